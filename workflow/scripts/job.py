"""Runs one train or encode job: GPU slot, resumable training folder, log copy.

Snakemake counts GPUs (``resources: gpu=1``) but does not say *which* GPU a
job gets, so the job picks one itself: it takes an exclusive ``flock`` on one
lock file per visible GPU (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)
and runs the command with ``CUDA_VISIBLE_DEVICES`` set to that GPU. Locks are
released by the kernel when the job ends, even when it is killed. Under SLURM
each job sees only the GPU it was given, so the lock is uncontended.

Usage::

    job.py run [--gpu] -- CMD ...
    job.py train --out-dir DIR --log-copy FILE [--resume] [--gpu] -- conmh train ...
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
VOLATILE = {"--threads": 1, "--device": 1, "--resume": 0, "--no-progress": 0}


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
def gpu_slot(gpus: list[str], locks: Path, poll: float = 5.0) -> Iterator[str | None]:
    """Hold an exclusive lock on one of ``gpus`` for the duration; None when there is no GPU."""
    if not gpus:
        yield None
        return
    waited = False
    while True:
        for gpu in gpus:
            fh = open(locks / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield gpu
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if not waited:
            print(f"job: all GPUs ({', '.join(gpus)}) are busy; waiting for one", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll)


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


def code_fingerprint() -> str:
    """sha256 over the training modules of the installed ``conmh`` package (found without importing it)."""
    spec = importlib.util.find_spec("conmh")
    if spec is None or not spec.submodule_search_locations:
        return "conmh-not-found"
    root = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        path = root / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    return digest.hexdigest()


def run_identity(cmd: list[str]) -> dict:
    return {"command": stable_command(cmd), "code": code_fingerprint()}


def prepare_train_dir(out_dir: Path, cmd: list[str], resume: bool) -> bool:
    """Make ``out_dir`` ready for ``cmd``; True when the run reuses its checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = json.loads((out_dir / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    same = isinstance(state, dict) and all(state.get(k) == v for k, v in run_identity(cmd).items())
    if resume and same and (out_dir / "checkpoint.pt").exists():
        return True
    for name in TRAIN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    write_state(out_dir, cmd, complete=False)
    return False


def write_state(out_dir: Path, cmd: list[str], complete: bool) -> None:
    tmp = out_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps({**run_identity(cmd), "complete": complete}, indent=1) + "\n")
    os.replace(tmp, out_dir / STATE)


def copy_file(src: Path, dst: Path) -> None:
    """Copy through a temporary name so that ``dst`` is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run(cmd: list[str], gpu: bool) -> int:
    env = dict(os.environ)
    with gpu_slot(visible_gpus(env) if gpu else [], lock_dir()) as slot:
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
            print(f"job: running on GPU {slot}", file=sys.stderr, flush=True)
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
    parser.add_argument("--gpu", action="store_true", help="hold one GPU (CUDA_VISIBLE_DEVICES) for the command")
    parser.add_argument("--out-dir", type=Path, help="train: the run's folder")
    parser.add_argument("--log-copy", type=Path, help="train: where to copy train_log.jsonl afterwards")
    parser.add_argument("--resume", action="store_true", help="train: reuse the checkpoint of an identical run")
    parser.add_argument("--import-checkpoint", type=Path, help="train: use this checkpoint instead of training")
    args = parser.parse_args(argv)

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
    if prepare_train_dir(args.out_dir, cmd, args.resume):
        print(f"job: reusing the checkpoint of the same run in {args.out_dir}", file=sys.stderr, flush=True)
        cmd = cmd + ["--resume"]
    status = run(cmd, args.gpu)
    if status == 0:
        write_state(args.out_dir, cmd, complete=True)
        copy_file(args.out_dir / "train_log.jsonl", args.log_copy)
    return status


if __name__ == "__main__":
    sys.exit(main())
