"""Class labels of a dataset split, read from the official MATLAB ``.mat`` files.

A label file holds an (N, C) 0/1 matrix under the layout's key
(docs/reference.md §2), as MATLAB v5 (read by scipy in a child process,
:mod:`conmh.matfile`) or v7.3 (HDF5, read with h5py). The matrix is checked
(2-D, non-empty, numeric, only 0 and 1), the parts of a split must agree on
their classes, and the row count must equal the split's number of videos, since
a misaligned label file silently ruins every mAP. Every problem raises
:class:`~conmh.errors.DataError` or :class:`~conmh.errors.MissingDataError`
with a message naming the file, the key and what was expected versus found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from conmh.datasets import (
    FEATURE_KEY,
    LABELLED_SPLITS,
    SOURCE_HINT,
    DatasetLayout,
    check_split,
    get_layout,
    require_files,
)
from conmh.errors import DataError, MissingDataError
from conmh.features import H5_ERRORS, open_split
from conmh.matfile import load_mat_v5


def _read_mat_array(path: Path, key: str) -> np.ndarray:
    """The matrix under ``key`` of a .mat file, as stored (v5 via scipy in a child process, v7.3 via h5py)."""
    if not path.is_file():
        raise MissingDataError(f"{path}: label file does not exist. {SOURCE_HINT}")
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
    except H5_ERRORS as e:
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


def load_label_files(layout: DatasetLayout, data_dir: Path, split: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Checked, concatenated labels of ``split`` and a description of each part file.

    The row count is checked against the split's feature files, since a
    misaligned label file silently ruins every mAP.
    """
    needed = [(f"{split} labels", f, k) for f, k in layout.label_files(split)]
    needed += [(split, f, FEATURE_KEY) for f in layout.feature_files(split)]
    require_files(layout, data_dir, needed)
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
    layout = get_layout(name, data_dir)
    check_split(split, LABELLED_SPLITS)
    return load_label_files(layout, Path(data_dir), split)[0]
