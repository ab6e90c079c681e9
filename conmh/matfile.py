"""``scipy.io.loadmat`` in a child process, so that a damaged file cannot kill ours.

scipy's MATLAB v5 reader is compiled code: some byte-damaged files make it
crash the process with SIGSEGV (tests/e2e/test_reliability.py), so a user would see
the command die without a word. Label files are small, so reading them in a
child Python process costs about half a second and turns a crash into an
ordinary "damaged file" error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The child: load, then report one JSON line and (when found) the matrix as .npy.
_CHILD = r"""
import json, sys
import numpy as np, scipy.io, scipy.sparse
path, key, out = sys.argv[1:4]
try:
    mat = scipy.io.loadmat(path)
except NotImplementedError:
    print(json.dumps({"status": "v73"})); sys.exit(0)
except Exception as e:
    print(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}"})); sys.exit(0)
if key not in mat:
    print(json.dumps({"status": "missing", "keys": sorted(k for k in mat if not k.startswith("__"))})); sys.exit(0)
arr = mat[key]
arr = arr.toarray() if scipy.sparse.issparse(arr) else np.asarray(arr)
if arr.dtype == object:
    print(json.dumps({"status": "error", "error": f"key {key!r} holds MATLAB objects, not a numeric matrix"}))
    sys.exit(0)
np.save(out, arr, allow_pickle=False)
print(json.dumps({"status": "ok"}))
"""


@dataclass(frozen=True)
class MatResult:
    """What the child found: ``status`` is ok (``array`` set), v73, missing (``keys``), error or crash."""

    status: str
    array: np.ndarray | None = None
    keys: tuple[str, ...] = ()
    error: str = ""


def load_mat_v5(path: str | Path, key: str, timeout: float = 600.0) -> MatResult:
    """The matrix under ``key`` of a MATLAB v5 file, read by ``scipy.io.loadmat`` in a child process."""
    with tempfile.TemporaryDirectory(prefix="conmh-mat-") as tmp:
        out = Path(tmp) / "array.npy"
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), key, str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return MatResult("crash", error=f"the MATLAB reader did not finish within {timeout:.0f} s")
        if proc.returncode != 0:
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            last = proc.stderr.strip().splitlines()[-1:] or [""]
            return MatResult("crash", error=f"the MATLAB reader crashed ({how}) {last[0]}".strip())
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["status"] == "ok":
            return MatResult("ok", array=np.load(out, allow_pickle=False))
        return MatResult(report["status"], keys=tuple(report.get("keys", ())), error=report.get("error", ""))
