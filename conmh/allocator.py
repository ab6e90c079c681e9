"""Process-wide memory-allocator setting used by ``conmh train``.

A training step allocates and frees the same large activations every step
(hundreds of MB at FCVID's shapes). With glibc's defaults every block above
the mmap threshold (at most 32 MiB) is a fresh ``mmap``: it is returned to the
kernel when freed and page-faulted in again at the next step, which costs
system time at every FCVID step (benchmarks/README.md). Telling malloc
to serve large blocks from its heap and never to trim the heap keeps that
memory in the process between steps. The cost: the process's RSS stays at its
peak instead of falling between steps.

There is no Python or PyTorch API for this; ``mallopt`` through ctypes is the
documented glibc interface (``mallopt(3)``). Elsewhere (macOS, musl) it is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never shrink it; True when glibc took both settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
