"""A fresh copy of the repository to run the pipeline in, and the commands that run there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Never copied: outputs of earlier runs and tool state.
IGNORED = {
    ".git",
    "data",
    "work",
    "results",
    "logs",
    ".snakemake",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "dvc.lock",
    "report.html",
    "cache",
    "tmp",
    "build",
    ".venv",
    ".ruff_cache",
    ".device",  # the GPU machine's own files (benchmarks/bench_gpu.py copies the repository there)
    ".whl",
}


def copy_repo(dest: Path) -> Path:
    """A fresh copy of the repository's sources (no data, no results, no tool state)."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        skip = {n for n in names if n in IGNORED and (n not in ("cache", "tmp") or here.name == ".dvc")}
        return skip | {n for n in names if n.endswith(".egg-info")}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def snakemake(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run(["snakemake", *args], cwd, timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr
