"""The reproduction pipeline as users run it: Snakemake dry runs list exactly the
expected jobs, bad configs and missing or corrupt data fail with clear messages,
a method added in one file gets its rows, and a change reruns what it should (the
default run: test_default_run.py; `dvc repro`: test_dvc.py). Every run happens in
a temporary copy of the repository."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conmh.datasets import DATASETS as RELEASES
from conmh.pipeline.config import dataset_names, load_config
from helpers.repo import (
    DEFAULT_BITS,
    DEFAULT_DATASETS,
    DEFAULT_METHODS,
    TEST_BITS,
    TEST_DATASET,
    copy_repo,
    metrics_of,
    output,
    snakemake,
    with_test_config,
)


def dry_run_jobs(proc: subprocess.CompletedProcess) -> set[tuple[str, ...]]:
    """(rule, wildcard values...) of every job a `snakemake -n` printed."""
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output(proc)):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        values = dict(w.split("=", 1) for w in wildcards.group(1).split(", ")) if wildcards else {}
        jobs.add((head.group(1), *(values[k] for k in ("method", "dataset", "bits") if k in values)))
    return jobs


def expected_jobs(datasets=DEFAULT_DATASETS, bits=DEFAULT_BITS, trained=None) -> set[tuple[str, ...]]:
    trained = {(d, b) for d in datasets for b in bits} if trained is None else trained
    jobs = {("all",), ("report",)}
    for d in datasets:
        jobs |= {("download", d), ("verify", d)}
        for b in bits:
            jobs |= {(step, m, d, str(b)) for step in ("encode", "evaluate") for m in DEFAULT_METHODS}
            jobs |= {("fit", m, d, str(b)) for m in DEFAULT_METHODS if m != "conmh" or (d, b) in trained}
    return jobs


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("dry") / "repo")


def real_config(tmp_path: Path) -> list[str]:
    """--config values that run every release instead of its miniature, from empty folders in tmp_path."""
    for d in RELEASES:
        (tmp_path / d).mkdir(exist_ok=True)
    return [f"datasets=[{', '.join(RELEASES)}]", f"paths={{data: {tmp_path}}}"]


# --------------------------------------------------------------------------- dry runs


def test_default_dry_run_lists_exactly_the_expected_jobs(repo):
    proc = snakemake(repo, "-n")
    assert proc.returncode == 0, output(proc)
    assert dry_run_jobs(proc) == expected_jobs()


def test_full_paper_dry_run_lists_the_jobs_with_the_paper_recipe_on_gpus(repo, tmp_path):
    proc = snakemake(repo, "-n", "-p", "--config", *real_config(tmp_path))
    assert proc.returncode == 0, output(proc)
    assert dry_run_jobs(proc) == expected_jobs(datasets=RELEASES)
    text = output(proc)
    train = [
        line[line.index("conmh pipeline fit --method conmh ") :].strip()
        for line in text.splitlines()
        if "conmh pipeline fit --method conmh " in line
    ]
    (config,) = set(re.findall(r"--config (logs/config-[0-9a-f]{12}\.yaml) ", "\n".join(train)))
    assert sorted(train) == sorted(
        f"conmh pipeline fit --method conmh --dataset {d} --bits {b} --threads 1 --config {config}"
        f" --log logs/fit/conmh-{d}-{b}bits.log"
        for d in RELEASES
        for b in DEFAULT_BITS
    )
    assert text.count("gpu=1") == 18  # ConMH's fit and encode jobs each ask for one GPU, the baselines' none
    # What those jobs run: the checked configuration with --config applied, read back.
    from conmh.pipeline.steps import train_command

    cfg = load_config(repo / config)
    for d in RELEASES:
        argv = train_command(cfg, d, 64)
        assert "--epochs" not in argv and "--batch-size" not in argv  # conmh train's default: the paper's recipe
        assert argv[argv.index("--data-dir") + 1] == str(tmp_path / d)
        assert argv[argv.index("--preset") + 1] == "small" and argv[argv.index("--device") + 1] == "auto"


def test_multi_node_gpu_training_asks_for_its_gpus_per_node(repo, tmp_path):
    # The slurm profile turns `gres` into --gres=gpu:4, which SLURM grants on each node; `gpu` (--gpus,
    # for all nodes together) could be split unevenly. tests/unit/test_cluster_launch.py: the plugin's flags.
    distributed = "distributed={nproc_per_node: 4, nnodes: 2}"
    proc = snakemake(repo, "-n", "--config", *real_config(tmp_path), "datasets=[fcvid]", "bits=[64]", distributed)
    assert proc.returncode == 0, output(proc)
    fits = re.findall(r"rule fit:.*?wildcards: [^\n]*method=(\w+).*?resources: ([^\n]*)", output(proc), re.S)
    assert sorted(m for m, _ in fits) == sorted(DEFAULT_METHODS)
    for method, resources in fits:  # the baselines fit on one node without GPUs
        want = "gpu=0, gres=gpu:4, nodes=2" if method == "conmh" else "gpu=0, gres=, nodes=1"
        assert resources.endswith(want), (method, resources)


def test_released_checkpoints_skip_training(repo, tmp_path):
    released = {}
    for b in DEFAULT_BITS:
        released[b] = tmp_path / f"fcvid_{b}.pth"
        released[b].write_bytes(b"weights")
    checkpoints = "checkpoints={fcvid: {" + ", ".join(f"{b}: {p}" for b, p in released.items()) + "}}"
    proc = snakemake(repo, "-n", "-p", "--config", *real_config(tmp_path), checkpoints)
    assert proc.returncode == 0, output(proc)
    trained = {(d, b) for d in ("activitynet", "yfcc") for b in DEFAULT_BITS}
    assert dry_run_jobs(proc) == expected_jobs(datasets=RELEASES, trained=trained)
    from conmh.pipeline.config import model_for

    (config,) = set(re.findall(r"--config (logs/config-[0-9a-f]{12}\.yaml) ", output(proc)))
    cfg = load_config(repo / config)
    for b, path in released.items():
        assert model_for(cfg, "conmh", "fcvid", b) == str(path) and str(path) in output(proc)  # encode's input


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profiles_are_valid(repo, tmp_path, profile):
    # A dry run with the local executor checks the slurm profile's other settings (tests/cluster submits).
    extra = ["--executor", "local", "--cores", "16"] if profile == "slurm" else []
    proc = snakemake(
        repo, "-n", "-p", "--profile", f"workflow/profiles/{profile}", *extra, "--config", *real_config(tmp_path)
    )
    assert proc.returncode == 0, output(proc)
    assert dry_run_jobs(proc) == expected_jobs(datasets=RELEASES)
    if profile == "slurm":  # fit and encode jobs get 8 threads on the cluster
        assert output(proc).count("--threads 8") == 2 * len(DEFAULT_METHODS) * 9


def test_a_subset_runs_only_its_jobs(repo):
    proc = snakemake(repo, "-n", "--config", "datasets=[yfcc-mini]", "bits=[32,64]")
    assert proc.returncode == 0, output(proc)
    assert dry_run_jobs(proc) == expected_jobs(datasets=("yfcc-mini",), bits=(32, 64))


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "fcvid={recipe: {mask_ratio: 1.5}}",
            "fcvid.recipe.mask_ratio: 1.5 is greater than or equal to the maximum of 1",
        ),
        ("datasets=[fcvid, ucf101]", f"datasets[1]: 'ucf101' is not one of {list(dataset_names())}"),
        (f"fcvid-mini={{sha256: {{fcv_test_feats.h5: {'0' * 64}}}}}", "fcvid-mini.sha256: a miniature is generated"),
        ("bits=[16,thirty]", "bits[1]: 'thirty' is not of type 'integer'"),
        ("yfcc={source: real}", "Additional properties are not allowed ('source' was unexpected)"),
    ],
)
def test_a_bad_config_value_is_refused_with_a_clear_message(repo, value, message):
    proc = snakemake(repo, "-n", "--config", value)
    assert proc.returncode != 0
    assert message in output(proc)
    assert "Traceback" not in output(proc)


# --------------------------------------------------------------------------- failures


def test_a_missing_real_dataset_gives_the_instructions(repo, tmp_path):
    empty = tmp_path / "activitynet"
    empty.mkdir()
    proc = snakemake(
        repo, "--cores", "1", "--config", "datasets=[activitynet]", "bits=[16]", f"paths={{data: {tmp_path}}}"
    )
    text = output(proc)
    assert proc.returncode != 0
    assert "Traceback" not in text
    assert "5 file(s) of the real dataset are missing" in text
    for name in ("train_feats.h5", "test_feats.h5", "re_label.mat", "query_feats.h5", "q_label.mat"):
        assert name in text
    assert "huangmozhi9527/ConMH" in text and "Baidu disk" in text
    assert f"put the files in {empty}/" in text
    assert not (repo / "work" / "fit" / "activitynet").exists()


def test_a_corrupted_file_fails_verify(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    target = "results/data/fcvid-mini/verify.json"
    first = snakemake(repo, "--cores", "1", "--config", "datasets=[fcvid-mini]", "--", target)
    assert first.returncode == 0, output(first)
    report = json.loads((repo / target).read_text())
    assert {f["file"] for f in report["files"]} == {"fcv_train_feats.h5", "fcv_test_feats.h5", "fcv_test_labels.mat"}
    assert all(len(f["sha256"]) == 64 for f in report["files"])
    feats = repo / "data" / "fcvid-mini" / "fcv_test_feats.h5"
    feats.write_bytes(feats.read_bytes()[: feats.stat().st_size // 2])  # truncated transfer
    again = snakemake(repo, "--cores", "1", "--config", "datasets=[fcvid-mini]", "--forcerun", "verify", "--", target)
    assert again.returncode != 0
    assert "fcv_test_feats.h5" in output(again)
    assert "Traceback" not in output(again)
    assert not (repo / target).exists()  # a failed verify leaves no report behind


# --------------------------------------------------------------------------- a method of one's own

# A method in one file (docs/methods.md): the signs of the first `bits` pooled feature dimensions
# against their mean over the training split.
TOY_METHOD = """
import numpy as np

