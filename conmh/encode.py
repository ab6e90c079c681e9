"""Videos to binary codes with a ConMH model (docs/reference.md §5), and the split encoding every method uses."""

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
from .presets import PAPER_PRESET

if TYPE_CHECKING:
    import torch

    from .model import ConMH

# torch is imported inside the functions that use it: the baselines
# (conmh.methods) and the evaluation never need it, and importing it costs
# seconds per pipeline job.


def encode_features(
    model: ConMH,
    feats: FeatureFiles,
    device: torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "encode",
) -> np.ndarray:
    """Bits (N, nbits) of every video: all frames visible, frame mean, sign (0 -> +1).

    In float32 without TF32 (``conmh.device.numerics``). The caller's model is
    left as it was: where it is not on ``device``, a copy encodes; its
    train/eval mode is restored.
    """
    import copy

    import torch

    from .device import numerics
    from .model import encode_bits

    if (feats.frames, feats.dim) != (model.cfg.frames, model.cfg.feature_dim):
        raise ConfigError(
            f"{feats.paths[0]}: key {feats.key!r} holds {feats.frames} frames x {feats.dim} dims, the model expects "
            f"{model.cfg.frames} x {model.cfg.feature_dim}"
        )
    where = next(model.parameters()).device
    on_device = where.type == device.type and device.index in (None, where.index)
    net = model if on_device else copy.deepcopy(model).to(device)
    was_training = net.training
    net.eval()
    out = np.empty((feats.n, model.cfg.nbits), dtype=bool)
    starts = range(0, feats.n, batch_size)
    try:
        with numerics(), torch.no_grad():
            for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
                stop = min(feats.n, start + batch_size)
                x = torch.from_numpy(feats.read(start, stop)).to(device)
                out[start:stop] = encode_bits(net.video_mean_codes(x)).cpu().numpy()
    finally:
        net.train(was_training)
    return out


def encode_splits(dataset: str, data_dir: Path, bits: int, method: str, encode, attrs: dict) -> Codes:
    """Codes of ``dataset``'s database (and separate queries) with their labels: ``encode(feats, split)``
    gives the bits (N, bits) of one split's features."""
    layout = get_layout(dataset, data_dir)
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
    bits: int | None = None,
    preset: str = PAPER_PRESET,
    device: str = "auto",
    batch_size: int = 1024,
    progress: bool = False,
) -> Codes:
    """Codes of a dataset's database and queries from a checkpoint (own or official).

    Official checkpoints do not record their architecture: give their ``bits``
    (and ``preset`` if not the paper's); files written by ``conmh train`` carry it.
    """
    from .device import select_device
    from .model import ModelConfig, load_checkpoint

    cfg = None
    if bits is not None:
        with open_split(dataset, data_dir, "database") as feats:
            cfg = ModelConfig.from_preset(preset, feature_dim=feats.dim, frames=feats.frames, nbits=bits)
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

    return encode_splits(dataset, Path(data_dir), model.cfg.nbits, "conmh", encode, attrs)
