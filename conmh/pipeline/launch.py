"""How a training command is started: plainly, under torchrun, or under srun + torchrun on several nodes.

Data-parallel training (the config's ``distributed`` section) starts
``conmh train`` under torchrun (``python -m torch.distributed.run``): on one
node with ``--standalone``; on several nodes inside a SLURM allocation, one
torchrun per node through ``srun``, meeting at the allocation's first node
(c10d rendezvous).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import LaunchError

# Rendezvous ports of multi-node runs, one per SLURM job (rendezvous_port): below Linux's ephemeral
# ports (32768-60999) and above the localhost test cluster's daemons (16817-16822).
RDZV_PORTS = range(20000, 30000)


def _slurm_output(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise LaunchError(f"`{' '.join(args)}` failed: {str(detail).strip()}") from None


def allocation_nodes(job_id: str) -> list[str]:
    """Host names of the whole allocation of SLURM job ``job_id``, first node first, asked of slurmctld.

    Not read from the environment: inside a job step (Snakemake's SLURM plugin
    runs every job in a one-task step) SLURM_JOB_NODELIST and SLURM_NNODES
    describe the step's single node, not the allocation.
    """
    nodelist = _slurm_output(["squeue", "-h", "-j", job_id, "-o", "%N"]).strip()
    if not nodelist:
        raise LaunchError(f"squeue lists no nodes for SLURM job {job_id}")
    return _slurm_output(["scontrol", "show", "hostnames", nodelist]).split()


def rendezvous_port(env: dict[str, str]) -> int:
    """The port of the c10d store on the allocation's first node: ``MASTER_PORT`` when set, else the
    job's own port in RDZV_PORTS (job id modulo its length).

    Not one fixed port: two multi-node jobs whose first node is the same would meet in one store (the
    later job's torchrun agents find the port taken and become clients of the earlier job's store), and
    the later job would fail when the earlier one ends. With a port per job, two jobs share one only when
    their ids differ by a multiple of 10,000 and they run on the same first node at the same time.
    """
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return RDZV_PORTS[int(env["SLURM_JOB_ID"]) % len(RDZV_PORTS)]


def srun_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the SLURM_* and SRUN_* variables of the current step (SLURM_CONF kept), so that
    ``srun --jobid`` takes the allocation's nodes from slurmctld rather than the step's from the environment."""
    return {k: v for k, v in env.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SRUN_"))}


def launch_command(
    cmd: list[str],
    nproc_per_node: int,
    nnodes: int,
    env: dict[str, str],
    *,
    cpus_per_node: int | None = None,
    gpus_per_node: int = 0,
) -> list[str]:
    """``cmd`` (``conmh ...``) as it is started for ``nnodes`` x ``nproc_per_node`` processes.

    On several nodes the srun step asks for ``cpus_per_node`` CPUs (when given) and ``gpus_per_node``
    GPUs (when not 0) on each node: a step gets no GPU it does not ask for, whatever the job holds.

    Always as ``python -m conmh``, which imports ``conmh`` from the current folder
    first: a DVC experiment (``dvc exp run --temp`` or ``--queue``) runs in its own
    copy of the repository and so trains with its own copy of the code.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise LaunchError(f"nproc_per_node and nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
    if cmd[:1] != ["conmh"]:
        raise LaunchError(f"only conmh commands are launched, not {cmd[0]}")
    if nproc_per_node * nnodes == 1:
        return [sys.executable, "-m", "conmh", *cmd[1:]]
    if cmd[:2] != ["conmh", "train"]:
        raise LaunchError(f"only `conmh train` runs data-parallel, not {' '.join(cmd[:2])}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        return torchrun[:3] + ["--standalone"] + torchrun[3:] + ["-m", "conmh", *cmd[1:]]
    if "SLURM_JOB_ID" not in env:
        raise LaunchError(
            f"training on {nnodes} nodes needs a SLURM allocation (run with the slurm profile), "
            "or start torchrun on each node yourself"
        )
    job_id = env["SLURM_JOB_ID"]
    nodes = allocation_nodes(job_id)
    if len(nodes) < nnodes:
        raise LaunchError(
            f"training on {nnodes} nodes, but SLURM job {job_id} has {len(nodes)} "
            f"({', '.join(nodes)}); submit it with --nodes={nnodes}"
        )
    endpoint = f"{nodes[0]}:{rendezvous_port(env)}"
    rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", job_id]
    # --overlap: Snakemake's plugin already runs this job inside a one-task step of the allocation.
    # Run with srun_env(): the step's variables would confine srun to the step's node.
    srun = [
        "srun",
        "--overlap",
        f"--jobid={job_id}",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    if cpus_per_node:
        srun.append(f"--cpus-per-task={cpus_per_node}")  # one task per node: torchrun and its processes
    if gpus_per_node:
        srun.append(f"--gres=gpu:{gpus_per_node}")
    return srun + torchrun + rendezvous + ["-m", "conmh", *cmd[1:]]


def run_command(
    cmd: list[str],
    nproc_per_node: int = 1,
    nnodes: int = 1,
    env: dict[str, str] | None = None,
    *,
    cpus_per_node: int | None = None,
    gpus_per_node: int = 0,
) -> int:
    """Start ``cmd`` for ``nnodes`` x ``nproc_per_node`` processes and wait; its exit status."""
    env = dict(os.environ if env is None else env)
    argv = launch_command(cmd, nproc_per_node, nnodes, env, cpus_per_node=cpus_per_node, gpus_per_node=gpus_per_node)
    if nnodes > 1:
        env = srun_env(env)
    print(f"+ {' '.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.call(argv, env=env)
