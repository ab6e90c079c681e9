"""Fault injection: kill runs at random moments, rerun them, compare; feed bad inputs; count.

On a tiny generated ActivityNet miniature (preset ``mini``, CPU, one thread):

1. **reference**: one uninterrupted ``conmh train`` + ``conmh encode``;
2. **conmh runs** (``--runs``): ``conmh train`` is SIGKILLed one to three times
   (inside an epoch, while ``checkpoint.pt`` or ``model.pt`` is being written, or
   at a random moment) and rerun with the same command until it completes; then
   ``conmh encode`` is SIGKILLed (while the codes file is written, or at a random
   moment) and rerun. After every kill, every file at a final path (checkpoint,
   model, log, codes) must load and no file that existed before the kill may be
   gone; at the end the codes (unpacked bits and labels), the final weights and
   the per-epoch losses must equal the reference;
3. **pipeline runs** (``--pipeline-runs``): the same with ``snakemake`` in a copy
   of the workflow with a reduced configuration (one dataset, one code length),
   the whole process group killed (as a node failure or ``scancel`` would), then
   rerun with what a user types (``snakemake --unlock`` when the lock is left);
   the Snakefile's jobs run ``conmh pipeline STEP``, so the ``conmh`` command on
   PATH must have that subcommand (else the section is reported unusable);
4. **bit rot** (``--flips``): one random byte of a codes file flipped, many times: refused,
   harmless, or silently different (also for the same content in HDF5's 1.10 format);
5. **bad inputs**: data files, checkpoints, codes files, command-line values and
   pipeline configurations that must be refused, each through the command(s)
   that should refuse it: exit code, whether the message names the file and the
   key, whether it says what was expected, whether a traceback was printed, and
   whether an output was written anyway.

It prints a summary and writes every outcome as JSON. Not part of the test suite
(several minutes; ``tests/e2e/test_reliability.py`` and ``tests/e2e/test_faults.py`` are the
CI-sized subset)::

    python tests/helpers/fault_injection.py [--runs 12] [--pipeline-runs 3] [--flips 400]
        [--seed 0] [--out benchmarks/out/fault_injection.json] [--workdir DIR] [--skip SECTION ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:  # run as a script: the tests folder holds the helpers package
    sys.path.insert(0, str(ROOT / "tests"))
from helpers import conmh_runs  # noqa: E402
from helpers.conmh_runs import BATCH, DATASET, log_values, truncate, unpacked, weights  # noqa: E402

BITS, EPOCHS = 16, 4
# 64 training videos in batches of 16: four steps per epoch, under a second an epoch on one thread.
SPEC_SIZES = dict(n_train=64, n_database=40, n_queries=12, feature_dim=32, n_classes=4)
CONMH = [sys.executable, "-m", "conmh.cli"]
# ``conmh pipeline ARGS`` (conmh.pipeline.cli), with this Python.
PIPELINE = [sys.executable, "-m", "conmh", "pipeline"]
TIMEOUT = 300  # seconds any one command may take
SECTIONS = ("conmh", "pipeline", "corruption", "bad-inputs")


# --------------------------------------------------------------------------- processes


def run(argv: list[str], cwd: Path | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@dataclass
class Kill:
    """One SIGKILL: where it landed and what it left behind."""

    target: str  # "conmh train", "conmh encode", "snakemake"
    trigger: str  # the kind of moment asked for
    killed: bool  # False: the command finished before the trigger fired (not counted as a fault)
    seconds: float
    phase: str = ""  # what the process was doing, seen from its files at the kill
    problems: list[str] = field(default_factory=list)  # unreadable files at final paths, files lost
    notes: list[str] = field(default_factory=list)


Trigger = Callable[[float], "str | None"]  # elapsed seconds -> the phase to kill in, or None to wait


def run_and_kill(
    argv: list[str],
    trigger: Trigger,
    *,
    cwd: Path | None = None,
    group: bool = False,
    poll: float = 0.001,
    before_kill: Callable[[], None] | None = None,
) -> tuple[bool, float, str]:
    """Start ``argv``, poll ``trigger``; SIGKILL the process (or its whole group) when it returns a phase.

    Returns (killed, seconds, phase). ``before_kill`` runs right before the signal (to snapshot files).
    """
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        phase = ""
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - t0
                if elapsed > TIMEOUT:
                    raise TimeoutError(f"{' '.join(argv)} ran over {TIMEOUT} s")
                seen = trigger(elapsed)
                if seen is not None:
                    if before_kill is not None:
                        before_kill()
                    phase = seen
                    if group:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(poll)
        finally:
            if proc.poll() is None and not phase:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if group:  # nothing of the group may survive into the rerun
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return proc.returncode == -signal.SIGKILL, time.monotonic() - t0, phase


STALE: set[str] = set()  # temporary files left by an earlier kill: not a sign of a write in progress


def temp_of(folder: Path, name: str) -> bool:
    """Whether a write of ``folder/name`` is in progress: ``conmh.atomic``'s ``.NAME.PID.tmp`` exists
    (one left by an earlier killed process does not count)."""
    try:
        return any(
            e.name.startswith(f".{name}.") and e.name.endswith(".tmp") and e.path not in STALE
            for e in os.scandir(folder)
        )
    except FileNotFoundError:
        return False


def note_stale(*folders: Path) -> None:
    """Remember the temporary files present now, before a process is started."""
    STALE.clear()
    STALE.update(str(p) for f in folders if f.exists() for p in f.rglob(".*.tmp"))


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --------------------------------------------------------------------------- reading outputs


def readable(path: Path) -> str | None:
    """None when the file at a final path loads as what it should be, else the problem."""
    from conmh.codes import read_codes
    from conmh.errors import ConMHError
    from conmh.model import load_checkpoint
    from conmh.train import _load_training_checkpoint

    try:
        if path.name == "checkpoint.pt":
            _load_training_checkpoint(path)
        elif path.suffix in (".pt", ".pth"):
            load_checkpoint(path)
        elif path.suffix == ".h5" and "codes" in path.parts:
            read_codes(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            text = path.read_text(encoding="utf-8")
            for line in text.splitlines(keepends=True):
                if line.endswith("\n"):  # a torn last line is dropped by the resume that rewrites the log
                    json.loads(line)
        elif path.suffix == ".csv":
            import pandas as pd

            pd.read_csv(path)
        elif path.stat().st_size == 0 and path.suffix not in (".log", ".tsv"):
            return f"{path}: empty"
    except (ConMHError, ValueError, OSError) as exc:
        return f"{path}: {exc}"
    return None


def final_files(*folders: Path) -> list[Path]:
    """Every non-hidden file under ``folders`` (what a later step may read)."""
    out = []
    for folder in folders:
        if folder.exists():
            out += [
                p
                for p in folder.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            ]
    return sorted(out)


def stray_temps(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders if f.exists() for p in f.rglob(".*.tmp"))


def check_after_kill(kill: Kill, before: list[Path], folders: list[Path]) -> None:
    """Files at final paths must load, and none that existed before the kill may be gone."""
    for path in before:
        if not path.exists():
            kill.problems.append(f"lost: {path}")
    for path in final_files(*folders):
        problem = readable(path)
        if problem:
            kill.problems.append(f"half-written or unreadable: {problem}")


# --------------------------------------------------------------------------- reference and comparison


def same_codes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_argv(data: Path, out: Path, epochs: int = EPOCHS) -> list[str]:
    return CONMH + conmh_runs.train_argv(data, out, epochs=epochs, bits=BITS)


def encode_argv(data: Path, model: Path, codes: Path, dataset: str = DATASET) -> list[str]:
    return CONMH + conmh_runs.encode_argv(data, model, codes, dataset)


@dataclass
class Reference:
    data: Path
    run_dir: Path
    codes: dict[str, np.ndarray]
    weights: dict
    losses: list[tuple]
    train_s: float
    startup_s: float  # start to the first epoch's beginning
    epoch_s: float
    encode_s: float


def make_reference(ws: Path) -> Reference:
    from conmh.synthetic import MiniatureSpec, make_miniature

    data = ws / "data"
    make_miniature(DATASET, data, seed=0, spec=MiniatureSpec(**SPEC_SIZES))
    out = ws / "reference"
    stamps: list[float] = []

    def watch(elapsed: float) -> None:
        if complete_lines(out / "train_log.jsonl") > len(stamps):
            stamps.append(elapsed)

    _, train_s, _ = run_and_kill(train_argv(data, out), watch, poll=0.005)
    if not (out / "model.pt").exists():
        raise SystemExit(f"the reference training failed: {run(train_argv(data, out)).stderr}")
    t0 = time.monotonic()
    proc = run(encode_argv(data, out / "model.pt", out / "codes.h5"))
    if proc.returncode:
        raise SystemExit(f"the reference encoding failed: {proc.stderr}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    epoch_s = float(np.mean([entry["seconds"] for entry in log]))
    return Reference(
        data,
        out,
        unpacked(out / "codes.h5"),
        weights(out / "model.pt"),
        log_values(out / "train_log.jsonl"),
        train_s,
        max(0.0, (stamps[0] if stamps else train_s) - epoch_s),
        epoch_s,
        time.monotonic() - t0,
    )


# --------------------------------------------------------------------------- 2. conmh runs


TRAIN_FAULTS = ("inside an epoch", "checkpoint write", "model write", "random moment")
ENCODE_FAULTS = ("codes write", "random moment")


def train_phase(out: Path) -> str:
    lines = complete_lines(out / "train_log.jsonl")
    if temp_of(out, "checkpoint.pt"):
        return f"writing checkpoint.pt of epoch {lines}"
    if temp_of(out, "model.pt"):
        return "writing model.pt"
    if temp_of(out, "train_log.jsonl"):
        return "rewriting train_log.jsonl (resume)"
    if (out / "model.pt").exists():
        return "after model.pt was written"
    if lines >= EPOCHS:
        return "after the last epoch's log line, between the checkpoint and model.pt"
    return f"inside epoch {lines + 1} (or start-up)" if lines == 0 else f"inside epoch {lines + 1}"


def train_trigger(kind: str, out: Path, ref: Reference, rng: np.random.Generator, done: int = 0) -> Trigger:
    """When to kill a training that resumes from a checkpoint of epoch ``done``."""
    if kind == "inside an epoch":
        k = int(rng.integers(done, EPOCHS))
        delay = float(rng.uniform(0.1, 0.8)) * ref.epoch_s
        seen: dict[str, float] = {}
        # A kill during a checkpoint write leaves the next epoch's log line; the resume drops it first.
        rewritten = [complete_lines(out / "train_log.jsonl") <= done]

        def inside(elapsed: float) -> str | None:
            lines = complete_lines(out / "train_log.jsonl")
            if not rewritten[0]:
                rewritten[0] = lines <= done
                return None
            if lines > k or (out / "model.pt").exists():
                return train_phase(out)  # the run is already past epoch k+1 (a resumed one)
            if lines == k and "t" not in seen:
                seen["t"] = elapsed if k > done else ref.startup_s
            if "t" in seen and elapsed >= seen["t"] + delay and not temp_of(out, "checkpoint.pt"):
                return train_phase(out)
            return None

        return inside
    if kind == "checkpoint write":
        k = int(rng.integers(done + 1, EPOCHS + 1))
        return lambda _: (
            train_phase(out) if temp_of(out, "checkpoint.pt") and complete_lines(out / "train_log.jsonl") >= k else None
        )
    if kind == "model write":
        return lambda _: train_phase(out) if temp_of(out, "model.pt") else None
    # Somewhere in the run's expected span (start-up plus the epochs still to do), with a margin for a faster machine.
    at = float(rng.uniform(0.3, 0.8 * (ref.startup_s + (EPOCHS - done + 1) * ref.epoch_s)))
    return lambda elapsed: train_phase(out) if elapsed >= at else None


def encode_trigger(kind: str, codes: Path, ref: Reference, rng: np.random.Generator) -> Trigger:
    def phase() -> str:
        if temp_of(codes.parent, codes.name):
            return "writing the codes file"
        return "after the codes file was written" if codes.exists() else "encoding"

    if kind == "codes write":
        return lambda _: phase() if temp_of(codes.parent, codes.name) else None
    at = float(rng.uniform(0.3, 0.8 * ref.encode_s))
    return lambda elapsed: phase() if elapsed >= at else None


def run_until_done(argv: list[str], cwd: Path | None = None, attempts: int = 3) -> tuple[int, str]:
    for _ in range(attempts):
        proc = run(argv, cwd)
        if proc.returncode == 0:
            return 0, ""
    return proc.returncode, (proc.stderr or proc.stdout)[-2000:]


def conmh_run(i: int, ws: Path, ref: Reference, rng: np.random.Generator) -> dict:
    """Kill training 1-3 times and encoding once, rerun each to completion, compare with the reference."""
    out = ws / f"run{i:02d}"
    codes = out / "codes.h5"
    kills: list[Kill] = []
    for j in range(int(rng.choice([1, 1, 2, 3]))):
        done = _checkpoint_epoch(out / "checkpoint.pt")
        if j == 0:  # the first kill of run i cycles through the kinds, so that each is well covered
            kind = TRAIN_FAULTS[i % len(TRAIN_FAULTS)]
        else:
            kind = str(rng.choice(TRAIN_FAULTS if done < EPOCHS else ("model write", "random moment")))
        before: list[Path] = []
        note_stale(out)
        killed, seconds, phase = run_and_kill(
            train_argv(ref.data, out),
            train_trigger(kind, out, ref, rng, done),
            before_kill=lambda: before.extend(final_files(out)),
        )
        kill = Kill("conmh train", kind, killed, round(seconds, 2), phase)
        if killed:
            check_after_kill(kill, before, [out])
            ckpt_epoch = _checkpoint_epoch(out / "checkpoint.pt")
            lines = complete_lines(out / "train_log.jsonl")
            kill.notes.append(
                f"left: checkpoint of epoch {ckpt_epoch}, {lines} complete log lines, "
                f"temp files {[Path(p).name for p in stray_temps(out)]}"
            )
            if not (ckpt_epoch <= lines <= ckpt_epoch + 1):
                kill.problems.append(f"log ({lines} lines) and checkpoint (epoch {ckpt_epoch}) disagree")
        kills.append(kill)
    rc, err = run_until_done(train_argv(ref.data, out))
    result: dict = {"run": i, "kills": kills}
    if rc:
        result["error"] = f"training rerun failed (exit {rc}): {err}"
        return result
    kind = ENCODE_FAULTS[i % len(ENCODE_FAULTS)]
    note_stale(out)
    before = []
    killed, seconds, phase = run_and_kill(
        encode_argv(ref.data, out / "model.pt", codes),
        encode_trigger(kind, codes, ref, rng),
        before_kill=lambda: before.extend(final_files(out)),
    )
    kill = Kill("conmh encode", kind, killed, round(seconds, 2), phase)
    if killed:
        check_after_kill(kill, before, [out])
        kill.notes.append(f"codes file at the target path after the kill: {codes.exists()}")
    kills.append(kill)
    rc, err = run_until_done(encode_argv(ref.data, out / "model.pt", codes))
    if rc:
        result["error"] = f"encoding rerun failed (exit {rc}): {err}"
        return result
    result.update(
        identical_codes=same_codes(unpacked(codes), ref.codes),
        identical_weights=same_weights(weights(out / "model.pt"), ref.weights),
        identical_losses=log_values(out / "train_log.jsonl") == ref.losses,
        unreadable=[p for p in map(readable, final_files(out)) if p],
        stray_temps=stray_temps(out),
    )
    return result


def _checkpoint_epoch(path: Path) -> int:
    import torch

    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


# --------------------------------------------------------------------------- 3. pipeline runs


PIPE_CONFIG = [
    "--config",
    f"datasets=[{DATASET}]",
    f"bits=[{BITS}]",
    "ks=[5,10,20]",
    "threads={train: 1, encode: 1}",
    f"miniature={{train: {{epochs: {EPOCHS}, batch_size: {BATCH}}}, sizes: {{{DATASET}: "
    + "{"
    + ", ".join(f"{k}: {v}" for k, v in SPEC_SIZES.items())
    + "}}}",
]
PIPE_TRAIN = Path(f"work/fit/{DATASET}/conmh-{BITS}bits")
PIPE_CODES = Path(f"work/codes/{DATASET}/conmh-{BITS}bits.h5")
PIPE_FAULTS = (
    "ConMH fit job, inside an epoch",
    "ConMH fit job, checkpoint write",
    "encode job, codes write",
    "random moment",
)


def snakemake_exe() -> str | None:
    return shutil.which("snakemake")


def copy_workflow(dest: Path) -> Path:
    """The Snakefile, config.yaml and workflow/ (rules, profiles, report captions) in ``dest``; the rules
    import and run the installed ``conmh`` package (``conmh.pipeline``), so nothing else is needed."""
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "Snakefile", dest / "Snakefile")
    shutil.copy2(ROOT / "config.yaml", dest / "config.yaml")
    shutil.copytree(ROOT / "workflow", dest / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def pipeline_usable(ws: Path) -> tuple[bool, str]:
    exe = snakemake_exe()
    if exe is None:
        return False, "snakemake is not installed"
    # Every job of the Snakefile runs `conmh pipeline STEP` from PATH.
    conmh_exe = shutil.which("conmh")
    if conmh_exe is None or run([conmh_exe, "pipeline", "--help"]).returncode != 0:
        return False, "the `conmh` command on PATH has no `pipeline` subcommand (the Snakefile's jobs run it)"
    probe = copy_workflow(ws / "pipeline-probe")
    proc = run([exe, "-n", "--cores", "1"] + PIPE_CONFIG, probe)
    shutil.rmtree(probe)
    return proc.returncode == 0, (proc.stderr or proc.stdout)[-1000:]


def rerun_pipeline(cwd: Path) -> tuple[int, list[str], str]:
    """Rerun as a user would: plain snakemake; --unlock when a killed run left its lock; --rerun-incomplete if asked."""
    exe = snakemake_exe()
    typed: list[str] = []
    extra: list[str] = []
    for _ in range(4):
        proc = run([exe, "--cores", "1"] + extra + PIPE_CONFIG, cwd)
        typed.append(" ".join(["snakemake", "--cores", "1"] + extra))
        if proc.returncode == 0:
            return 0, typed, ""
        text = proc.stdout + proc.stderr
        if "LockException" in text:
            run([exe, "--unlock", "--cores", "1"] + PIPE_CONFIG, cwd)
            typed.append("snakemake --unlock")
        elif "IncompleteFilesException" in text and not extra:
            extra = ["--rerun-incomplete"]
        else:
            return proc.returncode, typed, text[-2000:]
    return 1, typed, "gave up after 4 attempts"


@dataclass
class PipelineReference:
    codes: dict[str, dict[str, np.ndarray]]
    maps: dict[str, dict]
    table: str
    seconds: float


def pipeline_outputs(cwd: Path) -> tuple[dict, dict, str]:
    codes = {m: unpacked(cwd / f"work/codes/{DATASET}/{m}-{BITS}bits.h5") for m in ("conmh", "lsh")}
    maps = {
        m: json.loads((cwd / f"results/metrics/{DATASET}/{m}-{BITS}bits.json").read_text())["map"]
        for m in ("conmh", "lsh")
    }
    return codes, maps, (cwd / "results/table.csv").read_text()


def pipeline_reference(ws: Path) -> PipelineReference:
    cwd = copy_workflow(ws / "pipeline-reference")
    t0 = time.monotonic()
    proc = run([snakemake_exe(), "--cores", "1"] + PIPE_CONFIG, cwd)
    if proc.returncode:
        raise RuntimeError(f"the reference pipeline run failed: {(proc.stderr or proc.stdout)[-2000:]}")
    return PipelineReference(*pipeline_outputs(cwd), time.monotonic() - t0)


def pipeline_trigger(kind: str, cwd: Path, ref: PipelineReference, rng: np.random.Generator) -> Trigger:
    train_dir, log = cwd / PIPE_TRAIN, cwd / PIPE_TRAIN / "train_log.jsonl"
    codes = cwd / PIPE_CODES
    if kind == "ConMH fit job, inside an epoch":
        k = int(rng.integers(1, EPOCHS))
        seen: dict[str, float] = {}

        def inside(elapsed: float) -> str | None:
            if complete_lines(log) >= k and "t" not in seen:
                seen["t"] = elapsed + float(rng.uniform(0.1, 0.6))
            if "t" in seen and elapsed >= seen["t"] and not temp_of(train_dir, "checkpoint.pt"):
                return "ConMH fit job: " + train_phase(train_dir)
            return None

        return inside
    if kind == "ConMH fit job, checkpoint write":
        return lambda _: "ConMH fit job: " + train_phase(train_dir) if temp_of(train_dir, "checkpoint.pt") else None
    if kind == "encode job, codes write":
        return lambda _: "encode job: writing the codes file" if temp_of(codes.parent, codes.name) else None
    at = float(rng.uniform(1.0, ref.seconds))
    return lambda elapsed: f"{elapsed:.1f} s into the run" if elapsed >= at else None


def pipeline_run(i: int, ws: Path, ref: PipelineReference, rng: np.random.Generator) -> dict:
    cwd = copy_workflow(ws / f"pipeline-{i:02d}")
    kind = PIPE_FAULTS[i % len(PIPE_FAULTS)] if i < len(PIPE_FAULTS) else str(rng.choice(PIPE_FAULTS))
    before: list[Path] = []
    note_stale(cwd)
    killed, seconds, phase = run_and_kill(
        [snakemake_exe(), "--cores", "1"] + PIPE_CONFIG,
        pipeline_trigger(kind, cwd, ref, rng),
        cwd=cwd,
        group=True,
        before_kill=lambda: before.extend(final_files(cwd / "work", cwd / "results")),
    )
    kill = Kill("snakemake", kind, killed, round(seconds, 2), phase)
    if killed:
        check_after_kill(kill, before, [cwd / "work", cwd / "results"])
    rc, typed, err = rerun_pipeline(cwd)
    result: dict = {"run": i, "kills": [kill], "typed": typed}
    if rc:
        result["error"] = f"the rerun failed (exit {rc}): {err}"
        return result
    codes, maps, table = pipeline_outputs(cwd)
    train_log = (cwd / f"logs/fit/conmh-{DATASET}-{BITS}bits.log").read_text()
    result.update(
        identical_codes=all(same_codes(codes[m], ref.codes[m]) for m in codes),
        identical_metrics=maps == ref.maps,
        identical_table=table == ref.table,
        training_resumed="reusing the checkpoint" in train_log,
        unreadable=[p for p in map(readable, final_files(cwd / "work", cwd / "results")) if p],
        stray_temps=stray_temps(cwd / "work", cwd / "results"),
    )
    return result


# --------------------------------------------------------------------------- 4. bit rot in a codes file


def corruption_section(ws: Path, ref: Reference, flips: int, rng: np.random.Generator) -> dict:
    """Flip one random byte of a codes file, ``flips`` times: refused, harmless, or silently different?"""
    from conmh.codes import read_codes
    from conmh.errors import ConMHError

    written = ref.run_dir / "codes.h5"
    expected = unpacked(written)
    meta = read_codes(written)
    out = {}
    formats = (("as written by conmh (HDF5 1.10 format, fixed-length string attributes)", written),)
    for label, source in formats:
        data = source.read_bytes()
        counts = {"refused": 0, "identical": 0, "silently different": 0, "other exception": 0}
        examples = []
        target = ws / "flipped.h5"
        for off in rng.choice(len(data), min(flips, len(data)), replace=False):
            raw = bytearray(data)
            raw[off] ^= int(rng.integers(1, 256))
            target.write_bytes(bytes(raw))
            try:
                got = read_codes(target)
            except ConMHError:
                counts["refused"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - counted: read_codes promises CodesError only
                counts["other exception"] += 1
                examples.append(f"byte {off}: {type(exc).__name__}: {exc}"[:200])
                continue
            same = same_codes(unpacked(target), expected) and (got.bits, got.dataset, got.method, got.attrs) == (
                meta.bits,
                meta.dataset,
                meta.method,
                meta.attrs,
            )
            counts["identical" if same else "silently different"] += 1
            if not same:
                examples.append(f"byte {off}: codes, labels or attributes changed without an error")
        out[label] = {"bytes": len(data), "flips": sum(counts.values()), **counts, "examples": examples[:5]}
    return out


# --------------------------------------------------------------------------- 5. bad inputs


@dataclass
class Attempt:
    command: str
    argv: list[str]
    cwd: Path | None = None
    output: Path | None = None  # must not exist after a refusal


@dataclass
class Case:
    name: str
    category: str
    build: Callable[[Scratch], list[Attempt]]
    names: tuple[str, ...]  # what the message must name (file, key)
    expect: str = "refuse"  # "refuse", or "accept": a documented condition that is counted, not refused
    note: str = ""
    check: Callable[[Scratch], bool] | None = None  # "accept": is the condition counted where documented?


@dataclass
class Scratch:
    """A fresh copy of the good miniature and helpers to build attempts on it."""

    root: Path
    model: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def verify(self, dataset: str = DATASET) -> Attempt:
        return Attempt("conmh verify", CONMH + ["verify", dataset, str(self.data), "--no-checksums"])

    def train(self, dataset: str = DATASET, out: Path | None = None, bits: int = BITS) -> Attempt:
        out = out or self.root / "run"
        argv = train_argv(self.data, out, epochs=1)
        argv[argv.index("--dataset") + 1] = dataset
        argv[argv.index("--bits") + 1] = str(bits)
        return Attempt("conmh train", argv, output=out / "model.pt")

    def encode(self, model: Path | None = None, extra: tuple[str, ...] = ()) -> Attempt:
        codes = self.root / "codes.h5"
        return Attempt("conmh encode", encode_argv(self.data, model or self.model, codes) + list(extra), output=codes)

    def lsh(self) -> Attempt:
        codes = self.root / "lsh.h5"
        return Attempt(
            "conmh lsh",
            CONMH
            + ["lsh", "--dataset", DATASET, "--data-dir", str(self.data), "--bits", str(BITS), "--out", str(codes)],
            output=codes,
        )

    def snakemake(self, *config: str, dry: bool = True, target: str | None = None) -> Attempt:
        cwd = self.pipeline_copy()
        argv = [snakemake_exe() or "snakemake"] + (["-n"] if dry else []) + ["--cores", "1"]
        argv += ([target] if target else []) + PIPE_CONFIG + list(config)  # targets before --config's values
        return Attempt("snakemake" + (" -n" if dry else ""), argv, cwd=cwd)

    def pipeline_copy(self) -> Path:
        dest = self.root / "pipeline"
        if not dest.exists():
            copy_workflow(dest)
        return dest


def _set_value(path: Path, index: tuple[int, ...], value: float) -> None:
    with h5py.File(path, "r+") as fh:
        fh["feats"][index] = value


def _edit_h5(path: Path, edit: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as fh:
        edit(fh)


def _replace(key: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(fh: h5py.File) -> None:
        del fh[key]
        fh.create_dataset(key, data=data)

    return edit


def _labels(path: Path, key: str) -> np.ndarray:
    return scipy.io.loadmat(path)[key]


def _feats(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh["feats"][()]


def _bad_dims(path: Path) -> None:
    """Corrupt the stored dataspace of ``feats`` (frames larger than its maximum): damaged HDF5 metadata."""
    n, t, d = _feats(path).shape
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<QQQ", n, t, d))
    data[at + 8 : at + 16] = struct.pack("<Q", t * 120)
    path.write_bytes(bytes(data))


def _mat_type_byte(path: Path) -> None:
    """Flip one bit of the type of the label matrix's data element (found by fuzzing: crashes scipy.io.loadmat)."""
    data = bytearray(path.read_bytes())
    name = data.find(b"re_label")
    data[name + 8] ^= 0x80  # the data type field of the real part that follows the array name
    path.write_bytes(bytes(data))


