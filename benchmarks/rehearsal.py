"""A full-size rehearsal on the CPU: release-sized files, the pipeline's real steps, measured.

    python benchmarks/rehearsal.py [--out benchmarks/out/rehearsal] [--scale full|tiny|FRACTION]
                                   [--epochs 1] [--threads 2] [--seed 0] [--datasets fcvid,activitynet]
                                   [--delete-data]

1. Generates stand-ins of the FCVID and ActivityNet releases with the real
   file names, keys, counts and feature dims (FCVID 45,585 training and 45,600
   test videos x 25 x 4096, 239 classes; ActivityNet 9,722 / 3,758 / 1,000 x
   30 x 2048, 200 classes; 41 GB in all), block by block
   (``conmh.synthetic.make_release_sized``). Data of an earlier run with the
   same sizes and seed is reused (the table then shows that run's figures).
2. Runs every job of the pipeline for them at 64 bits, one after the other:
   ``download`` (a release: the files are there), ``verify --real``, then
   for each method of config.yaml's ``methods`` its ``fit`` (ConMH's: training
   with the paper's recipe and batch size, ``small`` preset, float32 on the
   CPU, ``--epochs`` epochs; FCVID's 19 GB training array is streamed), its
   ``encode`` (every database and query video) and its ``evaluate`` (mAP@K,
   the full protocol); and the ``report``. Each job is the step the Snakefile
   and dvc.yaml run, ``conmh pipeline STEP [--method M] --dataset D --bits 64
   [--threads N] --config FILE`` (``conmh.pipeline``), run from the
   repository root. FILE is the checked copy of a generated configuration
   (``OUT/config.yaml``) at ``{paths.logs}/config.yaml``, where a Snakemake
   run of that configuration writes it for its own jobs.
3. Prints per step the wall time, CPU time, peak RSS and the size of the
   step's outputs on disk as a Markdown table (MB = 2**20 bytes), and writes
   it to ``OUT/rehearsal.md``, ``.csv`` and ``.json`` with the machine (CPU
   model, cores, memory), the 1-minute load average after each step, the
   checks (FCVID training streamed and within 4 GB; the whole run within an
   hour) and each run's mAP@K.

Why the jobs run here and not under Snakemake: Snakemake's benchmark files
exist only for ``fit``, ``encode`` and ``evaluate``, and their ``max_rss``
is sampled (every 0.5 s for 15 s, then every 30 s) and summed over the job's
process tree. Here each job is one child process, timed with a monotonic
clock, and its peak RSS is the kernel's high-water mark from ``os.wait4``
(``ru_maxrss``: the largest process of the job, e.g. ``conmh train`` under
ConMH's ``conmh pipeline fit`` step; its own memory, not the page cache).
``snakemake -n -p --forceall --configfile OUT/config.yaml`` lists the same
jobs with the same commands, each with ``--log`` where this script sends the
job's output to the log itself (tests/e2e/test_rehearsal.py checks that).

``--scale tiny`` runs the same command on 1% of the counts with 64-dim
features, the ``mini`` preset and batch 32 (the test suite runs it). Below
full scale the ``verify`` job is ``conmh verify`` without ``--real`` (which
checks exactly the release's counts and dims). A
FRACTION such as 0.05 keeps the real dims, preset and batch sizes, for
estimating the full run.

Not part of the test suite at full size: it needs 42 GB of disk and, on 2
quiet cores, about half an hour. ``OUT`` defaults to the git-ignored
benchmarks/out/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from conmh.atomic import write_text_atomic
from conmh.datasets import get_layout
from conmh.device import IN_MEMORY_LIMIT_BYTES
from conmh.machine import cpu_model
from conmh.pipeline.config import check_config, data_dir, load_config, recipe_changes, write_effective_config
from conmh.pipeline.paper import figures_of
from conmh.pipeline.paths import Layout
from conmh.recipes import Recipe, get_recipe
from conmh.synthetic import RELEASE_CLASSES, release_spec

ROOT = Path(__file__).resolve().parents[1]

BITS = 64
DATASETS = ("fcvid", "activitynet")
# `conmh pipeline ARGS` (conmh.pipeline.cli) with this Python.
PIPELINE = [sys.executable, "-m", "conmh", "pipeline"]
MARKER = ".rehearsal"
# The targets: FCVID training within 4 GB, everything within an hour (2 cores, 24 GB).
RSS_LIMIT_MB = 4096
HOUR_S = 3600
# --scale tiny: a smoke test of the command (seconds), not a measurement.
TINY = {"scale": 0.01, "feature_dim": 64, "preset": "mini", "batch_size": 32}

# Runs one job and reports its cost. A child's ru_maxrss starts at the memory of
# the process that spawned it (the kernel keeps the high-water mark across exec),
# so jobs are spawned from this bare interpreter (~10 MB), not from the
# rehearsal's own process (torch imported: ~250 MB).
MEASURE = """\
import json, os, subprocess, sys, time
job = json.loads(sys.argv[1])
with open(job["log"], "w") as log:
    tic = time.perf_counter()
    try:
        proc = subprocess.Popen(job["argv"], cwd=job["cwd"], stdout=log, stderr=subprocess.STDOUT)
    except OSError as exc:
        log.write(f"cannot start {job['argv'][0]}: {exc}\\n")
        print(json.dumps({"exit_code": 127}))
        sys.exit()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"exit_code": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024}))  # KiB on Linux
