"""Writing dataset files: a folder in the generic layout from numpy arrays (docs/generic.md), and the
feature (HDF5) and label (.mat) files every layout uses (the miniatures are written with them too)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from .atomic import atomic_path
from .datasets import FEATURE_KEY, GENERIC_FEATURES, GENERIC_LABELS, GENERIC_QUERIES, GENERIC_TRAIN
from .errors import DataError
from .features import ArrayFeatures

# The MAT 5 header's first 116 bytes are free text, where scipy writes the current time; a fixed text
# makes the same arrays give the same bytes (and so the same sha256 in manifests and reports).
MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by conmh.synthetic".ljust(116)


def write_features(path: str | os.PathLike, feats: np.ndarray) -> None:
    """Features (N, frames, dims) as float32 under key ``feats`` of an HDF5 file."""
    with atomic_path(Path(path)) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset(FEATURE_KEY, data=feats, dtype=np.float32)


def write_labels(path: str | os.PathLike, key: str, labels: np.ndarray) -> None:
    """0/1 labels (N, classes) under ``key`` of a MATLAB 5 .mat file."""
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:  # a file object: savemat would append ".mat" to a ".tmp" name
            scipy.io.savemat(fh, {key: labels})
            fh.seek(0)
            fh.write(MAT_HEADER_TEXT)


def _labels(labels: np.ndarray, rows: int, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] == 0:
        raise DataError(f"{name}: expected ({rows}, classes) labels, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise DataError(f"{name}: labels must be 0/1 (or bool)")
    return arr.astype(np.uint8)


def write_generic(
    out_dir: str | os.PathLike,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    train_features: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
) -> list[Path]:
    """Write a generic-layout folder; return the paths written.

    ``features`` (N, frames, dims) with ``labels`` (N, classes) are the database, and the training set
    unless ``train_features`` is given; ``queries`` with ``query_labels`` are separate queries (without
    them, every database video is a query). Arrays are checked before anything is written.
    """
    db = ArrayFeatures(features, "features")
    parts = [(GENERIC_FEATURES, db.array)]
    label_parts = [(GENERIC_LABELS, _labels(labels, db.n, "labels"))]
    if train_features is not None:
        parts.append((GENERIC_TRAIN, ArrayFeatures(train_features, "train_features").array))
    if (queries is None) != (query_labels is None):
        raise DataError("queries and query_labels must be given together")
    if queries is not None:
        q = ArrayFeatures(queries, "queries")
        q_file, q_label = GENERIC_QUERIES
        parts.append((q_file, q.array))
        label_parts.append((q_label, _labels(query_labels, q.n, "query_labels")))
        if label_parts[1][1].shape[1] != label_parts[0][1].shape[1]:
            raise DataError("query_labels and labels must have the same classes (columns)")
    shapes = {name: a.shape[1:] for name, a in parts}
    if len(set(shapes.values())) > 1:
        raise DataError(f"every features array must have the same frames and dims, got {shapes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in parts:
        write_features(out / name, arr)
    for (name, key), arr in label_parts:
        write_labels(out / name, key, arr)
    return [out / name for name, _ in parts] + [out / name for (name, _), _ in label_parts]
