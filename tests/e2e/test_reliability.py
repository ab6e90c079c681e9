"""Reliability: a run killed at the worst moment and rerun ends exactly like an uninterrupted one,
no half-written file is ever at a path a later step reads, and bad data is refused with the file
and the key named (exit 3 or 4, one line, no traceback).

The kills are real SIGKILLs, sent by the ``conmh`` process to itself at a chosen point (a training
step, or between writing a file and renaming it into place, with the temporary file cut to half its
size): deterministic, unlike a timer. ``tests/helpers/fault_injection.py`` (run by hand) kills at random
moments, many times. Codes/metrics round trips are property-tested in test_codes.py and test_metrics.py; the
properties here are about surviving faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conmh.atomic import atomic_path
from conmh.cli import main
from conmh.codes import Codes, pack_bits, read_codes, write_codes
from conmh.errors import CodesError
from conmh.metrics import evaluate, map_at_k
from conmh.model import ModelConfig
from conmh.recipes import Recipe
from conmh.synthetic import MiniatureSpec, make_miniature
from conmh.train import CHECKPOINT, FINAL_MODEL, LOG, train
from helpers.conmh_runs import DATASET, encode_argv, log_values, train_argv, truncate, unpacked, weights

TINY = MiniatureSpec(n_train=32, n_database=24, n_queries=8, feature_dim=16, n_classes=4)
EPOCHS, BATCH = 3, 16  # two steps per epoch
TIMEOUT = 180

# Run `conmh` with a SIGKILL planted at one point: KILL_AT=step (before the KILL_N-th training step),
# or MODULE:FILE (the KILL_N-th atomic write of FILE by conmh.MODULE: the temporary file is complete,
# is then cut to half, and the process dies before the rename).
KILLING_CONMH = r"""
import contextlib, os, signal, sys
import conmh.codes, conmh.train
from conmh.cli import main

