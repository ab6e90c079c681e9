"""The Python API: ConMH on numpy arrays, for notebooks and other programs.

The command line and the pipeline run these same functions (``conmh encode``
through :func:`conmh.encode.encode_features`, ``conmh evaluate`` through
:mod:`conmh.metrics`, ``conmh search`` through :mod:`conmh.search`); this
module only gives them array-friendly entry points. ``import conmh`` exposes
them lazily, so importing the package does not import torch::

    import conmh
    model = conmh.load_model("model.pt")      # written by `conmh train`
    codes = conmh.encode_videos(model, features)  # (N, T, D) floats -> packed uint8 (N, ceil(bits / 8))
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .codes import pack_bits
from .datasets import get_layout
from .features import ArrayFeatures
from .presets import PAPER_PRESET

if TYPE_CHECKING:
    from .model import ConMH

__all__ = ["load_model", "encode_videos"]


def load_model(
    checkpoint: str | os.PathLike,
    *,
    bits: int | None = None,
    dataset: str | None = None,
    feature_dim: int | None = None,
    frames: int | None = None,
    preset: str = PAPER_PRESET,
) -> ConMH:
    """A ConMH model from a checkpoint: one written by ``conmh train`` (which records its architecture),
    or the authors' released ``.pth``, which does not: then give ``bits`` and either the ``dataset`` it was
    trained on (its frames and feature dim) or ``feature_dim`` and ``frames`` (and ``preset`` if not small).
    """
    from .model import ModelConfig, load_checkpoint

    if bits is None:
        return load_checkpoint(checkpoint)
    if dataset is not None:
        layout = get_layout(dataset)
        feature_dim, frames = feature_dim or layout.feature_dim, frames or layout.frames
    if feature_dim is None or frames is None:
        raise ValueError("an official checkpoint needs bits and either dataset or both feature_dim and frames")
    cfg = ModelConfig.from_preset(preset, feature_dim=feature_dim, frames=frames, nbits=bits)
    return load_checkpoint(checkpoint, cfg=cfg)


def encode_videos(model: ConMH, features: np.ndarray, *, device: str = "auto", batch_size: int = 1024) -> np.ndarray:
    """Packed codes, uint8 (N, ceil(bits / 8)), of features (N, frames, feature_dim): all frames visible,
    frame mean, sign (an exact 0 gives bit 1), exactly as ``conmh encode`` codes a dataset."""
    from .device import select_device
    from .encode import encode_features

    return pack_bits(encode_features(model, ArrayFeatures(features), select_device(device), batch_size))
