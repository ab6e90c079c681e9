"""What bf16 training changes in retrieval quality: mAP@K of fp32 and bf16 runs beside the seed spread.

Run (not part of the test suite; about 20 minutes on 2 quiet CPU cores, see below)::

    python benchmarks/bench_precision.py [--out benchmarks/out/precision] [--seeds 1,2,3]
        [--only fcvid-16,larger-fcvid-64] [--no-larger] [--epochs N] [--larger-epochs N]
        [--threads 2] [--config config.yaml] [--tiny]

Runs:

* the 9 miniature runs of the default pipeline (``config.yaml``: every
  dataset x every code length): the miniature data of ``make_miniature``
  (generation seed, sizes and preset from the config's ``miniature`` section)
  and the pipeline's recipe (the paper's, ``conmh.recipes``, with the
  dataset's ``recipe`` changes and the config's ``miniature.train``
  overrides: ``conmh.pipeline.config.recipe_changes``, as
  ``conmh.pipeline.steps.train_command`` passes them to ``conmh train``);
* one larger generated set (``--larger``, default on): an FCVID-style
  miniature of 2,000 training and 2,000 database videos, 512-dim features,
  32 classes, trained with the paper's ``small`` preset at 64 bits for 4
  epochs (``--larger-epochs``), otherwise with the miniature recipe.

Each run is trained once per training seed (``Recipe.seed``; the data stay
fixed) in float32 and once under bf16 autocast (``conmh.train.train(...,
precision="fp32" | "bf16")``), on the CPU. Encoding and evaluation are the
same for both (float32, ``conmh.encode.encode_dataset``,
``conmh.metrics.evaluate``).

Written under ``--out``:

* ``precision.csv``: one row per (run, seed, precision, K) with mAP@K, the
  training's wall seconds (sum of its epochs'), its process CPU seconds, its
  epochs and final loss, and the 1-minute load average after it;
* ``precision.md``: per run and K in 5, 20, 100 the mean mAP of fp32 and of
  bf16 over the seeds, their difference, and the seed-to-seed standard
  deviation of each; one overall line; training seconds per run; the CPU;
* ``plan.json`` (what each run is), ``data/`` and ``train/`` (models).

Resumable: a (run, seed, precision) whose rows are in the CSV is not run
again, and an interrupted training continues from its last epoch. A run
whose plan (data, recipe, preset, threads) differs from the one recorded in
``plan.json`` is refused: use another ``--out``.

``--tiny`` (for the tests): one small FCVID-style run at 16 bits, seed 1, one
epoch, both precisions, in seconds.

Time: with one thread, a miniature training costs about 17 CPU-seconds in
float32 and 9 in bf16 here, one of the larger set about 140 and 80. Run it on
a quiet machine: with 2 threads on a loaded one (load average 5), the
threads wait for each other, and a trial trained the larger set at 6 to 17
videos/s where one thread alone does about 57 per CPU-second.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from conmh.atomic import write_text_atomic
from conmh.errors import ConMHError
from conmh.machine import cpu_info, cpu_model
from conmh.recipes import Recipe, get_recipe
from conmh.synthetic import MINIATURE_DEFAULTS, MiniatureSpec

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
TABLE_KS = (5, 20, 100)
COLUMNS = (
    "run",
    "dataset",
    "bits",
    "seed",
    "precision",
    "k",
    "map",
    "train_s",
    "train_cpu_s",
    "epochs",
    "final_loss",
    "load_avg",
)

# The larger generated set, trained with the paper's preset: 2,000 videos x
# 4 epochs, about a minute or so of fp32 training with 2 threads on the team
# machine (the small preset at 512 dims does about 57 videos per CPU-second
# in float32, 99 in bf16). 3 epochs already lift mAP@20 from LSH's 0.38 to 0.63.
LARGER_SPEC = MiniatureSpec(n_train=2000, n_database=2000, n_queries=2000, feature_dim=512, n_classes=32)
LARGER_PRESET = "small"
LARGER_BITS = 64
LARGER_EPOCHS = 4
TINY_SPEC = MiniatureSpec(n_train=128, n_database=96, n_queries=32, feature_dim=32, n_classes=4)


class PlanError(Exception):
    """The command line or the output folder does not allow the requested runs."""


@dataclass(frozen=True)
class Run:
    """One training set-up; trained once per (seed, precision)."""

    name: str
    dataset: str  # file layout and recipe
    data_name: str  # folder under out/data (runs of one dataset share it)
    bits: int
    preset: str
    spec: MiniatureSpec
    data_seed: int
    recipe: Recipe  # its seed is replaced by each training seed

    def plan(self, threads: int) -> dict:
        recipe = {k: v for k, v in self.recipe.to_dict().items() if k != "seed"}
        return {
            "dataset": self.dataset,
            "data": self.data_name,
            "bits": self.bits,
            "preset": self.preset,
            "spec": dataclasses.asdict(self.spec),
            "data_seed": self.data_seed,
            "recipe": recipe,
            "threads": threads,
        }


# --------------------------------------------------------------------------- runs


def load_config(path: Path) -> dict:
    """The pipeline's configuration; PlanError unless it has the keys this benchmark reads."""
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: cannot read the configuration: {exc}") from None
    needed = ["datasets", "bits", "ks", "miniature.seed", "miniature.preset", "miniature.train"]
    missing = [key for key in needed if not _has(cfg, key.split("."))]
    if missing:
        raise PlanError(f"{path}: missing key(s) {', '.join(missing)}")
    return cfg


