"""The kinds of tests, and fixtures shared by several folders.

Each folder is one kind, and its tests carry that kind's marker:

* ``unit/``: functions against the reference formulas, the official code and bad
  inputs; under a minute (``python -m pytest -m unit``);
* ``e2e/``: whole commands and pipelines as users run them (Snakemake, DVC,
  torchrun, kills and restarts); several minutes;
* ``cluster/``: the pipeline on a SLURM cluster; skipped without one;
* ``remote/``: DVC push and pull through a real SSH server started by the tests (Debian's
  openssh-server, the dvc-ssh plugin); skipped without them, fails without them under
  CONMH_REQUIRE_REMOTE;
* ``gpu/``: the GPU path on a CUDA GPU (``python -m pytest -m gpu``); skipped without one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

KINDS = ("unit", "e2e", "cluster", "remote", "gpu")
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.path).relative_to(TESTS).parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in one of the folders {', '.join(KINDS)}")
        item.add_marker(kind)


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory) -> Path:
    """The default (miniature) pipeline, the README's main job, run once per session with the local
    executor in a fresh copy of the repository; tests/e2e/test_default_run.py checks it."""
    from helpers.repo import copy_repo, output, snakemake

    repo = copy_repo(tmp_path_factory.mktemp("snakemake") / "repo")
    proc = snakemake(repo, "--cores", "2", timeout=1200)
    assert proc.returncode == 0, output(proc)[-5000:]
    return repo


def built_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test session, even under pytest-xdist:
    the first worker to ask builds it under a lock, the others wait for it and share it (pytest-xdist's
    recipe for session fixtures). Its users must not change it."""
    from filelock import FileLock

    if worker_id == "master":  # one process (-n 0)
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # this session's folder, shared by its workers
    folder, done = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a failed attempt of another worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def snakemake_test_run(tmp_path_factory, worker_id) -> Path:
    """The .test configuration (one dataset at one code length, every rule and method) under Snakemake,
    as CI runs it: ``snakemake --configfile .test/config.yaml``. The DVC and SLURM runs of the same
    configuration are compared with it. Built once per session (``built_once``): read it, never change it."""
    from helpers.repo import copy_repo, output, snakemake

    def build(folder: Path) -> None:
        repo = copy_repo(folder / "repo")
        proc = snakemake(repo, "--cores", "2", "--configfile", ".test/config.yaml")
        assert proc.returncode == 0, output(proc)[-5000:]

    return built_once(tmp_path_factory, worker_id, "snakemake-test", build) / "repo"


@pytest.fixture(scope="session")
def dvc_test_run(tmp_path_factory, worker_id) -> Path:
    """``dvc repro`` of the .test configuration in a fresh copy of the repository (a git repository whose
    config.yaml is config.yaml with .test/config.yaml applied), then everything git tracks committed
    (dvc.lock and results/); the models, codes and data are in its DVC cache only.
    tests/e2e/test_dvc.py checks it; tests/remote pushes and pulls a copy of it. Built once per
    session (``built_once``): read it, never change it."""
    from helpers.repo import commit_all, output, repo_with_test_config, run

    def build(folder: Path) -> None:
        repo = repo_with_test_config(folder / "repo")
        proc = run(["dvc", "repro"], repo, timeout=1500)
        assert proc.returncode == 0, output(proc)[-5000:]
        commit_all(repo, "dvc repro")

    return built_once(tmp_path_factory, worker_id, "dvc-test", build) / "repo"
