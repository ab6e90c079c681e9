"""Binary codes on disk: bit packing and the HDF5 codes file.

A codes file holds everything evaluation needs (docs/reference.md §5), so that
``conmh evaluate`` reads one file and no dataset:

* ``/database/codes`` uint8 (N, ceil(bits/8)) and ``/database/labels`` uint8 (N, C);
* ``/queries/codes`` and ``/queries/labels`` likewise, or, for the FCVID
  protocol where every database video is also a query, no ``/queries`` group
  and the root attribute ``queries_are_database = 1``;
* root attributes ``format_version``, ``bits``, ``dataset``, ``method``,
  ``queries_are_database`` and the free-form ``Codes.attrs`` (checkpoint hash, seed, ...).

Codes are stored packed (``np.packbits`` along the bit axis): code bit 0 is
the most significant bit of byte 0, a set bit means +1, and the padding bits
of the last byte are 0. That is 8x smaller than one byte per bit and is
exactly what the popcount evaluation in ``conmh.metrics`` consumes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path
from .errors import CodesError

__all__ = [
    "FORMAT_VERSION",
    "Codes",
    "pack_bits",
    "unpack_bits",
    "packed_width",
    "padding_mask",
    "write_codes",
    "read_codes",
]

FORMAT_VERSION = 1
# Root attributes the format itself uses; ``Codes.attrs`` may not shadow them.
RESERVED_ATTRS = ("format_version", "bits", "dataset", "method", "queries_are_database")
AttrValue = str | int | float | bool


def packed_width(nbits: int) -> int:
    """Bytes per packed code of ``nbits`` bits."""
    return math.ceil(nbits / 8)


def padding_mask(nbits: int) -> int:
    """Mask of the unused (padding) bits in the last byte of an ``nbits``-bit packed code."""
    return (1 << (-nbits % 8)) - 1


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack (N, nbits) bool or 0/1 bits into uint8 (N, ceil(nbits/8)).

    Bit 0 of a code is the most significant bit of its first byte; 1 means +1.
    Values other than 0/1 (for example a {-1, +1} sign array) are refused
    rather than guessed at: the caller decides how a sign maps to a bit.
    """
    a = np.asarray(bits)
    if a.ndim != 2:
        raise ValueError(f"bits must be 2-D (N, nbits), got shape {a.shape}")
    if a.dtype != np.bool_:
        if not (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()):
            raise ValueError(f"bits must be bool or 0/1 integers, got dtype {a.dtype} with other values")
        a = a.astype(np.bool_)
    return np.packbits(a, axis=1)


