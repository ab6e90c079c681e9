"""``conmh pipeline STEP``: one step of the reproduction pipeline, for one method, dataset and code length.

Every Snakemake rule and every dvc.yaml stage runs one of these commands; the
step reads the configuration (``config.yaml`` by default) and calls the
function of the same name in ``conmh.pipeline.steps``::

    conmh pipeline download --dataset fcvid
    conmh pipeline miniature --dataset fcvid-mini   (DVC only)
    conmh pipeline verify   --dataset fcvid
    conmh pipeline fit      --method conmh --dataset fcvid --bits 64 [--threads 8]
    conmh pipeline encode   --method conmh --dataset fcvid --bits 64 [--threads 8]
    conmh pipeline evaluate --method conmh --dataset fcvid --bits 64
    conmh pipeline report

A dataset is a release (fcvid, activitynet, yfcc) or its miniature (fcvid-mini ...).

Exit codes as ``conmh``: 0 ok, 1 bug, 2 usage, 3 bad input or configuration,
4 missing dataset file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import exit_status

STEPS = ("download", "miniature", "verify", "fit", "encode", "evaluate", "report")
NEEDS = {  # the options each step needs
    "download": ("dataset",),
    "miniature": ("dataset",),
    "verify": ("dataset",),
    "fit": ("method", "dataset", "bits"),
    "encode": ("method", "dataset", "bits"),
    "evaluate": ("method", "dataset", "bits"),
    "report": (),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import methods
    from .config import dataset_names

    parser = argparse.ArgumentParser(
        prog="conmh pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--dataset", choices=dataset_names())
    parser.add_argument("--bits", type=int)
    parser.add_argument("--method", choices=methods.names(), help="fit, encode, evaluate: the method (conmh/methods/)")
    parser.add_argument("--threads", type=int, help="fit, encode: torch and BLAS threads (default: config's)")
    parser.add_argument(
        "--config", type=Path, default=Path("config.yaml"), help="configuration file (default: config.yaml)"
    )
    parser.add_argument(
        "--log", type=Path, help="write everything the step prints to this file; shown on stderr if the step fails"
    )
    return parser


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, and its children's, to ``log`` for the duration.

    A job log is a stream, written as the step runs (not through conmh.atomic):
    it is what one reads when a job hangs or dies.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(log, "w", encoding="utf-8", buffering=1) as fh:
        os.dup2(fh.fileno(), 1)  # child processes (torchrun, conmh train)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh  # this process, even where sys.stderr is not fd 2
        try:
            yield
        finally:
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_step(args: argparse.Namespace) -> int:
    from . import steps
    from .config import load_config

    cfg = load_config(args.config)
    step = getattr(steps, args.step)
    if args.step == "report":
        return step(cfg)
    if args.step in ("download", "miniature", "verify"):
        return step(cfg, args.dataset)
    if args.step == "evaluate":
        return step(cfg, args.method, args.dataset, args.bits)
    threads = args.threads or cfg["threads"]["train" if args.step == "fit" else "encode"]
    return step(cfg, args.method, args.dataset, args.bits, threads)


def _run(args: argparse.Namespace) -> int:
    return exit_status(f"conmh pipeline {args.step}", lambda: run_step(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in NEEDS[args.step] if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.step} needs {', '.join(missing)}")
    if args.log is None:
        return _run(args)
    with output_to(args.log):
        status = _run(args)
    if status != 0:
        sys.stderr.write(args.log.read_text(encoding="utf-8", errors="replace"))
    return status
