"""mAP@K of Hamming ranking (docs/reference.md §5), exact and fast.

Definition (the one of SSVH, BTH, ConMH and S5VH, not the usual AP): for a
query, rank the database by ascending Hamming distance; with rel(r) in {0, 1}
for the item at rank r and P(r) = (relevant items in the top r) / r,

    AP@K = (1/K) * sum_{r=1..K} rel(r) * P(r),

and mAP@K is the mean of AP@K over all queries. A database item is relevant
to a query when they share at least one class label.

Choices the definition leaves open, fixed here:

* ties: equal distances are ranked by ascending database index (``TIE_RULE``);
  the official code's unstable sort leaves them unspecified, so its numbers
  can differ from ours in the last digits;
* a query whose label row is all zero has no relevant item: its AP is 0 and
  it still counts in the mean (``evaluate`` reports how many there are);
* K larger than the database: ranks past the last item hold nothing
  (rel = 0), and AP@K is still divided by K;
* FCVID protocol (``queries=None``): the queries are the database itself, so
  each query is ranked against a database that contains it, and its
  self-match (distance 0) counts like any other relevant item.

How it stays fast and small: codes stay packed and are compared as 8-, 16-,
32- or 64-bit words (XOR, then ``np.bitwise_count``); each query's distances
are one row of N small integers. The K-th smallest distance of the row is
found by counting (how many items lie within t, for a few t), the items at or
below it are gathered in index order, and only those few are sorted (stably,
by distance). No N x N matrix and no full sort of a row is ever formed.
Queries are split into chunks processed by a thread pool: numpy releases the
GIL in all of these calls. At N = 45,600 x 45,600 with 64-bit codes this takes
about 3 CPU-seconds and a few MB (``benchmarks/bench_evaluate.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .codes import Codes, packed_width, padding_mask

__all__ = ["KS", "TIE_RULE", "DEFAULT_CHUNK", "map_at_k", "average_precision_at_k", "evaluate"]

KS = (5, 10, 20, 40, 60, 80, 100)
TIE_RULE = "equal Hamming distances ranked by ascending database index"
DEFAULT_CHUNK = 256  # queries per task: small enough to balance two or more threads, large enough to amortise


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _as_words(packed: np.ndarray) -> np.ndarray:
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


def _hamming_row(query: np.ndarray, db_words: np.ndarray, out: np.ndarray, xor: np.ndarray, count: np.ndarray) -> None:
    """Hamming distances from one query (n_words,) to every database code, into ``out``."""
    np.bitwise_count(np.bitwise_xor(db_words[0], query[0], out=xor), out=out)
    for j in range(1, len(query)):
        np.bitwise_count(np.bitwise_xor(db_words[j], query[j], out=xor), out=count)
        out += count


def _kth_distance(dist: np.ndarray, k: int, max_distance: int, guess: int) -> int:
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


def _nearest(dist: np.ndarray, k: int, threshold: int) -> np.ndarray:
    """Indices of the ``k`` nearest items ranked by (distance, index), given the k-th smallest distance.

    Everything at or below ``threshold`` is a candidate, gathered in ascending
    index; a stable sort of the few candidates by distance applies the tie rule.
    """
    candidates = np.flatnonzero(dist <= dist.dtype.type(threshold))
    return candidates[np.argsort(dist[candidates], kind="stable")[:k]]


def _ap_from_relevance(rel: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """AP@K (n, len(ks)) from the relevance (n, kmax) of each query's top kmax items."""
    kmax = rel.shape[1]
    precision = np.cumsum(rel, axis=1) / np.arange(1, kmax + 1)
    gain = np.cumsum(np.where(rel, precision, 0.0), axis=1)
    return np.stack([gain[:, min(k, kmax) - 1] / k for k in ks], axis=1)


def _check_inputs(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    ks: Sequence[int],
) -> None:
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or nbits < 1:
        raise ValueError(f"nbits must be a positive integer, got {nbits!r}")
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"every K must be a positive integer, got {list(ks)!r}")
    if (queries is None) != (query_labels is None):
        raise ValueError("queries and query_labels must both be given or both be None")
    width, pad = packed_width(nbits), padding_mask(nbits)
    splits = [("database", db, db_labels)] + ([] if queries is None else [("queries", queries, query_labels)])
    for name, codes, labels in splits:
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != width or codes.shape[0] == 0:
            raise ValueError(
                f"{name} codes must be uint8 (N >= 1, {width}) for {nbits} bits, got {codes.dtype} {codes.shape}"
            )
        if pad and np.any(codes[:, -1] & pad):
            raise ValueError(f"{name} codes have non-zero padding bits (expected np.packbits output)")
        if labels.ndim != 2 or labels.shape[0] != codes.shape[0]:
            raise ValueError(f"{name} labels must be ({codes.shape[0]}, C), got {labels.shape}")
    if query_labels is not None and query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(f"query labels have {query_labels.shape[1]} classes, database labels {db_labels.shape[1]}")


