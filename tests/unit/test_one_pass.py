"""The one-pass evaluation (``conmh.kernels``): every measure from one computation of each distance row equals
the formulas written out directly, at 16/32/64 bits and odd code lengths, on codes with many ties; the
evaluation's top K is the search's; threads and block sizes change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from conmh.codes import Codes, pack_bits
from conmh.hamming import hamming_search, run_kernel
from conmh.metrics import (
    average_precision_at_k,
    evaluate_detailed,
    full_ranking_average_precision,
    precision_recall_at_radius,
)

KS = (1, 5, 20, 100, 500)  # 500: beyond the database


def tied_problem(nbits: int, n_db: int, n_q: int, seed: int):
    """Codes drawn from a few values with a few bits flipped (many equal distances), multi-label labels,
    some rows without a label."""
    rng = np.random.default_rng([nbits, seed])
    pool = rng.random((7, nbits)) < 0.5

    def bits(n: int) -> np.ndarray:
        return pool[rng.integers(0, len(pool), n)] ^ (rng.random((n, nbits)) < 0.02)

    def labels(n: int) -> np.ndarray:
        lab = (rng.random((n, 5)) < 0.3).astype(np.uint8)
        lab[rng.random(n) < 0.15] = 0
        return lab

    return bits(n_db), labels(n_db), bits(n_q), labels(n_q)


def reference(db_bits, db_lab, q_bits, q_lab, ks):
    """Per query, straight from the definitions: AP@K, precision and recall at each radius, R, full AP."""
    nbits, n = db_bits.shape[1], len(db_bits)
    dist = (q_bits[:, None, :] != db_bits[None, :, :]).sum(axis=2)
    relevant = (q_lab[:, None, :] & db_lab[None, :, :]).any(axis=2)
    ap = np.zeros((len(q_bits), len(ks)))
    precision = np.zeros((len(q_bits), nbits + 1))
    recall = np.zeros((len(q_bits), nbits + 1))
    full = np.zeros(len(q_bits))
    for i in range(len(q_bits)):
        ranking = np.lexsort((np.arange(n), dist[i]))  # by distance, then by index
        rel = relevant[i, ranking].tolist()
        p_at = (np.cumsum(rel) / np.arange(1, n + 1)).tolist()  # p_at[r - 1] = P(r): relevant among the first r, / r
        for c, k in enumerate(ks):
            ap[i, c] = sum(rel[r - 1] * p_at[r - 1] for r in range(1, min(k, n) + 1)) / k
        n_rel = relevant[i].sum()
        for r in range(nbits + 1):
            retrieved = dist[i] <= r
            hits = (retrieved & relevant[i]).sum()
            precision[i, r] = hits / retrieved.sum() if retrieved.any() else 0.0
            recall[i, r] = hits / n_rel if n_rel else 0.0
        if n_rel:
            full[i] = sum(p_at[r - 1] for r in range(1, n + 1) if rel[r - 1]) / n_rel
    return ap, precision, recall, relevant.sum(axis=1), full


@pytest.mark.parametrize("nbits", [16, 32, 64, 7, 13, 33, 65])
@pytest.mark.parametrize("queries_are_database", [True, False])
def test_one_pass_equals_the_formulas(nbits: int, queries_are_database: bool) -> None:
    db, db_lab, q, q_lab = tied_problem(nbits, 260, 40, 0)
    if queries_are_database:
        codes = Codes(nbits, "fcvid", "t", pack_bits(db), db_lab)
        q, q_lab = db, db_lab
    else:
        codes = Codes(nbits, "yfcc", "t", pack_bits(db), db_lab, pack_bits(q), q_lab)
    ap, precision, recall, n_rel, full = reference(db, db_lab, q, q_lab, KS)
    metrics, per_query = evaluate_detailed(codes, KS, full_ranking=True)
    for j, k in enumerate(KS):
        np.testing.assert_allclose(per_query[f"ap@{k}"], ap[:, j], rtol=0, atol=1e-12)
    assert per_query["n_relevant"].tolist() == n_rel.tolist()
    np.testing.assert_allclose(per_query["ap_full"], full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics["pr_curve"]["precision"], precision.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics["pr_curve"]["recall"], recall.mean(axis=0), rtol=0, atol=1e-12)

    # the separate functions run the same pass: the same bits
    args = (codes.database, db_lab, codes.queries, codes.query_labels, nbits)
    np.testing.assert_array_equal(average_precision_at_k(*args, KS), np.stack([per_query[f"ap@{k}"] for k in KS], 1))
    p, r = precision_recall_at_radius(*args)
    np.testing.assert_allclose(p, precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r, recall, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(full_ranking_average_precision(*args), per_query["ap_full"])

    # the ranking the evaluation scores is the search's
    indices, distances = hamming_search(codes.database, pack_bits(q), nbits, 30)
    dist = (q[:, None, :] != db[None, :, :]).sum(axis=2)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), dist.shape), dist), axis=1)[:, :30]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(distances, np.take_along_axis(dist, order, 1))


def test_threads_and_blocks_change_nothing() -> None:
    db, db_lab, _, _ = tied_problem(64, 900, 0, 1)
    packed = pack_bits(db)
    args = (packed, db_lab, None, None, 64)
    base = full_ranking_average_precision(*args, chunk=1, workers=1)
    base_ap = average_precision_at_k(*args, KS, chunk=1, workers=1)
    base_top = hamming_search(packed, packed, 64, 50, chunk=1, workers=1)
    for chunk, workers in [(5, 2), (64, 3), (10_000, None)]:
        assert np.array_equal(full_ranking_average_precision(*args, chunk=chunk, workers=workers), base)
        assert np.array_equal(average_precision_at_k(*args, KS, chunk=chunk, workers=workers), base_ap)
        top = hamming_search(packed, packed, 64, 50, chunk=chunk, workers=workers)
        assert np.array_equal(top[0], base_top[0]) and np.array_equal(top[1], base_top[1])


def test_ranking_leaves_torchs_thread_count_alone():
    """Ranking must not change the thread count torch uses (numba's OpenMP threading layer, used by an
    earlier version, set it from 1 to all cores): a training that evaluates while it trains would then
    sum in another order than one that does not."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch; torch.set_num_threads(1)\n"
        "assert torch.get_num_threads() == 1\n"
        "from conmh.metrics import map_at_k\n"
        "codes = np.random.default_rng(0).integers(0, 256, (300, 8), dtype=np.uint8)\n"
        "labels = np.eye(3, dtype=bool)[np.arange(300) % 3]\n"
        "map_at_k(codes, labels, codes[:40], labels[:40], 64, (5, 20))\n"
        "print(torch.get_num_threads())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert proc.stdout.strip() == "1"


@pytest.mark.parametrize("workers", [1, 2])
def test_running_a_kernel_over_no_queries_calls_nothing(workers):
    calls = []
    run_kernel(lambda *args: calls.append(args), 0, 256, workers)
    assert calls == []
