"""A tiny ``conmh train`` / ``conmh encode`` run and what is compared between runs: shared by
tests/e2e/test_reliability.py, tests/e2e/test_bad_inputs.py and the soak (benchmarks/soak.py)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET = "activitynet"
BATCH = 16
# The tests' run: two training steps per epoch, about a second in all.
TINY_SIZES = dict(n_train=32, n_database=24, n_queries=8, feature_dim=16, n_classes=4)
TINY_EPOCHS = 3


@dataclass
class Reference:
    """An uninterrupted run: the miniature it read, its training folder and its codes file."""

    data: Path
    run: Path
    codes: Path


def make_tiny_run(root: Path) -> Reference:
    """A tiny ActivityNet miniature, ``conmh train`` on it (TINY_EPOCHS epochs) and ``conmh encode``,
    in this process with one torch thread."""
    from conmh.cli import main
    from conmh.synthetic import MiniatureSpec, make_miniature
    from conmh.train import FINAL_MODEL

    ref = Reference(root / "data", root / "run", root / "codes.h5")
    make_miniature(DATASET, ref.data, seed=0, spec=MiniatureSpec(**TINY_SIZES))
    with one_thread():
        assert main(train_argv(ref.data, ref.run, epochs=TINY_EPOCHS)) == 0
        assert main(encode_argv(ref.data, ref.run / FINAL_MODEL, ref.codes)) == 0
    return ref


@contextlib.contextmanager
def one_thread():
    """Runs in this process use one torch thread (as the pipeline does), then the old setting returns."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_argv(data: Path, out: Path, *, epochs: int, bits: int = 16, dataset: str = DATASET) -> list[str]:
    """``conmh train`` arguments (without ``conmh``): the mini preset, one CPU thread."""
    return [
        "train",
        "--dataset",
        dataset,
        "--data-dir",
        str(data),
        "--bits",
        str(bits),
        "--out-dir",
        str(out),
        "--preset",
        "mini",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    ]


def encode_argv(data: Path, model: Path, out: Path, dataset: str = DATASET) -> list[str]:
    """``conmh encode`` arguments (without ``conmh``), one CPU thread."""
    return [
        "encode",
        "--checkpoint",
        str(model),
        "--dataset",
        dataset,
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    ]


def unpacked(path: Path) -> dict[str, np.ndarray]:
    """A codes file's bits (unpacked) and labels, by split."""
    from conmh.codes import read_codes, unpack_bits

    codes = read_codes(path)
    out = {"database": unpack_bits(codes.database, codes.bits), "database_labels": codes.database_labels}
    if codes.queries is not None:
        out["queries"] = unpack_bits(codes.queries, codes.bits)
        out["query_labels"] = codes.query_labels
    return out


def log_values(path: Path) -> list[tuple]:
    """The deterministic part of a training log (timings differ between runs)."""
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(e["epoch"], e["loss"], e["recon"], e["contrast"], e["lr"]) for e in entries]


def weights(path: Path) -> dict:
    """A checkpoint's model weights."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def truncate(path: Path, fraction: float) -> None:
    """Keep the first ``fraction`` of the file's bytes (a torn write)."""
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