def _evil_checkpoint(path: Path, marker: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"): code run by loading a file
            return (open, (str(marker), "w"))

    torch.save({"model_state_dict": Payload()}, path)


def _wrong_arch_checkpoint(s: Scratch) -> Path:
    """A model trained on an FCVID miniature (25 frames), to be used for ActivityNet (30 frames)."""
    from conmh.synthetic import MiniatureSpec, make_miniature

    other = s.root / "fcvid"
    make_miniature("fcvid", other, seed=0, spec=MiniatureSpec(**SPEC_SIZES))
    argv = train_argv(other, s.root / "fcvid-run", epochs=1)
    argv[argv.index("--dataset") + 1] = "fcvid"
    proc = run(argv)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return s.root / "fcvid-run" / "model.pt"


RULE_ORDER = {"download": 0, "verify": 1, "fit": 2, "encode": 3, "evaluate": 4, "report": 5}


def _stale_outputs(s: Scratch) -> Path:
    """A pipeline folder whose outputs all exist (as after an earlier complete run), oldest first."""
    cwd = s.pipeline_copy()
    proc = run([snakemake_exe() or "snakemake", "--summary", "--cores", "1"] + PIPE_CONFIG, cwd)
    rows = [line.split("\t") for line in proc.stdout.splitlines()[1:] if line.count("\t") >= 2]
    for i, (path, *_) in enumerate(sorted(rows, key=lambda r: RULE_ORDER.get(r[2], len(RULE_ORDER)))):
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).touch()
        os.utime(cwd / path, (1e9 + i, 1e9 + i))
    return cwd