point, n, calls = os.environ["KILL_AT"], int(os.environ["KILL_N"]), [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "step":
    step = conmh.train.training_step
    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            die()
        return step(*args, **kwargs)
    conmh.train.training_step = counted
else:
    module_name, file_name = point.split(":")
    module = getattr(conmh, module_name)
    real = module.atomic_path
    @contextlib.contextmanager
    def torn(target):
        with real(target) as tmp:
            yield tmp
            if os.path.basename(target) == file_name:
                calls[0] += 1
                if calls[0] == n:
                    with open(tmp, "r+b") as fh:
                        fh.truncate(os.path.getsize(tmp) // 2)
                    die()
    module.atomic_path = torn
sys.exit(main(sys.argv[1:]))
"""


def killed_run(argv: list[str], at: str, n: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, KILL_AT=at, KILL_N=str(n))
    return subprocess.run(
        [sys.executable, "-c", KILLING_CONMH, *argv], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def _train_argv(data: Path, out: Path, bits: int = 16, dataset: str = DATASET, epochs: int = EPOCHS) -> list[str]:
    return train_argv(data, out, epochs=epochs, bits=bits, dataset=dataset)


@contextlib.contextmanager
def one_thread():
    """Every run of a comparison uses one torch thread (as the pipeline does), then the old setting returns."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Reference:
    data: Path
    run: Path
    codes: Path


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reliability")
    make_miniature(DATASET, root / "data", seed=0, spec=TINY)
    with one_thread():
        assert main(_train_argv(root / "data", root / "run")) == 0
        assert main(encode_argv(root / "data", root / "run" / FINAL_MODEL, root / "codes.h5")) == 0
    return Reference(root / "data", root / "run", root / "codes.h5")


def assert_same_run(out: Path, ref: Reference, codes: Path) -> None:
    """Weights, per-epoch losses and codes equal the uninterrupted run's; no temporary file is left."""
    reference, got = weights(ref.run / FINAL_MODEL), weights(out / FINAL_MODEL)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)
    assert log_values(out / LOG) == log_values(ref.run / LOG)
    expected, actual = unpacked(ref.codes), unpacked(codes)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    assert sorted(p.name for p in out.glob(".*.tmp")) == []


def checkpoint_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


# --------------------------------------------------------------------------- SIGKILL and rerun


@pytest.mark.parametrize(
    "at, n, checkpointed",
    [
        ("step", 4, 1),  # the second step of epoch 2: mid-epoch
        ("train:checkpoint.pt", 2, 1),  # epoch 2's checkpoint half-written, not yet renamed
        ("train:model.pt", 1, EPOCHS),  # the final model half-written after the last epoch
    ],
    ids=["mid-epoch", "checkpoint-write", "final-model-write"],
)
def test_killed_training_resumes_to_identical_codes(
    tmp_path: Path, ref: Reference, at: str, n: int, checkpointed: int
) -> None:
    out = tmp_path / "run"
    proc = killed_run(_train_argv(ref.data, out), at, n)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # What the kill left: the last complete epoch's checkpoint, loadable; never a half file at a final path.
    assert checkpoint_epoch(out / CHECKPOINT) == checkpointed
    assert not (out / FINAL_MODEL).exists()
    lines = (out / LOG).read_text().splitlines()
    assert len(lines) in (checkpointed, checkpointed + 1)  # the next epoch's line is written before its checkpoint
    if at != "step":
        assert len(list(out.glob(".*.tmp"))) == 1  # the torn write stayed under its temporary name
    with one_thread():
        assert main(_train_argv(ref.data, out)) == 0  # the same command again
        assert main(encode_argv(ref.data, out / FINAL_MODEL, tmp_path / "codes.h5")) == 0
    assert_same_run(out, ref, tmp_path / "codes.h5")


def test_killed_encoding_leaves_no_codes_file_and_rerun_is_identical(tmp_path: Path, ref: Reference) -> None:
    codes = tmp_path / "codes" / "conmh-16bits.h5"
    proc = killed_run(encode_argv(ref.data, ref.run / FINAL_MODEL, codes), "codes:conmh-16bits.h5", 1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not codes.exists()
    [torn] = codes.parent.glob(".*.tmp")  # hidden, never at the path `conmh evaluate` and the pipeline read
    assert torn.name.startswith(".conmh-16bits.h5.")
    with one_thread():
        assert main(encode_argv(ref.data, ref.run / FINAL_MODEL, codes)) == 0
    for key, value in unpacked(ref.codes).items():
        np.testing.assert_array_equal(unpacked(codes)[key], value, err_msg=key)


def test_killed_rewrite_keeps_the_previous_codes_file(tmp_path: Path, ref: Reference) -> None:
    codes = tmp_path / "codes.h5"
    shutil.copy2(ref.codes, codes)
    before = codes.read_bytes()
    proc = killed_run(
        ["lsh", "--dataset", DATASET, "--data-dir", str(ref.data), "--bits", "16", "--out", str(codes)],
        "codes:codes.h5",
        1,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert codes.read_bytes() == before
    read_codes(codes)


# --------------------------------------------------------------------------- properties of crash safety


@settings(max_examples=60, deadline=None)
@given(
    old=st.one_of(st.none(), st.binary(max_size=64)),
    new=st.binary(max_size=64),
    fail=st.one_of(st.none(), st.integers(0, 64)),
)
def test_atomic_write_leaves_old_or_new_content_never_a_mix(
    tmp_path_factory, old: bytes | None, new: bytes, fail: int | None
) -> None:
    """An error after writing any number of bytes leaves the previous file (or none) and no temporary file."""
    folder = tmp_path_factory.mktemp("atomic")
    target = folder / "metrics.json"
    if old is not None:
        target.write_bytes(old)
    with contextlib.suppress(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(new[:fail] if fail is not None else new)
            if fail is not None:
                raise RuntimeError("crash while writing")
    if fail is None:
        assert target.read_bytes() == new
    elif old is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == old
    assert [p.name for p in folder.iterdir()] == ([] if old is None and fail is not None else ["metrics.json"])


SMALL = ModelConfig(
    feature_dim=8,
    frames=6,
    nbits=8,
    hidden_size=16,
    encoder_depth=1,
    encoder_heads=2,
    decoder_dim=8,
    decoder_depth=1,
    decoder_heads=2,
)
SMALL_RECIPE = Recipe(
    mask_ratio=0.5,
    batch_size=8,
    epochs=4,
    alpha=1.0,
    temperature=0.5,
    tau_plus=0.1,
    lr=1e-3,
    lr_step=1,
    lr_gamma=0.5,
    lr_min=1e-4,
)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory) -> tuple[np.ndarray, dict[int, Path]]:
    """Training folders as a crash after k complete epochs leaves them (k = 0 .. epochs-1), and a full run."""
    feats = np.random.default_rng(0).standard_normal((24, 6, 8)).astype(np.float32)
    root = tmp_path_factory.mktemp("small")
    runs = {}
    with one_thread():
        for k in range(SMALL_RECIPE.epochs + 1):
            train(feats, SMALL, SMALL_RECIPE, root / str(k), device="cpu", progress=False, stop_after=k)
            runs[k] = root / str(k)
    return feats, runs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(0, SMALL_RECIPE.epochs - 1), torn=st.floats(0, 1, exclude_max=True), stale=st.binary(max_size=300))
def test_resume_after_a_torn_log_line_and_a_torn_checkpoint(
    tmp_path_factory, small_runs, k: int, torn: float, stale: bytes
) -> None:
    """The state a kill leaves while epoch k+1's log line and checkpoint are being written resumes exactly."""
    feats, runs = small_runs
    full = runs[SMALL_RECIPE.epochs]
    out = tmp_path_factory.mktemp("resume") / "run"
    shutil.copytree(runs[k], out)
    next_line = (full / LOG).read_text().splitlines(keepends=True)[k]
    with open(out / LOG, "a") as fh:
        fh.write(next_line[: int(torn * len(next_line))])  # a prefix of the line, without its newline
    (out / f".{CHECKPOINT}.12345.tmp").write_bytes(stale)  # the torn checkpoint of epoch k+1
    with one_thread():
        train(feats, SMALL, SMALL_RECIPE, out, device="cpu", progress=False, resume=True)
    assert log_values(out / LOG) == log_values(full / LOG)
    got, expected = weights(out / FINAL_MODEL), weights(full / FINAL_MODEL)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert list(out.glob(".*.tmp")) == []


def _small_codes(seed: int) -> Codes:
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return pack_bits(rng.random((n, 16)) < 0.5), (rng.random((n, 5)) < 0.3).astype(np.uint8)

    return Codes(16, DATASET, "lsh", *split(30), *split(6))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_change_to_stored_code_or_label_bytes_is_refused(tmp_path_factory, data) -> None:
    """Every byte of every stored codes/labels chunk (compressed or not) is covered by a checksum."""
    path = tmp_path_factory.mktemp("flip") / "codes.h5"
    write_codes(path, _small_codes(0))
    with h5py.File(path, "r") as fh:
        chunks = [
            fh[k].id.get_chunk_info(0) for k in ("database/codes", "database/labels", "queries/codes", "queries/labels")
        ]
    chunk = data.draw(st.sampled_from(chunks))
    at = chunk.byte_offset + data.draw(st.integers(0, chunk.size - 1))
    raw = bytearray(path.read_bytes())
    raw[at] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    with pytest.raises(CodesError, match=str(path)):
        read_codes(path)


def test_a_damaged_chunk_address_is_refused_not_read_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "codes.h5"
    codes = _small_codes(1)
    write_codes(path, codes)
    with h5py.File(path, "r") as fh:
        address = fh["queries/codes"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<Q", address))
    assert at > 0
    raw[at : at + 8] = b"\xff" * 8  # HDF5's "undefined address": the chunk reads as the fill value
    path.write_bytes(bytes(raw))
    try:
        back = read_codes(path)
    except CodesError:
        return
    assert np.array_equal(back.queries, codes.queries), "codes silently replaced by zeros"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_q=st.integers(1, 8), unlabelled=st.integers(1, 5))
def test_queries_without_a_label_score_zero_and_count(seed: int, n_q: int, unlabelled: int) -> None:
    """The documented rule: a query with no class has no relevant item, AP 0, and counts in the mean."""
    rng = np.random.default_rng(seed)
    db, q = rng.random((20, 12)) < 0.5, rng.random((n_q + unlabelled, 12)) < 0.5
    db_labels = (rng.random((20, 3)) < 0.5).astype(np.uint8)
    q_labels = (rng.random((n_q + unlabelled, 3)) < 0.5).astype(np.uint8)
    q_labels[:n_q][q_labels[:n_q].sum(axis=1) == 0, 0] = 1  # the first n_q queries have a class
    q_labels[n_q:] = 0
    ks = (1, 5, 20)
    labelled = map_at_k(pack_bits(db), db_labels, pack_bits(q[:n_q]), q_labels[:n_q], 12, ks)
    both = map_at_k(pack_bits(db), db_labels, pack_bits(q), q_labels, 12, ks)
    for k in ks:
        assert both[k] == pytest.approx(labelled[k] * n_q / (n_q + unlabelled), abs=1e-12)
    metrics = evaluate(Codes(12, DATASET, "lsh", pack_bits(db), db_labels, pack_bits(q), q_labels), ks)
    assert metrics["queries_without_label"] == unlabelled and metrics["n_queries"] == n_q + unlabelled


# --------------------------------------------------------------------------- bad data through verify and load


def _h5_replace(path: Path, key: str, make: Callable[[np.ndarray], np.ndarray]) -> None:
    with h5py.File(path, "r+") as fh:
        data = make(fh[key][()])
        del fh[key]
        fh.create_dataset(key, data=data)


def _h5_rename(path: Path, key: str, new: str) -> None:
    with h5py.File(path, "r+") as fh:
        fh.move(key, new)


def _h5_set(path: Path, index: tuple, value: float) -> None:
    with h5py.File(path, "r+") as fh:
        fh["feats"][index] = value


def _mat_edit(path: Path, key: str, make: Callable[[np.ndarray], np.ndarray], new_key: str | None = None) -> None:
    scipy.io.savemat(path, {new_key or key: make(scipy.io.loadmat(path)[key])})


def _damage_dataspace(path: Path) -> None:
    """Make the stored shape of 'feats' exceed its maximum: damaged HDF5 metadata, as a bad disk leaves it."""
    with h5py.File(path, "r") as fh:
        n, t, d = fh["feats"].shape
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<QQQ", n, t, d))
    raw[at + 8 : at + 16] = struct.pack("<Q", 100 * t)
    path.write_bytes(bytes(raw))


def _activitynet_as_fcvid(folder: Path) -> None:
    """An FCVID folder whose training file is ActivityNet's (30 frames instead of 25)."""
    other = folder.parent / "other"
    shutil.move(folder, other)
    make_miniature("fcvid", folder, seed=0, spec=TINY)
    shutil.copy2(other / "train_feats.h5", folder / "fcv_train_feats.h5")


# name -> (edit of a copy of the miniature, the file and key the message must name, commands that load it)
BAD_DATA: dict[str, tuple[Callable[[Path], None], tuple[str, ...], tuple[str, ...]]] = {
    "truncated feature file": (
        lambda d: truncate(d / "train_feats.h5", 0.6),
        ("train_feats.h5",),
        ("verify", "train", "lsh"),
    ),
    "not HDF5": (lambda d: (d / "test_feats.h5").write_text("feats\n" * 40), ("test_feats.h5",), ("verify", "encode")),
    "damaged HDF5 metadata": (
        lambda d: _damage_dataspace(d / "test_feats.h5"),
        ("test_feats.h5", "feats"),
        ("verify", "encode"),
    ),
    "truncated label file": (lambda d: truncate(d / "re_label.mat", 0.5), ("re_label.mat",), ("verify", "encode")),
    "wrong feature key": (
        lambda d: _h5_rename(d / "query_feats.h5", "feats", "features"),
        ("query_feats.h5", "feats"),
        ("verify", "encode"),
    ),
    "wrong label key": (
        lambda d: _mat_edit(d / "re_label.mat", "re_label", lambda a: a, "labels"),
        ("re_label.mat", "re_label"),
        ("verify", "encode"),
    ),
    "integer features": (
        lambda d: _h5_replace(d / "train_feats.h5", "feats", lambda a: a.astype(np.int32)),
        ("train_feats.h5", "feats", "int32"),
        ("verify", "train"),
    ),
    "NaN features": (
        lambda d: _h5_set(d / "test_feats.h5", (3, 2, 1), np.nan),
        ("test_feats.h5", "feats"),
        ("verify", "encode", "lsh"),
    ),
    "infinite features": (
        lambda d: _h5_set(d / "train_feats.h5", (5, 0, 0), np.inf),
        ("train_feats.h5", "feats"),
        ("verify", "train"),
    ),
    "zero-length features": (
        lambda d: _h5_replace(d / "query_feats.h5", "feats", lambda a: a[:0]),
        ("query_feats.h5", "feats"),
        ("verify", "encode"),
    ),
    "label rows do not match": (
        lambda d: _mat_edit(d / "q_label.mat", "q_label", lambda a: a[:-1]),
        ("q_label.mat", "query_feats.h5"),
        ("verify", "encode"),
    ),
    "labels not 0/1": (
        lambda d: _mat_edit(d / "re_label.mat", "re_label", lambda a: a * 2),
        ("re_label.mat", "re_label"),
        ("verify", "encode"),
    ),
    "query classes differ": (
        lambda d: _mat_edit(d / "q_label.mat", "q_label", lambda a: a[:, :-1]),
        ("q_label.mat", "q_label"),
        ("verify", "encode"),
    ),
    "file of another dataset": (_activitynet_as_fcvid, ("fcv_train_feats.h5", "feats", "25"), ("verify", "train")),
    "missing file": (lambda d: (d / "q_label.mat").unlink(), ("q_label.mat",), ("verify", "encode")),
}
XFAIL: dict[tuple[str, str], str] = {}  # (case, command) -> reason, for known defects


def _bad_data_params():
    for name, (_, _, commands) in BAD_DATA.items():
        for command in commands:
            reason = XFAIL.get((name, command))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, command, marks=marks, id=f"{name}-{command}")


@pytest.mark.parametrize("name, command", _bad_data_params())
def test_bad_data_is_refused_naming_file_and_key(
    tmp_path: Path, ref: Reference, capsys, name: str, command: str
) -> None:
    edit, names, _ = BAD_DATA[name]
    data = tmp_path / "data"
    shutil.copytree(ref.data, data)
    edit(data)
    dataset = "fcvid" if name == "file of another dataset" else DATASET
    output = tmp_path / ("run" if command == "train" else "out.h5")
    argv = {
        "verify": ["verify", dataset, str(data), "--no-checksums"],
        "train": _train_argv(data, output, dataset=dataset),
        "encode": encode_argv(data, ref.run / FINAL_MODEL, output, dataset=dataset),
        "lsh": ["lsh", "--dataset", dataset, "--data-dir", str(data), "--bits", "16", "--out", str(output)],
    }[command]
    with one_thread():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == (4 if name == "missing file" else 3), err
    for text in names:
        assert text in err, f"{text!r} not named in: {err}"
    assert "Traceback" not in err
    assert not (output / FINAL_MODEL if command == "train" else output).exists()


def test_a_label_row_without_class_is_accepted_counted_and_scored_zero(tmp_path: Path, ref: Reference) -> None:
    data = tmp_path / "data"
    shutil.copytree(ref.data, data)
    _mat_edit(data / "q_label.mat", "q_label", lambda a: a * (np.arange(len(a)) > 0)[:, None])  # query 0: no class
    assert main(["verify", DATASET, str(data), "--no-checksums", "--report", str(tmp_path / "verify.json")]) == 0
    assert json.loads((tmp_path / "verify.json").read_text())["label_rows_without_class"]["queries"] == 1
    with one_thread():
        assert main(encode_argv(data, ref.run / FINAL_MODEL, tmp_path / "codes.h5")) == 0
    assert main(["evaluate", str(tmp_path / "codes.h5"), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["queries_without_label"] == 1


def test_a_damaged_mat_file_is_refused_not_a_crash(tmp_path: Path, ref: Reference) -> None:
    """scipy.io.loadmat crashes (SIGSEGV) on this file; conmh.matfile reads it in a child process."""
    data = tmp_path / "data"
    shutil.copytree(ref.data, data)
    raw = bytearray((data / "re_label.mat").read_bytes())
    raw[raw.find(b"re_label") + 8] ^= 0x80  # one bit of the type of the matrix's data element
    (data / "re_label.mat").write_bytes(bytes(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "conmh.cli", "verify", DATASET, str(data), "--no-checksums"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 3 and "re_label.mat" in proc.stderr, (proc.returncode, proc.stderr)
    assert "damaged MATLAB .mat file" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- untrusted and mismatched checkpoints


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a file that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_resumed_checkpoint_that_runs_code_is_refused(tmp_path: Path, ref: Reference, capsys) -> None:
    marker = tmp_path / "code-ran"
    (tmp_path / "run").mkdir()
    torch.save({"format": "conmh-train-1", "model_state_dict": _RunsCode(marker)}, tmp_path / "run" / CHECKPOINT)
    torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["model_state_dict"].close()
    assert marker.exists()  # the file is live: an unrestricted load runs its payload
    marker.unlink()
    assert main(_train_argv(ref.data, tmp_path / "run")) == 3
    err = capsys.readouterr().err
    assert CHECKPOINT in err and "Traceback" not in err
    assert not marker.exists()


def test_a_truncated_training_checkpoint_is_refused(tmp_path: Path, ref: Reference, capsys) -> None:
    (tmp_path / "run").mkdir()
    blob = (ref.run / CHECKPOINT).read_bytes()
    (tmp_path / "run" / CHECKPOINT).write_bytes(blob[: len(blob) // 2])
    assert main(_train_argv(ref.data, tmp_path / "run")) == 3
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / CHECKPOINT) in err and "Traceback" not in err


def test_a_checkpoint_of_another_dataset_is_refused_naming_it(tmp_path: Path, ref: Reference, capsys) -> None:
    make_miniature("fcvid", tmp_path / "fcvid", seed=0, spec=TINY)
    with one_thread():
        assert main(_train_argv(tmp_path / "fcvid", tmp_path / "fcvid-run", dataset="fcvid", epochs=1)) == 0
        code = main(encode_argv(ref.data, tmp_path / "fcvid-run" / FINAL_MODEL, tmp_path / "codes.h5"))
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert not (tmp_path / "codes.h5").exists()
    assert str(tmp_path / "fcvid-run" / FINAL_MODEL) in err and "test_feats.h5" in err
