"""ConMH: Contrastive Masked Autoencoders for Self-Supervised Video Hashing (AAAI 2023).

A faithful re-implementation with fast Hamming-ranking evaluation. The
specification followed throughout is ``REFERENCE.md`` (shared with the project).
"""

__version__ = "0.1.0"
