"""The ``conmh`` command: verify, train, encode, lsh, itq, evaluate, search, export.

Exit codes (see ``conmh.errors``): 0 ok, 1 bug, 2 usage, 3 bad input,
4 missing dataset file. Errors a user can cause print one line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .datasets import DATASETS, LAYOUT_NAMES
from .errors import exit_status
from .metrics import KS
from .presets import PAPER_PRESET, PRESETS
from .recipes import OVERRIDABLE, RECIPES, cli_flag

EPILOG = (
    "exit codes: 0 ok, 1 unexpected error, 2 bad usage, 3 bad input (data, checkpoint, codes, config), "
    "4 missing dataset file"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("every K must be a positive integer")
    return ks


def _num(value: float | int) -> str:
    """A recipe value as the paper writes it: 1e-4 rather than 0.0001."""
    if isinstance(value, float) and 0 < abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-")
    return str(value)


def _paper(field: str) -> str:
    """The paper's value of a recipe field (``conmh.recipes``), per dataset where they differ."""
    values = {name: _num(getattr(RECIPES[name], field)) for name in DATASETS}
    if len(set(values.values())) == 1:
        return values[DATASETS[0]]
    return ", ".join(f"{name} {value}" for name, value in values.items())


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        choices=LAYOUT_NAMES,
        help="which layout the data folder follows: an official release (docs/reference.md §2), "
        "or generic for features of other videos (docs/generic.md)",
    )
    p.add_argument(
        "--data-dir", required=True, type=Path, help="folder holding the dataset's feature (.h5) and label (.mat) files"
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="threads of torch and numpy's BLAS (default: theirs)"
    )
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def _add_official_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """What an official checkpoint (which does not record its architecture) needs, and the encoding batch."""
    p.add_argument("--bits", type=_positive_int, help="code length of an official checkpoint")
    p.add_argument(
        "--preset",
        default=PAPER_PRESET,
        choices=tuple(PRESETS),
        help=f"architecture of an official checkpoint (default: {PAPER_PRESET})",
    )
    p.add_argument("--batch-size", type=_positive_int, default=1024, help="videos per forward pass (default: 1024)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conmh",
        description="ConMH self-supervised video hashing (AAAI 2023): train, encode, evaluate.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"conmh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "pipeline", help="one step of the reproduction pipeline, as Snakemake and DVC run it (conmh pipeline --help)"
    )
    p = sub.add_parser(
        "verify",
        help="check a dataset folder against its official layout",
        epilog=EPILOG,
        description="Check every file of a dataset: keys, shapes, dtypes, frame counts, dims, "
        "label rows, finite values; record each file's sha256.",
    )
    p.add_argument("dataset", choices=LAYOUT_NAMES, help="dataset layout to check (generic: docs/generic.md)")
    p.add_argument("data_dir", type=Path, help="folder holding the dataset's files")
    p.add_argument(
        "--real",
        action="store_true",
        help="also require the real release's video counts and feature dims (docs/reference.md §2)",
    )
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of each file")
    p.add_argument("--report", type=Path, help="write the verification report (JSON) here")

    p = sub.add_parser(
        "train",
        help="train ConMH on a dataset's training split",
        epilog=EPILOG,
        description="Train ConMH with the paper's recipe for the dataset (docs/reference.md §4); any "
        "recipe value can be overridden. Writes OUT/checkpoint.pt every epoch, "
        "OUT/train_log.jsonl, and OUT/model.pt after the last epoch. Rerunning the same "
        "command continues an interrupted run.",
    )
    _add_dataset_args(p)
    p.add_argument("--bits", required=True, type=_positive_int, help="code length (the paper: 16, 32, 64)")
    p.add_argument("--out-dir", required=True, type=Path, help="folder for checkpoint, log and final model")
    p.add_argument(
        "--preset",
        default=PAPER_PRESET,
        choices=tuple(PRESETS),
        help=f"encoder size; every paper number uses {PAPER_PRESET} (default: {PAPER_PRESET})",
    )
    for f in OVERRIDABLE:  # the recipe's changeable fields (conmh.recipes), with the paper's values
        paper = f"paper: {_paper(f.name)}"
        if f.name == "lr":
            paper += f"; x{_paper('lr_gamma')} every {_paper('lr_step')} epochs, floor {_paper('lr_min')}"
        value_type = int if f.name == "seed" else _positive_int if f.type == "int" else float
        p.add_argument(cli_flag(f.name), type=value_type, help=f"{f.metadata['help']} ({paper})")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from OUT/checkpoint.pt when it exists, so rerunning the same command after a "
        "crash loses at most one epoch; --no-resume refuses to touch an existing run (default: resume)",
    )
    p.add_argument(
        "--data-mode",
        default="auto",
        choices=["auto", "memory", "stream"],
        help="memory: hold the training array in RAM (or GPU memory on CUDA) in the compute dtype; "
        "stream: read each shuffled batch from HDF5 in a background thread, bounded memory; "
        "auto: memory when it fits (default: auto)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="compute precision: fp32 (as the official code; TF32 off on CUDA), or bf16 autocast "
        "(faster, other rounding, see the README); auto: fp32 on every device (default: auto)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-reproducible GPU training: deterministic kernels and the math attention kernel, so that "
        "a rerun or a resumed run ends with the same weights (its cost on GPUs: benchmarks/README.md; "
        "CPU training is deterministic without it)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the encoder blocks in the backward pass instead of keeping their activations: "
        "less memory for more compute, same weights (figures: benchmarks/README.md)",
    )
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep glibc's malloc defaults; by default, when the training array is held in memory, "
        "freed memory stays in the process between steps, which saves page faults (faster on CPU) "
        "but keeps RSS at its peak (streamed runs always keep the defaults)",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int,
        metavar="N",
        help="after every N-th epoch, encode the held-out split and write its mAP@K into the training log "
        "(as the official code evaluates; costs about one `conmh encode` + `conmh evaluate` each time, "
        "the weights are unchanged)",
    )
    _add_runtime_args(p)

    p = sub.add_parser(
        "encode",
        help="encode a dataset's database and queries to a codes file",
        epilog=EPILOG,
        description="Encode with all frames visible, frame mean, sign (an exact 0 gives +1). "
        "Checkpoints from `conmh train` record their architecture; for the authors' "
        "released checkpoints give --bits (and --preset if not small).",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="model.pt of `conmh train`, or an official .pth")
    _add_dataset_args(p)
    p.add_argument("--out", required=True, type=Path, help="codes file to write (HDF5)")
    _add_official_checkpoint_args(p)
    _add_runtime_args(p)

    p = sub.add_parser("lsh", help="LSH baseline codes: random projection of mean-pooled features", epilog=EPILOG)
    _add_dataset_args(p)
    p.add_argument("--bits", required=True, type=_positive_int, help="code length")
    p.add_argument("--out", required=True, type=Path, help="codes file to write (HDF5)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random hyperplanes (default: 1)")

    p = sub.add_parser(
        "itq",
        help="ITQ baseline codes: PCA and iterative quantization of mean-pooled features",
        epilog=EPILOG,
        description="Iterative quantization (Gong and Lazebnik, CVPR 2011): fitted on up to 20,000 evenly "
        "spaced training videos (mean-pooled, centred, PCA to --bits dims, rotated to minimise the "
        "quantisation loss), then applied to the database and queries. --bits must not exceed the feature dim.",
    )
    _add_dataset_args(p)
    p.add_argument("--bits", required=True, type=_positive_int, help="code length (at most the feature dim)")
    p.add_argument("--out", required=True, type=Path, help="codes file to write (HDF5)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random initial rotation (default: 1)")
    p.add_argument("--iterations", type=int, default=50, help="ITQ iterations (default: 50, as the paper)")

    p = sub.add_parser(
        "evaluate",
        help="mAP@K of a codes file",
        epilog=EPILOG,
        description="Hamming ranking, mAP@K as docs/reference.md §5 defines it; equal distances are "
        "ranked by ascending database index. The metrics file also holds precision and recall by Hamming "
        "radius, precision within radius 2 and per-class mAP@K (docs/measures.md).",
    )
    p.add_argument("codes", type=Path, help="codes file written by `conmh encode`, `conmh lsh` or `conmh itq`")
    p.add_argument("--out", required=True, type=Path, help="metrics file to write (JSON)")
    p.add_argument("--ks", type=_ks, default=KS, help=f"comma-separated cut-offs K (default: {','.join(map(str, KS))})")
    p.add_argument(
        "--per-query",
        type=Path,
        metavar="FILE",
        help="also write each query's AP@K and number of relevant items to FILE (CSV)",
    )
    p.add_argument(
        "--full-ranking",
        action="store_true",
        help="also compute mAP over the whole ranking (sorts every query's distances: slower; docs/measures.md)",
    )

    p = sub.add_parser(
        "search",
        help="top-k Hamming neighbours of queries in a codes file's database",
        epilog=EPILOG,
        description="Exact Hamming search, ranked as `conmh evaluate` ranks (equal distances by ascending "
        "database index). Queries: the codes file's queries (for a queries-are-database file, its database), "
        "all or --query-index; or the videos of --features encoded with --checkpoint. One output row per "
        "(query, rank): query, rank (from 1), database_index, distance, labels (class indices). See docs/search.md.",
    )
    p.add_argument("codes", type=Path, help="codes file whose database is searched")
    p.add_argument("-k", "--k", type=_positive_int, default=max(KS), help=f"neighbours per query (default: {max(KS)})")
    p.add_argument(
        "--query-index",
        help="queries to search: comma-separated indices and START:STOP ranges (stop excluded), e.g. 0,5,7 or "
        "0:100 (default: all); with --features, rows of that file",
    )
    p.add_argument("--features", type=Path, help="HDF5 features (N, frames, dim) of query videos, encoded first")
    p.add_argument("--key", default="feats", help="array of the features file (default: feats)")
    p.add_argument("--checkpoint", type=Path, help="model to encode --features with (as `conmh encode`)")
    _add_official_checkpoint_args(p)
    p.add_argument("--index", type=Path, help="search this faiss index of the database (`conmh export`) instead")
    p.add_argument("--workers", type=_positive_int, help="search threads (default: all usable CPUs)")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    p.add_argument("--out", type=Path, help="file to write (default: standard output)")
    _add_runtime_args(p)
    p.set_defaults(usage_error=p.error)

    p = sub.add_parser(
        "export",
        help="write a codes file's database as a faiss binary index",
        epilog=EPILOG,
        description="A faiss IndexBinaryFlat (d = 8 x bytes per code; padding bits are zero, so distances "
        "equal conmh's) of the database codes, for faiss-based serving. Needs faiss: "
        "pip install 'conmh[search]'.",
    )
    p.add_argument("codes", type=Path, help="codes file written by `conmh encode`, `conmh lsh`, ...")
    p.add_argument("--out", required=True, type=Path, help="faiss index to write (faiss.write_index_binary)")
    return parser


