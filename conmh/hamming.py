"""Exact Hamming ranking of packed binary codes: the one ranking that evaluation and search share.

Every query's database items are ranked by ascending Hamming distance, equal
distances by ascending database index (``TIE_RULE``): ``conmh.metrics``
scores the top K of this ranking and ``conmh search`` returns it, so the two
cannot disagree.

How it stays fast and small: codes stay packed and are compared as 64-bit
words (XOR, popcount); each query's distances are one row of N small
integers, computed once. The k-th smallest distance of the row is
found by counting (how many items lie within t, for a few t), and the items
at or below it are placed by a counting sort, in index order within a
distance. No N x N matrix and no sort of a row is ever formed. The kernels
are compiled with numba (``conmh.kernels``) and run blocks of queries in
parallel on a thread pool. Written by hand because no library ranks with this tie rule:
faiss's ``IndexBinaryFlat`` finds the same distances but orders equal ones
its own way (``conmh export`` writes one; docs/search.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .codes import packed_width, padding_mask

__all__ = ["TIE_RULE", "DEFAULT_CHUNK", "hamming_search"]

TIE_RULE = "equal Hamming distances ranked by ascending database index"
DEFAULT_CHUNK = 256  # queries per task: small enough to balance two or more threads, large enough to amortise


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def as_words(packed: np.ndarray) -> np.ndarray:
    """Packed codes (N, W bytes) as (ceil(W / 8), N) uint64 words for XOR + popcount.

    Codes are zero-padded to a multiple of 8 bytes; padding is zero on both
    sides of the XOR, so it adds nothing to the distance. One word type keeps
    the compiled kernels to one version. Word-major layout makes each word's
    column one contiguous array.
    """
    n, width = packed.shape
    padded = np.zeros((n, 8 * math.ceil(width / 8)), np.uint8)
    padded[:, :width] = packed
    return np.ascontiguousarray(padded.view(np.uint64).T)


def kth_distance(dist: np.ndarray, k: int, max_distance: int, guess: int) -> int:
    """The k-th smallest value of ``dist`` (values 0..max_distance), found by counting (``conmh.kernels``)."""
    from . import kernels

    return int(kernels.kth_distance(dist, k, max_distance, guess))


def row_dtype(nbits: int) -> np.dtype:
    """The dtype of a row of distances: uint8 up to 255 bits, else uint16."""
    return np.dtype(np.uint8 if nbits <= np.iinfo(np.uint8).max else np.uint16)


def run_kernel(kernel: Callable, n_queries: int, chunk: int, workers: int | None, *args) -> None:
    """Run a kernel of ``conmh.kernels`` over every query, in blocks, on ``workers`` threads (default: every
    usable CPU).

    A kernel call ranks queries ``start`` to ``stop`` - 1 without holding the
    GIL, so blocks run in parallel on a thread pool, handed out one at a
    time (a slow thread takes fewer). A block is at most ``chunk`` queries,
    fewer when there are too few queries to give every thread several
    blocks. Results do not depend on either.
    """
    threads = available_cpus() if workers is None else int(workers)
    block = max(1, min(int(chunk), -(-n_queries // (4 * threads))))
    starts = range(0, n_queries, block)

    def run_block(start: int) -> None:
        kernel(start, min(start + block, n_queries), *args)

    if threads == 1 or len(starts) <= 1:  # no pool for one block (or none: zero queries)
        for start in starts:
            run_block(start)
        return
    with ThreadPoolExecutor(min(threads, len(starts))) as pool:
        for _ in pool.map(run_block, starts):  # in order, re-raising a block's error
            pass


def check_codes(name: str, codes: np.ndarray, nbits: int, allow_empty: bool) -> None:
    width, pad = packed_width(nbits), padding_mask(nbits)
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != width:
        shape = getattr(codes, "shape", None)
        raise ValueError(
            f"{name} codes must be uint8 (N, {width}) for {nbits} bits, got {getattr(codes, 'dtype', type(codes))} "
            f"{shape}"
        )
    if codes.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} codes must hold at least one code, got {codes.shape}")
    if pad and codes.size and np.any(codes[:, -1] & pad):
        raise ValueError(f"{name} codes have non-zero padding bits (expected np.packbits output)")


def check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def hamming_search(
    database: np.ndarray,
    queries: np.ndarray,
    nbits: int,
    k: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest database codes of each query: (indices int64, distances int32), both (nq, k').

    ``database`` (N, W) and ``queries`` (nq, W) are packed codes (uint8,
    ``conmh.codes.pack_bits``, W = ceil(nbits / 8), padding bits zero). Row i
    lists query i's neighbours by ascending Hamming distance, equal distances
    by ascending database index (``TIE_RULE``), the ranking whose top K
    ``conmh.metrics`` scores. k' = min(k, N): a k beyond the database returns all of it.
    At most ``chunk`` queries form one parallel task, run on ``workers``
    threads (default: every usable CPU); the result does not depend on either. Zero queries give
    (0, k') arrays.
    """
    check_count("nbits", nbits)
    check_count("k", k)
    check_count("chunk", chunk)
    if workers is not None:
        check_count("workers", workers)
    check_codes("database", database, nbits, allow_empty=False)
    check_codes("queries", queries, nbits, allow_empty=True)
    n, nq = database.shape[0], queries.shape[0]
    k = min(int(k), n)
    indices = np.empty((nq, k), np.int64)
    distances = np.empty((nq, k), np.int32)
    if nq == 0:
        return indices, distances
    from . import kernels

    words = as_words(queries), as_words(database)
    run_kernel(
        kernels.search_kernel, nq, chunk, workers, *words, np.empty(0, row_dtype(nbits)), nbits, indices, distances
    )
    return indices, distances
