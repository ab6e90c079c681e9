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
from helpers.tiny import train_argv


@pytest.fixture(scope="module")
def evaluated(tiny_data: Path, tmp_path_factory) -> Path:
    """The run of tiny_model's command with --eval-every 2."""
    out = tmp_path_factory.mktemp("train-eval")
    assert main(train_argv(tiny_data, out, "--eval-every", "2")) == 0
    return out


def test_same_weights_with_and_without_evaluation(tiny_model: Path, evaluated: Path) -> None:
    for name in ("checkpoint.pt", "model.pt"):
        plain = torch.load(tiny_model / name, weights_only=True)
        with_eval = torch.load(evaluated / name, weights_only=True)
        assert plain["model_state_dict"].keys() == with_eval["model_state_dict"].keys()
        for key, value in plain["model_state_dict"].items():
            assert torch.equal(value, with_eval["model_state_dict"][key]), key
    plain = torch.load(tiny_model / "checkpoint.pt", weights_only=True)["optimizer_state_dict"]["state"]
    with_eval = torch.load(evaluated / "checkpoint.pt", weights_only=True)["optimizer_state_dict"]["state"]
    for index, state in plain.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(with_eval[index][key])), (index, key)


def test_log_has_map_every_n_epochs(tiny_data: Path, tiny_model: Path, evaluated: Path, tmp_path: Path) -> None:
    plain = [json.loads(line) for line in (tiny_model / "train_log.jsonl").read_text().splitlines()]
    log = [json.loads(line) for line in (evaluated / "train_log.jsonl").read_text().splitlines()]
    assert [("eval" in entry) for entry in log] == [False, True, False]
    assert all("eval" not in entry for entry in plain)
    assert [e["loss"] for e in log] == [e["loss"] for e in plain]
    evaluation = log[1]["eval"]
    assert list(evaluation["map"]) == [str(k) for k in KS] and evaluation["seconds"] >= 0
    assert all(0 <= v <= 1 for v in evaluation["map"].values())
    # the log's values are mAP@K of the held-out split encoded as `conmh encode` encodes it: a 2-epoch run's
    # evaluation after epoch 2 against its final model, encoded and evaluated
    assert main(train_argv(tiny_data, tmp_path / "two", "--epochs", "2", "--eval-every", "2")) == 0
    two = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    codes_file = tmp_path / "codes.h5"
    argv = ["encode", "--checkpoint", str(tmp_path / "two" / "model.pt"), "--dataset", "activitynet"]
    assert main([*argv, "--data-dir", str(tiny_data), "--out", str(codes_file), "--no-progress"]) == 0
    c = read_codes(codes_file)
    expected = map_at_k(c.database, c.database_labels, c.queries, c.query_labels, c.bits, KS)
    assert two[1]["eval"]["map"] == {str(k): v for k, v in expected.items()}
