"""LSH: sign of a random projection of the centred, mean-pooled features (docs/baselines.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..codes import Codes
from ..encode import encode_splits
from ..errors import ConfigError
from ..features import FeatureFiles, open_split
from . import check_bits, load_arrays, save_arrays

DISPLAY = "LSH"

# Training videos averaged to centre the projection: enough for a stable mean,
# few enough that the baseline never reads a whole 168 GB training set.
LSH_MEAN_SAMPLES = 10_000


def lsh_projection(dim: int, bits: int, seed: int) -> np.ndarray:
    """Gaussian random hyperplanes (dim, bits), a function of the seed only."""
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


def fit_state(dataset: str, data_dir: str | Path, bits: int, seed: int = 1, batch_size: int = 512) -> dict:
    """The centre (the mean pooled feature of up to ``LSH_MEAN_SAMPLES`` evenly spaced training videos,
    since CNN features are non-negative and uncentred hyperplanes would give nearly constant bits) and
    the projection. Videos are read ``batch_size`` at a time (FCVID: 200 MB)."""
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    with open_split(dataset, Path(data_dir), "train") as train:
        rows = np.unique(np.linspace(0, train.n - 1, min(train.n, LSH_MEAN_SAMPLES)).astype(np.int64))
        total = np.zeros(train.dim, dtype=np.float64)
        for start in range(0, len(rows), batch_size):
            total += train.take(rows[start : start + batch_size]).sum(axis=(0, 1), dtype=np.float64)
        centre = (total / (len(rows) * train.frames)).astype(np.float32)
        return {"centre": centre, "projection": lsh_projection(train.dim, bits, seed), "seed": seed}


def codes_of(state: dict, dataset: str, data_dir: str | Path, batch_size: int = 512) -> Codes:
    """Codes of the dataset under a fitted state, ``batch_size`` videos at a time."""
    centre, projection = state["centre"], state["projection"]
    bits = projection.shape[1]

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        out = np.empty((feats.n, bits), dtype=bool)
        for start, block in feats.iter_blocks(batch_size):
            out[start : start + len(block)] = (block.mean(axis=1) - centre) @ projection >= 0
        return out

    return encode_splits(dataset, Path(data_dir), bits, "lsh", encode, {"seed": int(state["seed"])})


def lsh_codes(dataset: str, data_dir: str | Path, bits: int, seed: int = 1, batch_size: int = 512) -> Codes:
    """Fit and encode in one go (``conmh lsh``)."""
    return codes_of(fit_state(dataset, data_dir, bits, seed, batch_size), dataset, data_dir, batch_size)


def fit(dataset: str, data_dir: str | Path, bits: int, model_file: str | Path, seed: int = 1) -> None:
    save_arrays(model_file, fit_state(dataset, data_dir, bits, seed))


def encode(model_file: str | Path, dataset: str, data_dir: str | Path, bits: int, **_fit_options) -> Codes:
    state = load_arrays(model_file)
    check_bits(model_file, state["projection"].shape[1], bits)
    return codes_of(state, dataset, data_dir)
