"""The unit tests' shared tiny dataset and trained model (fixtures ``tiny_data`` and ``tiny_model`` of
tests/unit/conftest.py, built once a session): their sizes, and the ``conmh train`` command line that trained
the model, for the tests that check sizes or train a variant of it."""

from __future__ import annotations

from pathlib import Path

from conmh.synthetic import MiniatureSpec

DATASET = "activitynet"  # the layout with a split of each kind: training videos, database and separate queries
SPEC = MiniatureSpec(n_train=32, n_database=40, n_queries=12, feature_dim=32, n_classes=4)
SEED = 0
BITS = 16


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """``conmh train`` of the mini preset on the CPU: 3 epochs of 2 batches of 16 videos."""
    return [
        "train",
        *("--dataset", DATASET, "--data-dir", str(data), "--bits", str(BITS), "--out-dir", str(out)),
        *("--preset", "mini", "--epochs", "3", "--batch-size", "16", "--device", "cpu"),
        *("--no-progress", "--default-allocator", *extra),
    ]
