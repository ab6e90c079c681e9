"""``scipy.io.loadmat`` in a child process, so that a damaged file cannot kill ours.

scipy's MATLAB v5 reader is compiled code: some byte-damaged files make it
crash the process with SIGSEGV (tests/e2e/test_reliability.py), so a user would see
the command die without a word. Each file is read in a child process, which
turns a crash into an ordinary "damaged file" error. The children are forked
from multiprocessing's fork server, which imports scipy once: a process's first
read starts it (about half a second, as a child Python of its own would cost),
its later reads cost milliseconds (a training or a test suite reads many).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A fresh server process rather than a fork of ours, which may hold threads (torch, numba).
_CONTEXT = multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class MatResult:
    """What the child found: ``status`` is ok (``array`` set), v73, missing (``keys``), error or crash."""

    status: str
    array: np.ndarray | None = None
    keys: tuple[str, ...] = ()
    error: str = ""


def _read(path: str, key: str, conn) -> None:
    """The child: load, then send one MatResult (a crash sends nothing)."""
    try:
        import scipy.io
        import scipy.sparse

        try:
            mat = scipy.io.loadmat(path)
        except NotImplementedError:
            conn.send(MatResult("v73"))
            return
        if key not in mat:
            conn.send(MatResult("missing", keys=tuple(sorted(k for k in mat if not k.startswith("__")))))
            return
        arr = mat[key]
        arr = arr.toarray() if scipy.sparse.issparse(arr) else np.asarray(arr)
        if arr.dtype == object:
            conn.send(MatResult("error", error=f"key {key!r} holds MATLAB objects, not a numeric matrix"))
            return
        conn.send(MatResult("ok", array=arr))
    except Exception as e:
        conn.send(MatResult("error", error=f"{type(e).__name__}: {e}"))


def load_mat_v5(path: str | Path, key: str, timeout: float = 600.0) -> MatResult:
    """The matrix under ``key`` of a MATLAB v5 file, read by ``scipy.io.loadmat`` in a child process."""
    _CONTEXT.set_forkserver_preload(["scipy.io", "scipy.sparse"])  # takes effect when the server starts
    receiver, sender = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(target=_read, args=(str(path), key, sender), daemon=True)
    child.start()
    sender.close()  # the child holds the only sending end: a crash closes it
    try:
        if not receiver.poll(timeout):
            child.kill()
            return MatResult("crash", error=f"the MATLAB reader did not finish within {timeout:.0f} s")
        try:
            return receiver.recv()
        except EOFError:  # it ended without an answer
            child.join()
            code = child.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            return MatResult("crash", error=f"the MATLAB reader crashed ({how})")
    finally:
        receiver.close()
        child.join()