def unpack_bits(packed: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 (N, ceil(nbits/8)) -> bool (N, nbits)."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise ValueError(f"packed codes must be 2-D uint8, got {p.dtype} {p.shape}")
    if nbits < 1 or p.shape[1] != packed_width(nbits):
        raise ValueError(f"{nbits} bits need {packed_width(nbits)} bytes per code, got {p.shape[1]}")
    return np.unpackbits(p, axis=1, count=nbits).astype(np.bool_)


@dataclass
class Codes:
    """Packed codes and labels of a dataset's database and queries.

    ``queries``/``query_labels`` are None when the queries are the database
    itself (FCVID protocol: each query is also a database item).
    """

    bits: int
    dataset: str
    method: str
    database: np.ndarray
    database_labels: np.ndarray
    queries: np.ndarray | None = None
    query_labels: np.ndarray | None = None
    attrs: dict[str, AttrValue] = field(default_factory=dict)

    @property
    def queries_are_database(self) -> bool:
        return self.queries is None

    @property
    def n_database(self) -> int:
        return int(self.database.shape[0])

    @property
    def n_queries(self) -> int:
        return self.n_database if self.queries is None else int(self.queries.shape[0])


def _check_split(where: str, split: str, codes: np.ndarray, labels: np.ndarray, bits: int) -> None:
    """Raise CodesError unless ``codes``/``labels`` form a valid split of ``bits``-bit codes."""
    name = f"{where}: /{split}"
    if codes.dtype != np.uint8:
        raise CodesError(f"{name}/codes: expected dtype uint8 (packed bits), found {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != packed_width(bits):
        raise CodesError(
            f"{name}/codes: expected shape (N, {packed_width(bits)}) for {bits}-bit codes packed 8 per byte, "
            f"found {codes.shape}"
        )
    if codes.shape[0] == 0:
        raise CodesError(f"{name}/codes: expected at least one code, found none")
    pad = padding_mask(bits)
    if pad and np.any(codes[:, -1] & pad):
        raise CodesError(
            f"{name}/codes: expected the {8 * codes.shape[1] - bits} padding bits of the last byte to be 0"
        )
    if labels.dtype != np.uint8:
        raise CodesError(f"{name}/labels: expected dtype uint8 (0/1 class matrix), found {labels.dtype}")
    if labels.ndim != 2:
        raise CodesError(f"{name}/labels: expected a 2-D (N, classes) matrix, found shape {labels.shape}")
    if labels.shape[0] != codes.shape[0]:
        raise CodesError(
            f"{name}: expected one label row per code, found {labels.shape[0]} label rows for {codes.shape[0]} codes"
        )
    if labels.size and labels.max() > 1:
        raise CodesError(f"{name}/labels: expected 0/1 values, found maximum {labels.max()}")


def _check_codes(codes: Codes, where: str) -> None:
    """Raise CodesError unless ``codes`` is self-consistent (used on write and on read)."""
    if not isinstance(codes.bits, (int, np.integer)) or isinstance(codes.bits, bool) or codes.bits < 1:
        raise CodesError(f"{where}: expected attribute 'bits' to be a positive integer, found {codes.bits!r}")
    _check_split(where, "database", codes.database, codes.database_labels, int(codes.bits))
    if (codes.queries is None) != (codes.query_labels is None):
        raise CodesError(f"{where}: queries and query labels must both be present or both absent")
    if codes.queries is not None:
        _check_split(where, "queries", codes.queries, codes.query_labels, int(codes.bits))
        if codes.query_labels.shape[1] != codes.database_labels.shape[1]:
            raise CodesError(
                f"{where}: query labels have {codes.query_labels.shape[1]} classes, "
                f"database labels {codes.database_labels.shape[1]}; expected the same"
            )


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as uint8: bool or 0/1 integers are converted, anything else is left for the check to refuse."""
    a = np.asarray(labels)
    if a.dtype == np.bool_ or (np.issubdtype(a.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 1):
        return a.astype(np.uint8, copy=False)
    return a


def write_codes(path: str | os.PathLike, codes: Codes) -> None:
    """Write ``codes`` to an HDF5 file, atomically (a reader never sees half a file).

    Raises CodesError if ``codes`` is inconsistent, so that no file is written
    that :func:`read_codes` would refuse.
    """
    path = Path(path)
    codes = Codes(
        bits=codes.bits,
        dataset=codes.dataset,
        method=codes.method,
        database=np.asarray(codes.database),
        database_labels=_as_labels(codes.database_labels),
        queries=None if codes.queries is None else np.asarray(codes.queries),
        query_labels=None if codes.query_labels is None else _as_labels(codes.query_labels),
        attrs=dict(codes.attrs),
    )
    _check_codes(codes, f"codes to write to {path}")
    for key, value in codes.attrs.items():
        if key in RESERVED_ATTRS:
            raise CodesError(f"codes to write to {path}: attribute {key!r} is reserved by the format")
        if not isinstance(value, (str, int, float, bool, np.integer, np.floating)):
            raise CodesError(
                f"codes to write to {path}: attribute {key!r} must be str, int or float, found {type(value).__name__}"
            )
    strings = {"dataset": codes.dataset, "method": codes.method, **codes.attrs}
    for key, value in strings.items():
        # Fixed-length strings are NUL-padded: a trailing NUL would be read back as padding, and lost.
        if isinstance(value, str) and value.endswith("\0"):
            raise CodesError(f"codes to write to {path}: attribute {key!r} ends with a NUL character ({value!r})")
    with atomic_path(path) as tmp:
        # libver v110: object headers carry checksums, so damaged metadata (a chunk
        # address, an attribute) fails to read instead of reading as zeros; strings
        # are stored fixed-length for the same reason (variable-length ones live in
        # the unchecked global heap).
        with h5py.File(tmp, "w", libver="v110") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["bits"] = int(codes.bits)
            f.attrs["dataset"] = _fixed(str(codes.dataset))
            f.attrs["method"] = _fixed(str(codes.method))
            f.attrs["queries_are_database"] = int(codes.queries_are_database)
            for key, value in codes.attrs.items():
                f.attrs[key] = _fixed(value) if isinstance(value, str) else value
            splits = [("database", codes.database, codes.database_labels)]
            if codes.queries is not None:
                splits.append(("queries", codes.queries, codes.query_labels))
            for split, packed, labels in splits:
                group = f.create_group(split)
                # Fletcher-32 checksums make a corrupted data block fail to read instead of
                # silently changing codes; label matrices are mostly zeros, hence gzip.
                group.create_dataset("codes", data=packed, fletcher32=True)
                group.create_dataset("labels", data=labels, compression="gzip", shuffle=True, fletcher32=True)


def _fixed(text: str) -> np.bytes_:
    """A fixed-length UTF-8 string attribute (HDF5 cannot store a zero-length one: keep one NUL)."""
    return np.bytes_(text.encode("utf-8") or b"\0")


def _python_value(value: object) -> AttrValue:
    """An HDF5 attribute as a plain Python value (so attrs round-trip and serialise to JSON)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value  # type: ignore[return-value]


def _read_dataset(f: h5py.File, where: str, key: str) -> np.ndarray:
    if key not in f:
        raise CodesError(f"{where}: missing dataset /{key}")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise CodesError(f"{where}: expected /{key} to be a dataset, found a {type(obj).__name__}")
    return np.asarray(obj[()])


def read_codes(path: str | os.PathLike) -> Codes:
    """Read a codes file written by :func:`write_codes`.

    Raises CodesError (never another exception) naming the file and the
    problem when the file is missing, not HDF5 or truncated, lacks a group,
    dataset or attribute, or holds inconsistent shapes or dtypes.
    """
    path = Path(path)
    where = f"codes file {path}"
    if not path.is_file():
        raise CodesError(f"{where}: does not exist (write it with `conmh encode`, `conmh lsh` or `conmh itq`)")
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: _python_value(value) for key, value in f.attrs.items()}
            for key in ("format_version", "bits", "dataset", "method"):
                if key not in attrs:
                    raise CodesError(f"{where}: missing root attribute {key!r}")
            if attrs["format_version"] != FORMAT_VERSION:
                raise CodesError(
                    f"{where}: expected format_version {FORMAT_VERSION}, found {attrs['format_version']!r}"
                )
            bits = attrs["bits"]
            if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
                raise CodesError(f"{where}: expected attribute 'bits' to be a positive integer, found {bits!r}")
            for key in ("dataset", "method"):
                if not isinstance(attrs[key], str):
                    raise CodesError(f"{where}: expected attribute {key!r} to be a string, found {attrs[key]!r}")
            same = attrs.get("queries_are_database", 0)
            if same not in (0, 1):
                raise CodesError(f"{where}: expected attribute 'queries_are_database' 0 or 1, found {same!r}")
            database = _read_dataset(f, where, "database/codes")
            database_labels = _read_dataset(f, where, "database/labels")
            queries = query_labels = None
            if same:
                if "queries" in f:
                    raise CodesError(f"{where}: has a /queries group although queries_are_database = 1")
            else:
                queries = _read_dataset(f, where, "queries/codes")
                query_labels = _read_dataset(f, where, "queries/labels")
    except CodesError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        # h5py reports a non-HDF5 or truncated file (and damaged objects) this way.
        raise CodesError(f"{where}: not a readable HDF5 codes file ({exc})") from None
    codes = Codes(
        bits=bits,
        dataset=attrs["dataset"],
        method=attrs["method"],
        database=database,
        database_labels=database_labels,
        queries=queries,
        query_labels=query_labels,
        attrs={key: value for key, value in attrs.items() if key not in RESERVED_ATTRS},
    )
    _check_codes(codes, where)
    return codes
