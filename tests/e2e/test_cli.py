"""The command line: a whole run on a tiny miniature, clear errors and exit codes for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conmh.cli import main
from conmh.codes import read_codes, unpack_bits
from conmh.synthetic import MiniatureSpec, make_miniature
from helpers.conmh_runs import one_thread, train_argv

TINY = MiniatureSpec(n_train=64, n_database=40, n_queries=12, feature_dim=32, n_classes=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_miniature("activitynet", root / "data", seed=0, spec=TINY)
    # --default-allocator: in-process calls leave this test process's malloc settings alone. One thread,
    # named: the thread count changes the weights' bits, and tests before this one (tests/unit's
    # conftest) may have set this process's.
    with one_thread():
        code = main([*train_argv(root / "data", root / "run", epochs=2), "--default-allocator"])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def encoded(tiny: Path) -> Path:
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(tiny / "run" / "model.pt"),
                "--dataset",
                "activitynet",
                "--data-dir",
                str(tiny / "data"),
                "--out",
                str(tiny / "codes.h5"),
                "--no-progress",
            ]
        )
        == 0
    )
    return tiny / "codes.h5"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conmh.cli", *args], capture_output=True, text=True, timeout=300)


def test_train_encode_lsh_evaluate(tiny: Path, encoded: Path) -> None:
    codes = read_codes(encoded)
    assert (codes.bits, codes.method, codes.dataset) == (16, "conmh", "activitynet")
    assert codes.database.shape == (40, 2) and codes.queries.shape == (12, 2)
    assert len(codes.attrs["checkpoint_sha256"]) == 64
    assert (
        main(
            [
                "lsh",
                "--dataset",
                "activitynet",
                "--data-dir",
                str(tiny / "data"),
                "--bits",
                "16",
                "--out",
                str(tiny / "lsh.h5"),
            ]
        )
        == 0
    )
    for name in ("codes", "lsh"):
        assert main(["evaluate", str(tiny / f"{name}.h5"), "--out", str(tiny / f"{name}.json")]) == 0
        metrics = json.loads((tiny / f"{name}.json").read_text())
        assert metrics["protocol"] == "separate_queries"
        assert sorted(int(k) for k in metrics["map"]) == [5, 10, 20, 40, 60, 80, 100]
        assert all(0.0 <= v <= 1.0 for v in metrics["map"].values())
        assert "ascending database index" in metrics["tie_rule"]


@pytest.mark.parametrize("batch_size", [7, 512])
def test_lsh_is_the_sign_of_the_centred_mean_pooled_projection(tiny: Path, batch_size: int) -> None:
    from conmh.features import open_split
    from conmh.methods.lsh import lsh_codes, lsh_projection

    with open_split("activitynet", tiny / "data", "train") as train:  # 64 videos: all of them centre
        centre = train.read(0, train.n).mean(axis=(0, 1), dtype=np.float64)
    with open_split("activitynet", tiny / "data", "queries") as q:
        pooled = q.read(0, q.n).mean(axis=1, dtype=np.float64)
    expected = (pooled - centre) @ lsh_projection(32, 16, seed=3).astype(np.float64) >= 0
    got = unpack_bits(lsh_codes("activitynet", tiny / "data", 16, seed=3, batch_size=batch_size).queries, 16)
    assert (got == expected).mean() > 0.99  # float32 arithmetic in the codes: a bit at the sign boundary may differ
    assert got.any() and not got.all()


def test_encode_is_the_model_sign_of_the_frame_mean(tiny: Path, encoded: Path) -> None:
    from conmh.features import open_split
    from conmh.model import load_checkpoint

    model = load_checkpoint(tiny / "run" / "model.pt")
    with open_split("activitynet", tiny / "data", "queries") as q:
        mean = model.video_mean_codes(torch.from_numpy(q.read(0, q.n))).numpy()
    codes = read_codes(encoded)
    np.testing.assert_array_equal(unpack_bits(codes.queries, 16), mean >= 0)


def test_rerun_of_a_finished_training_changes_nothing(tiny: Path) -> None:
    before = (tiny / "run" / "model.pt").read_bytes()
    with one_thread():
        assert main([*train_argv(tiny / "data", tiny / "run", epochs=2), "--default-allocator"]) == 0
    assert (tiny / "run" / "model.pt").read_bytes() == before


def test_allocator_setting_does_not_change_the_result(tiny: Path, tmp_path: Path) -> None:
    """`conmh train` keeps freed memory by default (conmh.allocator); the weights are the same bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", "from conmh.allocator import keep_freed_memory as k; print(k())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "True"  # glibc took the setting (this suite runs on Linux)
    proc = run_cli(*train_argv(tiny / "data", tmp_path / "run", epochs=2))
    assert proc.returncode == 0, proc.stderr
    same = (tmp_path / "run" / "model.pt").read_bytes() == (tiny / "run" / "model.pt").read_bytes()
    assert same, "the model's bytes differ"  # (not the bytes themselves: pytest's diff of 2 MB takes minutes)


def test_missing_dataset_exit_4_lists_files(tmp_path: Path) -> None:
    proc = run_cli("verify", "yfcc", str(tmp_path))
    assert proc.returncode == 4
    assert "yfcc_train_feats_1.h5" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupted_file_exit_3(tmp_path: Path) -> None:
    make_miniature("activitynet", tmp_path, seed=0, spec=TINY)
    path = tmp_path / "train_feats.h5"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    proc = run_cli("verify", "activitynet", str(tmp_path))
    assert proc.returncode == 3, proc.stderr
    assert "train_feats.h5" in proc.stderr and "Traceback" not in proc.stderr


def test_misshaped_checkpoint_exit_3(tiny: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "encode",
        "--checkpoint",
        str(tiny / "run" / "model.pt"),
        "--dataset",
        "activitynet",
        "--data-dir",
        str(tiny / "data"),
        "--out",
        str(tmp_path / "c.h5"),
        "--bits",
        "32",
    )
    assert proc.returncode == 3
    assert "mis-shaped" in proc.stderr and "binary.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.h5").exists()


def test_bad_codes_file_and_bad_values(tmp_path: Path, tiny: Path) -> None:
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as fh:
        fh["x"] = np.zeros(3)
    proc = run_cli("evaluate", str(bad), "--out", str(tmp_path / "m.json"))
    assert proc.returncode == 3 and "bad.h5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.json").exists()
    assert (
        main(
            [
                "train",
                "--dataset",
                "activitynet",
                "--data-dir",
                str(tiny / "data"),
                "--bits",
                "16",
                "--out-dir",
                str(tmp_path / "r"),
                "--mask-ratio",
                "1.5",
                "--device",
                "cpu",
                "--default-allocator",
            ]
        )
        == 3
    )


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "nope"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "x.h5", "--out", "m.json", "--ks", "5,0"])
    assert exc.value.code == 2


def test_every_option_has_help() -> None:
    from conmh.cli import build_parser

    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"conmh {name} {action.option_strings or action.dest} has no help"
