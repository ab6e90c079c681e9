"""The pipeline's steps: one function per Snakemake rule and per dvc.yaml stage.

Both engines run ``conmh pipeline STEP --method M --dataset D --bits B``, which
loads the configuration and calls the function of the same name here, so they
cannot drift apart. Each step calls the library functions of its job: a
method's ``fit`` and ``encode`` (conmh.methods), ``write_codes``, ``evaluate_file``.
ConMH's training alone starts a new process: the ``conmh train`` command of
the run, plainly or under torchrun / srun (``launch.py``), printed with a ``+``
in the job's log so it can be repeated by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..atomic import atomic_path, write_text_atomic, write_text_if_changed
from ..checksums import file_sha256
from ..recipes import cli_flag
from . import download as data_files
from .config import (
    data_dir,
    device,
    eval_every,
    is_real,
    layout_of,
    method_options,
    model_for,
    preset,
    recipe_changes,
    released_checkpoint,
    uses_gpu,
    world_size,
)
from .gpus import on_free_gpus
from .launch import launch_command, run_command
from .paths import Layout
from .training_run import prepare_train_dir, write_state


def download(cfg: dict, dataset: str) -> int:
    """Generate the miniature, or check that the real release's files are there; write the manifest."""
    folder, manifest = Path(data_dir(cfg, dataset)), Path(Layout.of(cfg).manifest(dataset))
    if is_real(dataset):
        sums = {name: digest.lower() for name, digest in cfg[dataset]["sha256"].items()}
        result = data_files.real(dataset, folder, manifest, sums)
    else:
        sizes = cfg["miniature"]["sizes"].get(dataset, {})
        result = data_files.miniature(dataset, folder, manifest, cfg["miniature"]["seed"], sizes)
    write_text_if_changed(manifest, json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{dataset}: {len(result['files'])} files ready in {folder}", file=sys.stderr)
    return 0


def miniature(cfg: dict, dataset: str) -> int:
    """Generate a miniature into its folder (DVC only: a cached output, which its download stage depends on;
    DVC cannot have a stage write a folder that is its own dependency). Snakemake's download step
    generates a miniature itself.

    A miniature that ``datasets`` does not list gets an empty folder: dvc.yaml's matrix names every
    miniature, and each of its stages must leave its output."""
    if is_real(dataset):
        from ..errors import ConfigError

        raise ConfigError(
            f"{dataset} is a released dataset, not a miniature: its files are put in place, not generated"
        )
    folder = Path(data_dir(cfg, dataset))
    if dataset not in cfg["datasets"]:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"{dataset}: not in `datasets`, nothing generated in {folder}", file=sys.stderr)
        return 0
    sizes = cfg["miniature"]["sizes"].get(dataset, {})
    result = data_files.miniature(
        dataset, folder, Path(Layout.of(cfg).manifest(dataset)), cfg["miniature"]["seed"], sizes
    )
    print(f"{dataset}: {len(result['files'])} miniature files in {folder}", file=sys.stderr)
    return 0


def verify(cfg: dict, dataset: str) -> int:
    """Check every file of the dataset against its layout; write the verification report."""
    from ..verify import verify_dataset

    folder = data_dir(cfg, dataset)
    report = verify_dataset(layout_of(dataset), folder, real=is_real(dataset), checksums=cfg["verify_checksums"])
    write_text_atomic(Layout.of(cfg).verify_report(dataset), json.dumps(report, indent=2) + "\n")
    print(f"{dataset}: {len(report['files'])} files OK in {folder}", file=sys.stderr)
    return 0


def train_command(cfg: dict, dataset: str, bits: int) -> list[str]:
    """The ``conmh train`` command of one run: the paper's recipe with the configured changes."""
    argv = [
        "conmh",
        "train",
        "--dataset",
        layout_of(dataset),
        "--data-dir",
        data_dir(cfg, dataset),
        "--bits",
        str(bits),
        "--out-dir",
        Layout.of(cfg).fit_dir("conmh", dataset, bits),
        "--preset",
        preset(cfg, dataset),
    ]
    for key, value in recipe_changes(cfg, dataset).items():
        argv += [cli_flag(key), str(value)]
    if eval_every(cfg, dataset):
        argv += ["--eval-every", str(eval_every(cfg, dataset))]
    if is_real(dataset):
        argv += ["--precision", cfg["precision"]]
        if cfg["activation_checkpointing"]:
            argv.append("--activation-checkpointing")
        if cfg["deterministic"]:
            argv.append("--deterministic")
    return argv + ["--device", device(cfg, dataset), "--no-progress"]


