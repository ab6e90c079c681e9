"""Hamming search: against a direct transcription, agreement with the evaluation's ranking, the
`conmh search` and `conmh export` commands, bad inputs, and equality with faiss."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conmh.cli import main
from conmh.codes import Codes, pack_bits, packed_width, unpack_bits, write_codes
from conmh.errors import ConfigError
from conmh.metrics import KS, average_precision_at_k
from conmh.search import (
    COLUMNS,
    OptionalDependencyError,
    faiss_index,
    faiss_search,
    format_json,
    hamming_search,
    import_faiss,
    parse_query_index,
)


def reference_search(db: np.ndarray, queries: np.ndarray, nbits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition, written out: unpack, count differing bits one pair at a time, sort by (distance, index)."""
    db_bits, q_bits = unpack_bits(db, nbits), unpack_bits(queries, nbits)
    indices, distances = [], []
    for q in q_bits:
        dist = [sum(int(a != b) for a, b in zip(q, row)) for row in db_bits]
        ranked = sorted(range(len(db_bits)), key=lambda j: (dist[j], j))[:k]
        indices.append(ranked)
        distances.append([dist[j] for j in ranked])
    shape = (len(q_bits), min(k, len(db_bits)))
    return np.array(indices, np.int64).reshape(shape), np.array(distances, np.int64).reshape(shape)


def tied_bits(rng: np.random.Generator, n: int, nbits: int, values: int | None) -> np.ndarray:
    """Random bits; with ``values``, drawn from that few distinct codes (many equal distances)."""
    if values is None:
        return rng.random((n, nbits)) < 0.5
    pool = rng.random((values, nbits)) < 0.5
    return pool[rng.integers(0, values, n)]


CASES = [  # nbits, n_db, n_q, distinct code values (None: any), k
    (1, 30, 7, None, 5),
    (5, 60, 12, None, 10),
    (8, 90, 15, 4, 20),
    (12, 80, 10, None, 100),  # 4 padding bits; k > N
    (24, 70, 10, 6, 33),
    (40, 50, 8, None, 7),  # 5 bytes: one zero-padded uint64 word
    (64, 120, 12, 10, 64),
    (100, 40, 6, 5, 40),  # two uint64 words; k = N
    (300, 30, 5, 4, 31),  # distances above 255; k = N + 1
]


@pytest.mark.parametrize("nbits, n_db, n_q, values, k", CASES)
@pytest.mark.parametrize("workers, chunk", [(1, 256), (2, 3)])
def test_matches_reference(nbits: int, n_db: int, n_q: int, values: int | None, k: int, workers: int, chunk: int):
    rng = np.random.default_rng([nbits, n_db, n_q])
    db, q = pack_bits(tied_bits(rng, n_db, nbits, values)), pack_bits(tied_bits(rng, n_q, nbits, values))
    indices, distances = hamming_search(db, q, nbits, k, workers=workers, chunk=chunk)
    expected_i, expected_d = reference_search(db, q, nbits, k)
    assert indices.dtype == np.int64 and indices.shape == (n_q, min(k, n_db))
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_array_equal(distances, expected_d)
    if values is not None:  # the cases are meant to hold ties inside the top k
        assert any(len(set(row)) < len(row) for row in distances.tolist())


