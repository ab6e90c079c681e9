"""The full-size rehearsal (benchmarks/rehearsal.py) at tiny scale, and its release-sized generator.

The full-size run (41 GB of data, most of an hour on 2 cores) is not part of
the suite; here the same command runs end to end on 1% of the counts, and a
Snakemake dry run of its generated configuration must list exactly the jobs
and commands it ran.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conmh import synthetic
from conmh.datasets import get_layout
from conmh.errors import ConfigError
from conmh.features import open_split
from conmh.labels import load_labels
from conmh.synthetic import make_release_sized, release_spec
from conmh.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("fcvid", "activitynet")
METHODS = ("conmh", "itq", "lsh")  # config.yaml's methods, in its order
PIPELINE_STEPS = ("download", "verify") + tuple(
    f"{step} {m}" for m in METHODS for step in ("fit", "encode", "evaluate")
)


# --------------------------------------------------------------------------- the generator


def test_release_spec_has_the_real_counts_dims_and_classes() -> None:
    fcvid, anet = release_spec("fcvid"), release_spec("activitynet")
    assert (fcvid.n_train, fcvid.n_database, fcvid.feature_dim, fcvid.n_classes) == (45585, 45600, 4096, 239)
    assert (anet.n_train, anet.n_database, anet.n_queries, anet.feature_dim, anet.n_classes) == (
        9722,
        3758,
        1000,
        2048,
        200,
    )
    small = release_spec("fcvid", scale=0.05)
    assert (small.n_train, small.n_database, small.feature_dim) == (2279, 2280, 4096)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_release_spec_refuses_a_bad_scale(bad: float) -> None:
    with pytest.raises(ConfigError, match="scale"):
        release_spec("fcvid", scale=bad)


def test_release_spec_refuses_yfcc() -> None:
    with pytest.raises(ConfigError, match="yfcc"):
        release_spec("yfcc")


@pytest.mark.parametrize("name", DATASETS)
def test_release_sized_files_verify_with_the_scaled_counts(tmp_path: Path, name: str) -> None:
    layout = get_layout(name)
    paths = make_release_sized(name, tmp_path, seed=0, scale=0.004, feature_dim=16, block=16)
    expected = {f for _, f, _ in layout.all_files()}
    assert {p.name for p in paths} == expected
    assert {p.name for p in tmp_path.iterdir()} == expected  # no stray temporary files
    report = verify_dataset(name, tmp_path, checksums=False)
    counts = {split: max(1, round(n * 0.004)) for split, n in layout.real_counts.items()}
    assert report["counts"] == counts
    classes = release_spec(name).n_classes
    assert (report["frames"], report["feature_dim"], report["n_classes"]) == (layout.frames, 16, classes)
    assert load_labels(name, tmp_path, "database").shape == (counts["database"], report["n_classes"])
    with h5py.File(tmp_path / layout.train[0], "r") as fh:
        ds = fh["feats"]
        assert ds.dtype == np.float32 and ds.chunks is None and ds.compression is None  # contiguous, as released
    for split in ("train", "database"):
        with open_split(name, tmp_path, split) as ff:
            x = ff.read(0, ff.n)
        # Every block was written: an unwritten HDF5 region reads as zeros.
        assert (x.reshape(len(x), -1).max(axis=1) > 0).all()
        assert x.min() >= 0


def test_release_sized_writes_block_by_block(tmp_path: Path, monkeypatch) -> None:
    drawn = []
    videos = synthetic._World.videos

    def spy(self, labels, frames, rng):
        drawn.append(len(labels))
        return videos(self, labels, frames, rng)

    monkeypatch.setattr(synthetic._World, "videos", spy)
    make_release_sized("activitynet", tmp_path, scale=0.01, feature_dim=8, block=20)
    assert max(drawn) == 20  # never a whole split at once
    assert sum(drawn) == 97 + 38 + 10


def test_release_sized_is_deterministic(tmp_path: Path) -> None:
    def arrays(folder: Path) -> dict[str, bytes]:
        out = {}
        for path in sorted(folder.iterdir()):
            if path.suffix == ".h5":
                with h5py.File(path, "r") as fh:
                    out[path.name] = fh["feats"][()].tobytes()
            else:
                out[path.name] = path.read_bytes()[128:]  # after the .mat header (it holds a date)
        return out

    a = make_release_sized("fcvid", tmp_path / "a", seed=3, scale=0.002, feature_dim=8, block=32)[0].parent
    b = make_release_sized("fcvid", tmp_path / "b", seed=3, scale=0.002, feature_dim=8, block=32)[0].parent
    c = make_release_sized("fcvid", tmp_path / "c", seed=4, scale=0.002, feature_dim=8, block=32)[0].parent
    assert arrays(a) == arrays(b)
    assert arrays(a)["fcv_train_feats.h5"] != arrays(c)["fcv_train_feats.h5"]


# --------------------------------------------------------------------------- the command, tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("rehearsal") / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "rehearsal.py"),
            "--scale",
            "tiny",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, json.loads((out / "rehearsal.json").read_text()), proc.stdout


def test_tiny_rehearsal_measures_every_step_of_both_datasets(tiny) -> None:
    out, result, stdout = tiny
    expected = [(s, d) for d in DATASETS for s in ("generate",) + PIPELINE_STEPS] + [("report", "all")]
    assert [(s["step"], s["dataset"]) for s in result["steps"]] == expected
    for s in result["steps"]:
        assert s["exit_code"] == 0, s
        assert s["wall_s"] > 0 and s["cpu_s"] > 0 and s["peak_rss_mb"] > 0 and s["disk_mb"] > 0, s
        assert Path(s["log"]).is_file()
    rss = {(s["step"], s["dataset"]): s["peak_rss_mb"] for s in result["steps"]}
    # Each job's own peak, not the rehearsal's (which has torch loaded): a job that never imports torch stays small.
    assert rss[("download", "fcvid")] < rss[("fit conmh", "fcvid")]
    # The printed table and the CSV hold the same rows.
    with open(out / "rehearsal.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][:6] == ["step", "dataset", "wall s", "CPU s", "peak RSS MB", "disk MB"]
    assert [tuple(r[:2]) for r in table[1:]] == expected
    for step, dataset in expected:
        assert f"| {step} | {dataset} |" in stdout
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    md_rows = [line for line in (out / "rehearsal.md").read_text().splitlines() if line.startswith("|")]
    assert len(md_rows) == len(expected) + 2  # header, rule, a row per step


def test_tiny_rehearsal_evaluates_in_full_and_reports(tiny) -> None:
    out, result, _ = tiny
    for d in DATASETS:
        for method in METHODS:
            metrics = json.loads((out / "run" / "results" / "metrics" / d / f"{method}-64bits.json").read_text())
            assert metrics["bits"] == 64 and set(metrics["map"]) == {"5", "10", "20", "40", "60", "80", "100"}
            assert result["map"][d][method] == metrics["map"]
        spec = release_spec(d, scale=0.01)
        expected_queries = spec.n_database if d == "fcvid" else spec.n_queries
        assert metrics["n_database"] == spec.n_database and metrics["n_queries"] == expected_queries
    assert (out / "run" / "results" / "table.md").is_file()
    train = result["checks"]["fcvid_train"]
    assert train["data_mode"] == "memory" and train["steps"] == -(-456 // 32)  # tiny: 1% of the videos, batch 32
    assert result["checks"]["within_an_hour"] is True


def test_tiny_rehearsal_runs_the_pipelines_own_jobs(tiny, tmp_path) -> None:
    """A Snakemake dry run of the generated config lists exactly these jobs with these commands
    (``conmh pipeline STEP ...``; Snakemake adds ``--log``, the rehearsal sends the output to the log itself)."""
    out, result, _ = tiny
    repo = tmp_path / "repo"
    skip = {".git", "data", "work", "results", "logs", ".snakemake", "out", "__pycache__", ".pytest_cache"}
    shutil.copytree(ROOT, repo, ignore=lambda _, names: {n for n in names if n in skip or n.endswith(".egg-info")})
    proc = subprocess.run(
        ["snakemake", "-n", "-p", "--forceall", "--cores", "2", "--configfile", str(out / "config.yaml")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    jobs = [s for s in result["steps"] if s["step"] != "generate"]
    rules = [r for r in re.findall(r"^(?:local)?rule (\w+):", text, re.M) if r != "all"]
    assert sorted(rules) == sorted(s["step"].split()[0] for s in jobs)
    [config] = {s["argv"][s["argv"].index("--config") + 1] for s in jobs if "--config" in s["argv"]}
    for s in jobs:
        step = s["step"].split()[0]
        if step == "verify":  # below full scale the rehearsal runs the step's `conmh verify` without --real
            assert s["argv"][:2] == ["conmh", "verify"] and "--real" not in s["argv"]
            assert "without --real" in s["note"]
            typed = ["conmh", "pipeline", "verify", "--dataset", s["dataset"], "--config", config]
        else:  # the rehearsal runs conmh.pipeline.cli with its Python: `conmh pipeline STEP ...`
            typed = ["conmh", "pipeline", *s["argv"][s["argv"].index(step) :]]
        command = shlex.join(typed)
        assert f"{command} --log {s['log']}" in text, command


def test_rehearsal_refuses_a_folder_that_is_not_its_own(tmp_path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rehearsal.py"), "--scale", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "not a rehearsal folder" in proc.stderr and str(tmp_path) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