def cmd_verify(args: argparse.Namespace) -> None:
    from .atomic import write_text_atomic
    from .verify import verify_dataset

    report = verify_dataset(args.dataset, args.data_dir, real=args.real, checksums=not args.no_checksums)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
    print(
        f"{args.dataset}: {len(report['files'])} files OK in {args.data_dir} "
        f"({report['frames']} frames x {report['feature_dim']} dims; counts {report['counts']})"
    )


def _init_distributed(device: str) -> bool:
    """Join the process group when started by torchrun (even as its only process: the same code path)."""
    import torch
    import torch.distributed as dist

    if not {"WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys() or dist.is_initialized():
        return False
    if torch.cuda.is_available() and device != "cpu":
        # NCCL only: every collective of the training runs on its GPU (conmh.train)
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")
    return True


def cmd_train(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from .device import set_threads

    set_threads(args.threads)
    joined = _init_distributed(args.device)
    try:
        _train(args)
    finally:
        if joined:
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> None:
    from .features import open_split
    from .model import ModelConfig
    from .recipes import get_recipe
    from .train import held_out_evaluator, train

    recipe = get_recipe(args.dataset).replace(**{f.name: getattr(args, f.name) for f in OVERRIDABLE})
    with open_split(args.dataset, args.data_dir, "train") as feats:
        cfg = ModelConfig.from_preset(args.preset, feature_dim=feats.dim, frames=feats.frames, nbits=args.bits)
        result = train(
            feats,
            cfg,
            recipe,
            args.out_dir,
            device=args.device,
            resume=args.resume,
            progress=not args.no_progress,
            data_mode=args.data_mode,
            precision=args.precision,
            deterministic=args.deterministic,
            activation_checkpointing=args.activation_checkpointing,
            keep_freed_memory=not args.default_allocator,
            meta={"dataset": args.dataset, "preset": args.preset},
            eval_every=args.eval_every or 0,
            evaluate=held_out_evaluator(args.dataset, args.data_dir, args.device) if args.eval_every else None,
        )
    last = result.log[-1] if result.log else {}
    if os.environ.get("RANK", "0") == "0":
        print(
            f"trained {result.epochs_done} epochs -> {result.final_model} "
            f"(final loss {last.get('loss', float('nan')):.4f})"
        )


def cmd_encode(args: argparse.Namespace) -> None:
    from .codes import write_codes
    from .device import set_threads
    from .encode import encode_dataset

    set_threads(args.threads)
    codes = encode_dataset(
        args.checkpoint,
        args.dataset,
        args.data_dir,
        bits=args.bits,
        preset=args.preset,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    write_codes(args.out, codes)
    print(f"{args.dataset}: {len(codes.database)} database codes of {codes.bits} bits -> {args.out}")


def cmd_lsh(args: argparse.Namespace) -> None:
    from .codes import write_codes
    from .methods.lsh import lsh_codes

    codes = lsh_codes(args.dataset, args.data_dir, args.bits, seed=args.seed)
    write_codes(args.out, codes)
    print(f"{args.dataset}: LSH {codes.bits}-bit codes -> {args.out}")


def cmd_itq(args: argparse.Namespace) -> None:
    from .codes import write_codes
    from .methods.itq import itq_codes

    codes = itq_codes(args.dataset, args.data_dir, args.bits, seed=args.seed, n_iter=args.iterations)
    write_codes(args.out, codes)
    print(
        f"{args.dataset}: ITQ {codes.bits}-bit codes ({codes.attrs['train_videos']} training videos, "
        f"{codes.attrs['n_iter']} iterations) -> {args.out}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .metrics import evaluate_file

    tic = time.perf_counter()
    codes, metrics = evaluate_file(
        args.codes, args.out, args.ks, per_query=args.per_query, full_ranking=args.full_ranking
    )
    summary = ", ".join(f"mAP@{k} {metrics['map'][str(k)]:.4f}" for k in args.ks)
    summary += f", P(r<=2) {metrics['precision_within_radius_2']:.4f}"
    if args.full_ranking:
        summary += f", mAP (full ranking) {metrics['map_full_ranking']:.4f}"
    print(f"{codes.dataset} {codes.method} {codes.bits} bits: {summary} ({time.perf_counter() - tic:.1f}s)")


def cmd_search(args: argparse.Namespace) -> None:
    from .atomic import write_text_atomic
    from .search import format_csv, format_json, search_codes_file

    if (args.features is None) != (args.checkpoint is None):
        args.usage_error("--features and --checkpoint go together (the checkpoint encodes the features)")
    if args.bits is not None and args.checkpoint is None:
        args.usage_error("--bits is for an official --checkpoint")
    encode_options = {}
    if args.features is not None:  # torch runs only to encode the query features
        from .device import set_threads

        set_threads(args.threads)
        encode_options = dict(
            key=args.key,
            bits=args.bits,
            preset=args.preset,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    rows, meta = search_codes_file(
        args.codes,
        args.k,
        query_index=args.query_index,
        features=args.features,
        checkpoint=args.checkpoint,
        index=args.index,
        workers=args.workers,
        **encode_options,
    )
    text = format_csv(rows) if args.format == "csv" else format_json(rows, meta)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        print(f"{meta['n_queries']} queries x top {meta['k']} of {meta['n_database']} ({meta['search']}) -> {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from .codes import read_codes
    from .search import write_faiss_index

    codes = read_codes(args.codes)
    write_faiss_index(codes, args.out)
    print(f"{codes.n_database} database codes of {codes.bits} bits -> faiss IndexBinaryFlat {args.out}")


COMMANDS = {
    "verify": cmd_verify,
    "train": cmd_train,
    "encode": cmd_encode,
    "lsh": cmd_lsh,
    "itq": cmd_itq,
    "evaluate": cmd_evaluate,
    "search": cmd_search,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # its own parser (conmh/pipeline/cli.py)
        from .pipeline.cli import main as pipeline_main

        return pipeline_main(argv[1:])
    args = build_parser().parse_args(argv)
    return exit_status(f"conmh {args.command}", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
