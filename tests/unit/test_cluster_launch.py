"""Unit tests of how a training job asks SLURM for its resources: a rendezvous port per job, GPUs
per node (the job's and its srun step's), and GPU locks that do not hold one job back for another's."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conmh.pipeline import config as settings
from conmh.pipeline import gpus, launch, steps

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["conmh", "train", "--dataset", "yfcc"]


@pytest.fixture
def two_nodes(monkeypatch) -> list[str]:
    """Every SLURM job runs on the same two nodes."""
    nodes = ["gpu07", "gpu08"]
    monkeypatch.setattr(launch, "allocation_nodes", lambda job_id: nodes)
    return nodes


def endpoint(argv: list[str]) -> str:
    return argv[argv.index("--rdzv-endpoint") + 1]


def srun_options(argv: list[str]) -> list[str]:
    return argv[: argv.index(sys.executable)]


def test_two_jobs_on_the_same_first_node_meet_at_different_ports(two_nodes):
    first, second = (endpoint(launch.launch_command(TRAIN, 4, 2, {"SLURM_JOB_ID": job})) for job in ("4242", "4243"))
    assert first.startswith("gpu07:") and second.startswith("gpu07:") and first != second
    assert all(int(e.split(":")[1]) in range(20000, 30000) for e in (first, second))
    # The same job always gets the same port (a requeued job keeps its id); MASTER_PORT chooses one.
    assert endpoint(launch.launch_command(TRAIN, 4, 2, {"SLURM_JOB_ID": "4242"})) == first
    assert endpoint(launch.launch_command(TRAIN, 4, 2, {"SLURM_JOB_ID": "4243", "MASTER_PORT": "29611"})) == (
        "gpu07:29611"
    )


def test_the_srun_step_asks_for_the_gpus_and_cpus_of_each_node(two_nodes):
    argv = launch.launch_command(TRAIN, 4, 2, {"SLURM_JOB_ID": "7"}, cpus_per_node=8, gpus_per_node=4)
    assert srun_options(argv)[-2:] == ["--cpus-per-task=8", "--gres=gpu:4"]
    cpu_run = launch.launch_command(TRAIN, 1, 2, {"SLURM_JOB_ID": "7"}, cpus_per_node=1)
    assert srun_options(cpu_run)[-1] == "--cpus-per-task=1" and not any("gpu" in a for a in srun_options(cpu_run))


def test_the_train_step_passes_its_gpus_per_node_and_threads_to_srun(two_nodes, tmp_path, monkeypatch):
    cfg = settings.load_config(ROOT / "config.yaml")
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    cfg["distributed"] = {"nproc_per_node": 4, "nnodes": 2}
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    started: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "call", lambda argv, env: started.append(argv) or 1)
    assert steps.train(cfg, "fcvid", 64, threads=8) == 1
    (argv,) = started
    assert srun_options(argv)[0] == "srun" and srun_options(argv)[-2:] == ["--cpus-per-task=8", "--gres=gpu:4"]


def test_a_multi_node_gpu_job_asks_slurm_for_gpus_per_node():
    cfg = settings.load_config(ROOT / "config.yaml")
    cfg["distributed"] = {"nproc_per_node": 4, "nnodes": 2}
    # Not --gpus=8, which SLURM may split 5 + 3 between the nodes: 4 on each node.
    assert (settings.train_gpus(cfg, "fcvid"), settings.train_gres(cfg, "fcvid")) == (0, "gpu:4")
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm.utils")

    class Job:  # what the SLURM plugin reads of a job: its resources
        def __init__(self, **resources):
            self.resources = type("Resources", (dict,), {"__getattr__": dict.__getitem__})(resources)

    job = Job(gpu=settings.train_gpus(cfg, "fcvid"), gres=settings.train_gres(cfg, "fcvid"))
    assert plugin.set_gres_string(job).split() == ["--gres=gpu:4"]
    # One node: the `gpu` resource, which a local Snakemake run counts (--resources gpu=N).
    cfg["distributed"] = {"nproc_per_node": 4, "nnodes": 1}
    assert (settings.train_gpus(cfg, "fcvid"), settings.train_gres(cfg, "fcvid")) == (4, "")
    job = Job(gpu=settings.train_gpus(cfg, "fcvid"), gres=settings.train_gres(cfg, "fcvid"))
    assert plugin.set_gres_string(job).split() == ["--gpus=4"]


class Waited(Exception):
    """Raised instead of the sleep of a job that found no free GPU (gpu_slots sleeps, then looks again)."""


def _never_sleep(seconds: float) -> None:
    raise Waited


def test_jobs_of_different_slurm_allocations_never_wait_for_each_others_gpu_0(tmp_path, monkeypatch):
    # Under SLURM's device constraint every job sees its own GPU as "0".
    monkeypatch.setenv("CONMH_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setattr(gpus, "time", SimpleNamespace(sleep=_never_sleep))
    # The jobs are in this process: each lock file is opened anew, and flock locks of two open files exclude
    # each other as those of two processes do.
    with gpus.on_free_gpus(1) as held:
        assert held == ["0"]
        monkeypatch.setenv("SLURM_JOB_ID", "102")
        with gpus.on_free_gpus(1) as other:  # Waited: a job of another allocation waited for this job's GPU 0
            assert other == ["0"]
        # Jobs within one allocation (a local Snakemake run inside salloc) still share its GPUs' locks.
        monkeypatch.setenv("SLURM_JOB_ID", "101")
        with pytest.raises(Waited), gpus.on_free_gpus(1):
            pass
