"""conmh.datasets, features, labels, verify: layouts, lazy feature reads, label loading and every bad-input check."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from conmh import datasets, verify
from conmh.datasets import get_layout
from conmh.errors import ConfigError, DataError, MissingDataError
from conmh.features import FeatureFiles, open_split
from conmh.labels import load_labels
from conmh.synthetic import MiniatureSpec, make_miniature
from conmh.verify import verify_dataset

TINY = MiniatureSpec(n_train=27, n_database=12, n_queries=6, feature_dim=8, n_classes=4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny miniature per dataset, written once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("pristine")
    for name in datasets.DATASETS:
        make_miniature(name, root / name, seed=3, spec=TINY)
    return {name: root / name for name in datasets.DATASETS}


@pytest.fixture
def ds(pristine: dict[str, Path], tmp_path: Path):
    """A fresh writable copy of a dataset's miniature: ds("yfcc") -> Path."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(pristine[name], target)
        return target

    return copy


def write_h5(path: Path, **arrays: np.ndarray) -> None:
    with h5py.File(path, "w") as fh:
        for key, arr in arrays.items():
            fh.create_dataset(key, data=arr)


def raw_feats(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh["feats"][()]


# --------------------------------------------------------------------------- layouts


def test_layouts_match_reference() -> None:
    fc, an, yf = (get_layout(n) for n in ("fcvid", "activitynet", "yfcc"))
    assert (fc.frames, an.frames, yf.frames) == (25, 30, 25)
    assert (fc.feature_dim, an.feature_dim, yf.feature_dim) == (4096, 2048, 4096)
    assert fc.train == ("fcv_train_feats.h5",) and fc.database == ("fcv_test_feats.h5",)
    assert fc.database_labels == (("fcv_test_labels.mat", "labels"),) and fc.queries is None
    assert an.database_labels == (("re_label.mat", "re_label"),)
    assert an.queries == ("query_feats.h5",) and an.query_labels == (("q_label.mat", "q_label"),)
    assert yf.train == tuple(f"yfcc_train_feats_{i}.h5" for i in range(1, 10))
    assert yf.database == ("yfcc_test_feats_1.h5", "yfcc_test_feats_2.h5")
    assert yf.database_labels == (("yfcc_test_labels_1.mat", "labels"), ("yfcc_test_labels_2.mat", "labels"))
    assert yf.queries == ("query1000_feats.h5",) and yf.query_labels == (("query1000_labels.mat", "labels"),)
    assert fc.real_counts == {"train": 45585, "database": 45600, "queries": 45600}
    assert an.real_counts == {"train": 9722, "database": 3758, "queries": 1000}
    assert yf.real_counts == {"train": 409788, "database": 101256, "queries": 1000}


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(ConfigError, match="nope"):
        get_layout("nope")
    with pytest.raises(ConfigError, match="valid"):
        open_split("fcvid", ".", "valid")
    with pytest.raises(ConfigError, match="train"):
        load_labels("fcvid", ".", "train")


# --------------------------------------------------------------------------- reading


def test_read_and_take_across_yfcc_parts(ds) -> None:
    root = ds("yfcc")
    layout = get_layout("yfcc")
    truth = np.concatenate([raw_feats(root / f) for f in layout.train])
    assert truth.shape == (27, 25, 8)
    with open_split("yfcc", root, "train") as ff:
        assert (ff.n, ff.frames, ff.dim, len(ff)) == (27, 25, 8, 27)
        assert ff.paths == tuple(root / f for f in layout.train)
        np.testing.assert_array_equal(ff.read(0, 27), truth)
        np.testing.assert_array_equal(ff.read(2, 11), truth[2:11])  # spans several files
        assert ff.read(5, 5).shape == (0, 25, 8)
        idx = np.array([26, 0, 3, 3, 14, 2, 25, 9, 0, 13])  # any order, repeats, every file boundary
        out = ff.take(idx)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, truth[idx])
        np.testing.assert_array_equal(ff.take(np.arange(6, 12)), truth[6:12])  # contiguous runs
        np.testing.assert_array_equal(ff.take(np.array([], dtype=int)), truth[:0])
        blocks = list(ff.iter_blocks(4))
        assert [s for s, _ in blocks] == list(range(0, 27, 4))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), truth)
        assert ff.locate(26) == (root / layout.train[-1], 26 - int(ff.offsets[-2]))
        with pytest.raises(IndexError):
            ff.take(np.array([27]))
        with pytest.raises(IndexError):
            ff.take(np.array([-1]))
        with pytest.raises(IndexError):
            ff.read(0, 28)


