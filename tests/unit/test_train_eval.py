"""`conmh train --eval-every N`: mAP@K of the held-out split in the training log every N epochs, and the
same weights (checkpoint, optimiser state, final model) as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conmh.cli import main
from conmh.codes import read_codes
from conmh.metrics import KS, map_at_k
from conmh.synthetic import MiniatureSpec, make_miniature

TINY = MiniatureSpec(n_train=48, n_database=30, n_queries=10, feature_dim=32, n_classes=4)


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--dataset", "activitynet", "--data-dir", str(data), "--bits", "16", "--out-dir", str(out)),
        *("--preset", "mini", "--epochs", "3", "--batch-size", "16", "--device", "cpu"),
        *("--no-progress", "--default-allocator", *extra),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-eval")
    make_miniature("activitynet", root / "data", seed=0, spec=TINY)
    assert main(train_argv(root / "data", root / "plain")) == 0
    assert main(train_argv(root / "data", root / "eval", "--eval-every", "2")) == 0
    return root


def test_same_weights_with_and_without_evaluation(runs: Path) -> None:
    for name in ("checkpoint.pt", "model.pt"):
        plain = torch.load(runs / "plain" / name, weights_only=True)
        evaluated = torch.load(runs / "eval" / name, weights_only=True)
        assert plain["model_state_dict"].keys() == evaluated["model_state_dict"].keys()
        for key, value in plain["model_state_dict"].items():
            assert torch.equal(value, evaluated["model_state_dict"][key]), key
    plain = torch.load(runs / "plain" / "checkpoint.pt", weights_only=True)["optimizer_state_dict"]["state"]
    evaluated = torch.load(runs / "eval" / "checkpoint.pt", weights_only=True)["optimizer_state_dict"]["state"]
    for index, state in plain.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(evaluated[index][key])), (index, key)


def test_log_has_map_every_n_epochs(runs: Path, tmp_path: Path) -> None:
    plain = [json.loads(line) for line in (runs / "plain" / "train_log.jsonl").read_text().splitlines()]
    log = [json.loads(line) for line in (runs / "eval" / "train_log.jsonl").read_text().splitlines()]
    assert [("eval" in entry) for entry in log] == [False, True, False]
    assert all("eval" not in entry for entry in plain)
    assert [e["loss"] for e in log] == [e["loss"] for e in plain]
    evaluation = log[1]["eval"]
    assert list(evaluation["map"]) == [str(k) for k in KS] and evaluation["seconds"] >= 0
    assert all(0 <= v <= 1 for v in evaluation["map"].values())
    # the log's values are mAP@K of the held-out split encoded as `conmh encode` encodes it: a 2-epoch run's
    # evaluation after epoch 2 against its final model, encoded and evaluated
    assert main(train_argv(runs / "data", tmp_path / "two", "--epochs", "2", "--eval-every", "2")) == 0
    two = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    codes_file = tmp_path / "codes.h5"
    argv = ["encode", "--checkpoint", str(tmp_path / "two" / "model.pt"), "--dataset", "activitynet"]
    assert main([*argv, "--data-dir", str(runs / "data"), "--out", str(codes_file), "--no-progress"]) == 0
    c = read_codes(codes_file)
    expected = map_at_k(c.database, c.database_labels, c.queries, c.query_labels, c.bits, KS)
    assert two[1]["eval"]["map"] == {str(k): v for k, v in expected.items()}
