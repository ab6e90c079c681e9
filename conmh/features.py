"""Lazy access to the features of a dataset split: HDF5 files read row by row.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from conmh.datasets import FEATURE_KEY, SOURCE_HINT, SPLITS, check_split, get_layout, require_files
from conmh.errors import DataError, MissingDataError

# What h5py raises on damaged metadata (besides OSError): turned into DataError.
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


def _open_h5(path: Path) -> h5py.File:
    """Open ``path`` read-only, turning every failure into a DataError naming it."""
    if not path.is_file():
        raise MissingDataError(f"{path}: feature file does not exist. {SOURCE_HINT}")
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
                "feature file(s) missing:\n" + "\n".join(f"  {p}" for p in missing) + f"\n{SOURCE_HINT}"
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
                except H5_ERRORS as e:
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
        except H5_ERRORS as e:
            raise DataError(f"{self.paths[f]}: reading key {self.key!r} failed, the file is corrupt ({e})") from e
        if not np.isfinite(rows).all():
            bad = np.flatnonzero(~np.isfinite(rows).reshape(len(rows), -1).all(axis=1))[0]
            first = sel.start + bad if isinstance(sel, slice) else sel[bad]
            raise DataError(
                f"{self.paths[f]}: key {self.key!r} row {int(first)} holds NaN or infinite values; "
                "expected finite features"
            )
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
    data_dir = Path(data_dir)
    layout = get_layout(name, data_dir)
    check_split(split, SPLITS)
    files = layout.feature_files(split)
    require_files(layout, data_dir, [(split, f, FEATURE_KEY) for f in files])
    ff = FeatureFiles([data_dir / f for f in files])
    if layout.frames is not None and ff.frames != layout.frames:
        ff.close()
        raise DataError(
            f"{ff.paths[0]}: key {FEATURE_KEY!r} has {ff.frames} frames per video, "
            f"expected {layout.frames} for {name} (docs/reference.md §2)"
        )
    return ff


class ArrayFeatures:
    """Features already in memory, (N, T, D), read like :class:`FeatureFiles` (the Python API's input).

    Checked as a file's features are: three dimensions, at least one video, finite real values.
    """

    key = "features"

    def __init__(self, features: np.ndarray, name: str = "<array>") -> None:
        arr = np.asarray(features)
        if arr.ndim != 3 or 0 in arr.shape:
            raise DataError(f"{name}: features must be (videos, frames, dims) with none empty, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{name}: features must be real numbers, got dtype {arr.dtype}")
        self.array = arr.astype(np.float32, copy=False)
        if not np.isfinite(self.array).all():
            raise DataError(f"{name}: features hold NaN or infinite values; expected finite features")
        self.paths = (Path(name),)
        self.n, self.frames, self.dim = self.array.shape

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"read({start}, {stop}) out of range for {self.n} rows")
        return self.array[start:stop]

    def take(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        return self.array[np.asarray(indices, dtype=np.int64)]

    def iter_blocks(self, block: int) -> Iterator[tuple[int, np.ndarray]]:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        for start in range(0, self.n, block):
            yield start, self.array[start : start + block]

    def __enter__(self) -> ArrayFeatures:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
