"""A real SSH server on this machine for the DVC remote tests: Debian's OpenSSH ``sshd`` on a free port
of 127.0.0.1, with a host key and a user key made for it, started and stopped by the tests.

The server accepts the current user with the test's key only (no password, no PAM), and serves SFTP,
which DVC's ``dvc-ssh`` plugin uses. With ``rate`` its SFTP server is slowed down to about that many
bytes per second in each direction (``slow_sftp.py``), so that a test can stop the server, or kill a
client, in the middle of a transfer.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
INSTALL_HINT = "apt-get install openssh-server, and pip install dvc-ssh"


class ServerProblem(Exception):
    """No SSH server can be started here; the message says why."""


def programs() -> tuple[str, str, str]:
    """(sshd, ssh-keygen, sftp-server); ServerProblem naming what is missing."""
    sshd = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)
    keygen = shutil.which("ssh-keygen")
    sftp = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)
    missing = [name for name, path in (("sshd", sshd), ("ssh-keygen", keygen), ("sftp-server", sftp)) if not path]
    try:
        import dvc_ssh  # noqa: F401
    except ImportError:
        missing.append("the dvc-ssh plugin")
    if missing:
        raise ServerProblem(f"{', '.join(missing)} not found ({INSTALL_HINT})")
    return sshd, keygen, sftp  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (sshd's connection processes and what they run), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    """``sshd -D`` on a free port of 127.0.0.1 with its own keys and configuration under ``home``."""

    def __init__(self, home: Path, rate: int | None = None):
        sshd, keygen, sftp = programs()
        self.home, self.sshd, self.user = home, sshd, getpass.getuser()
        self.port = free_port()
        self.keyfile = home / "client_ed25519"
        self.proc: subprocess.Popen | None = None
        self.retried = False
        home.mkdir(parents=True, exist_ok=True)
        for key in (home / "host_ed25519", self.keyfile):
            if not key.exists():
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copyfile(f"{self.keyfile}.pub", home / "authorized_keys")
        slow = Path(__file__).with_name("slow_sftp.py")
        self.subsystem = sftp if rate is None else f"{sys.executable} {slow} {rate} {sftp}"
        self.config = home / "sshd_config"

    def write_config(self) -> None:
        home = self.home
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {home / 'host_ed25519'}\n"
            f"PidFile {home / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {home / 'authorized_keys'}\n"
            f"AllowUsers {self.user}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"Subsystem sftp {self.subsystem}\n"
        )

    def start(self, timeout: float = 20) -> SSHServer:
        """Start the server (again, after ``stop``: on the same port); return when it answers."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        self.write_config()
        path = self.home / "sshd.log"
        offset = path.stat().st_size if path.exists() else 0
        with path.open("ab") as log:
            self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if b"Address already in use" in path.read_bytes()[offset:] and not self.retried:
                    # The free port was taken between free_port() and sshd's bind: once more on another.
                    self.proc, self.port, self.retried = None, free_port(), True
                    return self.start(timeout)
                raise ServerProblem(f"sshd exited with status {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerProblem(f"sshd did not answer on port {self.port} within {timeout} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop the server as a machine going down would: the listener and every open connection."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None

    def log(self) -> str:
        path = self.home / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, folder: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{folder.resolve()}"

    def add_dvc_remote(self, repo: Path, name: str, folder: Path, *, default: bool = True, verify: bool = True) -> None:
        """The remote ``name`` at ``folder`` on this server, in the repository's .dvc/config.local (not
        committed), with the test key; ``verify``: re-hash what is pulled (docs/pipeline.md)."""
        settings = {"keyfile": str(self.keyfile), "timeout": "30", "verify": str(verify).lower()}
        cmds = [["dvc", "remote", "add", "--local", "--force", *(["-d"] if default else []), name, self.url(folder)]]
        cmds += [["dvc", "remote", "modify", "--local", name, key, value] for key, value in settings.items()]
        for cmd in cmds:
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