from ..encode import encode_splits
from ..features import open_split
from . import load_arrays, save_arrays

DISPLAY = "Toy"


def fit(dataset, data_dir, bits, model_file, offset=0.0):
    with open_split(dataset, data_dir, "train") as train:
        pooled = np.concatenate([block.mean(axis=1) for _, block in train.iter_blocks(256)])
    save_arrays(model_file, {"mean": pooled[:, :bits].mean(axis=0) + offset})


def encode(model_file, dataset, data_dir, bits, **options):
    mean = load_arrays(model_file)["mean"]

    def bits_of(feats, split):
        return np.concatenate([block.mean(axis=1)[:, :bits] >= mean for _, block in feats.iter_blocks(256)])

    return encode_splits(dataset, data_dir, bits, "toy", bits_of, {})
"""


def test_a_method_added_in_one_file_gets_its_rows_figures_and_metrics(tmp_path):
    """One module in conmh/methods/ and its name under `methods` in config.yaml: Snakemake and `dvc repro`
    fit, encode and evaluate it and the report shows it, with no rule, stage or report edited."""
    import os

    import yaml

    repo = copy_repo(tmp_path / "repo")
    (repo / "conmh" / "methods" / "toy.py").write_text(TOY_METHOD)
    config = with_test_config(yaml.safe_load((repo / "config.yaml").read_text()))
    config["methods"] = ["lsh", "toy"]
    config["options"] = {"lsh": {"seed": 1}, "toy": {"offset": 0.0}}
    (repo / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the copy's conmh, toy method included, for every job

    def in_repo(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900, env=env)

    proc = in_repo(["snakemake", "--cores", "2"])
    assert proc.returncode == 0, output(proc)[-5000:]
    metrics = metrics_of(repo)
    toy_run = f"{TEST_DATASET}/toy-{TEST_BITS}bits.json"
    assert sorted(metrics) == [f"{TEST_DATASET}/lsh-{TEST_BITS}bits.json", toy_run]
    assert metrics[toy_run]["method"] == "toy"
    table = pd.read_csv(repo / "results" / "table.csv")
    assert list(table["result"]) == ["LSH (ours)", "Toy (ours)"]  # the order of `methods`, no ConMH row
    toy = table[table["result"] == "Toy (ours)"].iloc[0]
    assert toy["mAP@20"] == pytest.approx(metrics[toy_run]["map"]["20"], abs=1e-6)
    assert "Toy" in set(pd.read_csv(repo / "results" / "plots" / "map_at_k.csv")["method"])
    assert "Toy" in set(pd.read_csv(repo / "results" / "plots" / "pr_curve.csv")["method"])
    assert json.loads((repo / "results" / "summary" / toy_run).read_text())["mAP@20"] > 0
    figures = sorted(p.name for p in (repo / "results" / "figures").iterdir())
    assert figures == ["map_at_k.png", "per_class.png", "pr_curves.png"]  # nothing trained: no loss figure

    # dvc repro runs the same method from the same config.yaml and gets the same metrics.
    for leftover in ("results", "work", "data", "logs", ".snakemake"):
        subprocess.run(["rm", "-rf", str(repo / leftover)], check=True)
    for cmd in (["git", "init", "-q"], ["dvc", "repro"]):
        proc = in_repo(cmd)
        assert proc.returncode == 0, output(proc)[-5000:]
    assert f"fit@toy-{TEST_DATASET}-{TEST_BITS}" in proc.stdout
    again = metrics_of(repo)
    assert {k: v["map"] for k, v in again.items()} == {k: v["map"] for k, v in metrics.items()}


def test_what_a_change_reruns_under_snakemake(snakemake_test_run, tmp_path):
    """A job reruns for what it depends on, and only for that: a changed key of the configuration reruns
    the jobs that read it (config.STEP_KEYS), not the others; a fit that runs re-encodes; a model file that
    is only newer (as after a `dvc pull`, which writes models and codes in any order) does not. On a copy
    of the session's .test run (tests/conftest.py), with its files' times."""
    import os
    import time

    repo = tmp_path / "repo"
    shutil.copytree(snakemake_test_run, repo, symlinks=True)
    one_run = ["--configfile", ".test/config.yaml"]

    def planned(*config: str, forcerun: str = "") -> set[tuple[str, ...]]:
        args = (["--forcerun", forcerun] if forcerun else []) + (["--config", *config] if config else [])
        proc = snakemake(repo, "-n", *one_run, *args)
        assert proc.returncode == 0, output(proc)
        return dry_run_jobs(proc)

    assert planned() == set()
    run_ = (TEST_DATASET, str(TEST_BITS))
    # The K values: evaluation and the report only (before, every job ran again, training included).
    assert planned("ks=[5,20]") == {("evaluate", m, *run_) for m in DEFAULT_METHODS} | {("report",), ("all",)}
    # One method's option: that method's jobs only.
    lsh_seed = "options={conmh: {}, itq: {seed: 1}, lsh: {seed: 2}}"
    lsh_jobs = {(step, "lsh", *run_) for step in ("fit", "encode", "evaluate")}
    assert planned(lsh_seed) == lsh_jobs | {("report",), ("all",)}
    model = repo / "work" / "fit" / TEST_DATASET / f"lsh-{TEST_BITS}bits" / "model.pt"
    later = time.time() + 60
    os.utime(model, (later, later))  # newer than the codes made from it
    assert planned() == set()
    assert {("fit", "lsh", *run_), ("encode", "lsh", *run_)} <= planned(forcerun="fit")