@settings(max_examples=40, deadline=None)
@given(
    nbits=st.integers(1, 70),
    n_db=st.integers(1, 25),
    n_q=st.integers(0, 6),
    values=st.integers(1, 4),
    k=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_property(nbits: int, n_db: int, n_q: int, values: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    db, q = pack_bits(tied_bits(rng, n_db, nbits, values)), pack_bits(tied_bits(rng, n_q, nbits, values))
    indices, distances = hamming_search(db, q, nbits, k, workers=2, chunk=2)
    expected_i, expected_d = reference_search(db, q, nbits, k)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_array_equal(distances, expected_d)


def test_equal_distances_are_ranked_by_ascending_index() -> None:
    db = pack_bits(np.array([[1, 1, 0, 0]] * 3 + [[0, 0, 0, 0]] + [[1, 1, 0, 0]] * 2, bool))
    indices, distances = hamming_search(db, pack_bits(np.array([[1, 1, 0, 0]], bool)), 4, 10)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 4, 5, 3]])  # k > N: the whole database
    np.testing.assert_array_equal(distances, [[0, 0, 0, 0, 0, 2]])
    indices, _ = hamming_search(db, pack_bits(np.array([[0, 1, 0, 0]], bool)), 4, 4)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3]])  # all at distance 1: by index


@pytest.mark.parametrize("protocol", ["separate_queries", "queries_are_database"])
def test_top_k_is_the_ranking_the_evaluation_scores(protocol: str) -> None:
    """AP@K recomputed from the search's neighbours equals conmh.metrics' AP@K, query by query."""
    rng = np.random.default_rng(7)
    nbits, n_db = 16, 300
    db = pack_bits(tied_bits(rng, n_db, nbits, 40))
    db_labels = (rng.random((n_db, 5)) < 0.3).astype(np.uint8)
    if protocol == "separate_queries":
        q = pack_bits(tied_bits(rng, 50, nbits, 40))
        q_labels = (rng.random((50, 5)) < 0.3).astype(np.uint8)
        ap = average_precision_at_k(db, db_labels, q, q_labels, nbits, KS)
    else:
        q, q_labels = db, db_labels
        ap = average_precision_at_k(db, db_labels, None, None, nbits, KS)
    indices, _ = hamming_search(db, q, nbits, max(KS))
    rel = np.any(db_labels[indices] & q_labels[:, None, :], axis=2)
    for c, k in enumerate(KS):
        precision = np.cumsum(rel[:, :k], axis=1) / np.arange(1, k + 1)
        ours = (precision * rel[:, :k]).sum(axis=1) / k
        np.testing.assert_allclose(ours, ap[:, c], rtol=0, atol=1e-12)
    assert ap[:, -1].std() > 0  # not a degenerate case


