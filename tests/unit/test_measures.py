"""Precision/recall by Hamming radius, precision within radius 2, full-ranking mAP, per-class and per-query AP:
the fast code against direct transcriptions of the definitions (docs/measures.md) on cases with many ties, and
hand-computed tiny cases."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conmh.cli import main
from conmh.codes import Codes, pack_bits, write_codes
from conmh.metrics import (
    evaluate,
    evaluate_detailed,
    full_ranking_average_precision,
    map_at_k,
    per_class_map,
    per_query_csv,
    precision_recall_at_radius,
    precision_within_radius,
)

# ----------------------------------------------------------------------------- direct transcriptions


def distances_and_relevance(db_bits, db_labels, q_bits, q_labels, i):
    """Hamming distance and relevance (shares a label) of every database item for query ``i``, as lists."""
    dist = np.sum(db_bits != q_bits[i], axis=1)  # item j: the bits where db_bits[j] and the query differ
    rel = np.any(np.logical_and(db_labels, q_labels[i]), axis=1)  # item j: a label it shares with the query
    return [int(d) for d in dist], [bool(r) for r in rel]


def reference_pr(db_bits, db_labels, q_bits, q_labels, nbits):
    """Per-query precision and recall at radius r = 0..nbits, as the definition reads."""
    n = len(db_bits)
    precision = np.zeros((len(q_bits), nbits + 1))
    recall = np.zeros((len(q_bits), nbits + 1))
    for i in range(len(q_bits)):
        dist, rel = distances_and_relevance(db_bits, db_labels, q_bits, q_labels, i)
        n_relevant = sum(rel)
        for r in range(nbits + 1):
            retrieved = [j for j in range(n) if dist[j] <= r]
            hits = sum(1 for j in retrieved if rel[j])
            precision[i, r] = hits / len(retrieved) if retrieved else 0.0
            recall[i, r] = hits / n_relevant if n_relevant else 0.0
    return precision, recall


def reference_full_ap(db_bits, db_labels, q_bits, q_labels):
    """AP over the whole ranking (ties by ascending index), divided by the number of relevant items."""
    n = len(db_bits)
    out = np.zeros(len(q_bits))
    for i in range(len(q_bits)):
        dist, rel = distances_and_relevance(db_bits, db_labels, q_bits, q_labels, i)
        ranking = sorted(range(n), key=lambda j: (dist[j], j))
        hits, total = 0, 0.0
        for r, j in enumerate(ranking, start=1):
            if rel[j]:
                hits += 1
                total += hits / r
        out[i] = total / sum(rel) if sum(rel) else 0.0
    return out


def reference_ap_at_k(db_bits, db_labels, q_bits, q_labels, ks):
    """AP@K per query: (1/K) sum_{r<=K} rel(r) P(r), ties by ascending index."""
    n = len(db_bits)
    out = np.zeros((len(q_bits), len(ks)))
    for i in range(len(q_bits)):
        dist, rel = distances_and_relevance(db_bits, db_labels, q_bits, q_labels, i)
        ranked_rel = [rel[j] for j in sorted(range(n), key=lambda j: (dist[j], j))]
        for c, k in enumerate(ks):
            total = 0.0
            for r in range(1, min(k, n) + 1):
                if ranked_rel[r - 1]:
                    total += sum(ranked_rel[:r]) / r
            out[i, c] = total / k
    return out


def reference_per_class(ap, q_labels):
    """For each class: the number of queries labelled with it and their mean AP (NaN when none)."""
    counts, means = [], []
    for c in range(q_labels.shape[1]):
        rows = [i for i in range(len(q_labels)) if q_labels[i, c]]
        counts.append(len(rows))
        means.append([sum(ap[i, j] for i in rows) / len(rows) if rows else math.nan for j in range(ap.shape[1])])
    return np.array(counts), np.array(means).reshape(q_labels.shape[1], ap.shape[1])


# ----------------------------------------------------------------------------- random cases with ties


def random_problem(rng, nbits, n_db, n_q, classes=6, code_values=None):
    """Codes drawn from few distinct values (many ties), multi-label labels, some rows without a label,
    a class that no query carries (5) and one that no database item carries (4)."""

    def bits(n):
        if code_values is None:
            return rng.random((n, nbits)) < 0.5
        pool = rng.random((code_values, nbits)) < 0.5
        return pool[rng.integers(0, code_values, n)]

    def labels(n):
        lab = (rng.random((n, classes)) < 0.3).astype(np.uint8)
        lab[rng.random(n) < 0.2] = 0
        return lab

    db_lab, q_lab = labels(n_db), labels(n_q)
    db_lab[:, 4] = 0
    q_lab[:, 5] = 0
    return bits(n_db), db_lab, bits(n_q), q_lab


CASES = [  # nbits, n_db, n_q, distinct code values (None: any)
    (8, 50, 20, None),
    (8, 120, 40, 6),
    (8, 300, 15, 4),
    (12, 90, 30, None),  # 2 bytes, 4 padding bits
    (12, 200, 25, 9),
    (3, 60, 20, None),  # fewer bits than the radius 2
]


def problem(nbits, n_db, n_q, values, protocol):
    rng = np.random.default_rng([nbits, n_db, n_q, 7])
    db, db_lab, q, q_lab = random_problem(rng, nbits, n_db, n_q, code_values=values)
    if protocol == "queries_are_database":
        db_lab[:, 5] = 0  # here the queries are the database: keep a class without query
        return db, db_lab, None, None, db, db_lab
    return db, db_lab, q, q_lab, q, q_lab


PROTOCOLS = ["separate_queries", "queries_are_database"]


@pytest.mark.parametrize("nbits, n_db, n_q, values", CASES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pr_matches_reference(nbits, n_db, n_q, values, protocol) -> None:
    db, db_lab, q, q_lab, q_bits, q_lab_eff = problem(nbits, n_db, n_q, values, protocol)
    packed_q = None if q is None else pack_bits(q)
    precision, recall = precision_recall_at_radius(pack_bits(db), db_lab, packed_q, q_lab, nbits, chunk=7)
    ref_p, ref_r = reference_pr(db, db_lab, q_bits, q_lab_eff, nbits)
    assert precision.shape == recall.shape == (len(q_bits), nbits + 1)
    np.testing.assert_allclose(precision, ref_p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recall, ref_r, rtol=0, atol=1e-12)
    # the case exercises both conventions: a query retrieving nothing at r = 0, a query with no relevant item
    assert (ref_r[:, -1] == 0).any()
    assert precision_within_radius(precision.mean(axis=0)) == pytest.approx(ref_p[:, min(2, nbits)].mean(), abs=1e-12)


@pytest.mark.parametrize("nbits, n_db, n_q, values", CASES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_full_ranking_matches_reference(nbits, n_db, n_q, values, protocol) -> None:
    db, db_lab, q, q_lab, q_bits, q_lab_eff = problem(nbits, n_db, n_q, values, protocol)
    packed_q = None if q is None else pack_bits(q)
    ap = full_ranking_average_precision(pack_bits(db), db_lab, packed_q, q_lab, nbits, chunk=5)
    np.testing.assert_allclose(ap, reference_full_ap(db, db_lab, q_bits, q_lab_eff), rtol=0, atol=1e-12)


@pytest.mark.parametrize("nbits, n_db, n_q, values", CASES[:3])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_evaluate_detailed_matches_reference(nbits, n_db, n_q, values, protocol) -> None:
    """Per-class and per-query AP@K, n_relevant and every new key of the metrics object."""
    db, db_lab, q, q_lab, q_bits, q_lab_eff = problem(nbits, n_db, n_q, values, protocol)
    codes = Codes(nbits, "fcvid", "lsh", pack_bits(db), db_lab, None if q is None else pack_bits(q), q_lab)
    ks = (1, 5, 20, 400)  # 400: beyond the database
    metrics, per_query = evaluate_detailed(codes, ks, full_ranking=True)
    json.dumps(metrics, allow_nan=False)  # strict JSON: a class without query is null, not NaN

    ap = reference_ap_at_k(db, db_lab, q_bits, q_lab_eff, ks)
    assert list(per_query) == ["query", "n_relevant", "ap@1", "ap@5", "ap@20", "ap@400", "ap_full"]
    assert per_query["query"].tolist() == list(range(len(q_bits)))
    for j, k in enumerate(ks):
        np.testing.assert_allclose(per_query[f"ap@{k}"], ap[:, j], rtol=0, atol=1e-12)
    n_relevant = [sum(distances_and_relevance(db, db_lab, q_bits, q_lab_eff, i)[1]) for i in range(len(q_bits))]
    assert per_query["n_relevant"].tolist() == n_relevant
    full = reference_full_ap(db, db_lab, q_bits, q_lab_eff)
    np.testing.assert_allclose(per_query["ap_full"], full, rtol=0, atol=1e-12)
    assert metrics["map_full_ranking"] == pytest.approx(full.mean(), abs=1e-12)

    counts, means = reference_per_class(ap, q_lab_eff)
    assert counts[5] == 0 and (counts > 0).sum() >= 3  # a class without query, several with
    assert metrics["per_class_map"]["n_queries"] == counts.tolist()
    for j, k in enumerate(ks):
        got = metrics["per_class_map"]["map"][str(k)]
        assert [v is None for v in got] == np.isnan(means[:, j]).tolist()
        np.testing.assert_allclose([math.nan if v is None else v for v in got], means[:, j], rtol=0, atol=1e-12)

    ref_p, ref_r = reference_pr(db, db_lab, q_bits, q_lab_eff, nbits)
    curve = metrics["pr_curve"]
    assert curve["radius"] == list(range(nbits + 1))
    np.testing.assert_allclose(curve["precision"], ref_p.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve["recall"], ref_r.mean(axis=0), rtol=0, atol=1e-12)
    assert metrics["precision_within_radius_2"] == curve["precision"][2]
    # the existing keys keep their values
    assert metrics["map"] == {
        str(k): v for k, v in map_at_k(codes.database, db_lab, codes.queries, q_lab, nbits, ks).items()
    }


def test_per_class_map_matches_reference() -> None:
    rng = np.random.default_rng(3)
    ap = rng.random((40, 3))
    labels = (rng.random((40, 7)) < 0.3).astype(np.uint8)
    labels[:, 2] = 0
    counts, means = per_class_map(ap, labels)
    ref_counts, ref_means = reference_per_class(ap, labels)
    assert counts.tolist() == ref_counts.tolist()
    np.testing.assert_allclose(means, ref_means, rtol=0, atol=1e-12)  # NaN where the reference has NaN
    assert np.isnan(means[2]).all()


def test_independent_of_chunks_and_threads() -> None:
    rng = np.random.default_rng(11)
    db, db_lab, q, q_lab = random_problem(rng, 12, 150, 60, code_values=8)
    args = (pack_bits(db), db_lab, pack_bits(q), q_lab, 12)
    base_p, base_r = precision_recall_at_radius(*args, chunk=1, workers=1)
    base_ap = full_ranking_average_precision(*args, chunk=1, workers=1)
    for chunk, workers in [(7, 2), (60, 3), (1000, None)]:
        p, r = precision_recall_at_radius(*args, chunk=chunk, workers=workers)
        assert np.array_equal(p, base_p) and np.array_equal(r, base_r)
        assert np.array_equal(full_ranking_average_precision(*args, chunk=chunk, workers=workers), base_ap)


# ----------------------------------------------------------------------------- hand-computed cases


def test_hand_computed_separate_queries() -> None:
    """4-bit codes, 3 database items, a labelled query and one without a label.

    Query 0 (0000, class 0): distances [2, 1, 1], relevant [yes, no, yes]; ranked 1, 2, 0 (tie by index),
    relevance 0, 1, 1. Query 1 (0000, no label): nothing relevant.
    """
    db = pack_bits(np.array([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0]]))
    db_lab = np.array([[1, 0], [0, 1], [1, 1]], np.uint8)
    q = pack_bits(np.zeros((2, 4), np.uint8))
    q_lab = np.array([[1, 0], [0, 0]], np.uint8)
    precision, recall = precision_recall_at_radius(db, db_lab, q, q_lab, 4)
    np.testing.assert_allclose(precision, [[0, 1 / 2, 2 / 3, 2 / 3, 2 / 3], [0] * 5], atol=1e-15)
    np.testing.assert_allclose(recall, [[0, 1 / 2, 1, 1, 1], [0] * 5], atol=1e-15)
    # ties by descending index would give (1/2)(1/1 + 2/3) = 5/6
    np.testing.assert_allclose(full_ranking_average_precision(db, db_lab, q, q_lab, 4), [7 / 12, 0], atol=1e-15)

    metrics, per_query = evaluate_detailed(
        Codes(4, "activitynet", "lsh", db, db_lab, q, q_lab), (1, 2, 3), full_ranking=True
    )
    np.testing.assert_allclose(metrics["pr_curve"]["precision"], [0, 1 / 4, 1 / 3, 1 / 3, 1 / 3], atol=1e-15)
    np.testing.assert_allclose(metrics["pr_curve"]["recall"], [0, 1 / 4, 1 / 2, 1 / 2, 1 / 2], atol=1e-15)
    assert metrics["precision_within_radius_2"] == pytest.approx(1 / 3, abs=1e-15)
    assert metrics["map_full_ranking"] == pytest.approx(7 / 24, abs=1e-15)
    # AP@1 = 0, AP@2 = (1/2)(1/2), AP@3 = (1/3)(1/2 + 2/3) for query 0
    assert metrics["per_class_map"] == {
        "n_queries": [1, 0],
        "map": {"1": [0.0, None], "2": [0.25, None], "3": [pytest.approx(7 / 18), None]},
    }
    assert per_query["n_relevant"].tolist() == [2, 0]
    lines = per_query_csv(per_query).splitlines()
    assert lines[0] == "query,n_relevant,ap@1,ap@2,ap@3,ap_full" and len(lines) == 3
    rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    np.testing.assert_allclose(rows, [[0, 2, 0, 1 / 4, 7 / 18, 7 / 12], [1, 0, 0, 0, 0, 0]], rtol=0, atol=1e-15)


def test_hand_computed_queries_are_database() -> None:
    """FCVID protocol, 2-bit codes a = 00 (class 0), b = 11 (class 0), c = 00 (class 1); self-matches count.

    a: distances [0, 2, 0], relevant a, b; ranked a, c, b -> AP (1/2)(1 + 2/3) = 5/6.
    b: distances [2, 0, 2], relevant a, b; ranked b, a, c -> AP 1.
    c: distances [0, 2, 0], relevant c;    ranked a, c, b -> AP 1/2.
    """
    db = pack_bits(np.array([[0, 0], [1, 1], [0, 0]]))
    lab = np.array([[1, 0], [1, 0], [0, 1]], np.uint8)
    precision, recall = precision_recall_at_radius(db, lab, None, None, 2)
    np.testing.assert_allclose(precision, [[1 / 2, 1 / 2, 2 / 3], [1, 1, 2 / 3], [1 / 2, 1 / 2, 1 / 3]], atol=1e-15)
    np.testing.assert_allclose(recall, [[1 / 2, 1 / 2, 1], [1 / 2, 1 / 2, 1], [1, 1, 1]], atol=1e-15)
    np.testing.assert_allclose(full_ranking_average_precision(db, lab, None, None, 2), [5 / 6, 1, 1 / 2], atol=1e-15)

    metrics = evaluate(Codes(2, "fcvid", "conmh", db, lab), (1, 2), full_ranking=True)
    np.testing.assert_allclose(metrics["pr_curve"]["precision"], [2 / 3, 2 / 3, 5 / 9], atol=1e-15)
    np.testing.assert_allclose(metrics["pr_curve"]["recall"], [2 / 3, 2 / 3, 1], atol=1e-15)
    assert metrics["precision_within_radius_2"] == pytest.approx(5 / 9, abs=1e-15)  # radius 2 = the code length
    assert metrics["map_full_ranking"] == pytest.approx(7 / 9, abs=1e-15)
    # AP@1: a 1, b 1, c 0; AP@2: a (1/2)(1), b (1/2)(1 + 1), c (1/2)(1/2)
    assert metrics["per_class_map"] == {"n_queries": [2, 1], "map": {"1": [1.0, 0.0], "2": [0.75, 0.25]}}


def test_precision_within_radius_is_a_point_of_the_curve() -> None:
    curve = np.array([0.9, 0.8, 0.7, 0.6])
    assert precision_within_radius(curve) == 0.7
    assert precision_within_radius(curve, 0) == 0.9
    assert precision_within_radius(curve[:2]) == 0.8  # 1-bit codes: radius 2 retrieves what radius 1 does
    assert precision_within_radius(np.array([curve, curve[::-1]])).tolist() == [0.7, 0.8]


def test_full_ranking_is_optional() -> None:
    db = pack_bits(np.array([[0, 0], [1, 1]]))
    lab = np.array([[1], [1]], np.uint8)
    metrics, per_query = evaluate_detailed(Codes(2, "fcvid", "conmh", db, lab), (1,))
    assert "map_full_ranking" not in metrics and "ap_full" not in per_query


def test_invalid_inputs() -> None:
    db = pack_bits(np.zeros((4, 12), np.uint8))
    lab = np.ones((4, 2), np.uint8)
    for f in (precision_recall_at_radius, full_ranking_average_precision):
        with pytest.raises(ValueError, match="nbits"):
            f(db, lab, None, None, 0)
        with pytest.raises(ValueError, match="uint8"):
            f(db, lab, None, None, 24)
        with pytest.raises(ValueError, match="both"):
            f(db, lab, db, None, 12)
        with pytest.raises(ValueError, match="chunk"):
            f(db, lab, None, None, 12, chunk=0)
    with pytest.raises(ValueError, match="rows"):
        per_class_map(np.zeros((3, 1)), lab)


# ----------------------------------------------------------------------------- conmh evaluate


@pytest.mark.parametrize("queries_are_database", [True, False])
def test_cli_per_query_csv(tmp_path, capsys, queries_are_database: bool) -> None:
    rng = np.random.default_rng(5)
    db, db_lab, q, q_lab = random_problem(rng, 16, 120, 35, code_values=10)
    if queries_are_database:
        codes = Codes(16, "fcvid", "conmh", pack_bits(db), db_lab)
    else:
        codes = Codes(16, "activitynet", "lsh", pack_bits(db), db_lab, pack_bits(q), q_lab)
    write_codes(tmp_path / "c.h5", codes)
    argv = ["evaluate", str(tmp_path / "c.h5"), "--out", str(tmp_path / "m.json"), "--ks", "5,20,200"]
    assert main(argv + ["--per-query", str(tmp_path / "q.csv"), "--full-ranking"]) == 0
    assert "P(r<=2)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    with open(tmp_path / "q.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["query", "n_relevant", "ap@5", "ap@20", "ap@200", "ap_full"]
    assert [int(row["query"]) for row in rows] == list(range(codes.n_queries))
    for k in (5, 20, 200):
        # floats are written exactly, so the mean is the metrics file's mAP@K to the last bit
        assert np.mean([float(row[f"ap@{k}"]) for row in rows]) == metrics["map"][str(k)]
    assert np.mean([float(row["ap_full"]) for row in rows]) == metrics["map_full_ranking"]
    q_lab_eff = db_lab if queries_are_database else q_lab
    expected = (q_lab_eff.astype(int) @ db_lab.T.astype(int) > 0).sum(axis=1)
    assert [int(row["n_relevant"]) for row in rows] == expected.tolist()

    # without the options: no CSV, no full-ranking mAP, the same mAP@K
    assert main(argv[:3] + [str(tmp_path / "m2.json")] + argv[4:]) == 0
    plain = json.loads((tmp_path / "m2.json").read_text())
    assert "map_full_ranking" not in plain and plain["map"] == metrics["map"]
    assert plain["pr_curve"] == metrics["pr_curve"] and plain["per_class_map"] == metrics["per_class_map"]
