"""The pipeline on a real SLURM cluster (marker ``cluster``; see conftest.py for what they need).

* the .test configuration (one dataset at one code length, every rule and
  method) through ``--profile workflow/profiles/slurm`` gives the table of its
  local run, every job with the account and partition the environment chose;
* a ConMH fit (training) job with ``distributed.nnodes: 2`` spans two nodes: one torchrun
  per node started by srun, meeting through the c10d rendezvous, two gloo
  processes; it ends with the weights of a 2-process run on one node;
* two such trainings at once on the same two nodes each meet at their own
  port, and both end with the same weights;
* a training job cancelled with ``scancel`` after its first checkpoint and
  submitted again resumes, and ends with the codes of an uninterrupted run.
"""

from __future__ import annotations

import collections
import json
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from slurm_cluster import ROOT, Cluster, accounting, job_state, sbatch, slurm, wait_finished, wait_until

from conmh.pipeline.config import load_config
from conmh.pipeline.launch import rendezvous_port
from conmh.pipeline.paths import Layout
from conmh.pipeline.steps import train_command
from conmh.synthetic import MiniatureSpec, make_miniature
from helpers.repo import copy_repo

PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
POLLING_EVERY_SECOND = Path(__file__).parent / "snakemake_polling_every_second.py"  # snakemake, see there
GPU_RULES = ("fit", "encode")  # the rules the profile sends to CONMH_SLURM_GPU_PARTITION (every method's jobs)


def site_profile(cluster: Cluster, folder: Path, fit_tasks: int | None = None) -> Path:
    """A profile to put after workflow/profiles/slurm for this cluster: the same resources with memory
    requests capped at a node's memory (the profile asks up to 64 GB for real data), one thread per job
    (as the local run: the same threads give the same numbers), and the first status check after a second
    (a real cluster's jobs take minutes; these take seconds; see also snakemake_on_slurm)."""

    def capped(resources: dict) -> dict:
        return {k: min(int(v), cluster.node_memory_mb) if k == "mem_mb" else v for k, v in resources.items()}

    profile = yaml.safe_load(PROFILE.read_text())
    overlay = {
        "default-resources": capped(profile["default-resources"]),
        "set-resources": {rule: capped(res) for rule, res in profile["set-resources"].items()},
        "max-threads": 1,
        "slurm-init-seconds-before-status-checks": 1,
        "seconds-between-status-checks": 1,
    }
    if fit_tasks is not None:  # CPU training on several nodes: one task per node (see the profile)
        overlay["set-resources"]["fit"]["tasks"] = fit_tasks
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return folder