def test_take_reads_only_requested_rows(ds, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ds("fcvid")
    ff = open_split("fcvid", root, "train")
    requested: list[object] = []
    original = FeatureFiles._read_file

    def spy(self, f, sel):
        requested.append(sel)
        return original(self, f, sel)

    monkeypatch.setattr(FeatureFiles, "_read_file", spy)
    ff.take(np.array([20, 3, 3, 11]))
    assert len(requested) == 1  # one HDF5 read per file
    np.testing.assert_array_equal(requested[0], [3, 11, 20])  # sorted, unique, only those rows
    ff.close()


@pytest.mark.parametrize("storage", [{}, {"chunks": (2, 3, 8)}, {"compression": "gzip"}])
def test_scattered_rows_read_alike_from_any_hdf5_storage(tmp_path: Path, storage: dict) -> None:
    """Contiguous files are read by positioned reads, chunked or compressed ones through HDF5: same rows."""
    feats = np.random.default_rng(0).standard_normal((40, 3, 8)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("feats", data=feats, **storage)
    idx = np.array([39, 0, 1, 2, 17, 5, 6, 38, 17])
    with FeatureFiles([tmp_path / "f.h5"]) as ff:
        np.testing.assert_array_equal(ff.take(idx), feats[idx])


def test_a_file_truncated_under_a_reader_is_refused(tmp_path: Path) -> None:
    feats = np.ones((40, 3, 8), dtype=np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("feats", data=feats)
    with FeatureFiles([tmp_path / "f.h5"]) as ff:
        ff.take(np.array([1, 3]))  # open, offsets known
        size = (tmp_path / "f.h5").stat().st_size
        with open(tmp_path / "f.h5", "r+b") as fh:
            fh.truncate(size - 5 * 3 * 8 * 4)
        with pytest.raises(DataError, match=r"f\.h5.*truncated"):
            ff.take(np.array([2, 38]))


def test_feature_files_survive_pickling_and_close(ds) -> None:
    root = ds("activitynet")
    ff = open_split("activitynet", root, "queries")
    expected = ff.read(0, ff.n)
    clone = pickle.loads(pickle.dumps(ff))  # as handed to DataLoader workers
    np.testing.assert_array_equal(clone.take(np.arange(ff.n)), expected)
    ff.close()
    np.testing.assert_array_equal(ff.read(0, ff.n), expected)  # reopens lazily
    ff.close()
    clone.close()


def test_fcvid_queries_are_the_database(ds) -> None:
    root = ds("fcvid")
    q, d = open_split("fcvid", root, "queries"), open_split("fcvid", root, "database")
    assert q.paths == d.paths == (root / "fcv_test_feats.h5",)
    np.testing.assert_array_equal(q.read(0, q.n), d.read(0, d.n))
    np.testing.assert_array_equal(load_labels("fcvid", root, "queries"), load_labels("fcvid", root, "database"))


def test_labels_concatenate_yfcc_parts_in_order(ds) -> None:
    root = ds("yfcc")
    parts = [scipy.io.loadmat(root / f)["labels"] for f in ("yfcc_test_labels_1.mat", "yfcc_test_labels_2.mat")]
    labels = load_labels("yfcc", root, "database")
    assert labels.dtype == np.uint8 and labels.shape == (12, 4)
    np.testing.assert_array_equal(labels, np.concatenate(parts))
    assert load_labels("yfcc", root, "queries").shape == (6, 4)


def test_float64_features_are_read_as_float32(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((3, 2, 4))
    write_h5(tmp_path / "a.h5", feats=arr)
    with FeatureFiles([tmp_path / "a.h5"]) as ff:
        out = ff.read(0, 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.astype(np.float32))


# --------------------------------------------------------------------------- MATLAB v7.3 labels


def _v73_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


@pytest.mark.parametrize("with_matlab_header", [True, False])
def test_v73_labels_load_transposed(ds, with_matlab_header: bool) -> None:
    root = ds("activitynet")
    expected = load_labels("activitynet", root, "queries")
    path = root / "q_label.mat"
    path.unlink()
    # MATLAB v7.3 stores column-major: h5py sees the (N, C) matrix as (C, N).
    with h5py.File(path, "w", userblock_size=512 if with_matlab_header else 0) as fh:
        fh.create_dataset("q_label", data=expected.T.astype(np.float64))
    if with_matlab_header:
        with open(path, "r+b") as fh:
            fh.write(_v73_header())
        with pytest.raises(NotImplementedError):  # scipy's own refusal: the fallback is really used
            scipy.io.loadmat(path)
    got = load_labels("activitynet", root, "queries")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_v73_labels_wrong_key_lists_keys(ds) -> None:
    root = ds("activitynet")
    path = root / "q_label.mat"
    path.unlink()
    write_h5(path, other=np.zeros((4, 6)))
    with pytest.raises(DataError, match=r"q_label\.mat.*'q_label'.*other"):
        load_labels("activitynet", root, "queries")


# --------------------------------------------------------------------------- bad input


def test_missing_files_are_all_listed(ds) -> None:
    root = ds("yfcc")
    (root / "yfcc_train_feats_4.h5").unlink()
    (root / "yfcc_test_labels_2.mat").unlink()
    (root / "query1000_feats.h5").unlink()
    with pytest.raises(MissingDataError) as err:
        verify_dataset("yfcc", root)
    msg = str(err.value)
    for f in ("yfcc_train_feats_4.h5", "yfcc_test_labels_2.mat", "query1000_feats.h5"):
        assert str(root / f) in msg
    assert "yfcc_train_feats_3.h5" not in msg
    assert err.value.exit_code == 4
    with pytest.raises(MissingDataError, match="yfcc_train_feats_4.h5"):
        open_split("yfcc", root, "train")
    with pytest.raises(MissingDataError, match="yfcc_test_labels_2.mat"):
        load_labels("yfcc", root, "database")


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as err:
        verify_dataset("fcvid", tmp_path / "absent")
    msg = str(err.value)
    assert all(f in msg for f in ("fcv_train_feats.h5", "fcv_test_feats.h5", "fcv_test_labels.mat"))
    assert "does not exist" in msg


def test_not_hdf5(ds) -> None:
    root = ds("fcvid")
    (root / "fcv_train_feats.h5").write_bytes(b"this is not HDF5" * 100)
    with pytest.raises(DataError, match=r"fcv_train_feats\.h5.*not an HDF5 file") as err:
        open_split("fcvid", root, "train")
    assert not isinstance(err.value, MissingDataError)


def test_truncated_hdf5(ds) -> None:
    root = ds("fcvid")
    path = root / "fcv_train_feats.h5"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(DataError, match=r"fcv_train_feats\.h5.*truncated"):
        verify_dataset("fcvid", root)


def test_wrong_feature_key_lists_keys(ds) -> None:
    root = ds("activitynet")
    arr = raw_feats(root / "test_feats.h5")
    write_h5(root / "test_feats.h5", features=arr, extra=np.zeros(2))
    with pytest.raises(DataError, match=r"test_feats\.h5.*'feats'.*\['extra', 'features'\]"):
        open_split("activitynet", root, "database")


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((4, 25, 8), dtype=np.float32)[..., 0], r"shape \(4, 25\).*3-D"),
        (np.zeros((4, 25, 8), dtype=np.int32), r"dtype int32.*floating"),
        (np.zeros((0, 25, 8), dtype=np.float32), r"shape \(0, 25, 8\).*non-empty"),
    ],
    ids=["2-D", "int", "empty"],
)
def test_bad_feature_arrays(ds, array: np.ndarray, expected: str) -> None:
    root = ds("fcvid")
    write_h5(root / "fcv_test_feats.h5", feats=array)
    with pytest.raises(DataError, match=r"fcv_test_feats\.h5: key 'feats' has " + expected):
        open_split("fcvid", root, "database")


def test_feats_group_instead_of_array(ds) -> None:
    root = ds("fcvid")
    with h5py.File(root / "fcv_test_feats.h5", "w") as fh:
        fh.create_group("feats")
    with pytest.raises(DataError, match=r"fcv_test_feats\.h5.*'feats'.*group"):
        open_split("fcvid", root, "database")


def test_wrong_frame_count(ds) -> None:
    root = ds("fcvid")
    write_h5(root / "fcv_train_feats.h5", feats=np.zeros((27, 30, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"fcv_train_feats\.h5.*30 frames.*expected 25"):
        open_split("fcvid", root, "train")


def test_parts_disagree_within_split(ds) -> None:
    root = ds("yfcc")
    write_h5(root / "yfcc_train_feats_5.h5", feats=np.zeros((3, 25, 9), dtype=np.float32))
    with pytest.raises(DataError, match=r"yfcc_train_feats_5\.h5.*\(25, 9\).*yfcc_train_feats_1\.h5.*\(25, 8\)"):
        open_split("yfcc", root, "train")


def test_dims_disagree_across_splits(ds) -> None:
    root = ds("activitynet")
    write_h5(root / "query_feats.h5", feats=np.zeros((6, 30, 9), dtype=np.float32))
    open_split("activitynet", root, "queries")  # fine on its own
    with pytest.raises(DataError, match=r"query_feats\.h5.*dim 9.*train_feats\.h5.*8"):
        verify_dataset("activitynet", root)


def test_label_rows_differ_from_features(ds) -> None:
    root = ds("activitynet")
    labels = scipy.io.loadmat(root / "re_label.mat")["re_label"]
    scipy.io.savemat(root / "re_label.mat", {"re_label": labels[:-1]})
    with pytest.raises(DataError, match=r"re_label\.mat.*11 rows.*test_feats\.h5.*12 videos"):
        load_labels("activitynet", root, "database")
    with pytest.raises(DataError, match=r"re_label\.mat"):
        verify_dataset("activitynet", root)


def test_yfcc_label_rows_must_match_all_parts(ds) -> None:
    root = ds("yfcc")
    labels = scipy.io.loadmat(root / "yfcc_test_labels_2.mat")["labels"]
    scipy.io.savemat(root / "yfcc_test_labels_2.mat", {"labels": np.concatenate([labels, labels[:1]])})
    with pytest.raises(DataError, match=r"yfcc_test_labels_1\.mat, .*yfcc_test_labels_2\.mat.*13 rows.*12 videos"):
        load_labels("yfcc", root, "database")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2.0, r"only 0 and 1.*2\.0"), (np.nan, "only 0 and 1"), (-1.0, r"only 0 and 1.*-1\.0")],
)
def test_labels_not_binary(ds, value: float, expected: str) -> None:
    root = ds("fcvid")
    labels = scipy.io.loadmat(root / "fcv_test_labels.mat")["labels"].astype(np.float64)
    labels[3, 1] = value
    scipy.io.savemat(root / "fcv_test_labels.mat", {"labels": labels})
    with pytest.raises(DataError, match=r"fcv_test_labels\.mat: key 'labels' must hold " + expected):
        load_labels("fcvid", root, "database")


