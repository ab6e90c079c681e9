"""The soak: kill runs at random moments, rerun them, compare; flip bytes of a codes file; count.

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
   harmless, or silently different.

It prints a summary and writes every outcome as JSON. Not part of the test suite (several
minutes): ``tests/e2e/test_reliability.py`` kills at chosen points instead, and
``tests/e2e/test_bad_inputs.py`` feeds the bad inputs::

    python benchmarks/soak.py [--runs 12] [--pipeline-runs 3] [--flips 400]
        [--seed 0] [--out benchmarks/out/soak.json] [--workdir DIR] [--skip SECTION ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers package
from helpers.conmh_runs import (  # noqa: E402
    BATCH,
    DATASET,
    Reference,
    encode_argv,
    log_values,
    train_argv,
    unpacked,
    weights,
)
from helpers.repo import copy_workflow  # noqa: E402

BITS, EPOCHS = 16, 4
# 64 training videos in batches of 16: four steps per epoch.
SPEC_SIZES = dict(n_train=64, n_database=40, n_queries=12, feature_dim=32, n_classes=4)
CONMH = [sys.executable, "-m", "conmh"]
TIMEOUT = 300  # seconds any one command may take
SECTIONS = ("conmh", "pipeline", "corruption")


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
        elif path.name == "model.pt" and "fit" in path.parts and not path.parent.name.startswith("conmh-"):
            # a baseline's fitted arrays (conmh.methods.save_arrays), not a ConMH checkpoint
            from conmh.methods import load_arrays

            load_arrays(path)
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


@dataclass
class Timing:
    """How long the reference's commands took: random kill moments are drawn within these spans."""

    train_s: float
    startup_s: float  # start to the first epoch's beginning
    epoch_s: float
    encode_s: float


def make_reference(ws: Path) -> tuple[Reference, Timing]:
    from conmh.synthetic import MiniatureSpec, make_miniature

    ref = Reference(ws / "data", ws / "reference", ws / "reference" / "codes.h5")
    make_miniature(DATASET, ref.data, seed=0, spec=MiniatureSpec(**SPEC_SIZES))
    train = CONMH + train_argv(ref.data, ref.run, epochs=EPOCHS, bits=BITS)
    stamps: list[float] = []

    def watch(elapsed: float) -> None:
        if complete_lines(ref.run / "train_log.jsonl") > len(stamps):
            stamps.append(elapsed)

    _, train_s, _ = run_and_kill(train, watch, poll=0.005)
    if not (ref.run / "model.pt").exists():
        raise SystemExit(f"the reference training failed: {run(train).stderr}")
    t0 = time.monotonic()
    proc = run(CONMH + encode_argv(ref.data, ref.run / "model.pt", ref.codes))
    if proc.returncode:
        raise SystemExit(f"the reference encoding failed: {proc.stderr}")
    encode_s = time.monotonic() - t0
    log = [json.loads(line) for line in (ref.run / "train_log.jsonl").read_text().splitlines()]
    epoch_s = float(np.mean([entry["seconds"] for entry in log]))
    startup_s = max(0.0, (stamps[0] if stamps else train_s) - epoch_s)
    return ref, Timing(train_s, startup_s, epoch_s, encode_s)


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


def train_trigger(kind: str, out: Path, timing: Timing, rng: np.random.Generator, done: int = 0) -> Trigger:
    """When to kill a training that resumes from a checkpoint of epoch ``done``."""
    if kind == "inside an epoch":
        k = int(rng.integers(done, EPOCHS))
        delay = float(rng.uniform(0.1, 0.8)) * timing.epoch_s
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
                seen["t"] = elapsed if k > done else timing.startup_s
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
    at = float(rng.uniform(0.3, 0.8 * (timing.startup_s + (EPOCHS - done + 1) * timing.epoch_s)))
    return lambda elapsed: train_phase(out) if elapsed >= at else None


def encode_trigger(kind: str, codes: Path, timing: Timing, rng: np.random.Generator) -> Trigger:
    def phase() -> str:
        if temp_of(codes.parent, codes.name):
            return "writing the codes file"
        return "after the codes file was written" if codes.exists() else "encoding"

    if kind == "codes write":
        return lambda _: phase() if temp_of(codes.parent, codes.name) else None
    at = float(rng.uniform(0.3, 0.8 * timing.encode_s))
    return lambda elapsed: phase() if elapsed >= at else None


def run_until_done(argv: list[str], cwd: Path | None = None, attempts: int = 3) -> tuple[int, str]:
    for _ in range(attempts):
        proc = run(argv, cwd)
        if proc.returncode == 0:
            return 0, ""
    return proc.returncode, (proc.stderr or proc.stdout)[-2000:]


