"""A tiny ``conmh train`` / ``conmh encode`` run and what is compared between runs: shared by
tests/e2e/test_reliability.py and the fault-injection soak (tests/helpers/fault_injection.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATASET = "activitynet"
BATCH = 16


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
