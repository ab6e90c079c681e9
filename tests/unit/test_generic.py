"""The generic layout: features of any videos go through verify, train, encode, evaluate and search
as an official release does, with the same clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conmh.cli import main as conmh
from conmh.codes import read_codes
from conmh.datasets import get_layout
from conmh.errors import DataError
from conmh.generic import write_generic
from conmh.labels import load_labels
from conmh.verify import verify_dataset

FRAMES, DIM = 6, 16


def _videos(rng: np.random.Generator, n: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Videos around one centre per class, so that training and hashing have something to find."""
    labels = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
    centres = np.random.default_rng(99).standard_normal((classes, DIM)) * 3
    feats = labels @ centres
    return (feats[:, None, :] + rng.standard_normal((n, FRAMES, DIM))).astype(np.float32), labels


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    db, db_labels = _videos(rng, 60)
    q, q_labels = _videos(rng, 10)
    train, _ = _videos(rng, 40)
    plain, separate = tmp_path / "plain", tmp_path / "separate"
    write_generic(plain, db, db_labels)
    write_generic(separate, db, db_labels, train_features=train, queries=q, query_labels=q_labels)
    return {"plain": plain, "separate": separate}


def test_the_folder_decides_the_training_set_and_the_queries(folders):
    plain, separate = get_layout("generic", folders["plain"]), get_layout("generic", folders["separate"])
    assert plain.queries_are_database and plain.feature_files("train") == ("features.h5",)
    assert not separate.queries_are_database and separate.feature_files("train") == ("train_features.h5",)
    assert separate.feature_files("queries") == ("queries.h5",)
    assert load_labels("generic", folders["separate"], "queries").shape == (10, 4)


def test_verify_reports_what_the_files_hold(folders):
    report = verify_dataset("generic", folders["separate"])
    assert report["counts"] == {"train": 40, "database": 60, "queries": 10}
    assert (report["frames"], report["feature_dim"], report["n_classes"]) == (FRAMES, DIM, 4)
    assert verify_dataset("generic", folders["plain"])["counts"] == {"train": 60, "database": 60, "queries": 60}


@pytest.mark.parametrize("layout", ["plain", "separate"])
def test_train_encode_evaluate_and_search_run_on_a_generic_folder(folders, tmp_path, capsys, layout):
    data = str(folders[layout])
    out = tmp_path / "run"
    common = ["--dataset", "generic", "--data-dir", data]
    assert conmh(["verify", "generic", data]) == 0
    train = ["train", *common, "--bits", "16", "--out-dir", str(out), "--preset", "mini"]
    assert conmh([*train, "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--no-progress"]) == 0
    codes = tmp_path / "codes.h5"
    assert (
        conmh(["encode", "--checkpoint", str(out / "model.pt"), *common, "--out", str(codes), "--device", "cpu"]) == 0
    )
    written = read_codes(codes)
    assert written.dataset == "generic" and written.n_database == 60
    assert written.n_queries == (60 if layout == "plain" else 10)
    assert conmh(["evaluate", str(codes), "--out", str(tmp_path / "m.json"), "--ks", "5,10"]) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["map"]) == {"5", "10"}
    assert conmh(["search", str(codes), "--k", "3", "--format", "json"]) == 0
    assert conmh(["lsh", *common, "--bits", "16", "--out", str(tmp_path / "lsh.h5")]) == 0
    capsys.readouterr()


def test_missing_files_are_listed_with_the_generic_layout_described(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    assert conmh(["verify", "generic", str(tmp_path / "g")]) == 4
    err = capsys.readouterr().err
    assert "features.h5  (train, key 'feats')" in err and "labels.mat  (database labels, key 'labels')" in err
    assert "generic layout (docs/generic.md)" in err and "Baidu" not in err


def test_bad_generic_files_fail_as_an_official_release_would(folders, capsys):
    data = folders["separate"]
    with h5py.File(data / "queries.h5", "w") as fh:  # other frames than the database
        fh.create_dataset("feats", data=np.zeros((10, FRAMES + 1, DIM), np.float32))
    with pytest.raises(DataError, match="has 7 frames per video, but .* has 6; all splits must agree"):
        verify_dataset("generic", data)
    with h5py.File(data / "queries.h5", "w") as fh:
        fh.create_dataset("features", data=np.zeros((10, FRAMES, DIM), np.float32))
    assert conmh(["verify", "generic", str(data)]) == 3
    assert "queries.h5" in capsys.readouterr().err
    assert conmh(["verify", "generic", str(folders["plain"]), "--real"]) == 3
    assert "the generic layout has none" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"labels": np.zeros((5, 3))}, "expected \\(4, classes\\) labels"),
        ({"labels": np.full((4, 3), 2)}, "labels must be 0/1"),
        ({"queries": np.zeros((2, FRAMES, DIM))}, "must be given together"),
        ({"train_features": np.zeros((3, FRAMES, DIM + 1))}, "same frames and dims"),
        ({"features": np.zeros((4, FRAMES))}, "must be \\(videos, frames, dims\\)"),
    ],
)
def test_write_generic_refuses_bad_arrays_and_writes_nothing(tmp_path, arrays, problem):
    given = {"features": np.zeros((4, FRAMES, DIM)), "labels": np.zeros((4, 3)), **arrays}
    with pytest.raises(DataError, match=problem):
        write_generic(tmp_path / "g", **given)
    assert not (tmp_path / "g").exists()