def _has(node: object, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def pipeline_recipe(cfg: dict, dataset: str) -> Recipe:
    """The recipe the pipeline trains miniature ``dataset`` (e.g. fcvid-mini) with: the paper's, with the changes
    of ``conmh.pipeline.config.recipe_changes`` (the dataset's ``recipe``, then ``miniature.train``)."""
    from conmh.pipeline.config import layout_of, recipe_changes

    return get_recipe(layout_of(dataset)).replace(**recipe_changes(cfg, dataset))


def all_runs(cfg: dict, *, epochs: int | None, larger_epochs: int, tiny: bool) -> list[Run]:
    """The runs of the config's miniatures (its releases are left out: this benchmark generates its data), named
    by layout and code length (fcvid-16), then the larger FCVID-style run."""
    from conmh.pipeline.config import is_real, layout_of

    mini = cfg["miniature"]
    if tiny:
        recipe = pipeline_recipe(cfg, "fcvid-mini").replace(epochs=epochs or 1)
        return [Run("tiny-fcvid-16", "fcvid", "tiny-fcvid", 16, mini["preset"], TINY_SPEC, mini["seed"], recipe)]
    runs = []
    for dataset in [d for d in cfg["datasets"] if not is_real(d)]:
        layout = layout_of(dataset)
        spec = dataclasses.replace(MINIATURE_DEFAULTS[layout], **mini.get("sizes", {}).get(dataset, {}))
        recipe = pipeline_recipe(cfg, dataset).replace(epochs=epochs)
        for bits in cfg["bits"]:
            runs.append(Run(f"{layout}-{bits}", layout, dataset, int(bits), mini["preset"], spec, mini["seed"], recipe))
    recipe = pipeline_recipe(cfg, "fcvid-mini").replace(epochs=larger_epochs)
    runs.append(
        Run(
            f"larger-fcvid-{LARGER_BITS}",
            "fcvid",
            "larger-fcvid",
            LARGER_BITS,
            LARGER_PRESET,
            LARGER_SPEC,
            mini["seed"],
            recipe,
        )
    )
    return runs


def select_runs(runs: list[Run], only: list[str] | None, larger: bool) -> list[Run]:
    if only:
        names = {r.name for r in runs}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise PlanError(f"--only: unknown run(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
        return [r for r in runs if r.name in only]
    return [r for r in runs if larger or not r.name.startswith("larger-")]


def check_plan(out: Path, runs: list[Run], threads: int) -> dict:
    """Record each run's plan in out/plan.json; refuse a run recorded there with another plan."""
    path = out / "plan.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for run in runs:
        plan = run.plan(threads)
        if recorded.setdefault(run.name, plan) != plan:
            raise PlanError(
                f"{path}: run {run.name} was made with {recorded[run.name]}, "
                f"this command asks for {plan}; choose another --out"
            )
    write_text_atomic(path, json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return recorded


# --------------------------------------------------------------------------- one training


def ensure_data(run: Run, data_dir: Path) -> None:
    """Generate the run's miniature unless ``data_dir`` already holds it (same spec and seed)."""
    from conmh.synthetic import make_miniature

    marker = data_dir / "spec.json"
    want = {"dataset": run.dataset, "seed": run.data_seed, "spec": dataclasses.asdict(run.spec)}
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == want:
        return
    make_miniature(run.dataset, data_dir, seed=run.data_seed, spec=run.spec)
    write_text_atomic(marker, json.dumps(want, sort_keys=True) + "\n")


def train_and_evaluate(
    run: Run, seed: int, precision: str, data_dir: Path, train_dir: Path, ks: tuple[int, ...]
) -> list[dict]:
    """Train one (run, seed, precision), encode, evaluate; the CSV rows."""
    from conmh.encode import encode_dataset
    from conmh.features import open_split
    from conmh.metrics import evaluate
    from conmh.model import ModelConfig
    from conmh.train import CHECKPOINT, train

    recipe = run.recipe.replace(seed=seed)
    cpu = time.process_time()
    with open_split(run.dataset, data_dir, "train") as feats:
        cfg = ModelConfig.from_preset(run.preset, feature_dim=feats.dim, frames=feats.frames, nbits=run.bits)
        result = train(
            feats,
            cfg,
            recipe,
            train_dir,
            device="cpu",
            resume=True,
            progress=False,
            precision=precision,
            meta={"dataset": run.dataset, "preset": run.preset},
        )
    cpu = time.process_time() - cpu
    codes = encode_dataset(result.final_model, run.dataset, data_dir, device="cpu")
    maps = evaluate(codes, ks)["map"]
    (train_dir / CHECKPOINT).unlink(missing_ok=True)  # optimiser state: only needed to resume
    common = {
        "run": run.name,
        "dataset": run.dataset,
        "bits": run.bits,
        "seed": seed,
        "precision": precision,
        "train_s": round(sum(e["seconds"] for e in result.log), 3),
        "train_cpu_s": round(cpu, 3),
        "epochs": result.epochs_done,
        "load_avg": round(os.getloadavg()[0], 2),
        "final_loss": result.log[-1]["loss"],
    }
    return [{**common, "k": k, "map": maps[str(k)]} for k in ks]


# --------------------------------------------------------------------------- results


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(rows[0]) != set(COLUMNS):
        raise PlanError(f"{path}: columns {list(rows[0])}, expected {list(COLUMNS)}; choose another --out")
    for line, row in enumerate(rows, start=2):
        try:
            for key in ("bits", "seed", "k", "epochs"):
                row[key] = int(row[key])
            for key in ("map", "train_s", "train_cpu_s", "final_loss", "load_avg"):
                row[key] = float(row[key])
        except (TypeError, ValueError) as exc:
            raise PlanError(f"{path}, line {line}: not a result row ({exc}); choose another --out") from None
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    """Sample standard deviation over seeds (NaN below two seeds)."""
    return statistics.stdev(values) if len(values) >= 2 else float("nan")


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def summarise(rows: list[dict], ks: tuple[int, ...] = TABLE_KS) -> dict:
    """Per (run, K): means, difference and seed spreads; per run: training seconds; overall means."""
    cells, times = [], []
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        for k in ks:
            maps = {p: [r["map"] for r in mine if r["k"] == k and r["precision"] == p] for p in PRECISIONS}
            if maps["fp32"] or maps["bf16"]:
                cells.append(
                    {
                        "run": run,
                        "k": k,
                        "seeds": {p: len(v) for p, v in maps.items()},
                        **{f"mean_{p}": _mean(v) for p, v in maps.items()},
                        **{f"std_{p}": _std(v) for p, v in maps.items()},
                        "diff": _mean(maps["bf16"]) - _mean(maps["fp32"]),
                    }
                )
        once = [r for r in mine if r["k"] == mine[0]["k"]]  # one row per (seed, precision)
        times.append(
            {
                "run": run,
                "epochs": mine[0]["epochs"],
                **{
                    f"{col}_{p}": _mean([r[col] for r in once if r["precision"] == p])
                    for col in ("train_s", "train_cpu_s")
                    for p in PRECISIONS
                },
            }
        )
    diffs = [abs(c["diff"]) for c in cells if c["diff"] == c["diff"]]
    spreads = {p: [c[f"std_{p}"] for c in cells if c[f"std_{p}"] == c[f"std_{p}"]] for p in PRECISIONS}
    overall = {
        "cells": len(diffs),
        "mean_abs_diff": _mean(diffs),
        **{f"mean_std_{p}": _mean(v) for p, v in spreads.items()},
        "mean_std": _mean(spreads["fp32"] + spreads["bf16"]),
    }
    loads = [r["load_avg"] for r in rows]
    overall["load_avg"] = (min(loads), max(loads)) if loads else (float("nan"), float("nan"))
    return {"cells": cells, "times": times, "overall": overall}


def cpu_name() -> str:
    """The CPU's model name and whether it has bf16 matrix instructions (from /proc/cpuinfo)."""
    flags = set(cpu_info().get("flags", "").split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, bf16 instructions: {', '.join(bf16) or 'none'}"


def describe(name: str, plan: dict) -> str:
    spec, r = plan["spec"], plan["recipe"]
    return (
        f"`{name}`: {spec['n_train']} training / {spec['n_database']} database videos, "
        f"{spec['feature_dim']} dims, {spec['n_classes']} classes (data seed {plan['data_seed']}); preset "
        f"`{plan['preset']}`, {plan['bits']} bits, {r['epochs']} epoch(s), batch {r['batch_size']}, "
        f"lr {r['lr']:g}, mask ratio {r['mask_ratio']}, alpha {r['alpha']}; {plan['threads']} threads"
    )


def markdown(summary: dict, plans: dict, threads: int) -> str:
    import torch

    o = summary["overall"]
    lines = [
        "# bf16 against fp32 training: retrieval mAP",
        "",
        f"Written by `python benchmarks/bench_precision.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}"
        f" (the tables hold every run of the CSV). CPU: {cpu_name()}; {threads} torch threads; torch "
        f"{torch.__version__}, Python {platform.python_version()}.",
        "",
        "Each run is trained once per training seed in float32 and once under bf16 autocast, on the CPU; the "
        "data, the encoding and the evaluation (float32) are the same for both. Std: sample standard deviation "
        "over the training seeds.",
        "",
        *[f"* {describe(c['run'], plans[c['run']])}" for c in summary["times"] if c["run"] in plans],
        "",
        "## mAP@K: bf16 − fp32 beside the seed-to-seed spread",
        "",
        "| run | K | seeds | fp32 mean | bf16 mean | bf16 − fp32 | seed std fp32 | seed std bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        n = c["seeds"]
        seeds = n["fp32"] if n["fp32"] == n["bf16"] else f"{n['fp32']}/{n['bf16']}"
        diff = "–" if c["diff"] != c["diff"] else f"{c['diff']:+.4f}"
        lines.append(
            f"| {c['run']} | {c['k']} | {seeds} | {_fmt(c['mean_fp32'])} | {_fmt(c['mean_bf16'])} | "
            f"{diff} | {_fmt(c['std_fp32'])} | {_fmt(c['std_bf16'])} |"
        )
    lines += [
        "",
        f"**Overall** ({o['cells']} run x K cells): mean |bf16 − fp32| = {_fmt(o['mean_abs_diff'])}; mean "
        f"seed-to-seed std = {_fmt(o['mean_std'])} (fp32 {_fmt(o['mean_std_fp32'])}, bf16 "
        f"{_fmt(o['mean_std_bf16'])}).",
        "",
        "## Training time (CPU, mean over seeds)",
        "",
        "Wall seconds of the epochs (`train_log.jsonl`) and process CPU seconds of the training call (of its "
        "last part, when a training was resumed). On a shared machine the wall times carry other jobs' load: "
        f"the 1-minute load average after each training was {_fmt(o['load_avg'][0], 2)} to "
        f"{_fmt(o['load_avg'][1], 2)}.",
        "",
        "| run | epochs | fp32 wall s | bf16 wall s | fp32 / bf16 (wall) | fp32 CPU s | bf16 CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in summary["times"]:
        ratio = t["train_s_fp32"] / t["train_s_bf16"] if t["train_s_bf16"] > 0 else float("nan")
        lines.append(
            f"| {t['run']} | {t['epochs']} | {_fmt(t['train_s_fp32'], 1)} | {_fmt(t['train_s_bf16'], 1)} | "
            f"{_fmt(ratio, 2)}x | {_fmt(t['train_cpu_s_fp32'], 1)} | {_fmt(t['train_cpu_s_bf16'], 1)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "precision")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--seeds", type=_int_list, default=None, help="training seeds (default 1,2,3; --tiny: 1)")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help="comma-separated run names, e.g. fcvid-16,larger-fcvid-64",
    )
    p.add_argument(
        "--larger",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the larger generated set (default: yes)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs of the miniature runs (default: the config's)")
    p.add_argument("--larger-epochs", type=int, default=LARGER_EPOCHS)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tiny", action="store_true", help="one tiny run, 1 seed, 1 epoch (for the tests)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [1] if args.tiny else [1, 2, 3]
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        ks = tuple(int(k) for k in cfg["ks"])
        runs = select_runs(
            all_runs(cfg, epochs=args.epochs, larger_epochs=args.larger_epochs, tiny=args.tiny),
            None if args.tiny else args.only,
            args.larger,
        )
        csv_path = args.out / "precision.csv"
        rows = read_rows(csv_path)
        plans = check_plan(args.out, runs, args.threads)
    except (PlanError, ConMHError) as exc:  # ConMHError: e.g. a recipe with epochs < 1
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from conmh.allocator import keep_freed_memory

    keep_freed_memory()  # the process set-up of `conmh train`
    torch.set_num_threads(args.threads)
    done = {(r["run"], r["seed"], r["precision"]) for r in rows}
    for run in runs:
        data_dir = args.out / "data" / run.data_name
        ensure_data(run, data_dir)
        for seed in args.seeds:
            # Alternate which precision goes first, so that neither always meets a cold process.
            for precision in PRECISIONS if seed % 2 else PRECISIONS[::-1]:
                if (run.name, seed, precision) in done:
                    print(f"{run.name} seed {seed} {precision}: already in {csv_path}, skipped", flush=True)
                    continue
                new = train_and_evaluate(
                    run, seed, precision, data_dir, args.out / "train" / run.name / f"seed{seed}-{precision}", ks
                )
                rows += new
                write_rows(csv_path, rows)
                shown = ", ".join(f"mAP@{r['k']} {r['map']:.4f}" for r in new if r["k"] in TABLE_KS)
                print(f"{run.name} seed {seed} {precision}: {shown}; training {new[0]['train_s']:.1f} s", flush=True)
    write_text_atomic(args.out / "precision.md", markdown(summarise(rows), plans, args.threads))
    print(f"wrote {csv_path} and {args.out / 'precision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
