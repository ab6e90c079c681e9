"""The SLURM cluster the cluster tests submit to, and helpers to submit jobs and wait for them.

The tests need a running cluster with job accounting (``sacct``), at least two
nodes, the account and partitions they submit to, and the Snakemake executor
plugin. ``tests/cluster/slurm-localhost.sh start`` makes such a cluster on
this machine. Without one the tests are skipped, with the reason; with
``CONMH_REQUIRE_CLUSTER`` set (as in .ci/run) they fail instead.

The site settings are those of the slurm profile (``CONMH_SLURM_ACCOUNT``,
``CONMH_SLURM_PARTITION``, ``CONMH_SLURM_GPU_PARTITION``); when none is set the
tests use the localhost cluster's account "conmh" and partitions "cpu" and "gpu".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRE = "CONMH_REQUIRE_CLUSTER"
SITE_VARIABLES = ("CONMH_SLURM_ACCOUNT", "CONMH_SLURM_PARTITION", "CONMH_SLURM_GPU_PARTITION")
LOCALHOST_SITE = {"CONMH_SLURM_ACCOUNT": "conmh", "CONMH_SLURM_PARTITION": "cpu", "CONMH_SLURM_GPU_PARTITION": "gpu"}
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
START_HINT = "start one with `tests/cluster/slurm-localhost.sh start` (root, Debian)"


class ClusterProblem(Exception):
    """The cluster cannot run these tests; the message says why."""


def slurm(*args: str, timeout: float = 60) -> str:
    """stdout of a SLURM command; ClusterProblem when it fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterProblem(f"`{' '.join(args)}` failed: {exc}") from None
    if proc.returncode != 0:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no message"])[-1]
        raise ClusterProblem(f"`{' '.join(args)}` failed: {last}")
    return proc.stdout


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[str, ...]
    node_memory_mb: int  # the smallest RealMemory of the nodes
    site: dict[str, str]  # CONMH_SLURM_* variables the tests run with

    @property
    def account(self) -> str:
        return self.site["CONMH_SLURM_ACCOUNT"]

    @property
    def partition(self) -> str:
        return self.site["CONMH_SLURM_PARTITION"]

    @property
    def gpu_partition(self) -> str:
        return self.site.get("CONMH_SLURM_GPU_PARTITION") or self.partition

    def env(self) -> dict[str, str]:
        """The environment of a Snakemake or sbatch call: this process's, with the site variables."""
        return {**{k: v for k, v in os.environ.items() if k not in SITE_VARIABLES}, **self.site}


def find_cluster() -> Cluster:
    for tool in ("sbatch", "scancel", "sacct", "sacctmgr", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            raise ClusterProblem(f"`{tool}` not found: no SLURM client here; {START_HINT}")
    try:
        if "UP" not in slurm("scontrol", "ping"):
            raise ClusterProblem("slurmctld does not answer `scontrol ping`")
    except ClusterProblem as exc:
        raise ClusterProblem(f"{exc}; {START_HINT}") from None
    slurm("sacct", "-n", "-X", "-S", "now")  # accounting answers
    rows = [line.split() for line in slurm("sinfo", "-h", "-N", "-o", "%N %T %m").splitlines()]
    usable = {
        name: int(memory)
        for name, state, memory in rows
        if state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
    }
    if len(usable) < 2:
        raise ClusterProblem(f"the tests need 2 usable nodes, sinfo lists {rows}; {START_HINT}")
    given = {k: os.environ[k] for k in SITE_VARIABLES if os.environ.get(k)}
    site = given or LOCALHOST_SITE
    if "CONMH_SLURM_ACCOUNT" not in site or "CONMH_SLURM_PARTITION" not in site:
        raise ClusterProblem(
            "set both CONMH_SLURM_ACCOUNT and CONMH_SLURM_PARTITION (and optionally "
            "CONMH_SLURM_GPU_PARTITION), or none of them for the localhost cluster's"
        )
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    accounts = slurm("sacctmgr", "-n", "-P", "list", "associations", f"user={user}", "format=account").split()
    if site["CONMH_SLURM_ACCOUNT"] not in accounts:
        raise ClusterProblem(
            f"user {user} has no association with account {site['CONMH_SLURM_ACCOUNT']!r} "
            f"(has: {', '.join(sorted(set(accounts)))}); {START_HINT}"
        )
    partitions = {p.rstrip("*") for p in slurm("sinfo", "-h", "-o", "%P").split()}
    for key in ("CONMH_SLURM_PARTITION", "CONMH_SLURM_GPU_PARTITION"):
        if key in site and site[key] not in partitions:
            raise ClusterProblem(f"{key}={site[key]}: no such partition (have: {', '.join(sorted(partitions))})")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        raise ClusterProblem("the Snakemake SLURM executor plugin is not installed: pip install -e '.[cluster]'")
    return Cluster(nodes=tuple(sorted(usable)), node_memory_mb=min(usable.values()), site=site)


# --------------------------------------------------------------------------- jobs


def sbatch(cluster: Cluster, command: str, log: Path, *, cwd: Path = ROOT, extra: tuple[str, ...] = ()) -> str:
    """Submit ``command`` (a shell command line) as a one-task batch job; its job id."""
    args = [
        "sbatch",
        "--parsable",
        "-A",
        cluster.account,
        "-p",
        cluster.partition,
        "--ntasks=1",
        "--cpus-per-task=1",
        f"--mem={min(2000, cluster.node_memory_mb)}",
        "-o",
        str(log),
        "-D",
        str(cwd),
        *extra,
        "--wrap",
        command,
    ]
    proc = subprocess.run(args, env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    """The job's state as the accounting has it ("" before it is recorded)."""
    out = slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").split()
    return out[0].split()[0] if out else ""


def wait_until(condition, what: str, limit: float = 900, poll: float = 0.5):
    """Poll ``condition()`` until it returns something true; fail after ``limit`` seconds (a hung cluster)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"gave up after {limit:.0f}s waiting for {what}")


def wait_finished(job_id: str, limit: float = 900) -> str:
    return wait_until(lambda: (s := job_state(job_id)) in FINISHED and s, f"SLURM job {job_id} to end", limit)


def accounting(*args: str) -> list[dict[str, str]]:
    """sacct rows (``-P``) as dicts, for the fields named in ``-o``."""
    fields = args[args.index("-o") + 1].split(",")
    lines = slurm("sacct", "-n", "-P", *args).splitlines()
    return [dict(zip(fields, line.split("|"))) for line in lines if line]
