"""The fp32-vs-bf16 fidelity benchmark (benchmarks/bench_precision.py): its summary
arithmetic, and one tiny end-to-end run (both precisions, resume, refused re-plan)."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conmh.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_precision.py"

_spec = importlib.util.spec_from_file_location("bench_precision", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def _row(run: str, seed: int, precision: str, k: int, value: float, train_s: float = 1.0) -> dict:
    return {
        "run": run,
        "dataset": "fcvid",
        "bits": 16,
        "seed": seed,
        "precision": precision,
        "k": k,
        "map": value,
        "train_s": train_s,
        "train_cpu_s": 2 * train_s,
        "epochs": 3,
        "final_loss": 1.0,
        "load_avg": 0.5,
    }


def test_summary_sets_the_precision_difference_beside_the_seed_spread():
    maps = {("fp32", 1): 0.50, ("fp32", 2): 0.70, ("bf16", 1): 0.62, ("bf16", 2): 0.66}
    rows = [
        _row("a", s, p, k, v + (0.1 if k == 20 else 0.0), train_s=4.0 if p == "fp32" else 2.0)
        for (p, s), v in maps.items()
        for k in (5, 20)
    ]
    summary = bench.summarise(rows, ks=(5, 20))
    cell = summary["cells"][0]
    assert (cell["run"], cell["k"], cell["seeds"]) == ("a", 5, {"fp32": 2, "bf16": 2})
    assert cell["mean_fp32"] == pytest.approx(0.60) and cell["mean_bf16"] == pytest.approx(0.64)
    assert cell["diff"] == pytest.approx(0.04)
    assert cell["std_fp32"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert cell["std_bf16"] == pytest.approx(math.sqrt(0.0008))
    overall = summary["overall"]
    assert overall["cells"] == 2
    assert overall["mean_abs_diff"] == pytest.approx(0.04)
    assert overall["mean_std"] == pytest.approx((math.sqrt(0.02) + math.sqrt(0.0008)) / 2)
    assert summary["times"] == [
        {
            "run": "a",
            "epochs": 3,
            "train_s_fp32": 4.0,
            "train_s_bf16": 2.0,
            "train_cpu_s_fp32": 8.0,
            "train_cpu_s_bf16": 4.0,
        }
    ]


def test_one_seed_has_no_spread():
    rows = [_row("a", 1, p, 5, v) for p, v in (("fp32", 0.5), ("bf16", 0.4))]
    cell = bench.summarise(rows, ks=(5,))["cells"][0]
    assert cell["diff"] == pytest.approx(-0.1)
    assert math.isnan(cell["std_fp32"]) and math.isnan(cell["std_bf16"])


def test_the_miniature_runs_are_the_pipelines():
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    runs = bench.all_runs(cfg, epochs=None, larger_epochs=5, tiny=False)
    names = [r.name for r in runs]
    assert names[:-1] == [f"{d.removesuffix('-mini')}-{b}" for d in cfg["datasets"] for b in cfg["bits"]]
    assert names[-1] == "larger-fcvid-64"
    first = runs[0]
    assert first.preset == cfg["miniature"]["preset"] and first.data_seed == cfg["miniature"]["seed"]
    overrides = cfg["miniature"]["train"]
    assert (first.recipe.epochs, first.recipe.batch_size, first.recipe.lr) == (
        overrides["epochs"],
        overrides["batch_size"],
        overrides["lr"],
    )
    # The rest is the paper's recipe with the dataset's configured changes (none by default).
    paper = get_recipe(first.dataset).replace(**cfg[first.data_name]["recipe"])
    assert first.recipe.mask_ratio == paper.mask_ratio
    assert runs[-1].preset == "small" and runs[-1].recipe.epochs == 5
    assert [r.name for r in bench.select_runs(runs, None, larger=False)] == names[:-1]
    with pytest.raises(bench.PlanError, match="unknown run"):
        bench.select_runs(runs, ["fcvid-128"], larger=True)


def _bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )


def test_tiny_run_writes_both_precisions_and_resumes(tmp_path):
    out = tmp_path / "precision"
    first = _bench(out)
    assert first.returncode == 0, first.stderr
    ks = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["ks"]
    with open(out / "precision.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == bench.COLUMNS
    assert sorted((r["precision"], int(r["k"])) for r in rows) == sorted((p, k) for p in ("fp32", "bf16") for k in ks)
    assert {(r["run"], r["seed"], r["epochs"]) for r in rows} == {("tiny-fcvid-16", "1", "1")}
    assert all(0.0 <= float(r["map"]) <= 1.0 and float(r["train_s"]) > 0 for r in rows)
    table = (out / "precision.md").read_text(encoding="utf-8")
    for k in (5, 20, 100):
        assert f"| tiny-fcvid-16 | {k} | 1 |" in table
    assert "**Overall** (3 run x K cells)" in table
    assert "| tiny-fcvid-16 | 1 |" in table  # training time row

    # A second call finds every result in the CSV and trains nothing.
    csv_text = (out / "precision.csv").read_text(encoding="utf-8")
    model = out / "train" / "tiny-fcvid-16" / "seed1-fp32" / "model.pt"
    stamp = model.stat().st_mtime_ns
    again = _bench(out)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped") == 2
    assert (out / "precision.csv").read_text(encoding="utf-8") == csv_text
    assert model.stat().st_mtime_ns == stamp

    # Other settings into the same folder would mix results: refused, nothing written.
    other = _bench(out, "--epochs", "2")
    assert other.returncode == 2
    assert "plan.json" in other.stderr and "tiny-fcvid-16" in other.stderr
    assert (out / "precision.csv").read_text(encoding="utf-8") == csv_text
