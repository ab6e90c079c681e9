"""The test SSH server's SFTP subsystem, slowed down: ``python slow_sftp.py RATE SFTP_SERVER [ARGS]``
runs the real SFTP server and relays both directions between it and the client at about RATE bytes
per second, so that a transfer lasts long enough to be interrupted (tests/helpers/ssh_server.py).

It never outlives its session: it ends, and ends the SFTP server, when either side closes or fails,
and the kernel kills both when the sshd process that started the relay dies (the server stopped)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

CHUNK = 8192
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def relay(src: int, dst: int, rate: int, done: threading.Event) -> None:
    try:
        while data := os.read(src, CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
            time.sleep(len(data) / rate)
    except OSError:
        pass
    finally:
        done.set()


def main() -> int:
    die_with_parent()
    rate, server = int(sys.argv[1]), sys.argv[2:]
    proc = subprocess.Popen(
        server, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, preexec_fn=die_with_parent
    )
    done = threading.Event()
    for src, dst in ((0, proc.stdin.fileno()), (proc.stdout.fileno(), 1)):
        threading.Thread(target=relay, args=(src, dst, rate, done), daemon=True).start()
    done.wait()  # the client closed (or went away), or the SFTP server ended
    proc.stdin.close()
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
