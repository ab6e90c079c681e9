"""The CI cluster's script (slurm-localhost.sh) itself, on a state folder of its own: no cluster needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).with_name("slurm-localhost.sh")


def test_stop_takes_a_daemon_that_exited_but_is_not_yet_reaped_as_stopped(tmp_path: Path) -> None:
    """A daemon that exited stays a zombie until its parent reaps it (in CI the daemons' parent is init,
    which reaps them only every few seconds). ``stop`` must see that it exited, not wait 30 s for it and
    then kill -9 it. Here this test is the daemon's parent and reaps it only at the end."""
    (tmp_path / "run").mkdir()
    daemon = subprocess.Popen(["sleep", "600"])
    (tmp_path / "run" / "munged.pid").write_text(f"{daemon.pid}\n")
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "stop"],
            env={**os.environ, "CONMH_SLURM_STATE": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "stopped munged" in proc.stderr and "ignored SIGTERM" not in proc.stderr, proc.stderr
        assert daemon.wait(timeout=10) == -15  # it got SIGTERM, and only that
        assert not (tmp_path / "run" / "munged.pid").exists()
    finally:
        daemon.kill()
        daemon.wait()