def average_precision_at_k(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    ks: Iterable[int] = KS,
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> np.ndarray:
    """AP@K of every query: float64 (n_queries, len(ks)), columns in the order of ``ks``.

    Arguments as for :func:`map_at_k`. The result does not depend on
    ``chunk`` or ``workers``: every query is computed on its own.
    """
    ks = tuple(ks)
    _check_inputs(db, db_labels, queries, query_labels, nbits, ks)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    if queries is None:
        queries, query_labels = db, db_labels
    n = db.shape[0]
    kmax = min(max(ks), n)
    dist_dtype = np.uint8 if nbits <= np.iinfo(np.uint8).max else np.uint16
    db_words, q_words = _as_words(db), _as_words(queries)
    # Labels packed to bits: "shares a label" is a non-zero AND of two short byte rows.
    db_classes = np.packbits(np.asarray(db_labels) != 0, axis=1)
    q_classes = np.packbits(np.asarray(query_labels) != 0, axis=1)
    ap = np.empty((queries.shape[0], len(ks)), np.float64)

    def run(start: int, stop: int) -> None:
        dist = np.empty(n, dist_dtype)
        xor = np.empty(n, db_words.dtype)
        count = np.empty(n, np.uint8)
        top = np.empty((stop - start, kmax), np.intp)
        threshold = nbits // 2
        for i in range(start, stop):
            _hamming_row(q_words[:, i], db_words, dist, xor, count)
            threshold = _kth_distance(dist, kmax, nbits, threshold)
            top[i - start] = _nearest(dist, kmax, threshold)
        rel = np.any(db_classes[top] & q_classes[start:stop, None, :], axis=2)
        ap[start:stop] = _ap_from_relevance(rel, ks)

    bounds = [(s, min(s + chunk, queries.shape[0])) for s in range(0, queries.shape[0], chunk)]
    workers = min(workers or _available_cpus(), len(bounds))
    if workers <= 1:
        for start, stop in bounds:
            run(start, stop)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda b: run(*b), bounds))  # list() re-raises a worker's exception
    return ap


def map_at_k(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    ks: Iterable[int] = KS,
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> dict[int, float]:
    """mAP@K for each K in ``ks`` (docs/reference.md §5 definition; see the module docstring).

    ``db`` and ``queries`` are packed codes (uint8, ``conmh.codes.pack_bits``),
    labels (N, C) 0/1 matrices. ``queries=None`` (with ``query_labels=None``)
    is the FCVID protocol: the queries are the database and self-matches
    count. A query without any label has AP 0 and counts in the mean. Ties
    are ranked by ascending database index (``TIE_RULE``). ``chunk`` queries
    form one task of a pool of ``workers`` threads (default: all usable CPUs).
    """
    ks = tuple(ks)
    ap = average_precision_at_k(db, db_labels, queries, query_labels, nbits, ks, chunk=chunk, workers=workers)
    return {int(k): float(ap[:, j].mean()) for j, k in enumerate(ks)}


def evaluate(codes: Codes, ks: Iterable[int] = KS) -> dict:
    """The metrics JSON object of a codes file (``conmh evaluate`` adds ``codes_sha256``)."""
    ks = tuple(int(k) for k in ks)
    maps = map_at_k(codes.database, codes.database_labels, codes.queries, codes.query_labels, codes.bits, ks)
    query_labels = codes.database_labels if codes.queries_are_database else codes.query_labels
    metrics = {
        "dataset": codes.dataset,
        "method": codes.method,
        "bits": int(codes.bits),
        "map": {str(k): maps[k] for k in ks},
        "ks": list(ks),
        "protocol": "queries_are_database" if codes.queries_are_database else "separate_queries",
        "n_database": codes.n_database,
        "n_queries": codes.n_queries,
        "queries_without_label": int(np.count_nonzero(~np.any(query_labels, axis=1))),
        "tie_rule": TIE_RULE,
    }
    if "checkpoint_sha256" in codes.attrs:
        metrics["checkpoint_sha256"] = codes.attrs["checkpoint_sha256"]
    return metrics
