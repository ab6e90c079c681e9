"""Verification of a whole dataset folder against its official layout (``conmh verify``).

Checks every file of the release (see :func:`verify_dataset`) and returns a
JSON-able report of what was found. Any problem raises
:class:`~conmh.errors.DataError` or :class:`~conmh.errors.MissingDataError`
with a message naming the file, the key and what was expected versus found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from conmh.checksums import file_sha256
from conmh.datasets import FEATURE_KEY, LABELLED_SPLITS, get_layout, require_files
from conmh.errors import ConfigError, DataError
from conmh.features import FeatureFiles, open_split
from conmh.labels import load_label_files

# Rows per chunk when scanning a whole file: about 64 MiB of float32 at a time,
# so verifying a 168 GB dataset keeps memory flat.
_SCAN_BYTES = 64 * 2**20


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
    data_dir = Path(data_dir)
    layout = get_layout(name, data_dir)
    if real and not layout.real_counts:
        raise ConfigError(f"{name}: --real checks an official release's counts; the {name} layout has none")
    require_files(layout, data_dir, layout.all_files())

    feature_splits = ["train", "database"] + ([] if layout.queries_are_database else ["queries"])
    files: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    dim_source: tuple[Path, int] | None = None
    for split in feature_splits:
        with open_split(name, data_dir, split) as ff:
            if dim_source is None:
                dim_source, frames = (ff.paths[0], ff.dim), ff.frames
            elif ff.frames != frames:  # the official layouts' frames are checked on opening; generic: here
                raise DataError(
                    f"{ff.paths[0]}: key {FEATURE_KEY!r} has {ff.frames} frames per video, but {dim_source[0]} has "
                    f"{frames}; all splits must agree"
                )
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
        labels, parts = load_label_files(layout, data_dir, split)  # also checks rows against the features
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
            files.append(
                {"file": part["path"].name, "key": part["key"], "shape": part["shape"], "dtype": part["dtype"]}
            )

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
        "frames": frames,
        "feature_dim": feature_dim,
        "n_classes": n_classes,
        "queries_are_database": layout.queries_are_database,
        "label_rows_without_class": without_class,
    }
