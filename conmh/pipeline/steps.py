"""The pipeline's steps: one function per Snakemake rule and per dvc.yaml stage.

Both engines run ``conmh pipeline STEP --dataset D --bits B``, which loads the
configuration and calls the function of the same name here, so they cannot
drift apart. Where a step is a ``conmh`` command (verify, train, encode, lsh, itq,
evaluate), it runs the very command a user would type, printed first with a
``+`` in the job's log, so any step can be repeated by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..atomic import atomic_path, write_text_atomic, write_text_if_changed
from . import download as fetching
from .config import (
    data_dir,
    device,
    is_real,
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

# Recipe keys and the `conmh train` options that set them.
RECIPE_OPTIONS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "mask_ratio": "--mask-ratio",
    "alpha": "--alpha",
    "temperature": "--temperature",
    "tau_plus": "--tau-plus",
    "seed": "--seed",
}


def conmh(argv: list[str]) -> int:
    """Run ``conmh ARGV...`` in this process, as a user would type it; its exit status."""
    from ..cli import main

    print("+ conmh " + " ".join(argv), file=sys.stderr, flush=True)
    return main(argv)


def _threads(threads: int | None) -> list[str]:
    return ["--threads", str(threads)] if threads else []


def download(cfg: dict, dataset: str) -> int:
    """Generate the miniature, or gather and check the real release's files; write the manifest."""
    folder, manifest = Path(data_dir(cfg, dataset)), Path(Layout.of(cfg).manifest(dataset))
    if is_real(cfg, dataset):
        sums = {name: digest.lower() for name, digest in cfg[dataset]["sha256"].items()}
        result = fetching.real(dataset, folder, manifest, cfg[dataset]["mirrors"], sums)
    else:
        sizes = cfg["miniature"]["sizes"].get(dataset, {})
        result = fetching.miniature(dataset, folder, manifest, cfg["miniature"]["seed"], sizes)
    write_text_if_changed(manifest, json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{dataset}: {len(result['files'])} files ready in {folder}", file=sys.stderr)
    return 0


def miniature(cfg: dict, dataset: str) -> int:
    """Generate the dataset's miniature (DVC only: a cached output that its download stage depends on).

    dvc.yaml runs it for every dataset, as a DVC matrix cannot leave out the real ones;
    Snakemake's download step generates a miniature itself.
    """
    folder = Path(Layout.of(cfg).miniature_dir(dataset))
    sizes = cfg["miniature"]["sizes"].get(dataset, {})
    result = fetching.miniature(
        dataset, folder, Path(Layout.of(cfg).manifest(dataset)), cfg["miniature"]["seed"], sizes
    )
    print(f"{dataset}: {len(result['files'])} miniature files in {folder}", file=sys.stderr)
    return 0


def verify(cfg: dict, dataset: str) -> int:
    """Check every file of the dataset against its layout; write the verification report."""
    argv = ["verify", dataset, data_dir(cfg, dataset), "--report", Layout.of(cfg).verify_report(dataset)]
    if is_real(cfg, dataset):
        argv.append("--real")
    if not cfg["verify_checksums"]:
        argv.append("--no-checksums")
    return conmh(argv)


def train_command(cfg: dict, dataset: str, bits: int) -> list[str]:
    """The ``conmh train`` command of one run: the paper's recipe with the configured changes."""
    argv = [
        "conmh",
        "train",
        "--dataset",
        dataset,
        "--data-dir",
        data_dir(cfg, dataset),
        "--bits",
        str(bits),
        "--out-dir",
        Layout.of(cfg).train_dir(dataset, bits),
        "--preset",
        preset(cfg, dataset),
    ]
    for key, value in recipe_changes(cfg, dataset).items():
        argv += [RECIPE_OPTIONS[key], str(value)]
    if is_real(cfg, dataset):
        argv += ["--precision", cfg["precision"]]
        if cfg["activation_checkpointing"]:
            argv.append("--activation-checkpointing")
        if cfg["deterministic"]:
            argv.append("--deterministic")
    return argv + ["--device", device(cfg, dataset), "--no-progress"]


def train(cfg: dict, dataset: str, bits: int, threads: int | None = None) -> int:
    """Train one run in its folder (continuing an identical interrupted run), on free GPUs, under
    torchrun when data-parallel; then copy its log to the results."""
    lay = Layout.of(cfg)
    out_dir, log_copy = Path(lay.train_dir(dataset, bits)), Path(lay.train_log(dataset, bits))
    released = released_checkpoint(cfg, dataset, bits)
    if released is not None:
        return use_released(Path(released), out_dir, log_copy)
    nproc, nnodes = cfg["distributed"]["nproc_per_node"], cfg["distributed"]["nnodes"]
    cmd = train_command(cfg, dataset, bits) + _threads(threads)
    launch_command(cmd, nproc, nnodes, dict(os.environ))  # refuse a bad launch before touching the folder
    if prepare_train_dir(out_dir, cmd, is_real(cfg, dataset) and cfg["resume"], world_size(cfg)):
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


def encode(cfg: dict, dataset: str, bits: int, threads: int | None = None) -> int:
    """Encode the database and queries with the run's model (on a free GPU for real data)."""
    argv = [
        "encode",
        "--checkpoint",
        model_for(cfg, dataset, bits),
        "--dataset",
        dataset,
        "--data-dir",
        data_dir(cfg, dataset),
        "--out",
        Layout.of(cfg).codes("conmh", dataset, bits),
        "--preset",
        preset(cfg, dataset),
        "--bits",
        str(bits),
        "--device",
        device(cfg, dataset),
        "--no-progress",
        *_threads(threads),
    ]
    with on_free_gpus(1 if uses_gpu(cfg, dataset) else 0):
        return conmh(argv)


def _baseline(cfg: dict, method: str, dataset: str, bits: int) -> int:
    """``conmh lsh`` or ``conmh itq``: a baseline's codes, seeded by ``<method>_seed``."""
    return conmh(
        [
            method,
            "--dataset",
            dataset,
            "--data-dir",
            data_dir(cfg, dataset),
            "--bits",
            str(bits),
            "--out",
            Layout.of(cfg).codes(method, dataset, bits),
            "--seed",
            str(cfg[f"{method}_seed"]),
        ]
    )


def lsh(cfg: dict, dataset: str, bits: int) -> int:
    """The LSH baseline's codes."""
    return _baseline(cfg, "lsh", dataset, bits)


def itq(cfg: dict, dataset: str, bits: int) -> int:
    """The ITQ baseline's codes."""
    return _baseline(cfg, "itq", dataset, bits)


def evaluate(cfg: dict, method: str, dataset: str, bits: int) -> int:
    """mAP@K (for the configured K values), precision and recall by Hamming radius and per-class mAP@K of
    one codes file; every query's AP@K beside it."""
    lay = Layout.of(cfg)
    return conmh(
        [
            "evaluate",
            lay.codes(method, dataset, bits),
            "--out",
            lay.metrics(method, dataset, bits),
            "--ks",
            ",".join(str(k) for k in cfg["ks"]),
            "--per-query",
            lay.per_query(method, dataset, bits),
        ]
    )


def report(cfg: dict) -> int:
    """The paper's table, the per-run summaries and the figures."""
    from .report import write_report

    write_report(cfg)
    return 0