def conmh_run(i: int, ws: Path, ref: Reference, timing: Timing, rng: np.random.Generator) -> dict:
    """Kill training 1-3 times and encoding once, rerun each to completion, compare with the reference."""
    out = ws / f"run{i:02d}"
    codes = out / "codes.h5"
    train = CONMH + train_argv(ref.data, out, epochs=EPOCHS, bits=BITS)
    encode = CONMH + encode_argv(ref.data, out / "model.pt", codes)
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
            train,
            train_trigger(kind, out, timing, rng, done),
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
    rc, err = run_until_done(train)
    result: dict = {"run": i, "kills": kills}
    if rc:
        result["error"] = f"training rerun failed (exit {rc}): {err}"
        return result
    kind = ENCODE_FAULTS[i % len(ENCODE_FAULTS)]
    note_stale(out)
    before = []
    killed, seconds, phase = run_and_kill(
        encode,
        encode_trigger(kind, codes, timing, rng),
        before_kill=lambda: before.extend(final_files(out)),
    )
    kill = Kill("conmh encode", kind, killed, round(seconds, 2), phase)
    if killed:
        check_after_kill(kill, before, [out])
        kill.notes.append(f"codes file at the target path after the kill: {codes.exists()}")
    kills.append(kill)
    rc, err = run_until_done(encode)
    if rc:
        result["error"] = f"encoding rerun failed (exit {rc}): {err}"
        return result
    result.update(
        identical_codes=same_codes(unpacked(codes), unpacked(ref.codes)),
        identical_weights=same_weights(weights(out / "model.pt"), weights(ref.run / "model.pt")),
        identical_losses=log_values(out / "train_log.jsonl") == log_values(ref.run / "train_log.jsonl"),
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


PIPE_DATASET = f"{DATASET}-mini"  # the pipeline's name of that miniature (its layout is DATASET)
PIPE_CONFIG = [
    "--config",
    f"datasets=[{PIPE_DATASET}]",
    f"bits=[{BITS}]",
    "ks=[5,10,20]",
    "threads={train: 1, encode: 1}",
    f"miniature={{train: {{epochs: {EPOCHS}, batch_size: {BATCH}}}, sizes: {{{PIPE_DATASET}: "
    + "{"
    + ", ".join(f"{k}: {v}" for k, v in SPEC_SIZES.items())
    + "}}}",
]
PIPE_TRAIN = Path(f"work/fit/{PIPE_DATASET}/conmh-{BITS}bits")
PIPE_CODES = Path(f"work/codes/{PIPE_DATASET}/conmh-{BITS}bits.h5")
PIPE_FAULTS = (
    "ConMH fit job, inside an epoch",
    "ConMH fit job, checkpoint write",
    "encode job, codes write",
    "random moment",
)


def snakemake_exe() -> str | None:
    return shutil.which("snakemake")


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
    codes = {m: unpacked(cwd / f"work/codes/{PIPE_DATASET}/{m}-{BITS}bits.h5") for m in ("conmh", "lsh")}
    maps = {
        m: json.loads((cwd / f"results/metrics/{PIPE_DATASET}/{m}-{BITS}bits.json").read_text())["map"]
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
    train_log = (cwd / f"logs/fit/conmh-{PIPE_DATASET}-{BITS}bits.log").read_text()
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

    written = ref.codes
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
    problems = [p for k in injected for p in k["problems"]]
    problems += [p for r in runs for p in r.get("unreadable", [])]
    return {
        "faults_injected": len(injected),
        "faults_by_target": {t: sum(k["target"] == t for k in injected) for t in sorted({k["target"] for k in kills})},
        "triggers_missed": len(kills) - len(injected),
        "runs": len(runs),
        "runs_identical": len(identical),
        "runs_failed": [r.get("error", "") for r in runs if "error" in r],
        "files_lost_or_half_written": len(problems),
        "problems": problems,
        "stray_temp_files": sum(len(r.get("stray_temps", [])) for r in runs),
        "pipeline_rerun_commands": sorted({" ; ".join(r["typed"]) for r in report.get("pipeline_runs", [])}),
        "codes_byte_flips": {
            k: {c: v[c] for c in ("flips", "refused", "identical", "silently different", "other exception")}
            for k, v in report.get("codes_corruption", {}).items()
        },
    }


def print_summary(s: dict) -> None:
    print("\n=== soak summary ===")
    print(
        f"faults injected: {s['faults_injected']} {s['faults_by_target']} (triggers that came too late: "
        f"{s['triggers_missed']})"
    )
    print(f"runs that survived with identical results: {s['runs_identical']} / {s['runs']}")
    for err in s["runs_failed"]:
        print(f"  failed run: {err[:300]}")
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "soak.json")
    parser.add_argument("--workdir", type=Path, help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    tmp = None
    if args.workdir:
        ws = args.workdir
        ws.mkdir(parents=True, exist_ok=False)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="conmh-soak-")
        ws = Path(tmp.name)
    t0 = time.monotonic()
    report: dict = {"seed": args.seed, "spec": SPEC_SIZES, "bits": BITS, "epochs": EPOCHS, "batch_size": BATCH}
    try:
        print("reference run (uninterrupted train + encode) ...", flush=True)
        ref, timing = make_reference(ws)
        report["reference"] = {
            "train_s": round(timing.train_s, 1),
            "epoch_s": round(timing.epoch_s, 2),
            "startup_s": round(timing.startup_s, 1),
            "encode_s": round(timing.encode_s, 1),
        }
        if "conmh" not in args.skip:
            report["conmh_runs"] = []
            for i in range(args.runs):
                result = conmh_run(i, ws, ref, timing, rng)
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
    finally:
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["summary"] = summarise(json.loads(json.dumps(report, default=_jsonable)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n", encoding="utf-8")
        if tmp is not None:
            tmp.cleanup()
    print_summary(report["summary"])
    print(f"\n{report['seconds']:.0f} s; report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