def fit(cfg: dict, method: str, dataset: str, bits: int, threads: int | None = None) -> int:
    """Fit one method on the dataset's training split and write its model; ConMH's training is launched
    as its own process (:func:`train`), every other method fits in this one."""
    if method == "conmh":
        return train(cfg, dataset, bits, threads)
    from .. import methods
    from ..device import set_threads

    set_threads(threads)
    lay = Layout.of(cfg)
    model_file = lay.model(method, dataset, bits)
    with on_free_gpus(1 if uses_gpu(cfg, dataset, method) else 0):
        methods.get(method).fit(
            layout_of(dataset), data_dir(cfg, dataset), bits, model_file, **method_options(cfg, method, dataset)
        )
    # No epochs, no loss curve: the log names the model, so that a refit with another result differs.
    write_text_atomic(lay.fit_log(method, dataset, bits), json.dumps({"model_sha256": file_sha256(model_file)}) + "\n")
    print(f"{method} {dataset} {bits} bits: fitted -> {model_file}", file=sys.stderr)
    return 0


def train(cfg: dict, dataset: str, bits: int, threads: int | None = None) -> int:
    """Train one ConMH run in its folder (continuing an identical interrupted run), on free GPUs, under
    torchrun when data-parallel; then copy its log to the results."""
    lay = Layout.of(cfg)
    out_dir, log_copy = Path(lay.fit_dir("conmh", dataset, bits)), Path(lay.fit_log("conmh", dataset, bits))
    released = released_checkpoint(cfg, dataset, bits)
    if released is not None:
        return use_released(Path(released), out_dir, log_copy)
    nproc, nnodes = cfg["distributed"]["nproc_per_node"], cfg["distributed"]["nnodes"]
    cmd = train_command(cfg, dataset, bits) + (["--threads", str(threads)] if threads else [])
    launch_command(cmd, nproc, nnodes, dict(os.environ))  # refuse a bad launch before touching the folder
    if prepare_train_dir(out_dir, cmd, is_real(dataset) and cfg["resume"], world_size(cfg)):
        print(f"job: reusing the checkpoint of the same run in {out_dir}", file=sys.stderr, flush=True)
        cmd.append("--resume")
    gpus_per_node = nproc if uses_gpu(cfg, dataset) else 0
    # Several nodes: SLURM gives each node its GPUs; local locks would only cover the first node.
    with on_free_gpus(gpus_per_node if nnodes == 1 else 0):
        status = run_command(cmd, nproc, nnodes, cpus_per_node=threads, gpus_per_node=gpus_per_node)
    if status == 0:
        write_state(out_dir, cmd, complete=True, world_size=world_size(cfg))
        with atomic_path(log_copy) as tmp:
            shutil.copyfile(out_dir / "train_log.jsonl", tmp)
    return status


def use_released(checkpoint: Path, out_dir: Path, log_copy: Path) -> int:
    """A run with a released checkpoint is not trained: the checkpoint takes the model's place.

    Only ``dvc repro`` calls this (a DVC matrix cannot leave out one of its
    stages); Snakemake encodes the released file directly.
    """
    if not checkpoint.is_file():
        from ..errors import MissingDataError

        raise MissingDataError(f"released checkpoint {checkpoint} does not exist")
    with atomic_path(out_dir / "model.pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    write_text_atomic(log_copy, "")  # no training, no loss curve
    print(f"job: {checkpoint} used as {out_dir / 'model.pt'} (not trained)", file=sys.stderr)
    return 0


def encode(cfg: dict, method: str, dataset: str, bits: int, threads: int | None = None) -> int:
    """Encode the database and queries with the run's fitted model (on a free GPU where the method uses one)."""
    from .. import methods
    from ..codes import write_codes
    from ..device import set_threads

    set_threads(threads)
    model, out = model_for(cfg, method, dataset, bits), Layout.of(cfg).codes(method, dataset, bits)
    with on_free_gpus(1 if uses_gpu(cfg, dataset, method) else 0):
        codes = methods.get(method).encode(
            model, layout_of(dataset), data_dir(cfg, dataset), bits, **method_options(cfg, method, dataset)
        )
    write_codes(out, codes)
    print(
        f"{method} {dataset}: {len(codes.database)} database codes of {bits} bits from {model} -> {out}",
        file=sys.stderr,
    )
    return 0


def evaluate(cfg: dict, method: str, dataset: str, bits: int) -> int:
    """mAP@K (for the configured K values), precision and recall by Hamming radius and per-class mAP@K of
    one codes file; every query's AP@K beside it."""
    from ..metrics import evaluate_file

    lay = Layout.of(cfg)
    _, metrics = evaluate_file(
        lay.codes(method, dataset, bits),
        lay.metrics(method, dataset, bits),
        cfg["ks"],
        per_query=lay.per_query(method, dataset, bits),
    )
    print(f"{method} {dataset} {bits} bits: mAP@K {metrics['map']}", file=sys.stderr)
    return 0


def report(cfg: dict) -> int:
    """The paper's table, the per-run summaries and the figures."""
    from .report import write_report

    write_report(cfg)
    return 0
