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

The ranking itself (packed words, XOR + popcount, the K-th distance found by
counting, no N x N matrix) is ``conmh.hamming``'s, shared with ``conmh
search``. Costs: benchmarks/README.md.

Other measures (``evaluate`` reports them beside mAP@K; docs/measures.md has
the definitions, conventions and costs). All are means over the same
queries, with the same relevance and the same FCVID self-match rule:

* precision and recall at every Hamming radius r = 0..bits
  (:func:`precision_recall_at_radius`): the database items at distance <= r
  are retrieved; precision is 0 when nothing is retrieved, recall 0 when the
  query has no relevant item. Ties do not matter here;
* precision within radius 2: the r = 2 point of that curve
  (:func:`precision_within_radius`);
* per-class mAP@K (:func:`per_class_map`): the mean AP@K of the queries
  labelled with each class;
* mAP over the full ranking (:func:`full_ranking_average_precision`, off by
  default): the usual AP,
  (1/R) * sum_{r=1..N} rel(r) * P(r) with R the query's relevant items in
  the database (AP 0 when R = 0), ties by ``TIE_RULE``. It divides by R,
  not K, so it is not AP@K at K = N.

One pass computes them all (``conmh.kernels``): each query's distance row
is computed once and gives the top K, a histogram of the distances of all
items and of the relevant ones (found through a per-class index of the
database) and, for the full ranking, each relevant item's rank (items at
smaller distances plus those of its distance before it in index order). No
N x N matrix, no sort of a row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from .codes import Codes, packed_width, padding_mask
from .hamming import DEFAULT_CHUNK, TIE_RULE, as_words, check_count, row_dtype, run_kernel

__all__ = [
    "KS",
    "TIE_RULE",
    "DEFAULT_CHUNK",
    "PRECISION_RADIUS",
    "map_at_k",
    "average_precision_at_k",
    "precision_recall_at_radius",
    "precision_within_radius",
    "full_ranking_average_precision",
    "per_class_map",
    "Evaluation",
    "evaluate",
    "evaluate_detailed",
    "per_query_csv",
]

KS = (5, 10, 20, 40, 60, 80, 100)
PRECISION_RADIUS = 2  # the radius of "precision within Hamming radius 2"


def _check_inputs(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    ks: Sequence[int] | None,
) -> None:
    check_count("nbits", nbits)
    if ks is not None and (  # None: the caller takes no K
        not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks)
    ):
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
    return _one_pass(db, db_labels, queries, query_labels, nbits, tuple(ks), False, chunk, workers).ap


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
    are ranked by ascending database index (``TIE_RULE``). At most ``chunk``
    queries form one parallel task, on ``workers`` threads (default: every
    usable CPU).
    """
    ks = tuple(ks)
    ap = average_precision_at_k(db, db_labels, queries, query_labels, nbits, ks, chunk=chunk, workers=workers)
    return {int(k): float(ap[:, j].mean()) for j, k in enumerate(ks)}


class _Pass(NamedTuple):
    ap: np.ndarray  # (n_queries, len(ks)) AP@K
    precision: np.ndarray  # (n_queries, nbits + 1)
    recall: np.ndarray  # (n_queries, nbits + 1)
    n_relevant: np.ndarray  # (n_queries,) relevant database items of each query
    full_ap: np.ndarray | None  # (n_queries,) AP over the full ranking, when asked


def _csr(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pointers and column indices (ascending in each row) of the non-zero entries of a boolean matrix."""
    rows, cols = np.nonzero(on)
    ptr = np.zeros(on.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=on.shape[0]), out=ptr[1:])
    return ptr, cols.astype(np.int64)


