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


# The run of the DVC tests (tests/e2e/test_pipeline.py, tests/remote): one dataset at one code length,
# every stage (ActivityNet: separate queries, the protocol with the most files); the Snakemake fixture
# runs all nine, the other datasets and lengths take the same stages. All nine under DVC cost CI about
# 8 minutes.
DVC_RUN = ("activitynet", 64)


def one_run_config(config: dict, dataset: str, bits: int) -> dict:
    """config.yaml's content reduced to one dataset at one code length, every stage of it. The one place
    where the DVC tests depend on the configuration's layout."""
    return {
        **config,
        "datasets": [dataset],
        "bits": [bits],
        "dvc_data_dirs": {dataset: config["dvc_data_dirs"][dataset]},
    }


def released_checkpoint_config(config: dict, dataset: str, bits: int, path: str) -> dict:
    """config.yaml's content with the released checkpoint ``path`` in place of training that run."""
    return {**config, "checkpoints": {dataset: {bits: path}}}


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def commit_all(repo: Path, message: str) -> None:
    """``git add -A`` and a commit of everything git does not ignore (a ``git init`` first when needed)."""
    steps = ([GIT + ["init", "-q"]] if not (repo / ".git").exists() else []) + [
        GIT + ["add", "-A"],
        GIT + ["commit", "-q", "-m", message],
    ]
    for cmd in steps:
        proc = run(cmd, repo)
        assert proc.returncode == 0, output(proc)


def one_run_repo(dest: Path, dataset: str, bits: int) -> Path:
    """A fresh copy of the repository as a git repository of one commit, its config.yaml reduced to one
    dataset at one code length (``one_run_config``): what ``dvc repro`` runs in the DVC tests."""
    import yaml

    repo = copy_repo(dest)
    config = yaml.safe_load((repo / "config.yaml").read_text())
    (repo / "config.yaml").write_text(yaml.safe_dump(one_run_config(config, dataset, bits), sort_keys=False))
    commit_all(repo, "one run")
    return repo


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def snakemake(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run(["snakemake", *args], cwd, timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr
