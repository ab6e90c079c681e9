"""Fixtures shared by several test folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory) -> Path:
    """The default (miniature) pipeline, run once per session with the local executor in a fresh copy
    of the repository. tests/test_pipeline.py checks it; tests/cluster compares a SLURM run with it."""
    from test_pipeline import copy_repo, output, snakemake  # tests/ is on sys.path: pytest put it there for this file

    repo = copy_repo(tmp_path_factory.mktemp("snakemake") / "repo")
    proc = snakemake(repo, "--cores", "2", timeout=1200)
    assert proc.returncode == 0, output(proc)[-5000:]
    return repo
