"""A fresh copy of the repository to run the pipeline in, and the commands that run there."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Never copied: outputs of earlier runs and tool state.
IGNORED = {
    ".git",
    "data",
    "work",
    "results",
    "logs",
    ".snakemake",
    ".pytest_cache",
    ".hypothesis",
    "dvc.lock",
    "report.html",
    "cache",
    "tmp",
    "build",
    ".venv",
    ".ruff_cache",
    ".device",  # the GPU machine's own files (benchmarks/bench_gpu.py copies the repository there)
    ".whl",
}


def copy_repo(dest: Path) -> Path:
    """A fresh copy of the repository's sources (no data, no results, no tool state), with the compiled
    Hamming kernels (``compile_kernels``)."""
    compile_kernels()

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        skip = {n for n in names if n in IGNORED and (n not in ("cache", "tmp") or here.name == ".dvc")}
        return skip | {n for n in names if n.endswith(".egg-info")}

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def copy_workflow(dest: Path) -> Path:
    """The Snakefile, config.yaml and workflow/ alone in ``dest`` (created): enough for ``snakemake`` to plan
    and run the pipeline, whose jobs run the installed ``conmh`` package."""
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "Snakefile", dest / "Snakefile")
    shutil.copy2(ROOT / "config.yaml", dest / "config.yaml")
    shutil.copytree(ROOT / "workflow", dest / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@functools.cache
def compile_kernels() -> None:
    """Compile the Hamming kernels (conmh/kernels.py) into this checkout's numba cache, conmh/__pycache__,
    which ``copy_repo`` copies: a copy's jobs run the copy's conmh (``python -m conmh``), and its first
    ranking would otherwise compile them again, about 15 s of CPU per copy. The pipeline's signatures:
    codes of at most 255 bits, labels as the codes file holds them, both protocols."""
    import tempfile

    import numpy as np

    from conmh.codes import Codes, pack_bits, write_codes
    from conmh.metrics import evaluate_file, map_at_k

    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return pack_bits(rng.random((n, 16)) < 0.5), (rng.random((n, 3)) < 0.5).astype(np.uint8)

    (db, db_labels), (q, q_labels) = split(20), split(5)
    with tempfile.TemporaryDirectory() as tmp:
        for queries in ((q, q_labels), (None, None)):
            codes = Codes(16, "activitynet", "lsh", db, db_labels, *queries)
            write_codes(Path(tmp) / "codes.h5", codes)
            evaluate_file(Path(tmp) / "codes.h5", Path(tmp) / "metrics.json", per_query=Path(tmp) / "ap.csv")
            map_at_k(db, db_labels, *queries, 16)


# The default run (config.yaml), the README's main job: every miniature at every code length, every method.
DEFAULT_DATASETS = ("fcvid-mini", "activitynet-mini", "yfcc-mini")
DEFAULT_BITS = (16, 32, 64)
DEFAULT_METHODS = ("conmh", "itq", "lsh")


# The configuration CI runs end to end (.test/config.yaml: one dataset at one code length, every rule and
# every method, on a small miniature), applied on top of config.yaml as `snakemake --configfile` applies
# it. The default nine-run pipeline runs once (tests/conftest.py `snakemake_run`); the other end-to-end
# runs (DVC, SLURM, the remote) take this one.
TEST_CONFIG = ROOT / ".test" / "config.yaml"


def with_test_config(config: dict) -> dict:
    """config.yaml's content (``config``) with .test/config.yaml applied, merged as Snakemake merges a
    ``--configfile`` into the Snakefile's ``configfile:`` (snakemake.utils.update_config): DVC reads
    config.yaml alone."""
    import copy

    import yaml
    from snakemake.utils import update_config

    merged = copy.deepcopy(config)
    update_config(merged, yaml.safe_load(TEST_CONFIG.read_text()))
    return merged


def _test_run() -> tuple[str, int]:
    import yaml

    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    (dataset,), (bits,) = cfg["datasets"], cfg["bits"]
    return dataset, bits


# The dataset and code length of the .test configuration.
TEST_DATASET, TEST_BITS = _test_run()


def released_checkpoint_config(config: dict, dataset: str, bits: int, path: str) -> dict:
    """config.yaml's content with the released checkpoint ``path`` in place of training that run."""
    return {**config, "checkpoints": {dataset: {bits: path}}}


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def commit_all(repo: Path, message: str) -> None:
    """``git add -A`` and a commit of everything git does not ignore (a ``git init`` first when needed)."""
    steps = ([GIT + ["init", "-q"]] if not (repo / ".git").exists() else []) + [
        GIT + ["add", "-A"],
        GIT + ["commit", "-q", "-m", message],
    ]
    for cmd in steps:
        proc = run(cmd, repo)
        assert proc.returncode == 0, output(proc)


def repo_with_test_config(dest: Path) -> Path:
    """A fresh copy of the repository as a git repository of one commit, its config.yaml that of the .test
    configuration (``with_test_config``): what ``dvc repro`` runs in the DVC tests."""
    import yaml

    repo = copy_repo(dest)
    config = yaml.safe_load((repo / "config.yaml").read_text())
    (repo / "config.yaml").write_text(yaml.safe_dump(with_test_config(config), sort_keys=False))
    commit_all(repo, ".test configuration")
    return repo


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def snakemake(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run(["snakemake", *args], cwd, timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def metrics_of(repo: Path) -> dict[str, dict]:
    """Every metrics file of a run's results, by its path under results/metrics."""
    import json

    return {
        str(p.relative_to(repo / "results" / "metrics")): json.loads(p.read_text())
        for p in sorted((repo / "results" / "metrics").glob("*/*.json"))
    }
