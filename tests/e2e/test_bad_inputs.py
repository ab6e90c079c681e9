"""Bad inputs are refused clearly: data files, checkpoints, codes files and command-line values, each
through every command that reads it. Refused clearly means the documented exit code (2 usage, 3 bad
input, 4 missing file), a message that names the file and the key, no traceback, and no output
written anyway (docs/reliability.md).

Each case damages a fresh copy of one tiny good run (the ``reference_run`` fixture) and runs ``conmh``
in this process: a run takes a fraction of a second, where a new Python would take several.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from conmh.cli import main
from conmh.synthetic import MiniatureSpec, make_miniature
from conmh.train import CHECKPOINT, FINAL_MODEL
from helpers.conmh_runs import DATASET, TINY_SIZES, Reference, encode_argv, one_thread, train_argv, truncate

CODE_RAN = "code-ran"  # the file a planted pickle creates if it is ever loaded unrestricted
TIMEOUT = 180


@dataclass
class Scratch:
    """A fresh copy of the good run's data and what the commands read besides: a case's damage edits
    the files, or changes these settings (another dataset, checkpoint, code length, extra options)."""

    root: Path
    good: Reference
    dataset: str = DATASET
    model: Path | None = None  # encode's --checkpoint; None: the good run's model
    bits: int = 16
    extra: list[str] = field(default_factory=list)  # appended to the command line

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:  # train's --out-dir
        return self.root / "run"

    @property
    def codes(self) -> Path:  # evaluate's input
        return self.root / "codes.h5"


def command_line(s: Scratch, command: str) -> tuple[list[str], Path | None]:
    """``conmh COMMAND``'s arguments on the scratch copy, and the output it must not write when it refuses."""
    if command == "verify":
        return ["verify", s.dataset, str(s.data), "--no-checksums"], None
    if command == "train":
        return train_argv(s.data, s.run, epochs=1, bits=s.bits, dataset=s.dataset) + s.extra, s.run / FINAL_MODEL
    out = s.root / "out.h5"
    if command == "encode":
        return encode_argv(s.data, s.model or s.good.run / FINAL_MODEL, out, s.dataset) + s.extra, out
    if command == "lsh":
        return ["lsh", "--dataset", s.dataset, "--data-dir", str(s.data), "--bits", str(s.bits), "--out", str(out)], out
    if command == "evaluate":
        return ["evaluate", str(s.codes), "--out", str(s.root / "metrics.json")], s.root / "metrics.json"
    raise ValueError(command)


def run_conmh(argv: list[str], capfd) -> tuple[int, str]:
    """``conmh ARGV`` in this process: its exit code and what it printed. A bug raises (and fails the test)."""
    try:
        with one_thread():
            code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capfd.readouterr()
    return code, captured.err + captured.out


def run_conmh_process(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "conmh", *argv], capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stderr + proc.stdout


# --------------------------------------------------------------------------- damage


def _h5_replace(path: Path, make: Callable[[np.ndarray], np.ndarray]) -> None:
    with h5py.File(path, "r+") as fh:
        data = make(fh["feats"][()])
        del fh["feats"]
        fh.create_dataset("feats", data=data)


def _h5_rename(path: Path, new: str) -> None:
    with h5py.File(path, "r+") as fh:
        fh.move("feats", new)


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


def _flip_mat_type_bit(path: Path) -> None:
    """One bit of the type of the label matrix's data element (found by fuzzing): scipy.io.loadmat crashes."""
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"re_label") + 8] ^= 0x80
    path.write_bytes(bytes(raw))


def _fcvid_with_activitynet_file(s: Scratch, name: str) -> None:
    """The folder becomes an FCVID miniature whose ``name`` holds ActivityNet's features (30 frames, not 25)."""
    source = s.data / ("train_feats.h5" if "train" in name else "test_feats.h5")
    activitynet = source.read_bytes()
    shutil.rmtree(s.data)
    make_miniature("fcvid", s.data, seed=0, spec=MiniatureSpec(**TINY_SIZES))
    (s.data / name).write_bytes(activitynet)
    s.dataset = "fcvid"