"""

# Generation runs in a child process too, so that its peak RSS is measured like every other step's.
GENERATE = """\
import sys
from conmh.allocator import keep_freed_memory
from conmh.synthetic import make_release_sized
keep_freed_memory()  # the same ~1 GB of temporaries every block: no page faults
name, out, seed, scale, dim = sys.argv[1:]
make_release_sized(name, out, seed=int(seed), scale=float(scale), feature_dim=int(dim) if dim else None)
"""


@dataclass
class Step:
    """One measured job."""

    step: str
    dataset: str
    argv: list[str]
    outputs: list[str]
    log: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    disk_mb: float = 0.0
    exit_code: int | None = None
    load_avg: float = 0.0  # the machine's 1-minute load average when the step ended (2 = both cores busy)
    note: str = ""


# --------------------------------------------------------------------------- set-up


def parse_scale(text: str) -> tuple[str, float]:
    if text in ("full", "tiny"):
        return text, 1.0 if text == "full" else TINY["scale"]
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be full, tiny or a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"scale must be in (0, 1], got {value}")
    return ("full" if value == 1 else "fraction"), value


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def prepare_out(out: Path) -> None:
    """Use ``out`` only when it is new, empty or an earlier rehearsal's; clear that run's jobs."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        sys.exit(f"error: {out} is not empty and not a rehearsal folder (no {MARKER} file); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    # A training folder left by an earlier run would be resumed and measure nothing.
    shutil.rmtree(out / "run", ignore_errors=True)


def pipeline_config(out: Path, datasets: list[str], kind: str, epochs: int, threads: int) -> dict:
    """The pipeline's config.yaml with the datasets switched to the generated 'real' folders."""
    cfg = load_config(ROOT / "config.yaml")
    run = out / "run"
    cfg.update(
        datasets=datasets,
        bits=[BITS],
        device="cpu",
        preset=TINY["preset"] if kind == "tiny" else "small",
        threads={"train": threads, "encode": threads},
        resume=True,
        verify_checksums=True,
        checkpoints={},
        # FCVID's streamed training at batch 512 within 4 GB of RSS (README: memory)
        activation_checkpointing=True,
        # the releases' stand-ins are generated into OUT/data/<dataset>, where the steps read them
        paths={"data": str(out / "data"), **{k: str(run / k) for k in ("work", "results", "logs")}},
    )
    for d in datasets:
        recipe = dict(cfg[d]["recipe"], epochs=epochs)  # changes to the paper's recipe
        if kind == "tiny":
            recipe["batch_size"] = TINY["batch_size"]
        cfg[d] = dict(cfg[d], sha256={}, recipe=recipe)
    return check_config(cfg, "the rehearsal's configuration")


