"""Exact Hamming top-k search over packed codes, and the faiss export (docs/search.md).

:func:`hamming_search` ranks a database for each query exactly as the
evaluation does (``conmh.metrics``): ascending Hamming distance, equal
distances by ascending database index (``TIE_RULE``), with the same compiled
kernels (``conmh.kernels``: packed words, XOR + popcount, the k-th distance
found by counting, a counting sort of the few items at or below it). So the
top K of a search are the items whose relevance mAP@K counts.

faiss (``pip install 'conmh[search]'``) is optional: :func:`faiss_index`
builds an ``IndexBinaryFlat`` of the database codes; its distances equal ours
(the padding bits are zero), but it may order equal distances otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .codes import Codes, pack_bits, packed_width, read_codes
from .datasets import FEATURE_KEY
from .errors import CheckpointError, CodesError, ConfigError, ConMHError, MissingDataError
from .hamming import TIE_RULE, check_codes, check_count, hamming_search
from .presets import PAPER_PRESET

if TYPE_CHECKING:
    from .features import FeatureFiles

__all__ = [
    "COLUMNS",
    "TIE_RULE",
    "OptionalDependencyError",
    "hamming_search",
    "parse_query_index",
    "result_rows",
    "format_csv",
    "format_json",
    "import_faiss",
    "faiss_index",
    "write_faiss_index",
    "read_faiss_index",
    "faiss_search",
    "RowSubset",
    "encode_feature_queries",
    "search_codes_file",
]

COLUMNS = ("query", "rank", "database_index", "distance", "labels")
FAISS_HINT = "pip install 'conmh[search]'"


class OptionalDependencyError(ConMHError):
    """An optional dependency (faiss) is needed and not installed."""


# --- queries and output ---------------------------------------------------------


def parse_query_index(spec: str, n: int, what: str = "queries") -> np.ndarray:
    """Query indices from ``"0,5,7"``, ``"10:20"`` (Python-style: 10 to 19) or a mix (``"0,10:20"``).

    Order and repeats are kept. Raises ConfigError for a malformed item or an
    index outside [0, n).
    """
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if ":" in item:
                lo_text, hi_text = item.split(":")
                lo, hi = int(lo_text), int(hi_text)
                if hi <= lo:
                    raise ConfigError(f"--query-index: empty range {item!r} (START:STOP needs START < STOP)")
                values = range(lo, hi)
            else:
                values = range(int(item), int(item) + 1)
        except ValueError:
            raise ConfigError(
                f"--query-index: expected comma-separated indices or START:STOP ranges, got {item!r}"
            ) from None
        if values.start < 0 or values.stop > n:
            raise ConfigError(f"--query-index: {item} is out of range: {what} are indexed 0 to {n - 1}")
        out.extend(values)
    return np.asarray(out, dtype=np.int64)


def result_rows(
    query_ids: np.ndarray, indices: np.ndarray, distances: np.ndarray, database_labels: np.ndarray
) -> list[dict]:
    """One dict per (query, rank): the ``COLUMNS``, rank from 1, labels as the list of class indices."""
    labels = [np.flatnonzero(row).tolist() for row in np.asarray(database_labels)]
    rows = []
    for q, idx_row, dist_row in zip(np.asarray(query_ids).tolist(), indices.tolist(), distances.tolist()):
        for rank, (idx, d) in enumerate(zip(idx_row, dist_row), start=1):
            rows.append({"query": q, "rank": rank, "database_index": idx, "distance": d, "labels": labels[idx]})
    return rows


def format_csv(rows: Sequence[dict]) -> str:
    """CSV with a header; the labels column holds the class indices separated by spaces (empty: no label)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([*(row[c] for c in COLUMNS[:-1]), " ".join(map(str, row["labels"]))])
    return buf.getvalue()


def format_json(rows: Sequence[dict], meta: dict) -> str:
    """A JSON object: ``meta`` (codes file, bits, k, tie rule, ...) and ``results``, the rows, one per line."""
    head = json.dumps({**{key: value for key, value in meta.items() if key != "results"}, "results": []}, indent=1)
    body = ",\n".join(f"  {json.dumps(row)}" for row in rows)
    return head[: -len("[]\n}")] + (f"[\n{body}\n ]\n}}\n" if rows else "[]\n}\n")