def snakemake_on_slurm(cluster: Cluster, repo: Path, site: Path, *args: str) -> tuple[str, str]:
    """Run Snakemake with the slurm profile in ``repo``, checking the jobs' status every second
    (snakemake_polling_every_second.py); (its output, the SLURM run id naming its jobs)."""
    proc = subprocess.run(
        [sys.executable, str(POLLING_EVERY_SECOND), "--profile", "workflow/profiles/slurm", "--profile", str(site)]
        + list(args),
        cwd=repo,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    run_id = re.search(r"SLURM run ID: (\S+)", text)
    assert run_id, text[-3000:]
    return text, run_id.group(1)


def jobs_of_run(run_id: str, since: str) -> list[dict[str, str]]:
    """The allocations (one per Snakemake job) a run submitted, with the rule each ran and the values of
    its wildcards (the plugin's comment: ``rule_<rule>_wildcards_<values joined by _>``)."""
    rows = accounting(
        "-X", "-S", since, "--name", run_id, "-o", "JobID,Comment,Account,Partition,State,NNodes,NodeList"
    )
    for row in rows:
        rule, _, values = row["Comment"].removeprefix("rule_").partition("_wildcards_")
        row["rule"], row["wildcards"] = rule, tuple(values.split("_")) if values else ()
    return rows


def now() -> str:
    return datetime.now().strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------- the default pipeline

# The .test configuration (one dataset at one code length, every rule), as CI runs it locally
# (tests/conftest.py `snakemake_test_run`). All 88 jobs of the default pipeline through SLURM take roughly
# twice the CPU time of the local run (every job starts Snakemake once more, about 3.5 s of CPU), too much
# for CI; the other datasets and code lengths run the same rules and commands.


def test_the_test_configuration_on_slurm_gives_the_table_of_the_local_run(cluster, snakemake_test_run, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    since = now()
    _, run_id = snakemake_on_slurm(
        cluster, repo, site_profile(cluster, tmp_path / "site"), "--configfile", ".test/config.yaml"
    )

    local = pd.read_csv(snakemake_test_run / "results" / "table.csv")
    assert len(local) == 3  # ConMH, ITQ, LSH
    pd.testing.assert_frame_equal(pd.read_csv(repo / "results" / "table.csv"), local)
    metrics = sorted((repo / "results" / "metrics").glob("*/*.json"))
    assert len(metrics) == 3
    for path in metrics:
        theirs = json.loads((snakemake_test_run / path.relative_to(repo)).read_text())
        assert json.loads(path.read_text())["map"] == theirs["map"], path.name

    jobs = jobs_of_run(run_id, since)
    counts = collections.Counter(job["rule"] for job in jobs)
    assert counts == {
        "download": 1,
        "verify": 1,
        "fit": 3,  # ConMH's training, ITQ's and LSH's fits
        "encode": 3,
        "evaluate": 3,
        "report": 1,
    }
    methods = collections.Counter(m for job in jobs if job["rule"] == "fit" for m in job["wildcards"])
    assert {m: methods[m] for m in ("conmh", "itq", "lsh")} == {"conmh": 1, "itq": 1, "lsh": 1}, jobs
    for job in jobs:
        assert job["State"] == "COMPLETED", job
        assert job["Account"] == cluster.account, job
        assert job["Partition"] == (cluster.gpu_partition if job["rule"] in GPU_RULES else cluster.partition), job


# --------------------------------------------------------------------------- two nodes


TWO_NODE_CONFIG = [
    "datasets=[activitynet-mini]",
    "bits=[16]",
    "distributed={nproc_per_node: 1, nnodes: 2}",
    "miniature={sizes: {activitynet-mini: {n_train: 192, n_database: 40, n_queries: 10, feature_dim: 32,"
    " n_classes: 4}}, train: {epochs: 3, batch_size: 32, lr: 1.0e-3}}",
]


def test_training_on_two_nodes_starts_one_torchrun_per_node(cluster, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    since = now()
    train_log = "results/fit/activitynet-mini/conmh-16bits.jsonl"
    site = site_profile(cluster, tmp_path / "site", fit_tasks=2)
    _, run_id = snakemake_on_slurm(cluster, repo, site, "--config", *TWO_NODE_CONFIG, "--", train_log)

    jobs = jobs_of_run(run_id, since)
    (train_job,) = [job for job in jobs if job["rule"] == "fit" and "conmh" in job["wildcards"]]
    assert train_job["NNodes"] == "2" and train_job["State"] == "COMPLETED", train_job
    nodes = slurm("scontrol", "show", "hostnames", train_job["NodeList"]).split()
    # What the fit step ran: srun starting torchrun on each node, meeting at the allocation's first node.
    log = (repo / "logs" / "fit" / "conmh-activitynet-mini-16bits.log").read_text()
    launch = srun_launch(log)
    assert launch[:8] == [
        "srun",
        "--overlap",
        f"--jobid={train_job['JobID']}",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=1",  # the job's threads; no GPU
    ]
    torchrun = launch[launch.index("torch.distributed.run") + 1 : launch.index("conmh") - 1]
    assert torchrun == [
        "--nproc-per-node",
        "1",
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{nodes[0]}:{rendezvous_port({'SLURM_JOB_ID': train_job['JobID']})}",
        "--rdzv-id",
        train_job["JobID"],
    ]
    # The accounting saw that step: 2 tasks on 2 nodes.
    steps = accounting("-j", train_job["JobID"], "-o", "JobID,NNodes,NTasks,NodeList,State")
    (step,) = [s for s in steps if s["NTasks"] == "2"]
    assert step["NNodes"] == "2" and step["State"] == "COMPLETED", steps

    out = repo / "work" / "fit" / "activitynet-mini" / "conmh-16bits"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["meta"]["world_size"] == 2
    assert json.loads((out / "pipeline_run.json").read_text())["world_size"] == 2
    assert [json.loads(line)["epoch"] for line in (repo / train_log).read_text().splitlines()] == [1, 2, 3]

    # The same training as 2 processes on one node (torchrun --standalone) gives the same weights.
    assert_same_weights(out / "model.pt", one_node_run(launch, tmp_path / "one-node", cwd=repo))


def srun_launch(log: str) -> list[str]:
    """The srun + torchrun command line ConMH's fit step printed into its log."""
    return next(line[2:].split() for line in log.splitlines() if line.startswith("+ srun "))


def one_node_run(launch: list[str], out_dir: Path, cwd: Path) -> Path:
    """The training of a multi-node ``launch`` run as 2 processes on one node (torchrun --standalone)
    into ``out_dir``; its model."""
    args = launch[launch.index("conmh") + 1 :]
    args[args.index("--out-dir") + 1] = str(out_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "conmh", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir / "model.pt"


def assert_same_weights(a: Path, b: Path) -> None:
    ours, theirs = (torch.load(p, weights_only=True)["model_state_dict"] for p in (a, b))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def real_data_run(folder: Path, data: Path, recipe: dict, **settings) -> tuple[dict, Path]:
    """The configuration (and its file in ``folder``) of a run training ActivityNet at 16 bits from the
    miniature in ``data`` as the real release (only those resume; linked in as a user links a release),
    on the CPU, every output in ``folder``."""
    cfg = load_config(ROOT / "config.yaml")
    paths = {k: str(folder / k) for k in ("work", "results", "logs")}
    cfg.update(preset="mini", device="cpu", datasets=["activitynet"], paths={**paths, "data": str(folder / "releases")})
    cfg.update(settings)
    cfg["activitynet"].update(recipe=recipe)
    (folder / "releases").mkdir(parents=True, exist_ok=True)
    (folder / "releases" / "activitynet").symlink_to(data)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return cfg, config


def train_step(config: Path) -> list[str]:
    """The pipeline's ConMH fit step (its training) of that run, one thread per process, as a job runs it."""
    return [
        *"conmh pipeline fit --method conmh --dataset activitynet --bits 16 --threads 1 --config".split(),
        str(config),
    ]


def training_or_ended(job: str, out_dir: Path) -> bool:
    """Whether SLURM job ``job`` has written its first checkpoint into ``out_dir``, or has ended."""
    return (out_dir / "checkpoint.pt").exists() or job_state(job) not in ("", "PENDING", "RUNNING")


def test_two_trainings_on_the_same_two_nodes_at_once_meet_each_at_its_own_port(cluster, tmp_path):
    data = tmp_path / "data"
    make_miniature(
        "activitynet",
        data,
        seed=0,
        spec=MiniatureSpec(n_train=128, n_database=40, n_queries=10, feature_dim=32, n_classes=4),
    )
    # 20 epochs (about 1 s each here): the first job still trains when the second has started and trained.
    recipe = {"epochs": 20, "batch_size": 32, "lr": 1e-3, "seed": 1}
    runs = [
        real_data_run(tmp_path / name, data, recipe, distributed={"nproc_per_node": 1, "nnodes": 2})
        for name in ("a", "b")
    ]
    out_dirs = [Path(Layout.of(cfg).fit_dir("conmh", "activitynet", 16)) for cfg, _ in runs]

    def submit(config: Path) -> str:  # on the cluster's two nodes (so the same first node), a CPU on each
        return sbatch(
            cluster, shlex.join(train_step(config)), config.parent / "job.out", extra=("--nodes=2", "--ntasks=2")
        )

    # The second job starts once the first trains, so it ends later: with one port for both jobs, its
    # torchrun agents would be clients of the first job's store, which goes when the first job ends.
    jobs = [submit(runs[0][1])]
    wait_until(lambda: training_or_ended(jobs[0], out_dirs[0]), f"the first checkpoint of job {jobs[0]}", poll=0.2)
    jobs.append(submit(runs[1][1]))
    wait_until(lambda: training_or_ended(jobs[1], out_dirs[1]), f"the first checkpoint of job {jobs[1]}", poll=0.2)
    assert not (out_dirs[0] / "model.pt").exists(), "the first training ended before the second trained"
    for job, (_, config) in zip(jobs, runs):
        assert wait_finished(job) == "COMPLETED", (config.parent / "job.out").read_text()[-3000:]

    rows = accounting("-X", "-j", ",".join(jobs), "-o", "JobID,NodeList")
    assert len(rows) == 2 and rows[0]["NodeList"] == rows[1]["NodeList"], rows
    first_node = slurm("scontrol", "show", "hostnames", rows[0]["NodeList"]).split()[0]
    launches = [srun_launch((config.parent / "job.out").read_text()) for _, config in runs]
    endpoints = [launch[launch.index("--rdzv-endpoint") + 1] for launch in launches]
    assert endpoints == [f"{first_node}:{rendezvous_port({'SLURM_JOB_ID': job})}" for job in jobs]
    assert endpoints[0] != endpoints[1]

    # Both trained as two processes (the same run): the same weights. That a two-node run gives the weights
    # of two processes on one node is the test above's; a third training here would only repeat it.
    for out_dir in out_dirs:
        assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["meta"]["world_size"] == 2
    assert_same_weights(out_dirs[0] / "model.pt", out_dirs[1] / "model.pt")


# --------------------------------------------------------------------------- scancel and resume


def codes_of(checkpoint: Path, data: Path, out: Path) -> dict[str, np.ndarray]:
    cmd = [
        "conmh",
        "encode",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "activitynet",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--preset",
        "mini",
        "--bits",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(out) as f:
        return {key: f[key][()] for key in ("database/codes", "queries/codes")}


def test_a_cancelled_training_job_resumes_and_ends_with_the_codes_of_an_uninterrupted_run(cluster, tmp_path):
    data = tmp_path / "data"
    make_miniature(
        "activitynet",
        data,
        seed=0,
        spec=MiniatureSpec(n_train=400, n_database=60, n_queries=20, feature_dim=64, n_classes=6),
    )
    epochs = 4
    cfg, config = real_data_run(tmp_path, data, {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "seed": 1})
    run_dir, straight = Path(Layout.of(cfg).fit_dir("conmh", "activitynet", 16)), tmp_path / "straight"
    train = train_command(cfg, "activitynet", 16) + ["--threads", "1"]
    train[train.index("--out-dir") + 1] = str(straight)
    job = train_step(config)

    def epochs_logged() -> list[int]:
        path = run_dir / "train_log.jsonl"
        return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []

    # The uninterrupted run, here, while the cluster runs the other.
    uninterrupted = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = sbatch(cluster, shlex.join(job), tmp_path / "first.out")
    # Cancel once the first checkpoint is written, while the job trains a later epoch.
    wait_until(lambda: training_or_ended(first, run_dir), f"the first checkpoint of job {first}", poll=0.1)
    slurm("scancel", first)
    assert wait_finished(first) == "CANCELLED", (tmp_path / "first.out").read_text()
    interrupted = epochs_logged()
    assert 1 <= len(interrupted) < epochs, interrupted
    assert not (run_dir / "model.pt").exists()

    second = sbatch(cluster, shlex.join(job), tmp_path / "second.out")
    assert wait_finished(second) == "COMPLETED", (tmp_path / "second.out").read_text()
    # (A change to conmh's training code between the two jobs would make the step start afresh.)
    assert "reusing the checkpoint of the same run" in (tmp_path / "second.out").read_text()
    assert epochs_logged() == list(range(1, epochs + 1))

    output, _ = uninterrupted.communicate(timeout=900)
    assert uninterrupted.returncode == 0, output[-3000:]
    assert_same_weights(run_dir / "model.pt", straight / "model.pt")
    resumed_codes = codes_of(run_dir / "model.pt", data, tmp_path / "resumed.h5")
    straight_codes = codes_of(straight / "model.pt", data, tmp_path / "straight.h5")
    for key in resumed_codes:
        assert np.array_equal(resumed_codes[key], straight_codes[key]), key
