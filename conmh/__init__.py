"""ConMH: Contrastive Masked Autoencoders for Self-Supervised Video Hashing (AAAI 2023).

A faithful re-implementation with fast Hamming-ranking evaluation. The
specification followed throughout is the repository's ``docs/reference.md``.

The Python API (README, "Python API") is importable from here; each name is
imported on first use, so ``import conmh`` stays light (no torch).
"""

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "load_model": "conmh.api",
    "encode_videos": "conmh.api",  # not "encode": that is the module conmh.encode
    "map_at_k": "conmh.metrics",
    "average_precision_at_k": "conmh.metrics",
    "precision_recall_at_radius": "conmh.metrics",
    "per_class_map": "conmh.metrics",
    "full_ranking_average_precision": "conmh.metrics",
    "fit_itq": "conmh.methods.itq",
    "itq_bits": "conmh.methods.itq",
    "hamming_search": "conmh.hamming",
    "write_generic": "conmh.generic",
    "pack_bits": "conmh.codes",
    "unpack_bits": "conmh.codes",
    "read_codes": "conmh.codes",
    "write_codes": "conmh.codes",
    "Codes": "conmh.codes",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'conmh' has no attribute {name!r}")
