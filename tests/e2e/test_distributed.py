"""Two-process DDP training on the CPU (gloo), started by torchrun like a multi-GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conmh.model import load_checkpoint
from conmh.pipeline import steps
from conmh.pipeline.config import data_dir, load_config
from conmh.pipeline.paths import Layout
from conmh.synthetic import MiniatureSpec, make_miniature


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_miniature(
        "activitynet",
        data,
        seed=0,
        spec=MiniatureSpec(n_train=96, n_database=20, n_queries=10, feature_dim=32, n_classes=4),
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "conmh",
        "train",
        "--dataset",
        "activitynet",
        "--data-dir",
        str(data),
        "--bits",
        "16",
        "--out-dir",
        str(out),
        "--preset",
        "mini",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 7))
    assert log[-1]["loss"] < log[0]["loss"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["meta"]["world_size"] == 2
    model = load_checkpoint(out / "model.pt")  # a usable checkpoint: loads and encodes
    codes = model.video_mean_codes(torch.randn(3, 30, 32))
    assert codes.shape == (3, 16)


def test_pipeline_job_launches_ddp_from_the_config(tmp_path: Path, capfd, monkeypatch) -> None:
    """``distributed.nproc_per_node: 2`` in config.yaml: the pipeline's train step runs two processes."""
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config.yaml")
    cfg["distributed"] = {"nproc_per_node": 2, "nnodes": 1}
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    cfg["miniature"] = {**cfg["miniature"], "preset": "mini", "train": {"epochs": 4, "batch_size": 16, "lr": 1e-3}}
    data = Path(data_dir(cfg, "activitynet"))
    make_miniature(
        "activitynet",
        data,
        seed=0,
        spec=MiniatureSpec(n_train=64, n_database=20, n_queries=10, feature_dim=32, n_classes=4),
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert steps.train(cfg, "activitynet", 16, threads=1) == 0
    assert "torch.distributed.run --standalone --nproc-per-node 2" in capfd.readouterr().err
    out = Path(Layout.of(cfg).train_dir("activitynet", 16))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["meta"]["world_size"] == 2
    log = [json.loads(line) for line in Path(Layout.of(cfg).train_log("activitynet", 16)).read_text().splitlines()]
    assert len(log) == 4 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((out / "pipeline_run.json").read_text())["world_size"] == 2
    load_checkpoint(out / "model.pt")
