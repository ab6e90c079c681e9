"""Hashing methods by name: the rows of the table and the ``methods`` axis of the pipeline.

A method is one module of this package, ``conmh/methods/<name>.py``, with::

    DISPLAY = "My method"          # its name in tables and figures
    USES_GPU = False               # optional: the pipeline gives its jobs a GPU for real data
    def fit(dataset, data_dir, bits, model_file, **options) -> None:
        # learn from the dataset's training split; write the fitted model to model_file
    def encode(model_file, dataset, data_dir, bits, **options) -> conmh.codes.Codes:
        # codes of the database (and of the queries, where the dataset has its own)

``options`` are the method's entry under ``options`` in config.yaml, given to
both (ConMH's come from the preset and device keys instead). Listing the module's
name under ``methods`` in config.yaml puts it in the pipeline's runs, table,
figures and metrics; docs/methods.md shows a complete one. Modules import
torch inside their functions only: the Snakefile reads ``DISPLAY`` and
``USES_GPU`` without paying for it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError


def names() -> list[str]:
    """Every method this package holds."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The module of method ``name``; ConfigError naming the known methods when there is none."""
    if name not in names():
        raise ConfigError(f"unknown method {name!r}: known methods are {', '.join(names())} (conmh/methods/)")
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [attr for attr in ("DISPLAY", "fit", "encode") if not hasattr(module, attr)]
    if missing:
        raise ConfigError(
            f"method {name!r} ({module.__file__}) lacks {', '.join(missing)}: see conmh/methods/__init__.py"
        )
    return module


def method_file(name: str) -> Path:
    """The module file of method ``name`` (what a fit depends on)."""
    return Path(__file__).with_name(f"{name}.py")


def uses_gpu(name: str) -> bool:
    return bool(getattr(get(name), "USES_GPU", False))


def check_bits(model_file: str | Path, fitted: int, bits: int) -> None:
    if fitted != bits:
        raise ConfigError(f"{model_file}: fitted for {fitted}-bit codes, asked for {bits}")


def save_arrays(path: str | Path, arrays: dict) -> None:
    """A fitted model of numpy arrays and numbers, as a PyTorch file (tensors, the same bits)."""
    import numpy as np
    import torch

    from ..atomic import atomic_path

    state = {
        k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in arrays.items()
    }
    # Through a file object: given a path, torch.save names the archive's folder after the (temporary)
    # file, and the same arrays would give other bytes each time (DVC would see a changed model).
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_arrays(path: str | Path) -> dict:
    """What :func:`save_arrays` wrote, tensors back as numpy arrays."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
