"""mAP@K: the fast evaluation against a direct transcription of docs/reference.md §5, hand-computed cases,
invariances."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conmh.codes import Codes, pack_bits
from conmh.hamming import kth_distance
from conmh.metrics import KS, TIE_RULE, average_precision_at_k, evaluate, map_at_k


def reference_ap(
    db_bits: np.ndarray, db_labels: np.ndarray, q_bits: np.ndarray, q_labels: np.ndarray, ks: tuple[int, ...]
) -> np.ndarray:
    """AP@K per query, written as the formula reads (slow, unpacked bits).

    Rank the database by Hamming distance, ties by ascending index; with
    rel(r) = [item at rank r shares a label with the query] and
    P(r) = (#relevant in the top r) / r:  AP@K = (1/K) * sum_{r<=K} rel(r) P(r).
    """
    n = len(db_bits)
    out = np.zeros((len(q_bits), len(ks)))
    for i in range(len(q_bits)):
        dist = np.sum(db_bits != q_bits[i], axis=1)  # item j: the bits where db_bits[j] and the query differ
        ranking = np.lexsort((np.arange(n), dist))  # by distance, then by index
        shares = np.any(np.logical_and(db_labels, q_labels[i]), axis=1)  # item j: a label it shares with the query
        rel = [int(shares[j]) for j in ranking]
        for c, k in enumerate(ks):
            total = 0.0
            for r in range(1, k + 1):
                if r <= n and rel[r - 1]:
                    total += sum(rel[:r]) / r
            out[i, c] = total / k
    return out


def random_problem(
    rng: np.random.Generator, nbits: int, n_db: int, n_q: int, classes: int = 6, code_values: int | None = None
):
    """Random bits with many ties (codes drawn from few distinct values), multi-label labels, some empty rows."""

    def bits(n: int) -> np.ndarray:
        if code_values is None:
            return rng.random((n, nbits)) < 0.5
        pool = rng.random((code_values, nbits)) < 0.5
        return pool[rng.integers(0, code_values, n)]

    def labels(n: int) -> np.ndarray:
        lab = (rng.random((n, classes)) < 0.25).astype(np.uint8)
        lab[rng.random(n) < 0.2] = 0  # rows without any label
        return lab

    return bits(n_db), labels(n_db), bits(n_q), labels(n_q)


CASES = [  # nbits, n_db, n_q, distinct code values (None: any)
    (1, 30, 10, None),
    (4, 60, 25, None),
    (8, 150, 40, None),
    (8, 90, 30, 5),
    (12, 120, 30, None),  # odd bit count: 2 bytes, 4 padding bits
    (24, 80, 20, 9),  # 3 bytes -> one uint32 word
    (40, 80, 20, None),  # 5 bytes -> one zero-padded uint64 word
    (64, 110, 20, 12),
    (100, 60, 15, None),  # two uint64 words
    (300, 40, 10, 6),  # distances above 255
]


@pytest.mark.parametrize("nbits, n_db, n_q, values", CASES)
@pytest.mark.parametrize("protocol", ["separate_queries", "queries_are_database"])
def test_matches_reference(nbits: int, n_db: int, n_q: int, values: int | None, protocol: str) -> None:
    rng = np.random.default_rng([nbits, n_db, n_q])
    db, db_lab, q, q_lab = random_problem(rng, nbits, n_db, n_q, code_values=values)
    ks = KS + (1, 3, 250)  # includes K larger than the database
    if protocol == "queries_are_database":
        fast = average_precision_at_k(pack_bits(db), db_lab, None, None, nbits, ks, chunk=7, workers=2)
        slow = reference_ap(db, db_lab, db, db_lab, ks)
    else:
        fast = average_precision_at_k(pack_bits(db), db_lab, pack_bits(q), q_lab, nbits, ks, chunk=7, workers=2)
        slow = reference_ap(db, db_lab, q, q_lab, ks)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    maps = map_at_k(
        pack_bits(db),
        db_lab,
        *((None, None) if protocol == "queries_are_database" else (pack_bits(q), q_lab)),
        nbits,
        ks,
    )
    assert list(maps) == list(ks)
    np.testing.assert_allclose([maps[k] for k in ks], slow.mean(axis=0), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    nbits=st.integers(1, 70),
    n_db=st.integers(1, 25),
    n_q=st.integers(1, 6),
    classes=st.integers(1, 4),
    ks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    same=st.booleans(),
)
def test_matches_reference_property(
    data, nbits: int, n_db: int, n_q: int, classes: int, ks: list[int], same: bool
) -> None:
    db = data.draw(arrays(np.bool_, (n_db, nbits)))
    db_lab = data.draw(arrays(np.uint8, (n_db, classes), elements=st.integers(0, 1)))
    q = db if same else data.draw(arrays(np.bool_, (n_q, nbits)))
    q_lab = db_lab if same else data.draw(arrays(np.uint8, (n_q, classes), elements=st.integers(0, 1)))
    fast = average_precision_at_k(
        pack_bits(db),
        db_lab,
        None if same else pack_bits(q),
        None if same else q_lab,
        nbits,
        ks,
        chunk=data.draw(st.integers(1, 8)),
        workers=data.draw(st.integers(1, 3)),
    )
    np.testing.assert_allclose(fast, reference_ap(db, db_lab, q, q_lab, tuple(ks)), rtol=0, atol=1e-12)
    assert np.all((fast >= 0) & (fast <= 1))


@settings(max_examples=200, deadline=None)
@given(dist=arrays(np.uint8, st.integers(1, 60), elements=st.integers(0, 12)), data=st.data())
def test_kth_distance_is_the_kth_smallest(dist: np.ndarray, data) -> None:
    k = data.draw(st.integers(1, len(dist)))
    guess = data.draw(st.integers(-5, 20))  # any guess, even out of range, must give the exact answer
    assert kth_distance(dist, k, 12, guess) == np.sort(dist)[k - 1]


def test_hand_computed_separate_queries() -> None:
    # 4-bit codes. Query 0 = 0000 (class A): distances 0, 1, 2, 1 -> ranking 0, 1, 3, 2 (tie 1/3 by index).
    db = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]], bool)
    db_lab = np.array([[1, 0], [0, 1], [1, 0], [1, 1]], np.uint8)  # A, B, A, A+B
    q = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], bool)
    q_lab = np.array([[1, 0], [0, 0]], np.uint8)  # query 1 has no label: AP 0
    # relevance of query 0 by rank: 1, 0, 1, 1; P = 1, 1/2, 2/3, 3/4
    expected_q0 = {1: 1.0, 2: 1 / 2, 3: (1 + 2 / 3) / 3, 4: (1 + 2 / 3 + 3 / 4) / 4, 10: (1 + 2 / 3 + 3 / 4) / 10}
    ks = tuple(expected_q0)
    ap = average_precision_at_k(pack_bits(db), db_lab, pack_bits(q), q_lab, 4, ks)
    np.testing.assert_allclose(ap[0], list(expected_q0.values()), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(ap[1], 0.0)
    maps = map_at_k(pack_bits(db), db_lab, pack_bits(q), q_lab, 4, ks)
    assert maps[2] == pytest.approx(1 / 4)  # the opposite tie order (3 before 1) would give (1/2) * (1 + 1) / 2
    assert maps[4] == pytest.approx(29 / 96)


def test_hand_computed_queries_are_database() -> None:
    # 2-bit codes 00, 01, 11 with classes A, A, B; each query finds itself first (self-match counts).
    db = np.array([[0, 0], [0, 1], [1, 1]], bool)
    lab = np.array([[1, 0], [1, 0], [0, 1]], np.uint8)
    maps = map_at_k(pack_bits(db), lab, None, None, 2, (1, 2, 3))
    # rankings 0,1,2 / 1,0,2 (0 before 2 by index) / 2,1,0; relevance 110 / 110 / 100
    assert maps == pytest.approx({1: 1.0, 2: (1 + 1 + 1 / 2) / 3, 3: (2 / 3 + 2 / 3 + 1 / 3) / 3})


def test_identical_codes_are_ranked_by_index() -> None:
    # All database codes equal: the ranking is the database order, so only the first K items matter.
    db = pack_bits(np.zeros((50, 8), bool))
    db_lab = np.zeros((50, 1), np.uint8)
    db_lab[[0, 30]] = 1
    q_lab = np.ones((1, 1), np.uint8)
    maps = map_at_k(db, db_lab, db[:1], q_lab, 8, (5, 40))
    assert maps == pytest.approx({5: 1 / 5, 40: (1 + 2 / 31) / 40})


def test_independent_of_chunks_and_threads() -> None:
    rng = np.random.default_rng(5)
    db, db_lab, _, _ = random_problem(rng, 16, 700, 0, code_values=40)
    packed = pack_bits(db)
    results = [
        average_precision_at_k(packed, db_lab, None, None, 16, chunk=chunk, workers=workers)
        for chunk, workers in [(1000, 1), (64, 2), (33, 3), (1, 1)]
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_invalid_inputs() -> None:
    db = pack_bits(np.zeros((4, 12), bool))
    lab = np.ones((4, 2), np.uint8)
    with pytest.raises(ValueError, match=r"uint8 \(N >= 1, 3\)"):
        map_at_k(db, lab, None, None, 17)  # 17 bits need 3 bytes
    with pytest.raises(ValueError, match="padding"):
        map_at_k(db | 1, lab, None, None, 12)
    with pytest.raises(ValueError, match="labels"):
        map_at_k(db, lab[:3], None, None, 12)
    with pytest.raises(ValueError, match="classes"):
        map_at_k(db, lab, db, np.ones((4, 3), np.uint8), 12)
    with pytest.raises(ValueError, match="both"):
        map_at_k(db, lab, db, None, 12)
    for ks in [(), (0,), (5, -1)]:
        with pytest.raises(ValueError, match="positive"):
            map_at_k(db, lab, None, None, 12, ks)


def _codes(queries_are_database: bool) -> Codes:
    rng = np.random.default_rng(6)
    db, db_lab, q, q_lab = random_problem(rng, 32, 200, 30)
    if queries_are_database:
        return Codes(32, "fcvid", "conmh", pack_bits(db), db_lab, attrs={"checkpoint_sha256": "c0ffee"})
    return Codes(32, "activitynet", "lsh", pack_bits(db), db_lab, pack_bits(q), q_lab, attrs={"seed": 1})


@pytest.mark.parametrize("queries_are_database", [True, False])
def test_evaluate_metrics_object(queries_are_database: bool) -> None:
    codes = _codes(queries_are_database)
    metrics = evaluate(codes)
    json.dumps(metrics)  # JSON-serialisable as is
    q_lab = codes.database_labels if queries_are_database else codes.query_labels
    expected = reference_ap(
        np.unpackbits(codes.database, axis=1).astype(bool),
        codes.database_labels,
        np.unpackbits(codes.database if queries_are_database else codes.queries, axis=1).astype(bool),
        q_lab,
        KS,
    ).mean(axis=0)
    assert list(metrics["map"]) == [str(k) for k in KS]
    np.testing.assert_allclose(list(metrics["map"].values()), expected, rtol=0, atol=1e-12)
    assert metrics["ks"] == list(KS)
    assert metrics["tie_rule"] == TIE_RULE
    assert (metrics["dataset"], metrics["method"], metrics["bits"]) == (codes.dataset, codes.method, 32)
    assert metrics["protocol"] == ("queries_are_database" if queries_are_database else "separate_queries")
    assert metrics["n_database"] == 200
    assert metrics["n_queries"] == (200 if queries_are_database else 30)
    assert metrics["queries_without_label"] == int(np.sum(~q_lab.any(axis=1))) > 0
    assert ("checkpoint_sha256" in metrics) == queries_are_database
    assert "codes_sha256" not in metrics


def test_evaluate_custom_ks() -> None:
    metrics = evaluate(_codes(True), ks=[3, 7])
    assert metrics["ks"] == [3, 7] and list(metrics["map"]) == ["3", "7"]
