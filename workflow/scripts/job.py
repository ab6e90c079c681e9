"""Runs one train or encode job: GPU slots, torchrun launch, resumable training folder, log copy.

Snakemake counts GPUs (``resources: gpu=N``) but does not say *which* GPUs a
job gets, so the job picks them itself: it takes an exclusive ``flock`` on one
lock file per visible GPU (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)
and runs the command with ``CUDA_VISIBLE_DEVICES`` set to those GPUs. Locks
are released by the kernel when the job ends, even when it is killed. Under
SLURM each job sees only the GPUs it was given, so the locks are uncontended.

Data-parallel training (``--nproc-per-node N``, ``--nnodes M``, from the
config's ``distributed`` section) starts ``conmh train`` under torchrun
(``python -m torch.distributed.run``): on one node with ``--standalone``; on
several nodes inside a SLURM allocation, one torchrun per node through
``srun``, meeting at the allocation's first node (c10d rendezvous).

Usage::

    job.py run [--gpu] -- CMD ...
    job.py train --out-dir DIR --log-copy FILE [--resume] [--gpu] [--nproc-per-node N] [--nnodes M]
                 -- conmh train ...
    job.py train --out-dir DIR --log-copy FILE --import-checkpoint FILE

With ``--resume``, ``train`` reuses the folder's ``checkpoint.pt`` when it was
written by the same command and the same training code (a fingerprint of the
``conmh`` modules listed in TRAINING_CODE): an interrupted run continues from
its last epoch, and a finished one only writes its final model again (DVC
deletes outputs before it reruns a stage). Any other leftover checkpoint is
removed first, so a changed recipe or changed code trains from scratch. Without
``--resume`` every run starts from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

STATE = "pipeline_run.json"
TRAIN_FILES = ("checkpoint.pt", "model.pt", "train_log.jsonl")
# Modules whose changes make an earlier checkpoint stale (dvc.yaml lists them as train deps).
TRAINING_CODE = ("data.py", "loader.py", "losses.py", "model.py", "recipes.py", "train.py")
# Options that may change between an interrupted run and its continuation.
VOLATILE = {"--threads": 1, "--device": 1, "--resume": 0, "--no-progress": 0, "--activation-checkpointing": 0}
# torchrun's default rendezvous port; MASTER_PORT overrides it for multi-node runs.
RDZV_PORT = 29500


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """GPU ids this job may use: CUDA_VISIBLE_DEVICES entries, else those nvidia-smi lists, else none."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",")]
        return [g for g in ids if g and not g.startswith("-")]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def lock_dir() -> Path:
    path = Path(os.environ.get("CONMH_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"conmh-gpu-locks-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def gpu_slots(gpus: list[str], locks: Path, count: int = 1, poll: float = 5.0) -> Iterator[list[str]]:
    """Hold exclusive locks on ``count`` of ``gpus`` for the duration; [] when there is no GPU."""
    if not gpus:
        yield []
        return
    if count > len(gpus):
        raise JobError(f"the job needs {count} GPUs, but only {len(gpus)} are visible ({', '.join(gpus)})")
    waited = False
    while True:
        held: list[tuple[str, object]] = []
        for gpu in gpus:
            fh = open(locks / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            held.append((gpu, fh))
            if len(held) == count:
                break
        try:
            if len(held) == count:
                yield [gpu for gpu, _ in held]
                return
        finally:
            for _, fh in held:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
        if not waited:
            print(f"job: waiting for {count} free GPU(s) of {', '.join(gpus)}", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll)


class JobError(Exception):
    """A job that cannot start as configured (exit status 2, one line)."""


def _slurm_output(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise JobError(f"`{' '.join(args)}` failed: {str(detail).strip()}") from None


def allocation_nodes(job_id: str) -> list[str]:
    """Host names of the whole allocation of SLURM job ``job_id``, first node first, asked of slurmctld.

    Not read from the environment: inside a job step (Snakemake's SLURM plugin
    runs every job in a one-task step) SLURM_JOB_NODELIST and SLURM_NNODES
    describe the step's single node, not the allocation.
    """
    nodelist = _slurm_output(["squeue", "-h", "-j", job_id, "-o", "%N"]).strip()
    if not nodelist:
        raise JobError(f"squeue lists no nodes for SLURM job {job_id}")
    return _slurm_output(["scontrol", "show", "hostnames", nodelist]).split()


def srun_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the SLURM_* and SRUN_* variables of the current step (SLURM_CONF kept), so that
    ``srun --jobid`` takes the allocation's nodes from slurmctld rather than the step's from the environment."""
    return {k: v for k, v in env.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SRUN_"))}


def launch_command(cmd: list[str], nproc_per_node: int, nnodes: int, env: dict[str, str]) -> list[str]:
    """``cmd`` (``conmh train ...``) as it is started for ``nnodes`` x ``nproc_per_node`` processes."""
    if nproc_per_node < 1 or nnodes < 1:
        raise JobError(f"--nproc-per-node and --nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
    if nproc_per_node * nnodes == 1:
        return cmd
    if cmd[:2] != ["conmh", "train"]:
        raise JobError(f"only `conmh train` runs data-parallel, not {' '.join(cmd[:2])}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        return torchrun[:3] + ["--standalone"] + torchrun[3:] + ["-m", "conmh.cli", *cmd[1:]]
    if "SLURM_JOB_ID" not in env:
        raise JobError(f"training on {nnodes} nodes needs a SLURM allocation (run with the slurm profile), "
                       "or start torchrun on each node yourself")
    job_id = env["SLURM_JOB_ID"]
    nodes = allocation_nodes(job_id)
    if len(nodes) < nnodes:
        raise JobError(f"training on {nnodes} nodes, but SLURM job {job_id} has {len(nodes)} ({', '.join(nodes)}); "
                       f"submit it with --nodes={nnodes}")
    endpoint = f"{nodes[0]}:{env.get('MASTER_PORT', RDZV_PORT)}"
    rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                  "--rdzv-id", job_id]
    # --overlap: Snakemake's plugin already runs this job inside a one-task step of the allocation.
    # Run with srun_env(): the step's variables would confine srun to the step's node.
    srun = ["srun", "--overlap", f"--jobid={job_id}", f"--nodes={nnodes}", f"--ntasks={nnodes}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return srun + torchrun + rendezvous + ["-m", "conmh.cli", *cmd[1:]]


def stable_command(cmd: list[str]) -> list[str]:
    """``cmd`` without the options allowed to differ when a run is continued."""
    out, skip = [], 0
    for arg in cmd:
        if skip:
            skip -= 1
        elif arg in VOLATILE:
            skip = VOLATILE[arg]
        else:
            out.append(arg)
    return out


def training_code() -> list[Path]:
    """The training modules of the installed ``conmh`` package (found without importing it); [] if absent."""
    spec = importlib.util.find_spec("conmh")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return [root / name for name in TRAINING_CODE]


def code_fingerprint() -> str:
    """sha256 over the training modules of the installed ``conmh`` package."""
    paths = training_code()
    if not paths:
        return "conmh-not-found"
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    return digest.hexdigest()


def run_identity(cmd: list[str], world_size: int = 1) -> dict:
    """What must not change for a checkpoint to be continued (the data split depends on the world size)."""
    return {"command": stable_command(cmd), "code": code_fingerprint(), "world_size": world_size}


def prepare_train_dir(out_dir: Path, cmd: list[str], resume: bool, world_size: int = 1) -> bool:
    """Make ``out_dir`` ready for ``cmd``; True when the run reuses its checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = json.loads((out_dir / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    same = isinstance(state, dict) and all(state.get(k) == v for k, v in run_identity(cmd, world_size).items())
    if resume and same and (out_dir / "checkpoint.pt").exists():
        return True
    for name in TRAIN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    write_state(out_dir, cmd, complete=False, world_size=world_size)
    return False


def write_state(out_dir: Path, cmd: list[str], complete: bool, world_size: int = 1) -> None:
    tmp = out_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps({**run_identity(cmd, world_size), "complete": complete}, indent=1) + "\n")
    os.replace(tmp, out_dir / STATE)


def copy_file(src: Path, dst: Path) -> None:
    """Copy through a temporary name so that ``dst`` is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run(cmd: list[str], gpu: bool, nproc_per_node: int = 1, nnodes: int = 1) -> int:
    env = dict(os.environ)
    cmd = launch_command(cmd, nproc_per_node, nnodes, env)
    if nnodes > 1:
        env = srun_env(env)
    # Several nodes: SLURM gave each node its GPUs; the locks here would only cover the first node.
    local_gpus = visible_gpus(env) if gpu and nnodes == 1 else []
    with gpu_slots(local_gpus, lock_dir(), count=nproc_per_node) as slots:
        if slots:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
            print(f"job: running on GPU {env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
        print(f"+ {' '.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("run", "train"))
    parser.add_argument("--gpu", action="store_true",
                        help="hold GPUs (one per process on this node) and set CUDA_VISIBLE_DEVICES to them")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="train: DDP processes per node (default 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="train: nodes, each running one torchrun (default 1)")
    parser.add_argument("--out-dir", type=Path, help="train: the run's folder")
    parser.add_argument("--log-copy", type=Path, help="train: where to copy train_log.jsonl afterwards")
    parser.add_argument("--resume", action="store_true", help="train: reuse the checkpoint of an identical run")
    parser.add_argument("--import-checkpoint", type=Path, help="train: use this checkpoint instead of training")
    args = parser.parse_args(argv)

    try:
        return _main(parser, args, cmd)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, cmd: list[str]) -> int:
    if args.mode == "run":
        if not cmd:
            parser.error("give the command after --")
        return run(cmd, args.gpu)
    if args.out_dir is None or args.log_copy is None:
        parser.error("train needs --out-dir and --log-copy")
    if args.import_checkpoint is not None:
        if not args.import_checkpoint.is_file():
            print(f"error: released checkpoint {args.import_checkpoint} does not exist", file=sys.stderr)
            return 4
        copy_file(args.import_checkpoint, args.out_dir / "model.pt")
        args.log_copy.parent.mkdir(parents=True, exist_ok=True)
        args.log_copy.write_text("")  # no training, no loss curve
        print(f"job: {args.import_checkpoint} used as {args.out_dir / 'model.pt'} (not trained)", file=sys.stderr)
        return 0
    if not cmd:
        parser.error("give the conmh train command after --")
    world_size = args.nproc_per_node * args.nnodes
    launch_command(cmd, args.nproc_per_node, args.nnodes, dict(os.environ))  # refuse a bad launch early
    if prepare_train_dir(args.out_dir, cmd, args.resume, world_size):
        print(f"job: reusing the checkpoint of the same run in {args.out_dir}", file=sys.stderr, flush=True)
        cmd = cmd + ["--resume"]
    status = run(cmd, args.gpu, args.nproc_per_node, args.nnodes)
    if status == 0:
        write_state(args.out_dir, cmd, complete=True, world_size=world_size)
        copy_file(args.out_dir / "train_log.jsonl", args.log_copy)
    return status


if __name__ == "__main__":
    sys.exit(main())
