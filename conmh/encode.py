"""Videos to binary codes (docs/reference.md §5), for a trained model and for the LSH baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .checksums import file_sha256
from .codes import Codes, pack_bits
from .datasets import get_layout
from .errors import CheckpointError, ConfigError, DataError
from .features import FeatureFiles, open_split
from .labels import load_labels

if TYPE_CHECKING:
    import torch

    from .model import ConMH, ModelConfig

# torch is imported inside the functions that use it: the LSH baseline and the
# evaluation never need it, and importing it costs seconds per pipeline job.

# Training videos averaged to centre the LSH projection: enough for a stable
# mean, few enough that the baseline never reads a whole 168 GB training set.
LSH_MEAN_SAMPLES = 10_000


def encode_features(
    model: ConMH,
    feats: FeatureFiles,
    device: torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "encode",
) -> np.ndarray:
    """Bits (N, nbits) of every video: all frames visible, frame mean, sign (0 -> +1)."""
    import torch

    from .model import encode_bits

    if (feats.frames, feats.dim) != (model.cfg.frames, model.cfg.feature_dim):
        raise ConfigError(
            f"{feats.paths[0]}: key {feats.key!r} holds {feats.frames} frames x {feats.dim} dims, the model expects "
            f"{model.cfg.frames} x {model.cfg.feature_dim}"
        )
    model.eval().to(device)
    out = np.empty((feats.n, model.cfg.nbits), dtype=bool)
    starts = range(0, feats.n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        stop = min(feats.n, start + batch_size)
        with torch.no_grad():
            x = torch.from_numpy(feats.read(start, stop)).to(device)
            out[start:stop] = encode_bits(model.video_mean_codes(x)).cpu().numpy()
    return out


def _with_labels(dataset: str, data_dir: Path, bits: int, method: str, encode, attrs: dict) -> Codes:
    """Encode the database (and separate queries) of ``dataset`` and attach their labels."""
    layout = get_layout(dataset)
    with open_split(dataset, data_dir, "database") as db:
        database = pack_bits(encode(db, "database"))
    db_labels = load_labels(dataset, data_dir, "database")
    queries = query_labels = None
    if not layout.queries_are_database:
        with open_split(dataset, data_dir, "queries") as q:
            queries = pack_bits(encode(q, "queries"))
        query_labels = load_labels(dataset, data_dir, "queries")
        if query_labels.shape[1] != db_labels.shape[1]:
            q_file, q_key = layout.label_files("queries")[0]
            db_file, db_key = layout.label_files("database")[0]
            raise DataError(
                f"{data_dir / q_file}: key {q_key!r} has {query_labels.shape[1]} classes, but the database labels "
                f"({data_dir / db_file}, key {db_key!r}) have {db_labels.shape[1]}; they must share one class list"
            )
    return Codes(
        bits=bits,
        dataset=dataset,
        method=method,
        database=database,
        database_labels=db_labels,
        queries=queries,
        query_labels=query_labels,
        attrs=attrs,
    )


def encode_dataset(
    checkpoint: str | Path,
    dataset: str,
    data_dir: str | Path,
    *,
    cfg: ModelConfig | None = None,
    device: str = "auto",
    batch_size: int = 1024,
    progress: bool = False,
) -> Codes:
    """Codes of a dataset's database and queries from a checkpoint (own or official).

    ``cfg`` is needed for official checkpoints, which do not record their
    architecture; files written by ``conmh train`` carry it.
    """
    from .device import select_device
    from .model import load_checkpoint

    model = load_checkpoint(checkpoint, cfg=cfg)
    dev = select_device(device)
    attrs = {
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint": str(Path(checkpoint).name),
        "zero_mean_rule": "an exact 0 in the frame mean gives +1 (bit 1)",
    }

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        try:
            return encode_features(model, feats, dev, batch_size, progress, split)
        except ConfigError as exc:  # the features do not fit this checkpoint: name it too
            raise CheckpointError(f"{checkpoint}: checkpoint does not fit the data: {exc}") from None

    return _with_labels(dataset, Path(data_dir), model.cfg.nbits, "conmh", encode, attrs)


def lsh_projection(dim: int, bits: int, seed: int) -> np.ndarray:
    """Gaussian random hyperplanes (dim, bits), a function of the seed only."""
    return np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)


def lsh_codes(dataset: str, data_dir: str | Path, bits: int, seed: int = 1, batch_size: int = 512) -> Codes:
    """LSH baseline: sign of a random projection of the centred, mean-pooled features.

    Centred by the mean of (up to ``LSH_MEAN_SAMPLES`` evenly spaced) training
    videos, since CNN features are non-negative and uncentred hyperplanes
    would give nearly constant bits. Videos are read ``batch_size`` at a time
    (FCVID: 200 MB), so memory does not grow with the dataset.
    """
    if bits < 1:
        raise ConfigError(f"bits must be positive, got {bits}")
    data_dir = Path(data_dir)
    with open_split(dataset, data_dir, "train") as train:
        rows = np.unique(np.linspace(0, train.n - 1, min(train.n, LSH_MEAN_SAMPLES)).astype(np.int64))
        total = np.zeros(train.dim, dtype=np.float64)
        for start in range(0, len(rows), batch_size):
            total += train.take(rows[start : start + batch_size]).sum(axis=(0, 1), dtype=np.float64)
        centre = (total / (len(rows) * train.frames)).astype(np.float32)
        projection = lsh_projection(train.dim, bits, seed)

    def encode(feats: FeatureFiles, split: str) -> np.ndarray:
        out = np.empty((feats.n, bits), dtype=bool)
        for start, block in feats.iter_blocks(batch_size):
            out[start : start + len(block)] = (block.mean(axis=1) - centre) @ projection >= 0
        return out

    return _with_labels(dataset, data_dir, bits, "lsh", encode, {"seed": seed})
