"""The test SSH server's SFTP subsystem, slowed down: ``python slow_sftp.py RATE SFTP_SERVER [ARGS]``
runs the real SFTP server and relays both directions between it and the client at about RATE bytes
per second, so that a transfer lasts long enough to be interrupted (tests/helpers/ssh_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

CHUNK = 8192


def relay(src: int, dst: int, rate: int, done) -> None:
    try:
        while data := os.read(src, CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
            time.sleep(len(data) / rate)
    except OSError:
        pass
    finally:
        done()


def main() -> int:
    rate, server = int(sys.argv[1]), sys.argv[2:]
    proc = subprocess.Popen(server, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    upload = threading.Thread(target=relay, args=(0, proc.stdin.fileno(), rate, proc.stdin.close), daemon=True)
    upload.start()
    relay(proc.stdout.fileno(), 1, rate, lambda: None)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