def test_zero_queries_give_empty_results() -> None:
    db = np.zeros((5, 2), np.uint8)
    indices, distances = hamming_search(db, np.zeros((0, 2), np.uint8), 16, 3)
    assert indices.shape == distances.shape == (0, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(db=np.zeros((4, 2), np.int64)), "database codes must be uint8"),
        (dict(db=np.zeros((4, 3), np.uint8)), r"database codes must be uint8 \(N, 2\)"),
        (dict(db=np.zeros((0, 2), np.uint8)), "at least one code"),
        (dict(q=np.zeros((2, 1), np.uint8)), "queries codes must be uint8"),
        (dict(q=np.zeros(2, np.uint8)), "queries codes must be uint8"),
        (dict(db=np.full((4, 2), 1, np.uint8)), "database codes have non-zero padding bits"),
        (dict(q=np.full((2, 2), 0x0F, np.uint8)), "queries codes have non-zero padding bits"),
        (dict(k=0), "k must be a positive integer"),
        (dict(k=True), "k must be a positive integer"),
        (dict(k=2.0), "k must be a positive integer"),
        (dict(nbits=0), "nbits must be a positive integer"),
        (dict(workers=0), "workers must be a positive integer"),
    ],
)
def test_invalid_inputs(change: dict, message: str) -> None:
    args = dict(db=np.zeros((4, 2), np.uint8), q=np.zeros((2, 2), np.uint8), nbits=12, k=3, workers=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        hamming_search(args["db"], args["q"], args["nbits"], args["k"], workers=args["workers"])


def test_parse_query_index() -> None:
    np.testing.assert_array_equal(parse_query_index("0,5,7", 8), [0, 5, 7])
    np.testing.assert_array_equal(parse_query_index("2:5", 8), [2, 3, 4])
    np.testing.assert_array_equal(parse_query_index("7, 0:2,0", 8), [7, 0, 1, 0])
    for spec, message in [
        ("8", "out of range: queries are indexed 0 to 7"),
        ("-1", "out of range"),
        ("5:9", "out of range"),
        ("3:3", "empty range"),
        ("a", "expected comma-separated indices"),
        ("1,,2", "expected comma-separated indices"),
        ("1:2:3", "expected comma-separated indices"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_query_index(spec, 8)


# --- the command line -------------------------------------------------------------


def make_codes(path: Path, queries_are_database: bool, nbits: int = 12, seed: int = 0) -> Codes:
    rng = np.random.default_rng(seed)
    db_labels = (rng.random((40, 4)) < 0.4).astype(np.uint8)
    db_labels[0] = 0  # an item without a label: an empty list
    codes = Codes(
        bits=nbits,
        dataset="tiny",
        method="test",
        database=pack_bits(tied_bits(rng, 40, nbits, 8)),
        database_labels=db_labels,
        queries=None if queries_are_database else pack_bits(tied_bits(rng, 9, nbits, 8)),
        query_labels=None if queries_are_database else (rng.random((9, 4)) < 0.4).astype(np.uint8),
    )
    write_codes(path, codes)
    return codes


def expected_rows(codes: Codes, query_ids, queries: np.ndarray, k: int) -> list[tuple]:
    indices, distances = reference_search(codes.database, queries, codes.bits, k)
    return [
        (int(q), rank + 1, int(i), int(d), [int(c) for c in np.flatnonzero(codes.database_labels[i])])
        for q, row_i, row_d in zip(query_ids, indices, distances)
        for rank, (i, d) in enumerate(zip(row_i, row_d))
    ]


def parse_csv(text: str) -> list[tuple]:
    reader = csv.reader(io.StringIO(text))
    assert tuple(next(reader)) == COLUMNS
    return [(int(q), int(r), int(i), int(d), [int(c) for c in labels.split()]) for q, r, i, d, labels in reader]


def parse_json(text: str) -> tuple[dict, list[tuple]]:
    obj = json.loads(text)
    return obj, [tuple(row[c] for c in COLUMNS) for row in obj["results"]]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("queries_are_database", [False, True])
def test_cli_search_csv_all_queries(tmp_path: Path, capsys, queries_are_database: bool) -> None:
    codes = make_codes(tmp_path / "codes.h5", queries_are_database)
    pool = codes.database if queries_are_database else codes.queries
    code, out, _ = run_cli(capsys, "search", tmp_path / "codes.h5", "-k", 7)
    assert code == 0
    assert parse_csv(out) == expected_rows(codes, range(len(pool)), pool, 7)


def test_cli_search_json_selected_queries_to_file(tmp_path: Path, capsys) -> None:
    codes = make_codes(tmp_path / "codes.h5", queries_are_database=False)
    out_file = tmp_path / "out" / "neighbours.json"
    code, out, _ = run_cli(
        capsys,
        "search",
        tmp_path / "codes.h5",
        "--query-index",
        "8,0:2",
        "-k",
        50,
        "--format",
        "json",
        "--out",
        out_file,
    )
    assert code == 0 and "3 queries x top 40 of 40" in out
    meta, rows = parse_json(out_file.read_text())
    ids = [8, 0, 1]
    assert rows == expected_rows(codes, ids, codes.queries[ids], 50)  # k > N: the whole database
    assert meta["k"] == 40 and meta["bits"] == 12 and meta["queries"] == "queries" and meta["search"] == "exact"
    assert "ascending database index" in meta["tie_rule"]
    assert any(row[4] == [] for row in rows)  # database item 0 has no label


def test_json_output_is_valid_json_also_without_rows() -> None:
    rows = [{"query": 0, "rank": 1, "database_index": 3, "distance": 2, "labels": [1, 4]}]
    for some in (rows, []):
        assert json.loads(format_json(some, {"bits": 8, "results": "ignored"})) == {"bits": 8, "results": some}


def test_cli_search_queries_are_database_indexes_the_database(tmp_path: Path, capsys) -> None:
    codes = make_codes(tmp_path / "codes.h5", queries_are_database=True)
    code, out, _ = run_cli(capsys, "search", tmp_path / "codes.h5", "--query-index", "39", "-k", 3)
    assert code == 0
    rows = parse_csv(out)
    assert rows == expected_rows(codes, [39], codes.database[[39]], 3)
    assert rows[0][3] == 0  # the query is in the database


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--query-index", "9"], "--query-index: 9 is out of range: queries are indexed 0 to 8"),
        (["--query-index", "x"], "expected comma-separated indices"),
    ],
)
def test_cli_search_bad_query_index(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    make_codes(tmp_path / "codes.h5", queries_are_database=False)
    code, out, err = run_cli(capsys, "search", tmp_path / "codes.h5", *argv)
    assert code == 3 and out == ""
    assert err.startswith("conmh search: error: ") and message in err


def test_cli_search_missing_codes_file(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "search", tmp_path / "nope.h5")
    assert code == 3 and "nope.h5: does not exist" in err


def test_cli_search_usage_errors(tmp_path: Path, capsys) -> None:
    make_codes(tmp_path / "codes.h5", queries_are_database=False)
    for argv, message in [
        (["--features", tmp_path / "f.h5"], "--features and --checkpoint go together"),
        (["--checkpoint", tmp_path / "m.pt"], "--features and --checkpoint go together"),
        (["--bits", "16"], "--bits is for an official --checkpoint"),
        (["-k", "0"], "must be a positive integer"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["search", str(tmp_path / "codes.h5"), *map(str, argv)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# --- queries from features and a checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    """A tiny model (mini preset, 16 bits) saved as `conmh train` does (with arch) and as an official file (without)."""
    import torch

    from conmh.model import ConMH, ModelConfig

    root = tmp_path_factory.mktemp("search_model")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("mini", feature_dim=16, frames=5, nbits=16)
    model = ConMH(cfg)
    torch.save({"model_state_dict": model.state_dict(), "arch": cfg.to_dict()}, root / "model.pt")
    torch.save({"model_state_dict": model.state_dict()}, root / "official.pth")
    rng = np.random.default_rng(1)
    for name, n, dim in [("database.h5", 30, 16), ("queries.h5", 8, 16), ("wrong_dim.h5", 4, 12)]:
        with h5py.File(root / name, "w") as f:
            f["feats"] = rng.standard_normal((n, 5, dim)).astype(np.float32)
    return {"root": root, "model": model, "cfg": cfg}


def encode_first(model_files: dict, name: str) -> np.ndarray:
    import torch

    from conmh.encode import encode_features
    from conmh.features import FeatureFiles

    with FeatureFiles([model_files["root"] / name]) as feats:
        return pack_bits(encode_features(model_files["model"], feats, torch.device("cpu")))


@pytest.fixture(scope="module")
def feature_codes(model_files: dict) -> Path:
    """A codes file whose database is the encoded database features."""
    path = model_files["root"] / "codes.h5"
    database = encode_first(model_files, "database.h5")
    labels = np.eye(3, dtype=np.uint8)[np.arange(len(database)) % 3]
    write_codes(path, Codes(bits=16, dataset="tiny", method="conmh", database=database, database_labels=labels))
    return path


@pytest.mark.parametrize("official", [False, True])
def test_cli_search_features_equals_encoding_first(model_files: dict, feature_codes: Path, capsys, official: bool):
    root = model_files["root"]
    if official:
        checkpoint = ["--checkpoint", root / "official.pth", "--bits", 16, "--preset", "mini"]
    else:
        checkpoint = ["--checkpoint", root / "model.pt"]
    argv = ["search", feature_codes, "--features", root / "queries.h5", *checkpoint, "-k", 6, "--format", "json"]
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--no-progress")
    assert code == 0, err
    from conmh.codes import read_codes

    codes = read_codes(feature_codes)
    queries = encode_first(model_files, "queries.h5")
    meta, rows = parse_json(out)
    assert rows == expected_rows(codes, range(8), queries, 6)
    assert meta["queries"] == "features" and meta["n_queries"] == 8
    # --query-index picks rows of the features file
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--no-progress", "--query-index", "7,2")
    assert code == 0, err
    assert parse_json(out)[1] == expected_rows(codes, [7, 2], queries[[7, 2]], 6)


def test_cli_search_database_features_find_themselves(model_files: dict, feature_codes: Path, capsys) -> None:
    root = model_files["root"]
    argv = ["search", feature_codes, "--features", root / "database.h5", "--checkpoint", root / "model.pt", "-k", 1]
    code, out, _ = run_cli(capsys, *argv, "--device", "cpu", "--no-progress")
    assert code == 0
    for q, _rank, i, d, _labels in parse_csv(out):
        assert d == 0 and i <= q  # itself, or an equal code of lower index


def test_cli_search_features_errors(model_files: dict, feature_codes: Path, tmp_path: Path, capsys) -> None:
    root = model_files["root"]
    model = ["--checkpoint", root / "model.pt", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, "search", feature_codes, "--features", root / "wrong_dim.h5", *model)
    assert code == 3 and "model.pt: checkpoint does not fit the data" in err and "12 dims" in err
    code, _, err = run_cli(capsys, "search", feature_codes, "--features", tmp_path / "none.h5", *model)
    assert code == 4 and "none.h5: features file does not exist" in err
    code, _, err = run_cli(capsys, "search", feature_codes, "--features", root / "queries.h5", *model, "--key", "x")
    assert code == 3 and "no key 'x'" in err
    code, _, err = run_cli(
        capsys, "search", feature_codes, "--features", root / "queries.h5", *model, "--query-index", "8"
    )
    assert code == 3 and "out of range: rows of" in err
    other = tmp_path / "codes32.h5"
    make_codes(other, queries_are_database=True, nbits=32)
    code, _, err = run_cli(capsys, "search", other, "--features", root / "queries.h5", *model)
    assert code == 3 and "makes 16-bit codes" in err and "holds 32-bit codes" in err
    official = ["--checkpoint", root / "official.pth", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, "search", feature_codes, "--features", root / "queries.h5", *official)
    assert code == 3 and "does not record its architecture" in err


# --- faiss ---------------------------------------------------------------------------------


def assert_same_neighbours(ours: tuple, theirs: tuple, true_distances: np.ndarray) -> None:
    """faiss may pick other items at the k-th distance: equal distances, equal sets strictly below the k-th
    distance, and every item faiss returns really at the distance it reports."""
    (oi, od), (ti, td) = ours, theirs
    np.testing.assert_array_equal(od, td)
    for q in range(len(oi)):
        kth = od[q, -1]
        assert set(oi[q][od[q] < kth]) == set(ti[q][td[q] < kth])
        np.testing.assert_array_equal(true_distances[q, ti[q]], td[q])


def all_distances(db: np.ndarray, q: np.ndarray, nbits: int) -> np.ndarray:
    return (unpack_bits(q, nbits)[:, None, :] != unpack_bits(db, nbits)[None, :, :]).sum(axis=2)


@pytest.mark.parametrize("nbits", [12, 64, 100])
def test_faiss_returns_the_same_neighbours_at_the_same_distances(nbits: int) -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(nbits)
    db, q = pack_bits(tied_bits(rng, 500, nbits, 60)), pack_bits(tied_bits(rng, 40, nbits, 60))
    index = faiss_index(db, nbits)
    assert isinstance(index, faiss.IndexBinaryFlat) and index.d == 8 * packed_width(nbits) and index.ntotal == 500
    for k in (1, 10, 100, 600):
        ours = hamming_search(db, q, nbits, k)
        theirs = faiss_search(index, q, k)
        assert theirs[0].shape == (40, min(k, 500))
        assert_same_neighbours(ours, theirs, all_distances(db, q, nbits))
    # the raw faiss call too, not only our wrapper around it
    distances, _ = index.search(q, 10)
    np.testing.assert_array_equal(distances, hamming_search(db, q, nbits, 10)[1])


def test_cli_export_round_trip_and_search_with_the_index(tmp_path: Path, capsys) -> None:
    faiss = pytest.importorskip("faiss")
    codes = make_codes(tmp_path / "codes.h5", queries_are_database=False, nbits=12)
    code, out, err = run_cli(capsys, "export", tmp_path / "codes.h5", "--out", tmp_path / "index.faiss")
    assert code == 0, err
    assert "40 database codes of 12 bits" in out
    index = faiss.read_index_binary(str(tmp_path / "index.faiss"))
    assert index.d == 16 and index.ntotal == 40
    stored = faiss.vector_to_array(index.xb).reshape(40, 2)
    np.testing.assert_array_equal(stored, codes.database)

    code, out, err = run_cli(capsys, "search", tmp_path / "codes.h5", "--index", tmp_path / "index.faiss", "-k", 5)
    assert code == 0, err
    via_faiss = parse_csv(out)
    exact = expected_rows(codes, range(9), codes.queries, 5)
    assert [row[:2] for row in via_faiss] == [row[:2] for row in exact]  # query and rank columns

    def column(rows: list[tuple], c: int) -> np.ndarray:
        return np.array([row[c] for row in rows]).reshape(9, 5)

    ours, theirs = (column(exact, 2), column(exact, 3)), (column(via_faiss, 2), column(via_faiss, 3))
    assert_same_neighbours(ours, theirs, all_distances(codes.database, codes.queries, codes.bits))
    faiss_i, faiss_d = theirs
    labels = {i: [int(c) for c in np.flatnonzero(codes.database_labels[i])] for i in range(40)}
    assert all(row[4] == labels[row[2]] for row in via_faiss)
    for q in range(9):  # within what faiss returned, equal distances by ascending index
        assert list(zip(faiss_d[q], faiss_i[q])) == sorted(zip(faiss_d[q], faiss_i[q]))

    # an index of other codes is refused
    make_codes(tmp_path / "other.h5", queries_are_database=False, nbits=12, seed=1)
    code, _, err = run_cli(capsys, "search", tmp_path / "other.h5", "--index", tmp_path / "index.faiss")
    assert code == 3 and "does not hold this codes file's 40 database codes of 12 bits" in err
    (tmp_path / "junk.faiss").write_bytes(b"junk" * 10)
    code, _, err = run_cli(capsys, "search", tmp_path / "codes.h5", "--index", tmp_path / "junk.faiss")
    assert code == 3 and "not a readable faiss binary index" in err
    code, _, err = run_cli(capsys, "search", tmp_path / "codes.h5", "--index", tmp_path / "none.faiss")
    assert code == 3 and "none.faiss: does not exist" in err


def test_missing_faiss_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(OptionalDependencyError, match=r"pip install 'conmh\[search\]'"):
        import_faiss()
    make_codes(tmp_path / "codes.h5", queries_are_database=True)
    code, _, err = run_cli(capsys, "export", tmp_path / "codes.h5", "--out", tmp_path / "index.faiss")
    assert code == 3 and "pip install 'conmh[search]'" in err
    assert not (tmp_path / "index.faiss").exists()
    code, _, err = run_cli(capsys, "search", tmp_path / "codes.h5", "--index", tmp_path / "index.faiss")
    assert code == 3 and "pip install 'conmh[search]'" in err
