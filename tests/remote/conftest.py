"""Fixtures of the remote tests: a real SSH server on this machine (tests/helpers/ssh_server.py) and the
``dvc repro`` of the .test configuration (tests/conftest.py ``dvc_test_run``), committed in its own git
repository, whose outputs the tests push and pull. Without the server's programs the tests are skipped,
with the reason; with CONMH_REQUIRE_REMOTE set (as in .ci/run) they fail instead."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.repo import output, run
from helpers.ssh_server import ServerProblem, SSHServer, programs

REQUIRE = "CONMH_REQUIRE_REMOTE"


def require_programs() -> None:
    try:
        programs()
    except ServerProblem as exc:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set, but no SSH server can be started: {exc}", pytrace=False)
        pytest.skip(f"no SSH server for a DVC remote: {exc}")


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory) -> Iterator[SSHServer]:
    """sshd on a free port of 127.0.0.1 with keys made for the session; stopped at the end."""
    require_programs()
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except ServerProblem as exc:
        pytest.fail(f"sshd could not be started: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trained(dvc_test_run, tmp_path_factory) -> Path:
    """The trainer's repository: a copy of ``dvc repro`` of the .test configuration (tests/conftest.py
    ``dvc_test_run``, shared with another test: the remote tests change theirs), everything git tracks
    committed (dvc.lock and results/); the models, codes and data are in its DVC cache only."""
    require_programs()

    def dvc_tmp(folder: str, names: list[str]) -> set[str]:  # DVC's locks and state: remade by DVC
        return {"tmp"} if Path(folder).name == ".dvc" else set()

    return Path(shutil.copytree(dvc_test_run, tmp_path_factory.mktemp("trainer") / "repo", ignore=dvc_tmp))


@dataclass(frozen=True)
class Pushed:
    repo: Path  # the trainer's repository, its default remote "team" on the SSH server
    remote: Path  # the remote's folder on the server
    seconds: float
    output: str


@pytest.fixture(scope="session")
def pushed(trained, ssh_server, tmp_path_factory) -> Pushed:
    """The trainer's ``dvc push`` to the default remote, once per session."""
    remote = tmp_path_factory.mktemp("remote") / "conmh"
    ssh_server.add_dvc_remote(trained, "team", remote)
    start = time.monotonic()
    proc = run(["dvc", "push"], trained)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, output(proc)[-5000:]
    return Pushed(trained, remote, seconds, output(proc))
