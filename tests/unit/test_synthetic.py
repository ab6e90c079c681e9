"""conmh.synthetic: miniatures are deterministic and have the official layout."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from conmh.datasets import DATASETS, get_layout
from conmh.errors import ConfigError
from conmh.features import open_split
from conmh.labels import load_labels
from conmh.synthetic import MINIATURE_DEFAULTS, MiniatureSpec, make_miniature
from conmh.verify import verify_dataset

SMALL = MiniatureSpec(n_train=45, n_database=30, n_queries=10, feature_dim=16, n_classes=5)


def arrays(root: Path) -> dict[str, np.ndarray]:
    """Every array of a miniature, by file name."""
    out = {}
    for path in sorted(root.iterdir()):
        if path.suffix == ".h5":
            with h5py.File(path, "r") as fh:
                out[path.name] = fh["feats"][()]
        else:
            out[path.name] = next(v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__"))
    return out


@pytest.mark.parametrize("name", DATASETS)
def test_layout_verifies(tmp_path: Path, name: str) -> None:
    layout = get_layout(name)
    paths = make_miniature(name, tmp_path, seed=0, spec=SMALL)
    expected = {f for _, f, _ in layout.all_files()}
    assert {p.name for p in paths} == expected
    assert {p.name for p in tmp_path.iterdir()} == expected  # no stray temporary files
    report = verify_dataset(name, tmp_path, checksums=False)
    queries = SMALL.n_database if layout.queries_are_database else SMALL.n_queries
    assert report["counts"] == {"train": SMALL.n_train, "database": SMALL.n_database, "queries": queries}
    assert (report["frames"], report["feature_dim"], report["n_classes"]) == (layout.frames, 16, 5)
    for split in ("database", "queries"):
        labels = load_labels(name, tmp_path, split)
        assert labels.shape == (queries if split == "queries" else SMALL.n_database, 5)
        with open_split(name, tmp_path, split) as ff:
            assert ff.n == labels.shape[0]
    for fname, key in layout.database_labels + (layout.query_labels or ()):
        assert key in scipy.io.loadmat(tmp_path / fname)
    with h5py.File(tmp_path / layout.train[0], "r") as fh:
        assert list(fh.keys()) == ["feats"] and fh["feats"].dtype == np.float32


def test_yfcc_parts(tmp_path: Path) -> None:
    make_miniature("yfcc", tmp_path, seed=0, spec=SMALL)
    got = arrays(tmp_path)
    assert [got[f"yfcc_train_feats_{i}.h5"].shape[0] for i in range(1, 10)] == [5] * 9
    assert [got[f"yfcc_test_feats_{i}.h5"].shape[0] for i in (1, 2)] == [15, 15]
    assert [got[f"yfcc_test_labels_{i}.mat"].shape[0] for i in (1, 2)] == [15, 15]
    assert got["query1000_feats.h5"].shape == (10, 25, 16) and got["query1000_labels.mat"].shape == (10, 5)


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    for name in DATASETS:
        a = arrays(Path(make_miniature(name, tmp_path / f"{name}a", seed=7, spec=SMALL)[0]).parent)
        b = arrays(Path(make_miniature(name, tmp_path / f"{name}b", seed=7, spec=SMALL)[0]).parent)
        c = arrays(Path(make_miniature(name, tmp_path / f"{name}c", seed=8, spec=SMALL)[0]).parent)
        assert a.keys() == b.keys() == c.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
        assert any(a[k].tobytes() != c[k].tobytes() for k in a if k.endswith(".h5"))


def test_same_seed_gives_the_same_bytes_at_another_time(tmp_path: Path, monkeypatch) -> None:
    # scipy writes the current time into a .mat header; the files (and the manifest's sums) must not change.
    first = make_miniature("yfcc", tmp_path / "a", seed=7, spec=SMALL)
    monkeypatch.setattr(time, "asctime", lambda *_: "Thu Jan  1 00:00:00 2099")
    second = make_miniature("yfcc", tmp_path / "b", seed=7, spec=SMALL)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert Path(a).read_bytes() == Path(b).read_bytes(), a.name


def test_labels_and_features_are_plausible(tmp_path: Path) -> None:
    make_miniature("fcvid", tmp_path / "f", seed=0)
    make_miniature("activitynet", tmp_path / "a", seed=0)
    fc = load_labels("fcvid", tmp_path / "f", "database")
    an = load_labels("activitynet", tmp_path / "a", "database")
    assert (an.sum(1) == 1).all()  # ActivityNet: single label
    assert (fc.sum(1) >= 1).all() and (fc.sum(1) == 2).any()  # FCVID: some multi-label
    assert (an.sum(0) > 0).all() and (fc.sum(0) > 0).all()  # every class present
    with open_split("fcvid", tmp_path / "f", "train") as ff:
        x = ff.read(0, ff.n)
    assert np.isfinite(x).all() and x.min() >= 0  # non-negative, like CNN features
    assert (x > 0).mean() > 0.2  # not degenerate
    assert x.std(axis=1).mean() > 0  # frames of a video differ


def test_defaults_are_small() -> None:
    for name, spec in MINIATURE_DEFAULTS.items():
        layout = get_layout(name)
        assert spec.n_train <= 2000 and spec.n_database <= 1000 and spec.feature_dim <= 512
        assert spec.n_train >= len(layout.train) and spec.n_database >= len(layout.database)


def test_bad_spec(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_train"):
        make_miniature("yfcc", tmp_path, spec=MiniatureSpec(5, 10, 5, 8, 3))
    with pytest.raises(ConfigError, match="nope"):
        make_miniature("nope", tmp_path)
