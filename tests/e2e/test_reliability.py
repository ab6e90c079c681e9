"""Reliability: a run killed at the worst moment and rerun ends exactly like an uninterrupted one,
and no half-written file is ever at a path a later step reads. (Bad inputs: test_bad_inputs.py.)

The kills are real SIGKILLs, sent by the ``conmh`` process to itself at a chosen point (a training
step, or between writing a file and renaming it into place, with the temporary file cut to half its
size): deterministic, unlike a timer. The soak ``benchmarks/soak.py`` (run by hand) kills at random
moments, many times. Codes/metrics round trips are property-tested in test_codes.py and test_metrics.py; the
properties here are about surviving faults.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
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
from conmh.train import CHECKPOINT, FINAL_MODEL, LOG, train
from helpers.conmh_runs import (
    DATASET,
    TINY_EPOCHS,
    Reference,
    encode_argv,
    log_values,
    one_thread,
    train_argv,
    unpacked,
    weights,
)

EPOCHS = TINY_EPOCHS  # of the reference_run fixture (tests/e2e/conftest.py): two steps per epoch
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
    tmp_path: Path, reference_run: Reference, at: str, n: int, checkpointed: int
) -> None:
    out = tmp_path / "run"
    proc = killed_run(train_argv(reference_run.data, out, epochs=EPOCHS), at, n)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # What the kill left: the last complete epoch's checkpoint, loadable; never a half file at a final path.
    assert checkpoint_epoch(out / CHECKPOINT) == checkpointed
    assert not (out / FINAL_MODEL).exists()
    lines = (out / LOG).read_text().splitlines()
    assert len(lines) in (checkpointed, checkpointed + 1)  # the next epoch's line is written before its checkpoint
    if at != "step":
        assert len(list(out.glob(".*.tmp"))) == 1  # the torn write stayed under its temporary name
    with one_thread():
        assert main(train_argv(reference_run.data, out, epochs=EPOCHS)) == 0  # the same command again
        assert main(encode_argv(reference_run.data, out / FINAL_MODEL, tmp_path / "codes.h5")) == 0
    assert_same_run(out, reference_run, tmp_path / "codes.h5")


def test_killed_encoding_leaves_no_codes_file_and_rerun_is_identical(tmp_path: Path, reference_run: Reference) -> None:
    codes = tmp_path / "codes" / "conmh-16bits.h5"
    proc = killed_run(
        encode_argv(reference_run.data, reference_run.run / FINAL_MODEL, codes), "codes:conmh-16bits.h5", 1
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not codes.exists()
    [torn] = codes.parent.glob(".*.tmp")  # hidden, never at the path `conmh evaluate` and the pipeline read
    assert torn.name.startswith(".conmh-16bits.h5.")
    with one_thread():
        assert main(encode_argv(reference_run.data, reference_run.run / FINAL_MODEL, codes)) == 0
    for key, value in unpacked(reference_run.codes).items():
        np.testing.assert_array_equal(unpacked(codes)[key], value, err_msg=key)


def test_killed_rewrite_keeps_the_previous_codes_file(tmp_path: Path, reference_run: Reference) -> None:
    codes = tmp_path / "codes.h5"
    shutil.copy2(reference_run.codes, codes)
    before = codes.read_bytes()
    proc = killed_run(
        ["lsh", "--dataset", DATASET, "--data-dir", str(reference_run.data), "--bits", "16", "--out", str(codes)],
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
