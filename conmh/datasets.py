"""The dataset layouts: the official releases' names, splits, file names, keys and sizes
(docs/reference.md §2), and the generic layout for features of any other videos (docs/generic.md).

Facts only, no file is opened here (and neither h5py nor numpy is imported, so
the command line and the pipeline can read the layouts cheaply). Unknown
names raise :class:`~conmh.errors.ConfigError`; files missing from a data
folder raise :class:`~conmh.errors.MissingDataError` listing every missing
file with its full path and where the official files come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conmh.errors import ConfigError, MissingDataError

DATASETS = ("fcvid", "activitynet", "yfcc")  # the paper's benchmarks: the pipeline runs these
GENERIC = "generic"  # any features in the generic layout (docs/generic.md); the commands accept it too
LAYOUT_NAMES = (*DATASETS, GENERIC)
SPLITS = ("train", "database", "queries")
LABELLED_SPLITS = ("database", "queries")
FEATURE_KEY = "feats"

SOURCE_HINT = (
    "The official features are on Baidu disk (links in the upstream ConMH README); "
    "download them by hand and place the files as listed (see docs/reference.md §2)."
)


@dataclass(frozen=True)
class DatasetLayout:
    """File names, keys and sizes of one dataset layout: an official release (docs/reference.md §2), or the
    generic layout, whose frames and feature dim are whatever its files hold (None) and which has no
    official counts."""

    name: str
    frames: int | None
    feature_dim: int | None
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
        check_split(split, SPLITS)
        if split == "queries" and self.queries is not None:
            return self.queries
        return self.train if split == "train" else self.database

    def label_files(self, split: str) -> tuple[tuple[str, str], ...]:
        """(file name, key) pairs of ``split``'s labels, in concatenation order."""
        check_split(split, LABELLED_SPLITS)
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


# The generic layout: one features file that is the database (and the training set), its labels, and
# optionally a separate training set and separate queries. Which optional files a folder has decides
# its layout (generic_layout).
GENERIC_FEATURES = "features.h5"
GENERIC_LABELS = ("labels.mat", "labels")
GENERIC_TRAIN = "train_features.h5"
GENERIC_QUERIES = ("queries.h5", ("query_labels.mat", "labels"))


def generic_layout(data_dir: str | Path | None = None) -> DatasetLayout:
    """The generic layout of ``data_dir``: trains on ``train_features.h5`` when the folder has it (else on
    the database), and ranks separate queries when it has ``queries.h5`` (else the queries are the
    database, as FCVID's). Without a folder: the plain layout, database only."""
    folder = Path(data_dir) if data_dir is not None else None
    has = (lambda name: (folder / name).is_file()) if folder is not None else (lambda name: False)
    queries, query_labels = GENERIC_QUERIES
    return DatasetLayout(
        name=GENERIC,
        frames=None,
        feature_dim=None,
        train=(GENERIC_TRAIN,) if has(GENERIC_TRAIN) else (GENERIC_FEATURES,),
        database=(GENERIC_FEATURES,),
        database_labels=(GENERIC_LABELS,),
        queries=(queries,) if has(queries) else None,
        query_labels=(query_labels,) if has(queries) else None,
        real_counts={},
    )


def get_layout(name: str, data_dir: str | Path | None = None) -> DatasetLayout:
    """The layout of dataset ``name``; for the generic layout, the one ``data_dir`` holds (generic_layout).
    ConfigError for an unknown name."""
    if name == GENERIC:
        return generic_layout(data_dir)
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(LAYOUT_NAMES)}") from None


def check_split(split: str, allowed: Sequence[str]) -> None:
    """ConfigError unless ``split`` is one of ``allowed``."""
    if split not in allowed:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


GENERIC_HINT = (
    "The generic layout (docs/generic.md): features.h5 (key 'feats', videos x frames x dims) and labels.mat "
    "(key 'labels', videos x classes, 0/1), optionally train_features.h5, and queries.h5 with query_labels.mat."
)


def require_files(layout: DatasetLayout, data_dir: Path, needed: Sequence[tuple[str, str, str]]) -> None:
    """Raise MissingDataError listing every missing file of ``needed`` (split, file name, key) with its full path."""
    missing = [(s, f, k) for s, f, k in needed if not (data_dir / f).is_file()]
    if not missing:
        return
    lines = [f"  {data_dir / f}  ({s}, key {k!r})" for s, f, k in missing]
    where = "does not exist" if not data_dir.is_dir() else "exists"
    raise MissingDataError(
        f"{layout.name}: {len(missing)} dataset file(s) missing (data directory {data_dir} {where}):\n"
        + "\n".join(lines)
        + f"\n{GENERIC_HINT if layout.name == GENERIC else SOURCE_HINT}"
    )
