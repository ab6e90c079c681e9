"""Dataset layouts, lazy HDF5 feature access, label loading and verification.

The official releases (docs/reference.md §2) are large: FCVID's training features
are ~19 GB and YFCC's ~168 GB, so features are never loaded whole. A
:class:`FeatureFiles` keeps the HDF5 files open and reads only the rows asked
for. Every problem a user can cause (a missing file, a wrong key, a bad shape,
dtype or value) raises :class:`~conmh.errors.DataError` or
:class:`~conmh.errors.MissingDataError` with a message naming the file, the key
and what was expected versus found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from conmh.checksums import file_sha256
from conmh.errors import ConfigError, DataError, MissingDataError
from conmh.matfile import load_mat_v5

DATASETS = ("fcvid", "activitynet", "yfcc")
SPLITS = ("train", "database", "queries")
LABELLED_SPLITS = ("database", "queries")
FEATURE_KEY = "feats"

# Rows per chunk when scanning a whole file: about 64 MiB of float32 at a time,
# so verifying a 168 GB dataset keeps memory flat.
_SCAN_BYTES = 64 * 2**20
_SOURCE_HINT = (
    "The official features are on Baidu disk (links in the upstream ConMH README); "
    "download them by hand and place the files as listed (see docs/reference.md §2)."
)


@dataclass(frozen=True)
class DatasetLayout:
    """File names, keys and sizes of one official dataset release (docs/reference.md §2)."""

    name: str
    frames: int
    feature_dim: int
    train: tuple[str, ...]
    database: tuple[str, ...]
    database_labels: tuple[tuple[str, str], ...]
    queries: tuple[str, ...] | None
    query_labels: tuple[tuple[str, str], ...] | None
    real_counts: dict[str, int]

    @property
    def queries_are_database(self) -> bool:
        """FCVID protocol: every database video is also a query."""
        return self.queries is None

    def feature_files(self, split: str) -> tuple[str, ...]:
        """Feature file names of ``split``, in concatenation order."""
        _check_split(split, SPLITS)
        if split == "queries" and self.queries is not None:
            return self.queries
        return self.train if split == "train" else self.database

    def label_files(self, split: str) -> tuple[tuple[str, str], ...]:
        """(file name, key) pairs of ``split``'s labels, in concatenation order."""
        _check_split(split, LABELLED_SPLITS)
        if split == "queries" and self.query_labels is not None:
            return self.query_labels
        return self.database_labels

    def all_files(self) -> list[tuple[str, str, str]]:
        """Every distinct file of the release as (split, file name, key)."""
        out = [("train", f, FEATURE_KEY) for f in self.train]
        out += [("database", f, FEATURE_KEY) for f in self.database]
        out += [("database labels", f, k) for f, k in self.database_labels]
        if self.queries is not None:
            out += [("queries", f, FEATURE_KEY) for f in self.queries]
        if self.query_labels is not None:
            out += [("query labels", f, k) for f, k in self.query_labels]
        return out


LAYOUTS: dict[str, DatasetLayout] = {
    "fcvid": DatasetLayout(
        name="fcvid",
        frames=25,
        feature_dim=4096,
        train=("fcv_train_feats.h5",),
        database=("fcv_test_feats.h5",),
        database_labels=(("fcv_test_labels.mat", "labels"),),
        queries=None,
        query_labels=None,
        real_counts={"train": 45585, "database": 45600, "queries": 45600},
    ),
    "activitynet": DatasetLayout(
        name="activitynet",
        frames=30,
        feature_dim=2048,
        train=("train_feats.h5",),
        database=("test_feats.h5",),
        database_labels=(("re_label.mat", "re_label"),),
        queries=("query_feats.h5",),
        query_labels=(("q_label.mat", "q_label"),),
        real_counts={"train": 9722, "database": 3758, "queries": 1000},
    ),
    "yfcc": DatasetLayout(
        name="yfcc",
        frames=25,
        feature_dim=4096,
        train=tuple(f"yfcc_train_feats_{i}.h5" for i in range(1, 10)),
        database=("yfcc_test_feats_1.h5", "yfcc_test_feats_2.h5"),
        database_labels=(("yfcc_test_labels_1.mat", "labels"), ("yfcc_test_labels_2.mat", "labels")),
        queries=("query1000_feats.h5",),
        query_labels=(("query1000_labels.mat", "labels"),),
        real_counts={"train": 409788, "database": 101256, "queries": 1000},
    ),
}