def _one_pass(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    ks: Sequence[int] | None,
    full_ranking: bool,
    chunk: int,
    workers: int | None,
) -> _Pass:
    """Every measure of every query from one computation of its distance row (``conmh.kernels``).

    ``ks=None``: no K asked (AP@1 is computed, at no cost worth saving).
    """
    from . import kernels

    _check_inputs(db, db_labels, queries, query_labels, nbits, ks)
    ks = (1,) if ks is None else ks
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    if queries is None:
        queries, query_labels = db, db_labels
    n_q, bins = queries.shape[0], nbits + 1
    # Relevance through a per-class index of the database: a query's relevant items are the union of its
    # classes' members, a few hundred indices rather than a scan of every database label row.
    m_ptr, members = _csr(np.ascontiguousarray(np.asarray(db_labels).T != 0))
    q_ptr, q_classes = _csr(np.asarray(query_labels) != 0)
    ap = np.empty((n_q, len(ks)), np.float64)
    precision = np.empty((n_q, bins), np.float64)
    recall = np.empty((n_q, bins), np.float64)
    n_relevant = np.empty(n_q, np.int64)
    full_ap = np.zeros(n_q if full_ranking else 0, np.float64)
    run_kernel(
        kernels.evaluate_kernel,
        n_q,
        chunk,
        workers or None,
        as_words(queries),
        as_words(db),
        np.empty(0, row_dtype(nbits)),
        nbits,
        np.asarray(ks, np.int64),
        min(max(ks), db.shape[0]),
        q_ptr,
        q_classes,
        m_ptr,
        members,
        full_ranking,
        ap,
        precision,
        recall,
        n_relevant,
        full_ap,
    )
    return _Pass(ap, precision, recall, n_relevant, full_ap if full_ranking else None)