class RowSubset:
    """Some rows of a :class:`~conmh.features.FeatureFiles`, in a given order, as ``encode_features`` reads them."""

    def __init__(self, feats: FeatureFiles, rows: np.ndarray) -> None:
        self.feats, self.rows = feats, np.asarray(rows, dtype=np.int64)
        self.paths, self.key, self.frames, self.dim = feats.paths, feats.key, feats.frames, feats.dim
        self.n = len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.feats.take(self.rows[start:stop])


def encode_feature_queries(
    checkpoint: str | os.PathLike,
    features: str | os.PathLike,
    *,
    key: str = FEATURE_KEY,
    query_index: str | None = None,
    bits: int | None = None,
    preset: str = PAPER_PRESET,
    device: str = "auto",
    batch_size: int = 1024,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(row ids, packed codes, bits) of the videos of a features file, encoded as ``conmh encode`` does.

    ``query_index`` selects rows (:func:`parse_query_index`; default all).
    ``bits`` (with ``preset``) gives the architecture of an official
    checkpoint, which does not record it; the features give its dims.
    Raises CheckpointError when the features do not fit the checkpoint.
    """
    from .api import load_model
    from .device import select_device
    from .encode import encode_features
    from .features import FeatureFiles

    if not Path(features).is_file():
        raise MissingDataError(f"{features}: features file does not exist (expected HDF5, float32 (N, frames, dim))")
    with FeatureFiles([features], key=key) as feats:
        rows = (
            np.arange(feats.n)
            if query_index is None
            else parse_query_index(query_index, feats.n, f"rows of {features}")
        )
        model = load_model(checkpoint, bits=bits, feature_dim=feats.dim, frames=feats.frames, preset=preset)
        try:
            bits_ = encode_features(
                model, RowSubset(feats, rows), select_device(device), batch_size, progress, "queries"
            )
        except ConfigError as exc:  # the features do not fit this checkpoint: name it too
            raise CheckpointError(f"{checkpoint}: checkpoint does not fit the data: {exc}") from None
    return rows, pack_bits(bits_), model.cfg.nbits


def search_codes_file(
    codes_path: str | os.PathLike,
    k: int,
    *,
    query_index: str | None = None,
    features: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    workers: int | None = None,
    **encode_options,
) -> tuple[list[dict], dict]:
    """``conmh search``: (rows, meta) for the queries of a codes file, or of a features file with ``checkpoint``.

    Queries: the codes file's queries (its database when queries are the
    database), all or those of ``query_index``; or the rows of ``features``
    encoded with ``checkpoint`` (``encode_options``: see
    :func:`encode_feature_queries`). ``index``: search that faiss index of
    the database (``conmh export``) instead of :func:`hamming_search`.
    """
    codes = read_codes(codes_path)
    meta: dict = {"codes": str(codes_path), "dataset": codes.dataset, "method": codes.method, "bits": codes.bits}
    if features is not None:
        if checkpoint is None:
            raise ConfigError("--features needs --checkpoint to encode them")
        ids, queries, nbits = encode_feature_queries(checkpoint, features, query_index=query_index, **encode_options)
        if nbits != codes.bits:
            raise ConfigError(
                f"{checkpoint}: the checkpoint makes {nbits}-bit codes, but {codes_path} holds {codes.bits}-bit codes"
            )
        meta.update(queries="features", features=str(features), checkpoint=str(checkpoint))
    else:
        pool = codes.database if codes.queries_are_database else codes.queries
        what = "database codes (queries are the database)" if codes.queries_are_database else "queries"
        ids = np.arange(len(pool)) if query_index is None else parse_query_index(query_index, len(pool), what)
        queries = pool[ids]
        meta["queries"] = "database" if codes.queries_are_database else "queries"
    if index is not None:
        indices, distances = faiss_search(read_faiss_index(index, codes), queries, k)
        meta.update(search="faiss IndexBinaryFlat", index=str(index))
        meta["tie_rule"] = TIE_RULE + " among the items faiss returned (faiss picks which items of the k-th distance)"
    else:
        indices, distances = hamming_search(codes.database, queries, codes.bits, k, workers=workers)
        meta.update(search="exact", tie_rule=TIE_RULE)
    meta.update(k=int(indices.shape[1]), n_queries=len(ids), n_database=codes.n_database)
    return result_rows(ids, indices, distances, codes.database_labels), meta


# --- faiss ----------------------------------------------------------------------


def import_faiss():
    """The faiss module, or OptionalDependencyError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise OptionalDependencyError(
            f"faiss is not installed; it is an optional dependency: {FAISS_HINT} (or pip install faiss-cpu)"
        ) from None
    return faiss


