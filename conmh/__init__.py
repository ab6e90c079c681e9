"""ConMH: Contrastive Masked Autoencoders for Self-Supervised Video Hashing (AAAI 2023).

A faithful re-implementation with fast Hamming-ranking evaluation. The
specification followed throughout is the repository's ``docs/reference.md``.
"""

__version__ = "0.1.0"
