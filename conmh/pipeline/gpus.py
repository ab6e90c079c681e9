"""Which GPUs a job uses.

Snakemake counts GPUs (``resources: gpu=N``) but does not say *which* GPUs a
job gets, so the job picks them itself: it takes an exclusive ``flock`` on one
lock file per visible GPU (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)
and runs with ``CUDA_VISIBLE_DEVICES`` set to those GPUs. The kernel releases
the locks when the job ends, even when it is killed. Inside a SLURM job the
locks are the job's own (lock_dir), since SLURM already gives each job its GPUs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import LaunchError


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
    return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def lock_dir() -> Path:
    """The folder of the lock files: $CONMH_GPU_LOCK_DIR, default /tmp/conmh-gpu-locks-<uid>; inside a SLURM
    job, its subfolder slurm-<job id>.

    SLURM gives each job its GPUs exclusively, and under its device constraint every job sees its GPUs as
    0..n-1: locks shared between jobs would make one user's jobs on a node wait for one another over GPU
    "0" when each has a GPU of its own. Jobs run within one allocation (a local Snakemake run inside
    salloc) share its GPUs, and its locks.
    """
    default = Path(tempfile.gettempdir()) / f"conmh-gpu-locks-{os.getuid()}"
    path = Path(os.environ.get("CONMH_GPU_LOCK_DIR") or default)
    if os.environ.get("SLURM_JOB_ID"):
        path = path / f"slurm-{os.environ['SLURM_JOB_ID']}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def gpu_slots(gpus: list[str], locks: Path, count: int = 1, poll: float = 5.0) -> Iterator[list[str]]:
    """Hold exclusive locks on ``count`` of ``gpus`` for the duration; [] when there is no GPU."""
    if not gpus:
        yield []
        return
    if count > len(gpus):
        raise LaunchError(f"the job needs {count} GPUs, but only {len(gpus)} are visible ({', '.join(gpus)})")
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


@contextlib.contextmanager
def on_free_gpus(count: int) -> Iterator[list[str]]:
    """Set CUDA_VISIBLE_DEVICES of this process (and its children) to ``count`` free GPUs for the duration.

    ``count`` 0, or a machine without GPUs, changes nothing.
    """
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with gpu_slots(visible_gpus() if count else [], lock_dir(), count=count) as slots:
        if slots:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
            print(f"job: running on GPU {os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
        try:
            yield slots
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