def _fcvid_model(s: Scratch) -> None:
    """A model trained on an FCVID miniature (25 frames), to encode ActivityNet (30 frames) with."""
    make_miniature("fcvid", s.root / "fcvid", seed=0, spec=MiniatureSpec(**TINY_SIZES))
    with one_thread():
        assert main(train_argv(s.root / "fcvid", s.root / "fcvid-run", epochs=1, dataset="fcvid")) == 0
    s.model = s.root / "fcvid-run" / FINAL_MODEL


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a file that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "conmh-train-1", "model_state_dict": _RunsCode(marker)}, path)


def _pickle_as_checkpoint(s: Scratch) -> None:
    _plant_pickle(s.root / "evil.pt", s.root / CODE_RAN)
    s.model = s.root / "evil.pt"


def _random_bytes_as_checkpoint(s: Scratch) -> None:
    (s.root / "junk.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    s.model = s.root / "junk.pth"


def _truncated_training_checkpoint(s: Scratch) -> None:
    s.run.mkdir()
    blob = (s.good.run / CHECKPOINT).read_bytes()
    (s.run / CHECKPOINT).write_bytes(blob[: len(blob) // 2])


def _resume_with_other_bits(s: Scratch) -> None:
    s.run.mkdir()
    shutil.copy2(s.good.run / CHECKPOINT, s.run / CHECKPOINT)
    s.bits = 32


def _damage_chunk_address(s: Scratch) -> None:
    """Set the address of the query codes' chunk to HDF5's "undefined address": without checksummed
    metadata the chunk would read as its fill value (zeros)."""
    shutil.copy2(s.good.codes, s.codes)
    with h5py.File(s.codes, "r") as fh:
        address = fh["queries/codes"].id.get_chunk_info(0).byte_offset
    raw = bytearray(s.codes.read_bytes())
    at = raw.find(struct.pack("<Q", address))
    raw[at : at + 8] = b"\xff" * 8
    s.codes.write_bytes(bytes(raw))


def _truncated_codes(s: Scratch) -> None:
    shutil.copy2(s.good.codes, s.codes)
    truncate(s.codes, 0.7)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    damage: Callable[[Scratch], None]
    named: tuple[str, ...]  # what the message must name: the file, the key, what was expected
    commands: tuple[str, ...]  # every command that reads the damaged input
    exit: int = 3
    # scipy.io.loadmat crashes on the file: should conmh's guard regress, the crash must fail the test,
    # not end the test session.
    own_process: bool = False


FEATURE_COMMANDS = ("verify", "encode")
CASES: dict[str, Case] = {
    # feature files
    "truncated feature file": Case(
        lambda s: truncate(s.data / "train_feats.h5", 0.6), ("train_feats.h5",), ("verify", "train", "lsh")
    ),
    "HDF5 signature then zeros": Case(
        lambda s: (s.data / "query_feats.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(92)),
        ("query_feats.h5",),
        FEATURE_COMMANDS,
    ),
    "not HDF5": Case(
        lambda s: (s.data / "test_feats.h5").write_text("feats\n" * 40), ("test_feats.h5",), FEATURE_COMMANDS
    ),
    "damaged HDF5 metadata": Case(
        lambda s: _damage_dataspace(s.data / "test_feats.h5"), ("test_feats.h5", "feats"), ("verify", "encode", "lsh")
    ),
    "wrong feature key": Case(
        lambda s: _h5_rename(s.data / "query_feats.h5", "features"), ("query_feats.h5", "feats"), FEATURE_COMMANDS
    ),
    "integer features": Case(
        lambda s: _h5_replace(s.data / "train_feats.h5", lambda a: a.astype(np.int32)),
        ("train_feats.h5", "feats", "int32"),
        ("verify", "train", "lsh"),
    ),
    "NaN features": Case(
        lambda s: _h5_set(s.data / "test_feats.h5", (3, 2, 1), np.nan),
        ("test_feats.h5", "feats"),
        ("verify", "encode", "lsh"),
    ),
    "infinite features": Case(
        lambda s: _h5_set(s.data / "train_feats.h5", (5, 0, 0), np.inf),
        ("train_feats.h5", "feats"),
        ("verify", "train", "lsh"),
    ),
    "zero-length features": Case(
        lambda s: _h5_replace(s.data / "query_feats.h5", lambda a: a[:0]), ("query_feats.h5", "feats"), FEATURE_COMMANDS
    ),
    "2-D features": Case(
        lambda s: _h5_replace(s.data / "test_feats.h5", lambda a: a[:, 0]), ("test_feats.h5", "feats"), FEATURE_COMMANDS
    ),
    "FCVID training file of 30 frames": Case(
        lambda s: _fcvid_with_activitynet_file(s, "fcv_train_feats.h5"),
        ("fcv_train_feats.h5", "feats", "25"),
        ("verify", "train"),
    ),
    "FCVID database file of 30 frames": Case(
        lambda s: _fcvid_with_activitynet_file(s, "fcv_test_feats.h5"),
        ("fcv_test_feats.h5", "feats", "25"),
        ("verify", "encode"),
    ),
    # label files
    "truncated label file": Case(lambda s: truncate(s.data / "re_label.mat", 0.5), ("re_label.mat",), FEATURE_COMMANDS),
    "damaged label file": Case(
        lambda s: _flip_mat_type_bit(s.data / "re_label.mat"),
        ("re_label.mat", "damaged MATLAB .mat file"),
        FEATURE_COMMANDS,
        own_process=True,
    ),
    "wrong label key": Case(
        lambda s: _mat_edit(s.data / "re_label.mat", "re_label", lambda a: a, "labels"),
        ("re_label.mat", "re_label"),
        FEATURE_COMMANDS,
    ),
    "text labels": Case(
        lambda s: _mat_edit(s.data / "q_label.mat", "q_label", lambda a: np.where(a > 0, "y", "n")),
        ("q_label.mat", "q_label"),
        FEATURE_COMMANDS,
    ),
    "query label rows one short": Case(
        lambda s: _mat_edit(s.data / "q_label.mat", "q_label", lambda a: a[:-1]),
        ("q_label.mat", "query_feats.h5"),
        FEATURE_COMMANDS,
    ),
    "database label rows one extra": Case(
        lambda s: _mat_edit(s.data / "re_label.mat", "re_label", lambda a: np.vstack([a, a[:1]])),
        ("re_label.mat", "test_feats.h5"),
        FEATURE_COMMANDS,
    ),
    "labels of 2": Case(
        lambda s: _mat_edit(s.data / "re_label.mat", "re_label", lambda a: a * 2),
        ("re_label.mat", "re_label"),
        FEATURE_COMMANDS,
    ),
    "labels of -1": Case(
        lambda s: _mat_edit(s.data / "q_label.mat", "q_label", lambda a: a.astype(np.int8) * 2 - 1),
        ("q_label.mat", "q_label"),
        FEATURE_COMMANDS,
    ),
    "query classes differ": Case(
        lambda s: _mat_edit(s.data / "q_label.mat", "q_label", lambda a: a[:, :-1]),
        ("q_label.mat", "q_label"),
        FEATURE_COMMANDS,
    ),
    "missing file": Case(lambda s: (s.data / "q_label.mat").unlink(), ("q_label.mat",), FEATURE_COMMANDS, exit=4),
    # checkpoints
    "FCVID model for ActivityNet": Case(_fcvid_model, ("fcvid-run/model.pt", "test_feats.h5", "30", "25"), ("encode",)),
    "16-bit model as --bits 32": Case(
        lambda s: s.extra.extend(["--bits", "32"]), ("model.pt", "binary.weight"), ("encode",)
    ),
    "resume with --bits 32": Case(_resume_with_other_bits, (f"run/{CHECKPOINT}",), ("train",)),
    "pickle that runs code as --checkpoint": Case(_pickle_as_checkpoint, ("evil.pt", "weights_only"), ("encode",)),
    "pickle that runs code as the resumed checkpoint": Case(
        lambda s: _plant_pickle(s.run / CHECKPOINT, s.root / CODE_RAN), (f"run/{CHECKPOINT}",), ("train",)
    ),
    "truncated training checkpoint": Case(_truncated_training_checkpoint, (f"run/{CHECKPOINT}",), ("train",)),
    "random bytes as --checkpoint": Case(_random_bytes_as_checkpoint, ("junk.pth",), ("encode",)),
    # codes files
    "truncated codes file": Case(_truncated_codes, ("codes.h5",), ("evaluate",)),
    "damaged chunk address in a codes file": Case(_damage_chunk_address, ("codes.h5",), ("evaluate",)),
    # command-line values
    "--bits 0": Case(lambda s: setattr(s, "bits", 0), ("--bits",), ("train", "lsh"), exit=2),
    "--mask-ratio 1.5": Case(lambda s: s.extra.extend(["--mask-ratio", "1.5"]), ("mask",), ("train",)),
    "--device cuda without CUDA": Case(lambda s: s.extra.extend(["--device", "cuda"]), ("cuda",), ("train", "encode")),
}
# Pipeline configurations that must be refused (unknown keys, wrong types, code lengths and mask ratios out
# of range, released checkpoints that do not exist or are not run, a release's folder without its files) are
# tested through the config checker and the steps (tests/unit/test_pipeline_units.py) and `snakemake -n`
# (tests/e2e/test_faults.py).


def _params():
    for name, case in CASES.items():
        marks = []
        if name == "--device cuda without CUDA":
            marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"))
        for command in case.commands:
            yield pytest.param(name, command, marks=marks, id=f"{name}-{command}")


@pytest.mark.parametrize("name, command", list(_params()))
def test_bad_input_is_refused_clearly(tmp_path: Path, reference_run: Reference, capfd, name: str, command: str) -> None:
    case = CASES[name]
    scratch = Scratch(tmp_path, reference_run)
    shutil.copytree(reference_run.data, scratch.data)
    case.damage(scratch)
    argv, output = command_line(scratch, command)
    code, message = run_conmh_process(argv) if case.own_process else run_conmh(argv, capfd)
    assert code == case.exit, message
    for text in case.named:
        assert text in message, f"{text!r} not named in: {message}"
    assert "Traceback" not in message
    assert output is None or not output.exists()
    assert not (tmp_path / CODE_RAN).exists(), "loading the file ran its code"


def test_the_planted_pickle_runs_code_when_loaded_unrestricted(tmp_path: Path) -> None:
    """The pickle cases' file is live: a load without weights_only runs its payload."""
    _plant_pickle(tmp_path / "evil.pt", tmp_path / CODE_RAN)
    torch.load(tmp_path / "evil.pt", weights_only=False)["model_state_dict"].close()
    assert (tmp_path / CODE_RAN).exists()


def test_a_label_row_without_class_is_accepted_counted_and_scored_zero(
    tmp_path: Path, reference_run: Reference
) -> None:
    """Documented, not refused: such a query has no relevant item, scores AP 0 and counts in the mean;
    verify and the metrics file report how many there are."""
    data = tmp_path / "data"
    shutil.copytree(reference_run.data, data)
    _mat_edit(data / "q_label.mat", "q_label", lambda a: a * (np.arange(len(a)) > 0)[:, None])  # query 0: no class
    assert main(["verify", DATASET, str(data), "--no-checksums", "--report", str(tmp_path / "verify.json")]) == 0
    assert json.loads((tmp_path / "verify.json").read_text())["label_rows_without_class"]["queries"] == 1
    with one_thread():
        assert main(encode_argv(data, reference_run.run / FINAL_MODEL, tmp_path / "codes.h5")) == 0
    assert main(["evaluate", str(tmp_path / "codes.h5"), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["queries_without_label"] == 1
