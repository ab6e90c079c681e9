"""Unit tests run torch on one thread: their tensors are tiny, where a second thread only adds overhead,
and on a busy 2-core machine contention made small trainings several times slower with two. From the
first unit test on (session scope, so that module fixtures that train come after it too), restored at
the end; the other kinds, which run first and compare in-process runs with the commands they start,
keep torch's default."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
