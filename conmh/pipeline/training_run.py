"""A pipeline training folder that survives interruptions, and knows when it is stale.

The folder's ``pipeline_run.json`` records the run's identity: the ``conmh
train`` command (without the options allowed to change between attempts), a
fingerprint of the training code, and the world size (the data split depends
on it). With ``resume``, a folder whose identity matches keeps its
``checkpoint.pt``: an interrupted run continues from its last epoch, and a
finished one only writes its final model again (DVC deletes outputs before it
reruns a stage). Any other leftover is removed first, so a changed recipe or
changed code trains from scratch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import write_text_atomic

STATE = "pipeline_run.json"
TRAIN_FILES = ("checkpoint.pt", "model.pt", "train_log.jsonl")
# The modules of this package whose change makes a trained model stale: the one
# list (dvc.yaml's train stage names the same files; a test keeps them equal).
TRAINING_CODE = (
    "datasets.py",
    "features.py",
    "device.py",
    "loader.py",
    "losses.py",
    "model.py",
    "presets.py",
    "recipes.py",
    "train.py",
)
# Options that may change between an interrupted run and its continuation (value: how many arguments follow).
VOLATILE = {
    "--threads": 1,
    "--device": 1,
    "--resume": 0,
    "--no-progress": 0,
    "--activation-checkpointing": 0,
    "--eval-every": 1,  # evaluations leave the weights as they are
}


def training_code() -> list[Path]:
    """The training modules of this ``conmh`` package."""
    root = Path(__file__).resolve().parents[1]
    return [root / name for name in TRAINING_CODE]


def code_fingerprint() -> str:
    """sha256 over the training modules."""
    digest = hashlib.sha256()
    for path in training_code():
        digest.update(path.name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    return digest.hexdigest()


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


def run_identity(cmd: list[str], world_size: int = 1) -> dict:
    """What must not change for a checkpoint to be continued."""
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
    state = {**run_identity(cmd, world_size), "complete": complete}
    write_text_atomic(out_dir / STATE, json.dumps(state, indent=1) + "\n")