def effective_recipe(cfg: dict, dataset: str) -> Recipe:
    """The recipe a run trains with: the paper's (conmh.recipes) with the configured changes."""
    return get_recipe(dataset).replace(**recipe_changes(cfg, dataset))


def step_command(
    step: str,
    config: Path,
    dataset: str | None = None,
    bits: int | None = None,
    method: str | None = None,
    threads: int | None = None,
) -> list[str]:
    """``conmh pipeline STEP ...``, its options in the order of the Snakefile's rules."""
    argv = PIPELINE + [step]
    if method is not None:
        argv += ["--method", method]
    if dataset is not None:
        argv += ["--dataset", dataset]
    if bits is not None:
        argv += ["--bits", str(bits)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv + ["--config", str(config)]


# --------------------------------------------------------------------------- jobs


def jobs(cfg: dict, config: Path, out: Path, kind: str, scale: float, seed: int, threads: int) -> list[Step]:
    """Every job, in an order that respects the pipeline's dependencies; the pipeline's steps read ``config``."""
    lay = Layout.of(cfg)
    dim = str(TINY["feature_dim"]) if kind == "tiny" else ""
    todo = []
    for d in cfg["datasets"]:
        data = out / "data" / d
        todo.append(
            Step(
                "generate",
                d,
                [sys.executable, "-c", GENERATE, d, str(data), str(seed), str(scale), dim],
                [str(data)],
                str(out / "data" / f"{d}.log"),
            )
        )
        verify = step_command("verify", config, d)
        if kind != "full":  # --real checks exactly the release's counts and dims: the step's command without it
            verify = ["conmh", "verify", d, data_dir(cfg, d), "--report", lay.verify_report(d)]
        todo += [
            Step("download", d, step_command("download", config, d), [lay.manifest(d)], lay.log("download", d)),
            Step(
                "verify",
                d,
                verify,
                [lay.verify_report(d)],
                lay.log("verify", d),
                note="" if kind == "full" else "without --real (not the release's counts)",
            ),
        ]
        for method in cfg["methods"]:  # every method's fit, encode and evaluate (ConMH's fit is its training)
            run = f"{method}-{d}-{BITS}bits"
            todo += [
                Step(
                    f"fit {method}",
                    d,
                    step_command("fit", config, d, BITS, method=method, threads=threads),
                    [lay.fit_dir(method, d, BITS), lay.fit_log(method, d, BITS)],
                    lay.log("fit", run),
                ),
                Step(
                    f"encode {method}",
                    d,
                    step_command("encode", config, d, BITS, method=method, threads=threads),
                    [lay.codes(method, d, BITS)],
                    lay.log("encode", run),
                ),
                Step(
                    f"evaluate {method}",
                    d,
                    step_command("evaluate", config, d, BITS, method=method),
                    [lay.metrics(method, d, BITS)],
                    lay.log("evaluate", run),
                ),
            ]
    report = list(lay.report_files(figures_of(cfg)).values()) + [
        lay.summary(m, d, BITS) for d in cfg["datasets"] for m in cfg["methods"]
    ]
    todo.append(Step("report", "all", step_command("report", config), report, lay.log("report", "report")))
    return todo


def size_mb(paths: list[str]) -> float:
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total / 2**20


def measure(step: Step) -> None:
    """Run the step's command from the repository root (as dvc.yaml does) and record what it cost."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this python, conmh
    Path(step.log).parent.mkdir(parents=True, exist_ok=True)
    job = json.dumps({"argv": step.argv, "cwd": str(ROOT), "log": step.log})
    proc = subprocess.run([sys.executable, "-c", MEASURE, job], env=env, capture_output=True, text=True, check=True)
    for key, value in json.loads(proc.stdout).items():
        setattr(step, key, value)
    step.disk_mb = size_mb(step.outputs)
    step.load_avg = os.getloadavg()[0]


MEASURED = ("wall_s", "cpu_s", "peak_rss_mb", "disk_mb", "exit_code", "load_avg")


def generate(step: Step, spec: dict, out: Path) -> None:
    """Generate a dataset, or reuse the files of an earlier run with the same spec (and its figures)."""
    record = out / "data" / f"{step.dataset}.json"
    files = [f for _, f, _ in get_layout(step.dataset).all_files()]
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
        sizes = {f: (Path(step.outputs[0]) / f).stat().st_size for f in files}
    except (OSError, ValueError):
        old, sizes = None, None
    if old and old.get("spec") == spec and old.get("sizes") == sizes:
        for key, value in old["measured"].items():
            setattr(step, key, value)
        step.note = "reused: figures of the run that generated it"
        return
    record.unlink(missing_ok=True)
    shutil.rmtree(step.outputs[0], ignore_errors=True)
    measure(step)
    if step.exit_code == 0:
        sizes = {f: (Path(step.outputs[0]) / f).stat().st_size for f in files}
        measured = {k: getattr(step, k) for k in MEASURED}
        write_text_atomic(record, json.dumps({"spec": spec, "sizes": sizes, "measured": measured}, indent=1) + "\n")


# --------------------------------------------------------------------------- output


COLUMNS = ("step", "dataset", "wall s", "CPU s", "peak RSS MB", "disk MB", "note")


def rows(done: list[Step]) -> list[list[str]]:
    return [
        [s.step, s.dataset, f"{s.wall_s:.1f}", f"{s.cpu_s:.1f}", f"{s.peak_rss_mb:,.0f}", mb(s.disk_mb), s.note]
        for s in done
    ]


def mb(value: float) -> str:
    return f"{value:,.1f}" if value >= 1 else f"{value:.3f}"


def markdown(done: list[Step]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(done)]
    return "\n".join(lines)


def checks(done: list[Step], cfg: dict, specs: dict) -> dict:
    """The issue's targets, as measured. The data mode is what ``conmh train --data-mode auto`` picks on a CPU."""
    total = sum(s.wall_s for s in done)
    out: dict = {"total_wall_s": total, "within_an_hour": total <= HOUR_S}
    for s in done:
        if s.step != "fit conmh":
            continue
        spec, recipe = specs[s.dataset], effective_recipe(cfg, s.dataset)
        nbytes = spec["n_train"] * get_layout(s.dataset).frames * spec["feature_dim"] * 4
        out[f"{s.dataset}_train"] = {
            "array_gb": round(nbytes / 1e9, 2),
            "data_mode": "stream" if nbytes > IN_MEMORY_LIMIT_BYTES else "memory",
            "batch_size": recipe.batch_size,
            "epochs": recipe.epochs,
            "steps": -(-spec["n_train"] // recipe.batch_size) * recipe.epochs,  # the last batch may be partial
            "peak_rss_mb": round(s.peak_rss_mb),
            "within_4gb": s.peak_rss_mb <= RSS_LIMIT_MB,
        }
    return out


def summary_lines(result: dict) -> list[str]:
    m, c = result["machine"], result["checks"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}",
        f"scale: {result['scale']} ({result['kind']}); data {result['data_gb']:.1f} GB; "
        f"total {c['total_wall_s'] / 60:.1f} min ({'within' if c['within_an_hour'] else 'OVER'} an hour)",
    ]
    for d in result["datasets"]:
        t = c.get(f"{d}_train")
        if t:
            lines.append(
                f"{d} training: {t['steps']} steps at batch {t['batch_size']}, {t['array_gb']} GB array -> "
                f"data mode {t['data_mode']} (auto), peak RSS {t['peak_rss_mb']} MB"
                + (f" ({'within' if t['within_4gb'] else 'OVER'} 4 GB)" if d == "fcvid" else "")
            )
        for method, maps in result["map"].get(d, {}).items():
            lines.append(f"{d} {method} {BITS} bits mAP@K: " + ", ".join(f"@{k} {v:.3f}" for k, v in maps.items()))
    return lines


def write_outputs(out: Path, result: dict, done: list[Step]) -> None:
    write_text_atomic(out / "rehearsal.json", json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows(done))
    write_text_atomic(out / "rehearsal.csv", buf.getvalue())
    write_text_atomic(out / "rehearsal.md", "\n".join(summary_lines(result)) + "\n\n" + markdown(done) + "\n")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "out" / "rehearsal",
        help="folder for the data, the run and the tables (default: benchmarks/out/rehearsal)",
    )
    parser.add_argument(
        "--scale",
        type=parse_scale,
        default=("full", 1.0),
        help="full (the release's sizes, default), tiny (the test's smoke run) or a fraction of "
        "the counts with the real dims, e.g. 0.05",
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per dataset (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of fit and encode (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated, among {', '.join(RELEASE_CLASSES)} (default: both)",
    )
    parser.add_argument("--delete-data", action="store_true", help="delete the generated feature files at the end")
    args = parser.parse_args(argv)
    kind, scale = args.scale
    datasets = [d for d in args.datasets.split(",") if d]
    if not datasets or set(datasets) - set(RELEASE_CLASSES):
        parser.error(f"--datasets: choose among {', '.join(RELEASE_CLASSES)}, got {args.datasets!r}")
    if args.epochs < 1 or args.threads < 1:
        parser.error("--epochs and --threads must be positive")

    out = args.out.resolve()
    prepare_out(out)
    cfg = pipeline_config(out, datasets, kind, args.epochs, args.threads)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    # The jobs read the checked copy where a Snakemake run of this configuration writes it for its jobs.
    config = Path(write_effective_config(cfg))
    dim = TINY["feature_dim"] if kind == "tiny" else None
    specs = {d: asdict(release_spec(d, scale, dim)) for d in datasets}
    info = machine()
    print(
        f"rehearsal: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; scale {kind} ({scale}); out {out}",
        flush=True,
    )

    todo = jobs(cfg, config, out, kind, scale, args.seed, args.threads)
    done: list[Step] = []
    failed = None
    for i, step in enumerate(todo, 1):
        if step.step == "generate":
            spec = {**specs[step.dataset], "seed": args.seed, "scale": scale}
            generate(step, spec, out)
        else:
            measure(step)
        done.append(step)
        print(
            f"[{i:2d}/{len(todo)}] {step.step:<14} {step.dataset:<11} {step.wall_s:8.1f} s  "
            f"{step.peak_rss_mb:7.0f} MB RSS  {step.disk_mb:9.1f} MB on disk  load {step.load_avg:.1f}  "
            f"{step.note}",
            flush=True,
        )
        if step.exit_code != 0:
            failed = step
            break

    maps = {}
    for d in datasets:
        for method in cfg["methods"]:
            path = Path(Layout.of(cfg).metrics(method, d, BITS))
            if path.is_file():
                maps.setdefault(d, {})[method] = json.loads(path.read_text(encoding="utf-8"))["map"]
    data_gb = sum(s.disk_mb for s in done if s.step == "generate") * 2**20 / 1e9
    result = {
        "machine": info,
        "kind": kind,
        "scale": scale,
        "seed": args.seed,
        "datasets": datasets,
        "bits": BITS,
        "epochs": args.epochs,
        "threads": args.threads,
        "config": str(out / "config.yaml"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_gb": data_gb,
        "specs": specs,
        "checks": checks(done, cfg, specs),
        "map": maps,
        "failed": failed.step if failed else None,
        "steps": [{**asdict(s), "command": shlex.join(s.argv)} for s in done],
    }
    write_outputs(out, result, done)
    print("\n" + "\n".join(summary_lines(result)) + "\n\n" + markdown(done), flush=True)
    print(f"\nwritten: {out / 'rehearsal.md'}, .csv, .json; logs under {out / 'run' / 'logs'}")
    if args.delete_data:
        for d in datasets:
            shutil.rmtree(out / "data" / d, ignore_errors=True)
            (out / "data" / f"{d}.json").unlink(missing_ok=True)
    if failed:
        log = Path(failed.log).read_text(errors="replace")[-3000:] if Path(failed.log).exists() else ""
        print(
            f"\nerror: {failed.step} {failed.dataset} exited with {failed.exit_code}; {failed.log}:\n{log}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
