"""Unit tests run torch on one thread: their tensors are tiny, where a second thread only adds overhead,
and on a busy 2-core machine contention made small trainings several times slower with two. Per test,
and restored after it, so that the other kinds (whose in-process runs are compared with the commands
they start) keep torch's default."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