def faiss_index(database: np.ndarray, nbits: int):
    """A ``faiss.IndexBinaryFlat`` of d = 8 * packed width holding ``database``.

    The padding bits of the last byte are zero in every code, so they add
    nothing to a distance: faiss's distances equal :func:`hamming_search`'s.
    """
    faiss = import_faiss()
    check_count("nbits", nbits)
    check_codes("database", database, nbits, allow_empty=False)
    index = faiss.IndexBinaryFlat(8 * database.shape[1])
    index.add(np.ascontiguousarray(database))
    return index


def write_faiss_index(codes: Codes, path: str | os.PathLike) -> None:
    """Write the database codes of ``codes`` to ``path`` as a faiss binary index (atomically)."""
    from .atomic import atomic_path

    faiss = import_faiss()
    index = faiss_index(codes.database, codes.bits)
    with atomic_path(path) as tmp:
        faiss.write_index_binary(index, str(tmp))


def read_faiss_index(path: str | os.PathLike, codes: Codes):
    """Read a faiss binary index written by :func:`write_faiss_index`, checked to hold ``codes``'s database.

    Raises CodesError when the file is missing or unreadable, or holds other codes.
    """
    faiss = import_faiss()
    path = Path(path)
    if not path.is_file():
        raise CodesError(f"faiss index {path}: does not exist (write it with `conmh export`)")
    where = f"faiss index {path}"
    try:
        index = faiss.read_index_binary(str(path))
    except RuntimeError as exc:
        raise CodesError(f"{where}: not a readable faiss binary index ({str(exc).splitlines()[0]})") from None
    if not isinstance(index, faiss.IndexBinaryFlat):
        raise CodesError(f"{where}: expected an IndexBinaryFlat (exact search), found {type(index).__name__}")
    width = packed_width(codes.bits)
    stored = faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size) if index.ntotal else None
    if index.d != 8 * width or stored is None or not np.array_equal(stored, codes.database):
        raise CodesError(
            f"{where}: does not hold this codes file's {codes.n_database} database codes of {codes.bits} "
            f"bits (it has {index.ntotal} codes of {index.d} bits); export it again with `conmh export`"
        )
    return index


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a faiss binary index: (indices int64, distances int32) (nq, min(k, ntotal)).

    Each row is re-sorted by (distance, index), so it follows ``TIE_RULE`` among
    the items faiss returned; at the k-th distance, faiss may have picked other
    items of that distance than :func:`hamming_search` (same distances, same
    neighbours strictly below the k-th distance).
    """
    check_count("k", k)
    if not isinstance(queries, np.ndarray) or queries.dtype != np.uint8 or queries.shape[1:] != (index.code_size,):
        raise ValueError(
            f"queries must be uint8 (nq, {index.code_size}) for this index, got "
            f"{getattr(queries, 'dtype', type(queries))} {getattr(queries, 'shape', None)}"
        )
    k = min(int(k), index.ntotal)
    distances, indices = index.search(np.ascontiguousarray(queries), k)
    order = np.lexsort((indices, distances), axis=1)
    return np.take_along_axis(indices, order, 1).astype(np.int64), np.take_along_axis(distances, order, 1)