def bad_input_cases() -> list[Case]:
    def data_case(
        name: str,
        edit: Callable[[Path], None],
        commands: Callable[[Scratch], list[Attempt]],
        names: tuple[str, ...],
        expect: str = "refuse",
        note: str = "",
    ) -> Case:
        def build(s: Scratch) -> list[Attempt]:
            edit(s.data)
            return commands(s)

        return Case(name, "data", build, names, expect, note)

    verify_train = lambda s: [s.verify(), s.train(), s.lsh()]  # noqa: E731
    verify_encode = lambda s: [s.verify(), s.encode()]  # noqa: E731
    cases = [
        data_case(
            "truncated HDF5 feature file (60 %)",
            lambda d: truncate(d / "train_feats.h5", 0.6),
            verify_train,
            ("train_feats.h5",),
        ),
        data_case(
            "HDF5 signature followed by zeros (download cut after 100 bytes)",
            lambda d: (d / "query_feats.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(92)),
            verify_encode,
            ("query_feats.h5",),
        ),
        data_case(
            "not an HDF5 file (text)",
            lambda d: (d / "test_feats.h5").write_text("feats\n" * 50),
            verify_encode,
            ("test_feats.h5",),
        ),
        data_case(
            "damaged HDF5 metadata (dataspace larger than its maximum)",
            lambda d: _bad_dims(d / "test_feats.h5"),
            lambda s: [s.verify(), s.encode(), s.lsh()],
            ("test_feats.h5", "feats"),
        ),
        data_case(
            "truncated .mat label file", lambda d: truncate(d / "re_label.mat", 0.5), verify_encode, ("re_label.mat",)
        ),
        data_case(
            "damaged .mat label file (one bit of a type field)",
            lambda d: _mat_type_byte(d / "re_label.mat"),
            verify_encode,
            ("re_label.mat",),
        ),
        data_case(
            "wrong feature key ('features' instead of 'feats')",
            lambda d: _edit_h5(d / "query_feats.h5", lambda f: f.move("feats", "features")),
            verify_encode,
            ("query_feats.h5", "feats"),
        ),
        data_case(
            "wrong label key ('labels' instead of 're_label')",
            lambda d: scipy.io.savemat(d / "re_label.mat", {"labels": _labels(d / "re_label.mat", "re_label")}),
            verify_encode,
            ("re_label.mat", "re_label"),
        ),
        data_case(
            "integer features (int32)",
            lambda d: _edit_h5(d / "train_feats.h5", _replace("feats", _feats(d / "train_feats.h5").astype(np.int32))),
            verify_train,
            ("train_feats.h5", "feats"),
        ),
        data_case(
            "text labels (dtype <U1)",
            lambda d: scipy.io.savemat(
                d / "q_label.mat", {"q_label": np.where(_labels(d / "q_label.mat", "q_label") > 0, "y", "n")}
            ),
            verify_encode,
            ("q_label.mat", "q_label"),
        ),
        data_case(
            "NaN in database features",
            lambda d: _set_value(d / "test_feats.h5", (3, 2, 1), np.nan),
            lambda s: [s.verify(), s.encode(), s.lsh()],
            ("test_feats.h5", "feats"),
        ),
        data_case(
            "+inf in training features",
            lambda d: _set_value(d / "train_feats.h5", (5, 0, 0), np.inf),
            verify_train,
            ("train_feats.h5", "feats"),
        ),
        data_case(
            "zero-length query features (0, 30, D)",
            lambda d: _edit_h5(d / "query_feats.h5", _replace("feats", _feats(d / "query_feats.h5")[:0])),
            verify_encode,
            ("query_feats.h5", "feats"),
        ),
        data_case(
            "2-D features (frames missing)",
            lambda d: _edit_h5(d / "test_feats.h5", _replace("feats", _feats(d / "test_feats.h5")[:, 0])),
            verify_encode,
            ("test_feats.h5", "feats"),
        ),
        data_case(
            "query label rows do not match the query features (one row short)",
            lambda d: scipy.io.savemat(d / "q_label.mat", {"q_label": _labels(d / "q_label.mat", "q_label")[:-1]}),
            verify_encode,
            ("q_label.mat", "query_feats.h5"),
        ),
        data_case(
            "database label rows do not match (one row extra)",
            lambda d: scipy.io.savemat(
                d / "re_label.mat",
                {"re_label": np.vstack([_labels(d / "re_label.mat", "re_label")] * 2)[: SPEC_SIZES["n_database"] + 1]},
            ),
            verify_encode,
            ("re_label.mat", "test_feats.h5"),
        ),
        data_case(
            "labels not 0/1 (a 2)",
            lambda d: scipy.io.savemat(d / "re_label.mat", {"re_label": _labels(d / "re_label.mat", "re_label") * 2}),
            verify_encode,
            ("re_label.mat", "re_label"),
        ),
        data_case(
            "labels not 0/1 (-1 for 'no')",
            lambda d: scipy.io.savemat(
                d / "q_label.mat", {"q_label": _labels(d / "q_label.mat", "q_label").astype(np.int8) * 2 - 1}
            ),
            verify_encode,
            ("q_label.mat", "q_label"),
        ),
        data_case(
            "query classes differ from database classes",
            lambda d: scipy.io.savemat(d / "q_label.mat", {"q_label": _labels(d / "q_label.mat", "q_label")[:, :-1]}),
            verify_encode,
            ("q_label.mat",),
        ),
        Case(
            "a query label row with no class",
            "data",
            _unlabelled_query,
            (),
            expect="accept",
            note="documented: such a query has no relevant item, scores AP 0 and counts in the mean; verify "
            "and the metrics file report how many there are",
            check=_unlabelled_counted,
        ),
        data_case("a missing dataset file", lambda d: (d / "q_label.mat").unlink(), verify_encode, ("q_label.mat",)),
        data_case(
            "ActivityNet (30-frame) features named as FCVID's fcv_train_feats.h5",
            lambda d: _fcvid_with(d, "fcv_train_feats.h5"),
            lambda s: [s.verify("fcvid"), s.train("fcvid")],
            ("fcv_train_feats.h5", "feats", "25"),
        ),
        data_case(
            "ActivityNet (30-frame) features named as FCVID's fcv_test_feats.h5",
            lambda d: _fcvid_with(d, "fcv_test_feats.h5"),
            lambda s: [s.verify("fcvid"), _encode_fcvid(s)],
            ("fcv_test_feats.h5", "feats", "25"),
        ),
    ]

    def checkpoint_case(name: str, build: Callable[[Scratch], list[Attempt]], names: tuple[str, ...]) -> Case:
        return Case(name, "checkpoint", build, names)

    def evil_encode(s: Scratch) -> list[Attempt]:
        _evil_checkpoint(s.root / "evil.pt", s.root / "PWNED")
        return [s.encode(s.root / "evil.pt")]

    def evil_resume(s: Scratch) -> list[Attempt]:
        (s.root / "run").mkdir()
        _evil_checkpoint(s.root / "run" / "checkpoint.pt", s.root / "PWNED")
        return [s.train()]

    def truncated_resume(s: Scratch) -> list[Attempt]:
        (s.root / "run").mkdir()
        ckpt = ROOT_REF["run_dir"] / "checkpoint.pt"
        (s.root / "run" / "checkpoint.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        return [s.train()]

    def other_bits_resume(s: Scratch) -> list[Attempt]:
        shutil.copytree(ROOT_REF["run_dir"], s.root / "run", ignore=shutil.ignore_patterns("model.pt", "codes.h5"))
        return [s.train(bits=32)]

    def junk(s: Scratch) -> list[Attempt]:
        (s.root / "junk.pth").write_bytes(np.random.default_rng(0).bytes(4096))
        return [s.encode(s.root / "junk.pth")]

    cases += [
        checkpoint_case(
            "checkpoint of another architecture: FCVID model (25 frames) for ActivityNet",
            lambda s: [s.encode(_wrong_arch_checkpoint(s))],
            ("model.pt", "30", "25"),
        ),
        checkpoint_case(
            "checkpoint of another code length (--bits 32 for a 16-bit model)",
            lambda s: [s.encode(extra=("--bits", "32"))],
            ("model.pt", "binary.weight"),
        ),
        checkpoint_case(
            "training checkpoint of another code length (resume with --bits 32)", other_bits_resume, ("checkpoint.pt",)
        ),
        checkpoint_case("a pickle that runs code, as --checkpoint", evil_encode, ("evil.pt", "weights_only")),
        checkpoint_case(
            "a pickle that runs code, as the checkpoint.pt a run resumes from", evil_resume, ("checkpoint.pt",)
        ),
        checkpoint_case("truncated checkpoint.pt (copied by hand, disk full)", truncated_resume, ("checkpoint.pt",)),
        checkpoint_case("random bytes as --checkpoint", junk, ("junk.pth",)),
        Case("truncated codes file", "codes", _truncated_codes, ("codes.h5",)),
        Case(
            "codes file with a damaged chunk address (reads as zeros without a metadata checksum)",
            "codes",
            _codes_chunk_address,
            ("codes.h5",),
        ),
        Case("--bits 0", "usage", lambda s: [s.train(bits=0)], ("--bits",)),
        Case(
            "--mask-ratio 1.5",
            "usage",
            lambda s: [
                Attempt("conmh train", s.train().argv + ["--mask-ratio", "1.5"], output=s.root / "run" / "model.pt")
            ],
            ("mask",),
        ),
        Case(
            "--device cuda on a machine without CUDA",
            "usage",
            lambda s: [
                Attempt("conmh train", s.train().argv + ["--device", "cuda"], output=s.root / "run" / "model.pt")
            ],
            ("cuda",),
            note="only meaningful on a machine without a GPU",
        ),
    ]
    config = [
        ("unknown top-level key", ("foo=1",), ("foo",)),
        ("unknown recipe key (typo 'epoch')", (f"{DATASET}={{recipe: {{epoch: 5}}}}",), ("epoch",)),
        ("wrong type (bits: [sixteen])", ("bits=[sixteen]",), ("bits[0]", "integer")),
        ("wrong type (threads.train: two)", ("threads={train: two}",), ("threads.train",)),
        ("code length 0", ("bits=[0]",), ("bits[0]",)),
        ("code length 1", ("bits=[1]",), ("bits[0]",)),
        ("code length 1000", ("bits=[1000]",), ("bits[0]",)),
        ("mask ratio 1", (f"{DATASET}={{recipe: {{mask_ratio: 1}}}}",), ("mask_ratio",)),
        (
            "released checkpoint path that does not exist",
            (f"checkpoints={{{DATASET}: {{{BITS}: /nonexistent/an16.pth}}}}",),
            ("/nonexistent/an16.pth",),
        ),
        (
            "released checkpoint for a code length that is not run",
            (f"checkpoints={{{DATASET}: {{64: /nonexistent/an64.pth}}}}",),
            ("checkpoints",),
        ),
    ]
    for name, values, names in config:
        cases.append(Case(name, "config", lambda s, v=values: [s.snakemake(*v)], names))
    cases.append(
        Case(
            "real dataset folder that does not exist (source: real)",
            "config",
            lambda s: [
                s.snakemake(
                    f"{DATASET}={{source: real, data_dir: /nonexistent/an}}",
                    dry=False,
                    target=f"results/data/{DATASET}/download.json",
                )
            ],
            ("/nonexistent/an", "train_feats.h5"),
            note="refused by the first job (download), before any training",
        )
    )
    cases.append(
        Case(
            "released checkpoint path that does not exist, earlier outputs present",
            "config",
            lambda s: [
                Attempt(
                    "snakemake -n",
                    [snakemake_exe() or "snakemake", "-n", "--cores", "1"]
                    + PIPE_CONFIG
                    + [f"checkpoints={{{DATASET}: {{{BITS}: /nonexistent/an16.pth}}}}"],
                    cwd=_stale_outputs(s),
                )
            ],
            ("/nonexistent/an16.pth",),
            note="after a complete run, naming a released checkpoint that does not exist must not let the pipeline "
            "relabel the trained model's codes as the released checkpoint's",
        )
    )
    return cases


ROOT_REF: dict[str, Path] = {}  # the reference run folder, for cases that start from its files


def _unlabelled_query(s: Scratch) -> list[Attempt]:
    labels = _labels(s.data / "q_label.mat", "q_label")
    labels[0] = 0
    scipy.io.savemat(s.data / "q_label.mat", {"q_label": labels})
    verify = s.verify()
    verify.argv += ["--report", str(s.root / "verify.json")]
    evaluate = Attempt(
        "conmh evaluate", CONMH + ["evaluate", str(s.root / "codes.h5"), "--out", str(s.root / "m.json")]
    )
    return [verify, s.encode(), evaluate]


def _unlabelled_counted(s: Scratch) -> bool:
    try:
        report = json.loads((s.root / "verify.json").read_text())
        metrics = json.loads((s.root / "m.json").read_text())
    except (OSError, ValueError):
        return False
    return report["label_rows_without_class"]["queries"] == 1 and metrics["queries_without_label"] == 1


def _fcvid_with(d: Path, name: str) -> None:
    """Turn the folder into an FCVID miniature, then put ActivityNet's 30-frame features under ``name``."""
    from conmh.synthetic import MiniatureSpec, make_miniature

    source = d / ("train_feats.h5" if "train" in name else "test_feats.h5")
    keep = source.read_bytes()
    for p in d.iterdir():
        p.unlink()
    make_miniature("fcvid", d, seed=0, spec=MiniatureSpec(**SPEC_SIZES))
    (d / name).write_bytes(keep)


def _encode_fcvid(s: Scratch) -> Attempt:
    codes = s.root / "codes.h5"
    return Attempt("conmh encode", encode_argv(s.data, s.model, codes, dataset="fcvid"), output=codes)


def _reference_codes(s: Scratch) -> Path:
    path = s.root / "codes.h5"
    shutil.copy2(ROOT_REF["run_dir"] / "codes.h5", path)
    return path


def _truncated_codes(s: Scratch) -> list[Attempt]:
    path = _reference_codes(s)
    truncate(path, 0.7)
    return [
        Attempt(
            "conmh evaluate", CONMH + ["evaluate", str(path), "--out", str(s.root / "m.json")], output=s.root / "m.json"
        )
    ]


def _codes_chunk_address(s: Scratch) -> list[Attempt]:
    path = _reference_codes(s)
    with h5py.File(path, "r") as fh:
        address = fh["queries/codes"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<Q", address))
    data[at : at + 8] = b"\xff" * 8  # "undefined address": HDF5 then reads the fill value (zeros)
    path.write_bytes(bytes(data))
    return [
        Attempt(
            "conmh evaluate", CONMH + ["evaluate", str(path), "--out", str(s.root / "m.json")], output=s.root / "m.json"
        )
    ]


def try_case(case: Case, s: Scratch) -> dict:
    out: dict = {"name": case.name, "category": case.category, "expect": case.expect, "note": case.note, "attempts": []}
    try:
        attempts = case.build(s)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        out["build_error"] = f"{type(exc).__name__}: {exc}"
        return out
    for attempt in attempts:
        proc = run(attempt.argv, attempt.cwd)
        text = (proc.stderr + "\n" + proc.stdout).strip()
        message = _message(text, attempt.command)
        entry = {
            "command": attempt.command,
            "exit": proc.returncode,
            "message": message,
            "traceback": "Traceback (most recent call last)" in text,
            "names": {n: n in text for n in case.names},
            "says_expected": any(
                w in message.lower()
                for w in (
                    "expect",
                    "must",
                    "not allowed",
                    "not of type",
                    "minimum",
                    "maximum",
                    "does not exist",
                    "missing",
                )
            ),
            "output_written": bool(attempt.output and attempt.output.exists()),
        }
        if case.expect == "refuse":
            entry["refused_clearly"] = (
                (entry["exit"] in (2, 3, 4) or (attempt.command.startswith("snakemake") and entry["exit"] != 0))
                and not entry["traceback"]
                and all(entry["names"].values())
                and not entry["output_written"]
            )
        else:
            entry["handled_as_documented"] = entry["exit"] == 0
        out["attempts"].append(entry)
    if (s.root / "PWNED").exists():
        out["code_ran"] = True
    ok_key = "refused_clearly" if case.expect == "refuse" else "handled_as_documented"
    out["ok"] = bool(out["attempts"]) and all(a[ok_key] for a in out["attempts"]) and not out.get("code_ran")
    if case.check is not None:
        out["counted_as_documented"] = case.check(s)
        out["ok"] = out["ok"] and out["counted_as_documented"]
    return out


def _message(text: str, command: str) -> str:
    """The lines of the output that carry the error (snakemake prints a banner first)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if command.startswith("snakemake"):
        keep = [
            i
            for i, line in enumerate(lines)
            if any(
                w in line
                for w in (
                    "Error",
                    "error",
                    "Exception",
                    "not valid",
                    "  - ",
                    "missing",
                    "Missing",
                    "Nothing to be done",
                )
            )
        ]
        if keep:
            return "\n".join(lines[keep[0] : keep[0] + 8])[:1200]
        return "\n".join(lines[-4:])[:1200]
    return "\n".join(lines[-6:])[:1200]


def bad_inputs_section(ws: Path, ref: Reference, pipeline: bool) -> list[dict]:
    ROOT_REF["run_dir"] = ref.run_dir
    results = []
    for i, case in enumerate(bad_input_cases()):
        if case.category == "config" and not pipeline:
            continue
        root = ws / f"bad-{i:02d}"
        shutil.copytree(ref.data, root / "data")
        scratch = Scratch(root, ref.run_dir / "model.pt")
        results.append(try_case(case, scratch))
        status = "ok" if results[-1]["ok"] else "NOT OK"
        print(f"  bad input {i + 1:2d} {status:6s} {case.name}", flush=True)
    return results


# --------------------------------------------------------------------------- report


def summarise(report: dict) -> dict:
    kills = [k for section in ("conmh_runs", "pipeline_runs") for r in report.get(section, []) for k in r["kills"]]
    injected = [k for k in kills if k["killed"]]
    runs = report.get("conmh_runs", []) + report.get("pipeline_runs", [])
    identical = [
        r
        for r in runs
        if "error" not in r
        and r.get("identical_codes")
        and r.get("identical_weights", True)
        and r.get("identical_losses", True)
        and r.get("identical_metrics", True)
        and r.get("identical_table", True)
    ]
    bad = report.get("bad_inputs", [])
    refuse = [c for c in bad if c["expect"] == "refuse"]
    problems = [p for k in injected for p in k["problems"]]
    problems += [p for r in runs for p in r.get("unreadable", [])]
    return {
        "faults_injected": len(injected),
        "faults_by_target": {t: sum(k["target"] == t for k in injected) for t in sorted({k["target"] for k in kills})},
        "triggers_missed": len(kills) - len(injected),
        "runs": len(runs),
        "runs_identical": len(identical),
        "runs_failed": [r.get("error", "") for r in runs if "error" in r],
        "bad_inputs_tried": len(bad),
        "bad_inputs_to_refuse": len(refuse),
        "refused_clearly": sum(c["ok"] for c in refuse),
        "not_refused_clearly": [c["name"] for c in refuse if not c["ok"]],
        "documented_conditions_handled": sum(c["ok"] for c in bad if c["expect"] == "accept"),
        "files_lost_or_half_written": len(problems),
        "problems": problems,
        "stray_temp_files": sum(len(r.get("stray_temps", [])) for r in runs),
        "pipeline_rerun_commands": sorted({" ; ".join(r["typed"]) for r in report.get("pipeline_runs", [])}),
        "codes_byte_flips": {
            k: {c: v[c] for c in ("flips", "refused", "identical", "silently different", "other exception")}
            for k, v in report.get("codes_corruption", {}).items()
        },
    }


def print_summary(s: dict, report: dict) -> None:
    print("\n=== fault injection summary ===")
    print(
        f"faults injected: {s['faults_injected']} {s['faults_by_target']} (triggers that came too late: "
        f"{s['triggers_missed']})"
    )
    print(f"runs that survived with identical results: {s['runs_identical']} / {s['runs']}")
    for err in s["runs_failed"]:
        print(f"  failed run: {err[:300]}")
    print(
        f"bad inputs tried: {s['bad_inputs_tried']}; to refuse: {s['bad_inputs_to_refuse']}, refused clearly: "
        f"{s['refused_clearly']}; documented conditions handled: {s['documented_conditions_handled']}"
    )
    for case in report.get("bad_inputs", []):
        if not case["ok"]:
            worst = next(
                (a for a in case.get("attempts", []) if not a.get("refused_clearly", a.get("handled_as_documented"))),
                None,
            )
            detail = case.get("build_error") or (
                f"{worst['command']}: exit {worst['exit']}, names "
                f"{worst['names']}, traceback {worst['traceback']}, output written "
                f"{worst['output_written']}: {worst['message'][-200:]!r}"
                if worst
                else ""
            )
            print(f"  NOT refused clearly: {case['name']}\n      {detail}")
    print(f"files lost or left half-written: {s['files_lost_or_half_written']}")
    for p in s["problems"]:
        print(f"  {p}")
    print(f"stray hidden temp files left beside outputs (never read): {s['stray_temp_files']}")
    for label, c in s["codes_byte_flips"].items():
        print(
            f"codes file, one random byte flipped ({label}): {c['flips']} flips, {c['refused']} refused, "
            f"{c['identical']} harmless, {c['silently different']} silently different, "
            f"{c['other exception']} other exceptions"
        )
    if s["pipeline_rerun_commands"]:
        print(f"what a user typed after a killed snakemake: {s['pipeline_rerun_commands']}")


def _jsonable(obj):
    if isinstance(obj, Kill):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(type(obj).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="conmh train+encode runs with kills (default 12)")
    parser.add_argument("--pipeline-runs", type=int, default=3, help="snakemake runs with a kill (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--flips", type=int, default=400, help="random byte flips of a codes file (default 400)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "fault_injection.json")
    parser.add_argument("--workdir", type=Path, help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    tmp = None
    if args.workdir:
        ws = args.workdir
        ws.mkdir(parents=True, exist_ok=False)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="conmh-faults-")
        ws = Path(tmp.name)
    t0 = time.monotonic()
    report: dict = {"seed": args.seed, "spec": SPEC_SIZES, "bits": BITS, "epochs": EPOCHS, "batch_size": BATCH}
    try:
        print("reference run (uninterrupted train + encode) ...", flush=True)
        ref = make_reference(ws)
        report["reference"] = {
            "train_s": round(ref.train_s, 1),
            "epoch_s": round(ref.epoch_s, 2),
            "startup_s": round(ref.startup_s, 1),
            "encode_s": round(ref.encode_s, 1),
        }
        if "conmh" not in args.skip:
            report["conmh_runs"] = []
            for i in range(args.runs):
                result = conmh_run(i, ws, ref, rng)
                report["conmh_runs"].append(result)
                kills = ", ".join(f"{k.target.split()[-1]} @ {k.phase or 'finished first'}" for k in result["kills"])
                print(
                    f"  conmh run {i + 1}/{args.runs}: identical={result.get('identical_codes')} ({kills})", flush=True
                )
        usable, why = pipeline_usable(ws) if "pipeline" not in args.skip else (False, "skipped")
        report["pipeline_usable"] = usable if usable else why
        if usable and args.pipeline_runs:
            print("reference pipeline run ...", flush=True)
            pref = pipeline_reference(ws)
            report["pipeline_reference_s"] = round(pref.seconds, 1)
            report["pipeline_runs"] = []
            for i in range(args.pipeline_runs):
                result = pipeline_run(i, ws, pref, rng)
                report["pipeline_runs"].append(result)
                k = result["kills"][0]
                print(
                    f"  pipeline run {i + 1}/{args.pipeline_runs}: identical={result.get('identical_codes')} "
                    f"({k.trigger}: {k.phase or 'finished first'}; typed {result['typed']})",
                    flush=True,
                )
        if "corruption" not in args.skip and args.flips:
            print("bit rot in a codes file ...", flush=True)
            report["codes_corruption"] = corruption_section(ws, ref, args.flips, rng)
        if "bad-inputs" not in args.skip:
            print("bad inputs ...", flush=True)
            report["bad_inputs"] = bad_inputs_section(ws, ref, pipeline=usable is True)
    finally:
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["summary"] = summarise(json.loads(json.dumps(report, default=_jsonable)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n", encoding="utf-8")
        if tmp is not None:
            tmp.cleanup()
    print_summary(report["summary"], json.loads(json.dumps(report, default=_jsonable)))
    print(f"\n{report['seconds']:.0f} s; report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
