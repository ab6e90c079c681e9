"""benchmarks/bench_gpu.py at tiny sizes on the CPU: every part measures and reports, a failing
part is recorded without stopping the others, and the in-memory encoding path encodes exactly
what the HDF5 path does. (The pipeline part runs the whole miniature pipeline: not here.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
VIDEOS, BATCH = 32, 16
TINY = [
    "--device",
    "cpu",
    "--scale",
    str(VIDEOS / 45585),
    "--dim",
    "32",
    "--preset",
    "mini",
    "--batch-size",
    str(BATCH),
    "--bits",
    "16",
    "--stream-videos",
    "24",
    "--encode-batch",
    "16",
]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out, work = tmp / "gpu_bench.json", tmp / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny shapes: one thread is fastest on a shared machine
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *TINY,
            "--parts",
            "resident,stream,encode",
            "--out",
            str(out),
            "--workdir",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout, work


def test_training_runs_report_positive_numbers(tiny_run):
    report, _, _ = tiny_run
    parts = report["parts"]
    assert report["setting"]["videos"] == VIDEOS
    assert parts["flops"]["status"] == "ok" and parts["flops"]["flops_per_step"] > 0
    assert all(p["best"] > 0 for p in parts["matmul_peak"]["peaks"].values())
    for name, precision, mode, deterministic in (
        ("resident_fp32", "fp32", "memory", False),
        ("resident_bf16", "bf16", "memory", False),
        ("resident_fp32_deterministic", "fp32", "memory", True),
        ("stream_fp32", "fp32", "stream", False),
    ):
        run = parts[name]
        assert run["status"] == "ok", run
        assert (run["precision"], run["data_mode"], run["epochs"]) == (precision, mode, 2)
        assert run["deterministic"] is deterministic
        assert run["epoch_seconds"] == run["epoch_log"][-1]["seconds"]  # the last epoch, not the warm-up
        for key in ("epoch_seconds", "videos_per_s", "tflops_per_s", "fraction_of_matmul_peak", "fcvid_epoch_s"):
            assert run[key] > 0, (name, key)
        assert np.isfinite(run["final_loss"])
        assert "peak_gpu_memory_gb" not in run  # CPU: no GPU memory to report
    assert parts["stream_fp32"]["videos"] == 24
    goal = report["goal"]
    assert goal["fcvid_epoch_s"] == pytest.approx(45585 / parts["resident_fp32"]["videos_per_s"])
    assert goal["epoch_goal_met"] is (goal["fcvid_epoch_s"] <= 2.0)
    assert goal["projected_805_epochs_min"] == pytest.approx(805 * goal["fcvid_epoch_s"] / 60)


def test_encoding_and_report(tiny_run):
    report, stdout, work = tiny_run
    parts = report["parts"]
    assert (parts["encode_memory"]["videos"], parts["encode_hdf5"]["videos"]) == (VIDEOS, 24)
    assert parts["encode_memory"]["videos_per_s"] > 0 and parts["encode_hdf5"]["videos_per_s"] > 0
    assert "pipeline" not in parts
    assert "| resident_fp32 |" in stdout and "| stream_fp32 |" in stdout
    assert "| resident_fp32_deterministic |" in stdout
    assert report["markdown"] in stdout
    assert list(work.iterdir()) == []  # scratch files (features, HDF5, checkpoints) removed


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    bench = load_bench()
    out = tmp_path / "r.json"
    report = bench.Report(out, budget_s=60)

    def broken() -> dict:
        raise ValueError("no such thing")

    assert report.run("first", broken)["status"] == "failed"
    assert report.run("second", lambda: {"value": 1})["status"] == "ok"
    assert report.run("third", lambda: {"value": 2}, min_seconds=1e6)["status"] == "skipped"
    saved = json.loads(out.read_text())["parts"]
    assert saved["first"]["error"] == "ValueError: no such thing"
    assert saved["second"]["value"] == 1
    assert "needs at least" in saved["third"]["reason"]


def test_memory_and_hdf5_encoding_give_the_same_codes(tmp_path):
    from conmh.encode import encode_features
    from conmh.features import FeatureFiles
    from conmh.model import ConMH, ModelConfig

    bench = load_bench()
    feats = bench.make_features(20, 25, 8, torch.device("cpu"), seed=3)
    assert feats.shape == (20, 25, 8) and feats.dtype == np.float32 and feats.min() == 0
    np.testing.assert_array_equal(feats, bench.make_features(20, 25, 8, torch.device("cpu"), seed=3))
    path = tmp_path / "fcv_train_feats.h5"
    bench.write_h5(path, feats)
    with h5py.File(path, "r") as fh:
        np.testing.assert_array_equal(fh["feats"][()], feats)
    torch.manual_seed(0)
    model = ConMH(ModelConfig.from_preset("mini", feature_dim=8, nbits=16))
    with FeatureFiles([path]) as ff:
        from_file = encode_features(model, ff, torch.device("cpu"), batch_size=8)
    from_memory = encode_features(model, bench.ArrayFeatures(feats), torch.device("cpu"), batch_size=8)
    np.testing.assert_array_equal(from_memory, from_file)


def test_unknown_part_is_refused():
    bench = load_bench()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--parts", "resident,gpu-magic"])
    assert exc.value.code == 2