def get_layout(name: str) -> DatasetLayout:
    """The layout of dataset ``name``; ConfigError for an unknown name."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


def _require_files(layout: DatasetLayout, data_dir: Path, needed: Sequence[tuple[str, str, str]]) -> None:
    """Raise MissingDataError listing every missing file of ``needed`` with its full path."""
    missing = [(s, f, k) for s, f, k in needed if not (data_dir / f).is_file()]
    if not missing:
        return
    lines = [f"  {data_dir / f}  ({s}, key {k!r})" for s, f, k in missing]
    where = "does not exist" if not data_dir.is_dir() else "exists"
    raise MissingDataError(
        f"{layout.name}: {len(missing)} dataset file(s) missing (data directory {data_dir} {where}):\n"
        + "\n".join(lines)
        + f"\n{_SOURCE_HINT}"
    )


# --------------------------------------------------------------------------- features


# What h5py raises on damaged metadata (besides OSError): turned into DataError.
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


def _open_h5(path: Path) -> h5py.File:
    """Open ``path`` read-only, turning every failure into a DataError naming it."""
    if not path.is_file():
        raise MissingDataError(f"{path}: feature file does not exist. {_SOURCE_HINT}")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: not an HDF5 file (expected HDF5 with float32 key {FEATURE_KEY!r})")
    try:
        return h5py.File(path, "r")
    except OSError as e:  # truncated or corrupt: HDF5 checks the stored end of file
        raise DataError(f"{path}: cannot open as HDF5, the file is truncated or corrupt ({e})") from e


def _feature_dataset(fh: h5py.File, path: Path, key: str) -> h5py.Dataset:
    """The (N, T, D) float array under ``key``, checked for presence, rank, dtype and size."""
    if key not in fh:
        raise DataError(f"{path}: no key {key!r}; keys found: {sorted(fh.keys())}")
    ds = fh[key]
    if not isinstance(ds, h5py.Dataset):
        raise DataError(f"{path}: key {key!r} is an HDF5 group, expected an (N, T, D) array")
    if ds.ndim != 3:
        raise DataError(f"{path}: key {key!r} has shape {ds.shape}, expected a 3-D (N, T, D) array")
    if not np.issubdtype(ds.dtype, np.floating):
        raise DataError(f"{path}: key {key!r} has dtype {ds.dtype}, expected floating point (float32)")
    if 0 in ds.shape:
        raise DataError(f"{path}: key {key!r} has shape {ds.shape}, expected a non-empty (N, T, D) array")
    return ds


class FeatureFiles:
    """Lazy view of one or more HDF5 files' ``feats`` arrays (N_i, T, D) concatenated along N.

    Only requested rows are read. Files are opened again after a fork (and when
    unpickled), so the object can be handed to DataLoader worker processes.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], key: str = FEATURE_KEY) -> None:
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        if not self.paths:
            raise ValueError("FeatureFiles needs at least one path")
        self.key = key
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise MissingDataError(
                "feature file(s) missing:\n" + "\n".join(f"  {p}" for p in missing) + f"\n{_SOURCE_HINT}"
            )
        self._files: list[h5py.File] | None = []
        self._pid = os.getpid()
        self._raw_offsets: dict[int, int | None] = {}  # a property of the file: valid in any process
        try:
            for p in self.paths:
                self._files.append(_open_h5(p))
            datasets = []
            for fh, p in zip(self._files, self.paths):
                try:
                    datasets.append(_feature_dataset(fh, p, key))
                except _H5_ERRORS as e:
                    raise DataError(f"{p}: cannot read key {key!r}, the HDF5 metadata is damaged ({e})") from e
            first = datasets[0]
            for ds, p in zip(datasets[1:], self.paths[1:]):
                if ds.shape[1:] != first.shape[1:]:
                    raise DataError(
                        f"{p}: key {key!r} has (frames, dim) = {ds.shape[1:]}, but {self.paths[0]} has "
                        f"{first.shape[1:]}; all parts of a split must agree"
                    )
        except BaseException:
            self.close()
            raise
        self.shapes: tuple[tuple[int, int, int], ...] = tuple(ds.shape for ds in datasets)
        self.dtypes: tuple[np.dtype, ...] = tuple(ds.dtype for ds in datasets)
        self.offsets = np.concatenate([[0], np.cumsum([s[0] for s in self.shapes])]).astype(np.int64)
        self.n: int = int(self.offsets[-1])
        self.frames: int = int(first.shape[1])
        self.dim: int = int(first.shape[2])

    # ---- file handles
    def _datasets(self) -> list[h5py.Dataset]:
        if self._files is None or self._pid != os.getpid():
            # HDF5 handles must not be shared across processes: reopen in this one.
            self._files = [_open_h5(p) for p in self.paths]
            self._pid = os.getpid()
        return [fh[self.key] for fh in self._files]

    def close(self) -> None:
        """Close the files (a later read opens them again)."""
        if self._files is not None and self._pid == os.getpid():
            for fh in self._files:
                fh.close()
        self._files = None

    def __enter__(self) -> FeatureFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = None
        return state

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeatureFiles(n={self.n}, frames={self.frames}, dim={self.dim}, files={len(self.paths)})"

    # ---- reading
    def locate(self, row: int) -> tuple[Path, int]:
        """The file holding global row ``row`` and the row's index inside it."""
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} out of range [0, {self.n})")
        f = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.paths[f], int(row - self.offsets[f])

    def _raw_offset(self, f: int) -> int | None:
        """Byte offset of file ``f``'s array when it is stored contiguous, unfiltered, native float32."""
        if f not in self._raw_offsets:
            ds = self._datasets()[f]
            plain = ds.chunks is None and not ds.compression and ds.dtype == np.dtype("=f4")
            self._raw_offsets[f] = ds.id.get_offset() if plain else None
        return self._raw_offsets[f]

    def _read_rows_raw(self, f: int, rows: np.ndarray, offset: int) -> np.ndarray:
        """Sorted unique ``rows`` of file ``f`` by positioned reads of their bytes (runs read at once).

        Written by hand because HDF5 point selections of scattered 400 KB rows
        (a shuffled training batch) run about 3x slower (benchmarks/README.md);
        reads go through the page cache without mapping the file into the process.
        """
        shape = self.shapes[f][1:]
        out = np.empty((len(rows), *shape), dtype=np.float32)
        row_bytes = out[0].nbytes if len(rows) else 0
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(self.paths[f], "rb", buffering=0) as fh:
            for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
                want = (hi - lo) * row_bytes
                got = os.preadv(fh.fileno(), [memoryview(out[lo:hi]).cast("B")], offset + int(rows[lo]) * row_bytes)
                if got != want:
                    raise OSError(f"short read: {got} of {want} bytes at row {int(rows[lo])}, the file is truncated")
        return out

    def _read_file(self, f: int, sel: slice | np.ndarray) -> np.ndarray:
        """Rows of file ``f``, refused when unreadable or not finite (a NaN would train a NaN model)."""
        try:
            offset = self._raw_offset(f) if isinstance(sel, np.ndarray) else None
            if offset is None:
                rows = np.asarray(self._datasets()[f][sel], dtype=np.float32)
            else:
                rows = self._read_rows_raw(f, sel, offset)
        except _H5_ERRORS as e:
            raise DataError(f"{self.paths[f]}: reading key {self.key!r} failed, the file is corrupt ({e})") from e
        if not np.isfinite(rows).all():
            bad = np.flatnonzero(~np.isfinite(rows).reshape(len(rows), -1).all(axis=1))[0]
            first = sel.start + bad if isinstance(sel, slice) else sel[bad]
            raise DataError(f"{self.paths[f]}: key {self.key!r} row {int(first)} holds NaN or infinite values; "
                            "expected finite features")
        return rows

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 (stop-start, T, D); may span files."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"read({start}, {stop}) out of range for {self.n} rows")
        parts = []
        for f in range(len(self.paths)):
            lo, hi = max(start, self.offsets[f]), min(stop, self.offsets[f + 1])
            if lo < hi:
                parts.append(self._read_file(f, slice(int(lo - self.offsets[f]), int(hi - self.offsets[f]))))
        if not parts:
            return np.empty((0, self.frames, self.dim), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read_sorted(self, f: int, local: np.ndarray) -> np.ndarray:
        """Sorted unique rows ``local`` of file ``f``: one slice when they are contiguous, else a point read."""
        if local[-1] - local[0] + 1 == local.size:
            return self._read_file(f, slice(int(local[0]), int(local[-1]) + 1))
        return self._read_file(f, local)

    def take(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows ``indices`` as float32 (len, T, D), in the given order (repeats allowed).

        Reads only those rows: per file, the sorted unique rows in one HDF5 read
        (a slice when they are contiguous, else one point selection), then the
        requested order is restored in memory.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"take() needs a 1-D array of integer indices, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size == 0:
            return np.empty((0, self.frames, self.dim), dtype=np.float32)
        if idx.min() < 0 or idx.max() >= self.n:
            raise IndexError(f"take() indices must lie in [0, {self.n}), got [{idx.min()}, {idx.max()}]")
        file_of = np.searchsorted(self.offsets, idx, side="right") - 1
        if file_of[0] == file_of[-1] and np.all(np.diff(idx) > 0):  # sorted rows of one file: no reordering copy
            return self._read_sorted(int(file_of[0]), idx - self.offsets[file_of[0]])
        out = np.empty((idx.size, self.frames, self.dim), dtype=np.float32)
        for f in np.unique(file_of):
            where = np.flatnonzero(file_of == f)
            local, inverse = np.unique(idx[where] - self.offsets[f], return_inverse=True)
            out[where] = self._read_sorted(int(f), local)[inverse]
        return out

    def iter_blocks(self, block: int) -> Iterator[tuple[int, np.ndarray]]:
        """Contiguous blocks ``(start, rows)`` of at most ``block`` rows, in order."""
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        for start in range(0, self.n, block):
            yield start, self.read(start, min(start + block, self.n))


def open_split(name: str, data_dir: str | os.PathLike, split: str) -> FeatureFiles:
    """Features of ``split`` ("train", "database", "queries"); FCVID's queries are its database."""
    layout = get_layout(name)
    _check_split(split, SPLITS)
    data_dir = Path(data_dir)
    files = layout.feature_files(split)
    _require_files(layout, data_dir, [(split, f, FEATURE_KEY) for f in files])
    ff = FeatureFiles([data_dir / f for f in files])
    if ff.frames != layout.frames:
        ff.close()
        raise DataError(
            f"{ff.paths[0]}: key {FEATURE_KEY!r} has {ff.frames} frames per video, "
            f"expected {layout.frames} for {name} (docs/reference.md §2)"
        )
    return ff


# --------------------------------------------------------------------------- labels


def _read_mat_array(path: Path, key: str) -> np.ndarray:
    """The matrix under ``key`` of a .mat file, as stored (v5 via scipy in a child process, v7.3 via h5py)."""
    if not path.is_file():
        raise MissingDataError(f"{path}: label file does not exist. {_SOURCE_HINT}")
    if h5py.is_hdf5(path):  # MATLAB v7.3 (with or without the MATLAB header)
        return _read_mat_v73(path, key)
    result = load_mat_v5(path, key)
    if result.status == "ok":
        return result.array
    if result.status == "v73":
        return _read_mat_v73(path, key)
    if result.status == "missing":
        raise DataError(f"{path}: no key {key!r}; keys found: {list(result.keys)}")
    if result.status == "crash":
        raise DataError(f"{path}: damaged MATLAB .mat file: {result.error}")
    raise DataError(f"{path}: not a readable MATLAB .mat file ({result.error})")


def _read_mat_v73(path: Path, key: str) -> np.ndarray:
    """Read a MATLAB v7.3 matrix; MATLAB is column-major, so h5py sees it transposed."""
    try:
        with h5py.File(path, "r") as fh:
            if key not in fh:
                found = sorted(k for k in fh.keys() if not k.startswith("#"))
                raise DataError(f"{path}: no key {key!r}; keys found: {found}")
            ds = fh[key]
            if not isinstance(ds, h5py.Dataset):
                raise DataError(f"{path}: key {key!r} is not a dense matrix (an HDF5 group, e.g. a sparse matrix)")
            return np.asarray(ds[()]).T
    except _H5_ERRORS as e:
        raise DataError(f"{path}: cannot read as a MATLAB v7.3 (HDF5) file ({e})") from e


def _check_label_matrix(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Validate an (N, C) 0/1 matrix and return it as uint8."""
    if arr.ndim != 2:
        raise DataError(f"{path}: key {key!r} has shape {arr.shape}, expected a 2-D (N, C) 0/1 matrix")
    if 0 in arr.shape:
        raise DataError(f"{path}: key {key!r} has shape {arr.shape}, expected a non-empty (N, C) matrix")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{path}: key {key!r} has dtype {arr.dtype}, expected a numeric 0/1 matrix")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        values = np.unique(arr[bad])[:5].tolist()
        raise DataError(f"{path}: key {key!r} must hold only 0 and 1; found other values, e.g. {values}")
    return arr.astype(np.uint8)


def _load_label_files(
    layout: DatasetLayout, data_dir: Path, split: str
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Checked, concatenated labels of ``split`` and a description of each part file.

    The row count is checked against the split's feature files, since a
    misaligned label file silently ruins every mAP.
    """
    needed = [(f"{split} labels", f, k) for f, k in layout.label_files(split)]
    needed += [(split, f, FEATURE_KEY) for f in layout.feature_files(split)]
    _require_files(layout, data_dir, needed)
    arrays, parts = [], []
    for fname, key in layout.label_files(split):
        path = data_dir / fname
        raw = _read_mat_array(path, key)
        arr = _check_label_matrix(raw, path, key)
        if arrays and arr.shape[1] != arrays[0].shape[1]:
            raise DataError(
                f"{path}: key {key!r} has {arr.shape[1]} classes, but {parts[0]['path']} has {arrays[0].shape[1]}"
            )
        arrays.append(arr)
        parts.append({"path": path, "key": key, "shape": list(raw.shape), "dtype": str(raw.dtype)})
    labels = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    with open_split(layout.name, data_dir, split) as ff:
        if labels.shape[0] != ff.n:
            raise DataError(
                f"{', '.join(str(p['path']) for p in parts)}: labels have {labels.shape[0]} rows, but the "
                f"{split} features ({', '.join(str(p) for p in ff.paths)}) hold {ff.n} videos"
            )
    return labels, parts


def load_labels(name: str, data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """(N, C) uint8 0/1 labels of ``split`` ("database" or "queries"), parts concatenated in order."""
    layout = get_layout(name)
    _check_split(split, LABELLED_SPLITS)
    return _load_label_files(layout, Path(data_dir), split)[0]


# --------------------------------------------------------------------------- verification


def _scan_finite(ff: FeatureFiles) -> None:
    """Raise DataError at the first NaN or infinite feature value, reading in bounded chunks."""
    rows = max(1, _SCAN_BYTES // (ff.frames * ff.dim * 4))
    for start, block in ff.iter_blocks(rows):
        finite = np.isfinite(block).all(axis=(1, 2))
        if not finite.all():
            path, row = ff.locate(start + int(np.argmin(finite)))
            raise DataError(f"{path}: key {ff.key!r} row {row} holds NaN or infinite values; expected finite features")


def verify_dataset(
    name: str, data_dir: str | os.PathLike, *, real: bool = False, checksums: bool = True
) -> dict[str, Any]:
    """Check every file of the dataset's layout and return a JSON-able report.

    Checks presence, HDF5/.mat readability, keys, shapes, dtypes, frame counts,
    agreement of dims within and across splits, finite feature values, 0/1
    labels whose rows match the features, and with ``real`` the official
    counts and feature dims. Label rows without any class are only counted:
    such a query has no relevant item and scores AP 0.
    """
    layout = get_layout(name)
    data_dir = Path(data_dir)
    _require_files(layout, data_dir, layout.all_files())

    feature_splits = ["train", "database"] + ([] if layout.queries_are_database else ["queries"])
    files: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    dim_source: tuple[Path, int] | None = None
    for split in feature_splits:
        with open_split(name, data_dir, split) as ff:
            if dim_source is None:
                dim_source = (ff.paths[0], ff.dim)
            elif ff.dim != dim_source[1]:
                raise DataError(
                    f"{ff.paths[0]}: key {FEATURE_KEY!r} has feature dim {ff.dim}, but {dim_source[0]} has "
                    f"{dim_source[1]}; all splits must agree"
                )
            _scan_finite(ff)
            counts[split] = ff.n
            for path, shape, dtype in zip(ff.paths, ff.shapes, ff.dtypes):
                files.append({"file": path.name, "key": FEATURE_KEY, "shape": list(shape), "dtype": str(dtype)})
    if layout.queries_are_database:
        counts["queries"] = counts["database"]
    assert dim_source is not None
    feature_dim = dim_source[1]

    without_class: dict[str, int] = {}
    n_classes: int | None = None
    for split in LABELLED_SPLITS:
        labels, parts = _load_label_files(layout, data_dir, split)  # also checks rows against the features
        if n_classes is None:
            n_classes = labels.shape[1]
        elif labels.shape[1] != n_classes:
            raise DataError(
                f"{parts[0]['path']}: key {parts[0]['key']!r} has {labels.shape[1]} classes, "
                f"but the database labels have {n_classes}"
            )
        without_class[split] = int((labels.sum(axis=1) == 0).sum())
        if split == "queries" and layout.queries_are_database:
            continue  # same files as the database: listed once
        for part in parts:
            files.append({"file": part["path"].name, "key": part["key"], "shape": part["shape"], "dtype": part["dtype"]})

    if real:
        for split, expected in layout.real_counts.items():
            if counts[split] != expected:
                names = ", ".join(layout.feature_files(split))
                raise DataError(
                    f"{data_dir}: {name} {split} features ({names}) hold {counts[split]} videos, "
                    f"expected {expected} for the official release (docs/reference.md §2)"
                )
        if feature_dim != layout.feature_dim:
            raise DataError(
                f"{dim_source[0]}: key {FEATURE_KEY!r} has feature dim {feature_dim}, "
                f"expected {layout.feature_dim} for the official {name} release (docs/reference.md §2)"
            )

    order = {fname: i for i, (_, fname, _) in enumerate(layout.all_files())}
    files.sort(key=lambda entry: order[entry["file"]])  # the layout's order: each split, then its labels
    for entry in files:
        entry["sha256"] = file_sha256(data_dir / entry["file"]) if checksums else None
    return {
        "dataset": name,
        "data_dir": str(data_dir),
        "real": real,
        "files": files,
        "counts": counts,
        "frames": layout.frames,
        "feature_dim": feature_dim,
        "n_classes": n_classes,
        "queries_are_database": layout.queries_are_database,
        "label_rows_without_class": without_class,
    }
