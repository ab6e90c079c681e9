"""Exact Hamming ranking of packed binary codes: the one ranking that evaluation and search share.

Every query's database items are ranked by ascending Hamming distance, equal
distances by ascending database index (``TIE_RULE``): ``conmh.metrics``
scores the top K of this ranking and ``conmh search`` returns it, so the two
cannot disagree.

How it stays fast and small: codes stay packed and are compared as 8-, 16-,
32- or 64-bit words (XOR, then ``np.bitwise_count``); each query's distances
are one row of N small integers. The K-th smallest distance of the row is
found by counting (how many items lie within t, for a few t), the items at or
below it are gathered in index order, and only those few are sorted (stably,
by distance). No N x N matrix and no full sort of a row is ever formed.
Queries are split into chunks processed by a thread pool: numpy releases the
GIL in all of these calls. Written by hand because no library ranks with this
tie rule: faiss's ``IndexBinaryFlat`` finds the same distances but orders
equal ones its own way (``conmh export`` writes one; docs/search.md).
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
    """Packed codes (N, W bytes) as (n_words, N) unsigned words for XOR + popcount.

    The word is the widest of uint8/16/32 that holds a whole code, or uint64
    (codes zero-padded to a multiple of 8 bytes); padding is zero on both
    sides of the XOR, so it adds nothing to the distance. Word-major layout
    makes each word's column one contiguous array.
    """
    n, width = packed.shape
    if width <= 4:
        nbytes = 1 << math.ceil(math.log2(width)) if width > 1 else 1
    else:
        nbytes = 8 * math.ceil(width / 8)
    dtype = np.dtype(f"u{min(nbytes, 8)}")
    padded = np.zeros((n, nbytes), np.uint8)
    padded[:, :width] = packed
    return np.ascontiguousarray(padded.view(dtype).T)


def hamming_row(query: np.ndarray, db_words: np.ndarray, out: np.ndarray, xor: np.ndarray, count: np.ndarray) -> None:
    """Hamming distances from one query (n_words,) to every database code, into ``out``."""
    np.bitwise_count(np.bitwise_xor(db_words[0], query[0], out=xor), out=out)
    for j in range(1, len(query)):
        np.bitwise_count(np.bitwise_xor(db_words[j], query[j], out=xor), out=count)
        out += count


def kth_distance(dist: np.ndarray, k: int, max_distance: int, guess: int) -> int:
    """The k-th smallest value of ``dist``: the least t with count(dist <= t) >= k.

    Found by counting (``dist <= t`` is a cheap vectorised comparison, far
    cheaper than a histogram or a partition of the row), probing outwards
    from ``guess`` with doubling steps: neighbouring queries have similar
    thresholds, so two probes usually settle it.
    """
    lo, hi = -1, max_distance  # invariant: count(<= lo) < k <= count(<= hi)
    probe, step = guess, 1
    while hi - lo > 1:
        t = min(max(probe, lo + 1), hi - 1)
        if np.count_nonzero(dist <= dist.dtype.type(t)) >= k:
            hi, probe = t, t - step
        else:
            lo, probe = t, t + step
        step *= 2
    return hi


def nearest(dist: np.ndarray, k: int, threshold: int) -> np.ndarray:
    """Indices of the ``k`` nearest items ranked by (distance, index), given the k-th smallest distance.

    Everything at or below ``threshold`` is a candidate, gathered in ascending
    index; a stable sort of the few candidates by distance applies the tie rule.
    """
    candidates = np.flatnonzero(dist <= dist.dtype.type(threshold))
    return candidates[np.argsort(dist[candidates], kind="stable")[:k]]


def in_chunks(run: Callable[[int, int], None], n: int, chunk: int, workers: int | None) -> None:
    """Call ``run(start, stop)`` on consecutive chunks of ``chunk`` queries of ``n``, on ``workers`` threads."""
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    workers = min(workers or available_cpus(), len(bounds))
    if workers <= 1:
        for start, stop in bounds:
            run(start, stop)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda b: run(*b), bounds))  # list() re-raises a worker's exception


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
    ``chunk`` queries form one task of a pool of ``workers`` threads (default:
    all usable CPUs); the result does not depend on either. Zero queries give
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
    dist_dtype = np.uint8 if nbits <= np.iinfo(np.uint8).max else np.uint16
    db_words, q_words = as_words(database), as_words(queries)

    def run(start: int, stop: int) -> None:
        dist = np.empty(n, dist_dtype)
        xor = np.empty(n, db_words.dtype)
        count = np.empty(n, np.uint8)
        threshold = nbits // 2
        for i in range(start, stop):
            hamming_row(q_words[:, i], db_words, dist, xor, count)
            threshold = kth_distance(dist, k, nbits, threshold)
            top = nearest(dist, k, threshold)
            indices[i] = top
            distances[i] = dist[top]

    in_chunks(run, nq, chunk, workers)
    return indices, distances