def test_wrong_label_key_lists_keys(ds) -> None:
    root = ds("activitynet")
    labels = scipy.io.loadmat(root / "q_label.mat")["q_label"]
    scipy.io.savemat(root / "q_label.mat", {"labels": labels})
    with pytest.raises(DataError, match=r"q_label\.mat: no key 'q_label'; keys found: \['labels'\]"):
        load_labels("activitynet", root, "queries")


def test_label_matrix_not_2d_and_not_mat(ds) -> None:
    root = ds("activitynet")
    (root / "q_label.mat").write_bytes(b"garbage" * 50)
    with pytest.raises(DataError, match=r"q_label\.mat.*not a readable MATLAB"):
        load_labels("activitynet", root, "queries")
    scipy.io.savemat(root / "q_label.mat", {"q_label": np.zeros((6, 2, 2))})
    with pytest.raises(DataError, match=r"q_label\.mat: key 'q_label' has shape \(6, 2, 2\).*2-D"):
        load_labels("activitynet", root, "queries")


def test_query_and_database_classes_disagree(ds) -> None:
    root = ds("activitynet")
    scipy.io.savemat(root / "q_label.mat", {"q_label": np.eye(6, 5, dtype=np.uint8)})
    with pytest.raises(DataError, match=r"q_label\.mat.*5 classes.*4"):
        verify_dataset("activitynet", root)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(ds, monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    root = ds("yfcc")
    monkeypatch.setattr(verify, "_SCAN_BYTES", 1)  # one row per chunk: exercises chunked scanning
    path = root / "yfcc_train_feats_7.h5"
    arr = raw_feats(path)
    arr[1, 4, 2] = bad
    write_h5(path, feats=arr)
    with pytest.raises(DataError, match=r"yfcc_train_feats_7\.h5: key 'feats' row 1 .*NaN or infinite"):
        verify_dataset("yfcc", root)


def test_real_mode_checks_counts_and_dims(ds) -> None:
    root = ds("activitynet")
    verify_dataset("activitynet", root, real=False, checksums=False)
    with pytest.raises(DataError, match=r"train_feats\.h5.*27 videos.*expected 9722"):
        verify_dataset("activitynet", root, real=True, checksums=False)
    layout = get_layout("activitynet")
    patched = datasets.DatasetLayout(**{**layout.__dict__, "real_counts": {"train": 27, "database": 12, "queries": 6}})
    datasets.LAYOUTS["activitynet"] = patched
    try:
        with pytest.raises(DataError, match=r"feature dim 8, expected 2048"):
            verify_dataset("activitynet", root, real=True, checksums=False)
    finally:
        datasets.LAYOUTS["activitynet"] = layout


# --------------------------------------------------------------------------- the report


def test_verify_report(ds) -> None:
    root = ds("yfcc")
    # A database video without any class: reported, not an error.
    labels = scipy.io.loadmat(root / "yfcc_test_labels_1.mat")["labels"]
    labels[:2] = 0
    scipy.io.savemat(root / "yfcc_test_labels_1.mat", {"labels": labels})
    report = verify_dataset("yfcc", root)
    layout = get_layout("yfcc")
    assert report["dataset"] == "yfcc" and report["real"] is False
    assert report["counts"] == {"train": 27, "database": 12, "queries": 6}
    assert (report["frames"], report["feature_dim"], report["n_classes"]) == (25, 8, 4)
    expected_files = [
        *layout.train,
        *layout.database,
        *(f for f, _ in layout.database_labels),
        *layout.queries,
        *(f for f, _ in layout.query_labels),
    ]
    assert [e["file"] for e in report["files"]] == expected_files
    for entry in report["files"]:
        assert entry["sha256"] == hashlib.sha256((root / entry["file"]).read_bytes()).hexdigest()
    by_name = {e["file"]: e for e in report["files"]}
    assert by_name["yfcc_test_labels_1.mat"]["key"] == "labels"
    assert by_name["yfcc_test_labels_1.mat"]["shape"] == [6, 4]
    assert by_name["yfcc_train_feats_1.h5"]["shape"] == [3, 25, 8]
    assert by_name["yfcc_train_feats_1.h5"]["dtype"] == "float32"
    expected_empty = int((load_labels("yfcc", root, "database").sum(1) == 0).sum())
    assert expected_empty >= 2
    assert report["label_rows_without_class"]["database"] == expected_empty
    assert verify_dataset("yfcc", root, checksums=False)["files"][0]["sha256"] is None


def test_verify_report_fcvid_lists_each_file_once(ds) -> None:
    root = ds("fcvid")
    report = verify_dataset("fcvid", root, checksums=False)
    assert [e["file"] for e in report["files"]] == ["fcv_train_feats.h5", "fcv_test_feats.h5", "fcv_test_labels.mat"]
    assert report["counts"]["queries"] == report["counts"]["database"] == 12
    assert report["queries_are_database"] is True
    assert report["label_rows_without_class"]["queries"] == report["label_rows_without_class"]["database"]
