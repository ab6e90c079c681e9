"""Data-parallel training on the CPU (gloo), started by torchrun like a multi-GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conmh.model import load_checkpoint
from conmh.pipeline import steps
from conmh.pipeline.config import data_dir, load_config
from conmh.pipeline.paths import Layout
from conmh.synthetic import MiniatureSpec, make_miniature

TRAIN = ["train", "--dataset", "activitynet", "--bits", "16", "--preset", "mini", "--batch-size", "16"]
TRAIN += ["--lr", "1e-3", "--device", "cpu", "--threads", "1", "--no-progress", "--deterministic"]
# Three processes, 97 videos in batches of 16: shares of 6, 6 and 4 videos, and a last batch of one video,
# which leaves two ranks an empty share.
WORLD = 3

# A torchrun entry point whose ranks write to folders of their own, as nodes that share no file system.
PER_RANK_FOLDERS = """
import os, sys
from conmh.cli import main
args = sys.argv[1:]
args[args.index("--out-dir") + 1] += f"/rank-{os.environ['RANK']}"
sys.exit(main(args))
"""


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The codes' all-gather is a plain collective: the autograd one of torch.distributed.nn.functional
    # is deprecated in torch 2.13 and warned at every step.
    assert "torch.distributed.nn.functional" not in proc.stderr


def torchrun(*args: str, world: int = WORLD) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["model_state_dict"]


def test_torchrun_trains_what_one_process_trains_and_resumes_without_a_shared_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spec = MiniatureSpec(n_train=97, n_database=20, n_queries=10, feature_dim=32, n_classes=4)
    make_miniature("activitynet", data, seed=0, spec=spec)
    args = [*TRAIN, "--data-dir", str(data), "--epochs", "2"]
    run(torchrun("-m", "conmh", *args, "--out-dir", str(tmp_path / "ddp")))
    run([sys.executable, "-m", "conmh", *args, "--out-dir", str(tmp_path / "one")])

    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in log] == [WORLD, WORLD]
    # The same computation as one process (same batches, masks and losses), up to float summation order.
    for key in ("loss", "recon", "contrast"):
        assert [e[key] for e in log] == pytest.approx([e[key] for e in one], rel=1e-5), key
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    # A lone process under torchrun joins a process group and takes the data-parallel path (DDP, the
    # gathers, the all-reduce; what tests/gpu runs under NCCL on one GPU): the plain run's weights exactly.
    run(torchrun("-m", "conmh", *args, "--out-dir", str(tmp_path / "alone"), world=1))
    alone = weights(tmp_path / "alone")
    assert all(torch.equal(alone[key], single[key]) for key in single)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=5e-5, msg=key)  # Adam amplifies rounding

    # Interrupted after one epoch, then resumed, each rank with its own folder: the ranks start from rank 0's
    # checkpoint and end with the weights of the uninterrupted run.
    entry = tmp_path / "per_rank_folders.py"
    entry.write_text(PER_RANK_FOLDERS)
    split = [*TRAIN, "--data-dir", str(data), "--out-dir", str(tmp_path / "split")]
    run(torchrun(str(entry), *split, "--epochs", "1"))
    run(torchrun(str(entry), *split, "--epochs", "2"))
    resumed = weights(tmp_path / "split" / "rank-0")
    assert all(torch.equal(resumed[key], ddp[key]) for key in ddp)
    assert not (tmp_path / "split" / "rank-1").exists()  # only rank 0 reads and writes files
    assert load_checkpoint(tmp_path / "split" / "rank-0" / "model.pt").cfg.nbits == 16


def test_pipeline_job_launches_ddp_from_the_config(tmp_path: Path, capfd, monkeypatch) -> None:
    """``distributed.nproc_per_node: 2`` in config.yaml: the pipeline's ConMH fit step runs two processes."""
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config.yaml")
    cfg["distributed"] = {"nproc_per_node": 2, "nnodes": 1}
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    cfg["miniature"] = {**cfg["miniature"], "preset": "mini", "train": {"epochs": 4, "batch_size": 16, "lr": 1e-3}}
    data = Path(data_dir(cfg, "activitynet-mini"))
    make_miniature(
        "activitynet",
        data,
        seed=0,
        spec=MiniatureSpec(n_train=64, n_database=20, n_queries=10, feature_dim=32, n_classes=4),
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert steps.fit(cfg, "conmh", "activitynet-mini", 16, threads=1) == 0
    assert "torch.distributed.run --standalone --nproc-per-node 2" in capfd.readouterr().err
    out = Path(Layout.of(cfg).fit_dir("conmh", "activitynet-mini", 16))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["meta"]["world_size"] == 2
    log = [
        json.loads(line)
        for line in Path(Layout.of(cfg).fit_log("conmh", "activitynet-mini", 16)).read_text().splitlines()
    ]
    assert len(log) == 4 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((out / "pipeline_run.json").read_text())["world_size"] == 2
    load_checkpoint(out / "model.pt")
