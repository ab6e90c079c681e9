"""Codes: bit packing convention, exact HDF5 round trips, and CodesError on every malformed file."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conmh.codes import Codes, pack_bits, read_codes, unpack_bits, write_codes
from conmh.errors import CodesError


def bit_matrices(max_rows: int = 20, max_bits: int = 130) -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(0, max_rows), st.integers(1, max_bits))
    return shapes.flatmap(lambda shape: arrays(np.bool_, shape))


# --- packing -----------------------------------------------------------------


@given(bit_matrices())
def test_pack_unpack_round_trip(bits: np.ndarray) -> None:
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (bits.shape[0], -(-bits.shape[1] // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits.shape[1]), bits)


@given(bit_matrices(max_rows=5))
def test_padding_bits_are_zero(bits: np.ndarray) -> None:
    packed = pack_bits(bits)
    pad = -bits.shape[1] % 8
    if packed.size:
        assert not np.any(packed[:, -1] & ((1 << pad) - 1))


def test_first_bit_is_msb_of_first_byte_and_one_means_plus_one() -> None:
    bits = np.zeros((1, 12), bool)
    bits[0, 0] = bits[0, 8] = bits[0, 11] = True
    np.testing.assert_array_equal(pack_bits(bits), [[0b1000_0000, 0b1001_0000]])
    np.testing.assert_array_equal(pack_bits(np.array([[1, 0, 1, 1]], np.int64)), [[0b1011_0000]])


def test_pack_refuses_sign_values() -> None:
    with pytest.raises(ValueError, match="0/1"):
        pack_bits(np.array([[-1, 1, 1]]))
    with pytest.raises(ValueError, match="2-D"):
        pack_bits(np.zeros(8, bool))


def test_unpack_checks_width() -> None:
    with pytest.raises(ValueError, match="bytes per code"):
        unpack_bits(np.zeros((3, 2), np.uint8), 17)


# --- write / read round trip ---------------------------------------------------


def random_codes(
    rng: np.random.Generator, bits: int, n_db: int, n_q: int | None, classes: int, attrs: dict | None = None
) -> Codes:
    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return pack_bits(rng.random((n, bits)) < 0.5), (rng.random((n, classes)) < 0.3).astype(np.uint8)

    db, db_labels = split(n_db)
    q, q_labels = split(n_q) if n_q is not None else (None, None)
    return Codes(
        bits=bits,
        dataset="fcvid" if n_q is None else "activitynet",
        method="lsh",
        database=db,
        database_labels=db_labels,
        queries=q,
        query_labels=q_labels,
        attrs=attrs if attrs is not None else {"seed": 7, "checkpoint_sha256": "ab" * 32, "lr": 1e-4},
    )


def assert_same_codes(a: Codes, b: Codes) -> None:
    assert (a.bits, a.dataset, a.method) == (b.bits, b.dataset, b.method)
    assert a.queries_are_database == b.queries_are_database
    for name in ("database", "database_labels", "queries", "query_labels"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
        else:
            assert y.dtype == x.dtype == np.uint8
            np.testing.assert_array_equal(x, y)
    assert a.attrs == b.attrs
    assert {k: type(v) for k, v in a.attrs.items()} == {k: type(v) for k, v in b.attrs.items()}


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 100),
    n_db=st.integers(1, 30),
    n_q=st.one_of(st.none(), st.integers(1, 10)),
    classes=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    attrs=st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
            lambda k: k not in ("bits", "dataset", "method", "format_version", "queries_are_database")
        ),
        st.one_of(
            st.integers(-(2**62), 2**62),
            st.floats(allow_nan=False),
            st.text(max_size=20).filter(lambda t: not t.endswith("\0")),  # refused: see below
        ),
        max_size=4,
    ),
)
def test_write_read_round_trip(bits: int, n_db: int, n_q: int | None, classes: int, seed: int, attrs: dict) -> None:
    codes = random_codes(np.random.default_rng(seed), bits, n_db, n_q, classes, attrs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codes.h5"
        write_codes(path, codes)
        assert [p.name for p in Path(tmp).iterdir()] == ["codes.h5"]  # atomic write left no temp file
        back = read_codes(path)
    assert_same_codes(codes, back)


@pytest.mark.parametrize("bits", [16, 32, 64, 12, 7])
def test_round_trip_both_protocols(tmp_path: Path, bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n_q in (None, 9):
        codes = random_codes(rng, bits, 40, n_q, 5)
        write_codes(tmp_path / "c.h5", codes)
        back = read_codes(tmp_path / "c.h5")
        assert_same_codes(codes, back)
        with h5py.File(tmp_path / "c.h5") as f:
            assert f.attrs["queries_are_database"] == (n_q is None)
            assert ("queries" in f) == (n_q is not None)
            assert f["database/codes"].shape == (40, -(-bits // 8))


def test_write_accepts_bool_labels_and_overwrites(tmp_path: Path) -> None:
    codes = random_codes(np.random.default_rng(0), 8, 5, None, 3)
    codes.database_labels = codes.database_labels.astype(bool)
    write_codes(tmp_path / "c.h5", codes)
    write_codes(tmp_path / "c.h5", codes)
    assert read_codes(tmp_path / "c.h5").database_labels.dtype == np.uint8


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c, "attrs", {"bits": 3}), "reserved"),
        (lambda c: setattr(c, "attrs", {"x": [1, 2]}), "must be str, int or float"),
        (lambda c: setattr(c, "attrs", {"note": "a\0"}), "'note' ends with a NUL character"),
        (lambda c: setattr(c, "method", "lsh\0"), "'method' ends with a NUL character"),
        (lambda c: setattr(c, "bits", 0), "positive integer"),
        (lambda c: setattr(c, "database", c.database[:, :1]), "expected shape"),
        (lambda c: setattr(c, "database_labels", c.database_labels[:-1]), "one label row per code"),
        (lambda c: setattr(c, "query_labels", None), "both be present"),
    ],
)
def test_write_refuses_inconsistent_codes(tmp_path: Path, change: Callable[[Codes], None], message: str) -> None:
    codes = random_codes(np.random.default_rng(1), 16, 6, 3, 4)
    change(codes)
    with pytest.raises(CodesError, match=message):
        write_codes(tmp_path / "c.h5", codes)
    assert list(tmp_path.iterdir()) == []


# --- malformed files -------------------------------------------------------------


def _set_attr(name: str, value) -> Callable[[h5py.File], None]:
    return lambda f: f.attrs.__setitem__(name, value)


def _replace(key: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[key]
        f[key] = data

    return edit


def _group_instead(key: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[key]
        f.create_group(key)

    return edit


# (edit applied to a valid file with separate queries (16 bits, 6 db, 3 queries, 4 classes), expected message part)
MALFORMED = {
    "missing database group": (lambda f: f.__delitem__("database"), "missing dataset /database/codes"),
    "missing database labels": (lambda f: f.__delitem__("database/labels"), "missing dataset /database/labels"),
    "missing queries group": (lambda f: f.__delitem__("queries"), "missing dataset /queries/codes"),
    "missing query labels": (lambda f: f.__delitem__("queries/labels"), "missing dataset /queries/labels"),
    "codes is a group": (_group_instead("database/codes"), "to be a dataset"),
    "codes wrong dtype": (_replace("database/codes", np.zeros((6, 2), np.int64)), "expected dtype uint8"),
    "labels wrong dtype": (_replace("queries/labels", np.zeros((3, 4), np.float32)), "expected dtype uint8"),
    "labels not 0/1": (_replace("database/labels", np.full((6, 4), 2, np.uint8)), "0/1"),
    "labels 1-D": (_replace("database/labels", np.zeros(6, np.uint8)), "2-D"),
    "codes 1-D": (_replace("database/codes", np.zeros(12, np.uint8)), "expected shape"),
    "packed width too small": (_replace("database/codes", np.zeros((6, 1), np.uint8)), "expected shape (N, 2)"),
    "packed width too large": (_replace("queries/codes", np.zeros((3, 3), np.uint8)), "expected shape (N, 2)"),
    "no codes": (_replace("database/codes", np.zeros((0, 2), np.uint8)), "at least one code"),
    "label rows != code rows": (_replace("database/labels", np.zeros((5, 4), np.uint8)), "5 label rows for 6 codes"),
    "query classes differ": (_replace("queries/labels", np.zeros((3, 5), np.uint8)), "classes"),
    "padding bits set": (_set_attr("bits", 12), "expected the 4 padding bits of the last byte to be 0"),
    "missing bits": (lambda f: f.attrs.__delitem__("bits"), "missing root attribute 'bits'"),
    "missing dataset": (lambda f: f.attrs.__delitem__("dataset"), "missing root attribute 'dataset'"),
    "missing method": (lambda f: f.attrs.__delitem__("method"), "missing root attribute 'method'"),
    "missing format version": (lambda f: f.attrs.__delitem__("format_version"), "'format_version'"),
    "unknown format version": (_set_attr("format_version", 99), "format_version 1, found 99"),
    "bits zero": (_set_attr("bits", 0), "positive integer"),
    "bits negative": (_set_attr("bits", -16), "positive integer"),
    "bits float": (_set_attr("bits", 16.0), "positive integer"),
    "bits string": (_set_attr("bits", "16"), "positive integer"),
    "dataset not a string": (_set_attr("dataset", 3), "'dataset' to be a string"),
    "bad protocol flag": (_set_attr("queries_are_database", 2), "0 or 1"),
    "queries despite flag": (_set_attr("queries_are_database", 1), "has a /queries group"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_codes_error(tmp_path: Path, case: str) -> None:
    edit, message = MALFORMED[case]
    path = tmp_path / "bad.h5"
    codes = random_codes(np.random.default_rng(2), 16, 6, 3, 4)
    codes.database[:, -1] |= 0b1111  # valid at 16 bits; its low bits are padding if the file claims 12
    write_codes(path, codes)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(CodesError) as info:
        read_codes(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert info.value.exit_code == 3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CodesError, match="does not exist") as info:
        read_codes(tmp_path / "nope.h5")
    assert "nope.h5" in str(info.value)


def test_directory_is_not_a_codes_file(tmp_path: Path) -> None:
    with pytest.raises(CodesError, match="does not exist"):
        read_codes(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not an HDF5 file at all\n" * 10, b"\x89HDF\r\n\x1a\n" + b"\0" * 50])
def test_not_hdf5(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "codes.h5"
    path.write_bytes(content)
    with pytest.raises(CodesError, match="not a readable HDF5") as info:
        read_codes(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "codes.h5"
    codes = random_codes(np.random.default_rng(3), 64, 500, None, 50)
    write_codes(path, codes)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CodesError) as info:
        read_codes(path)
    assert str(path) in str(info.value)


def test_corrupted_code_bytes_are_detected(tmp_path: Path) -> None:
    """A flipped bit inside the stored codes fails the dataset checksum instead of changing a code."""
    path = tmp_path / "codes.h5"
    codes = random_codes(np.random.default_rng(4), 64, 50, None, 10)
    write_codes(path, codes)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(codes.database.tobytes())
    assert at > 0
    data[at + 5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CodesError, match="not a readable HDF5"):
        read_codes(path)