def precision_recall_at_radius(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of every query at every Hamming radius: two float64 (n_queries, nbits + 1) arrays.

    Column r holds the measure over the database items at distance <= r.
    Precision is 0 when nothing lies within r; recall is 0 for a query with
    no relevant item. The PR curve is the mean over rows (``axis=0``).
    Arguments as for :func:`map_at_k`.
    """
    scan = _one_pass(db, db_labels, queries, query_labels, nbits, None, False, chunk, workers)
    return scan.precision, scan.recall


def precision_within_radius(precision: np.ndarray, radius: int = PRECISION_RADIUS) -> np.ndarray:
    """The radius-``radius`` point of a precision-by-radius curve (last axis = radius 0..nbits).

    A radius beyond the code length retrieves everything, as radius nbits does.
    """
    precision = np.asarray(precision)
    return precision[..., min(radius, precision.shape[-1] - 1)]


def full_ranking_average_precision(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray | None,
    query_labels: np.ndarray | None,
    nbits: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> np.ndarray:
    """AP over the whole ranking of every query: float64 (n_queries,), see the module docstring.

    Arguments as for :func:`map_at_k`.
    """
    return _one_pass(db, db_labels, queries, query_labels, nbits, None, True, chunk, workers).full_ap


def per_class_map(ap: np.ndarray, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean of per-query AP ``ap`` (n_queries, len(ks)) over the queries labelled with each class.

    Returns the number of such queries (C,) and the means (C, len(ks)),
    NaN for a class that no query carries. A query with several labels
    counts in each of its classes.
    """
    ap = np.asarray(ap, np.float64)
    on = np.asarray(query_labels) != 0
    if on.shape[0] != ap.shape[0]:
        raise ValueError(f"{ap.shape[0]} AP rows for {on.shape[0]} label rows")
    rows, classes = np.nonzero(on)  # row-major: each class's queries in ascending order, summed in that order
    counts = np.bincount(classes, minlength=on.shape[1])
    sums = np.zeros((on.shape[1], ap.shape[1]))
    for j in range(ap.shape[1]):
        sums[:, j] = np.bincount(classes, weights=ap[rows, j], minlength=on.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return counts, means


class Evaluation(NamedTuple):
    """What :func:`evaluate_detailed` returns."""

    metrics: dict  # the metrics JSON object
    per_query: dict[str, np.ndarray]  # columns of the per-query table: query, n_relevant, ap@K..., [ap_full]


def evaluate_detailed(codes: Codes, ks: Iterable[int] = KS, *, full_ranking: bool = False) -> Evaluation:
    """The metrics JSON object of a codes file and its per-query table (``conmh evaluate --per-query``)."""
    ks = tuple(int(k) for k in ks)
    db, db_labels, queries, query_labels = codes.database, codes.database_labels, codes.queries, codes.query_labels
    scan = _one_pass(db, db_labels, queries, query_labels, codes.bits, ks, full_ranking, DEFAULT_CHUNK, None)
    ap = scan.ap
    labels_of_queries = codes.database_labels if codes.queries_are_database else codes.query_labels
    metrics = {
        "dataset": codes.dataset,
        "method": codes.method,
        "bits": int(codes.bits),
        "map": {str(k): float(ap[:, j].mean()) for j, k in enumerate(ks)},  # = map_at_k
        "ks": list(ks),
        "protocol": "queries_are_database" if codes.queries_are_database else "separate_queries",
        "n_database": codes.n_database,
        "n_queries": codes.n_queries,
        "queries_without_label": int(np.count_nonzero(~np.any(labels_of_queries, axis=1))),
        "tie_rule": TIE_RULE,
    }
    if "checkpoint_sha256" in codes.attrs:
        metrics["checkpoint_sha256"] = codes.attrs["checkpoint_sha256"]
    curve = scan.precision.mean(axis=0), scan.recall.mean(axis=0)
    metrics["precision_within_radius_2"] = float(precision_within_radius(curve[0], PRECISION_RADIUS))
    if full_ranking:
        metrics["map_full_ranking"] = float(scan.full_ap.mean())
    metrics["pr_curve"] = {
        "radius": list(range(codes.bits + 1)),
        "precision": curve[0].tolist(),
        "recall": curve[1].tolist(),
    }
    counts, class_means = per_class_map(ap, labels_of_queries)
    metrics["per_class_map"] = {
        "n_queries": counts.tolist(),
        "map": {str(k): [None if np.isnan(v) else float(v) for v in class_means[:, j]] for j, k in enumerate(ks)},
    }
    per_query = {"query": np.arange(codes.n_queries), "n_relevant": scan.n_relevant}
    per_query.update({f"ap@{k}": ap[:, j] for j, k in enumerate(ks)})
    if full_ranking:
        per_query["ap_full"] = scan.full_ap
    return Evaluation(metrics, per_query)


def evaluate(codes: Codes, ks: Iterable[int] = KS, *, full_ranking: bool = False) -> dict:
    """The metrics JSON object of a codes file (``conmh evaluate`` adds ``codes_sha256``).

    Beside mAP@K it holds the precision/recall curve by Hamming radius
    (``pr_curve``), ``precision_within_radius_2``, ``per_class_map`` and, with
    ``full_ranking=True``, ``map_full_ranking`` (docs/measures.md).
    """
    return evaluate_detailed(codes, ks, full_ranking=full_ranking).metrics


def per_query_csv(per_query: dict[str, np.ndarray]) -> str:
    """The per-query table as CSV text: a header, then one row per query; floats written exactly (``repr``)."""
    columns = [np.asarray(v).tolist() for v in per_query.values()]
    lines = [",".join(per_query)]
    lines += [",".join(map(repr, row)) for row in zip(*columns)]
    return "\n".join(lines) + "\n"


def evaluate_file(
    codes_path: str | os.PathLike,
    out: str | os.PathLike,
    ks: Iterable[int] = KS,
    *,
    per_query: str | os.PathLike | None = None,
    full_ranking: bool = False,
) -> tuple[Codes, dict]:
    """``conmh evaluate``: the metrics of a codes file (naming its sha256) written to ``out`` as JSON, and
    with ``per_query`` every query's AP@K to that file as CSV; the codes and the metrics."""
    from .atomic import write_text_atomic
    from .checksums import file_sha256
    from .codes import read_codes

    codes = read_codes(codes_path)
    metrics, table = evaluate_detailed(codes, ks, full_ranking=full_ranking)
    metrics["codes_sha256"] = file_sha256(codes_path)
    if per_query is not None:
        write_text_atomic(per_query, per_query_csv(table))
    write_text_atomic(out, json.dumps(metrics, indent=2) + "\n")
    return codes, metrics
