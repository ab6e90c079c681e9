"""Fixtures of the unit tests: torch on one thread, and the tiny dataset and trained model that tests share
(their sizes and training: tests/helpers/tiny.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Unit tests run torch on one thread: their tensors are tiny, where a second thread only adds overhead,
    and on a busy 2-core machine contention made small trainings several times slower with two. From the
    first unit test on (session scope, so that the fixtures that train come after it too), restored at the
    end; the other kinds, which run first and compare in-process runs with the commands they start, keep
    torch's default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a tiny ActivityNet miniature (tiny.SPEC, seed tiny.SEED): training videos, database and
    separate queries, in the release's layout. Shared: tests read it and write elsewhere."""
    from conmh.synthetic import make_miniature

    folder = tmp_path_factory.mktemp("tiny") / tiny.DATASET
    make_miniature(tiny.DATASET, folder, seed=tiny.SEED, spec=tiny.SPEC)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --out-dir of ``conmh train`` on tiny_data (tiny.train_argv: mini preset, 16 bits, 3 epochs):
    checkpoint.pt, model.pt and train_log.jsonl. Shared: tests read it and write elsewhere."""
    from conmh.cli import main

    out = tmp_path_factory.mktemp("tiny-model")
    assert main(tiny.train_argv(tiny_data, out)) == 0
    return out
