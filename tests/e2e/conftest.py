"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest

from helpers.conmh_runs import Reference, make_tiny_run


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Reference:
    """One uninterrupted tiny train + encode: the run that test_reliability's killed runs must end like,
    and whose inputs test_bad_inputs damages (a fresh copy for each case)."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny-run"))
