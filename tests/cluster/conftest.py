"""The ``cluster`` fixture: a usable SLURM cluster, else the test is skipped (or fails under
CONMH_REQUIRE_CLUSTER). What "usable" means: slurm_cluster.find_cluster."""

from __future__ import annotations

import os

import pytest
from slurm_cluster import REQUIRE, Cluster, ClusterProblem, find_cluster


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    try:
        return find_cluster()
    except ClusterProblem as exc:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set, but no usable SLURM cluster: {exc}", pytrace=False)
        pytest.skip(f"no usable SLURM cluster: {exc}")
