"""One definition of the pipeline, shared by the Snakefile and dvc.yaml.

Both workflow engines call the commands built here, so they cannot drift
apart: the Snakefile imports this module and runs ``command(...)`` in its
rules; every DVC stage runs ``python workflow/scripts/steps.py STEP ...``,
which loads ``config.yaml`` and runs the same command. This module also owns
config checking (the JSON schema plus the type conversion that
``snakemake --config`` values need) and the layout of every output path.

Usage (what dvc.yaml calls)::

    python workflow/scripts/steps.py STEP [--dataset D] [--bits B] [--method M] [--config FILE] [--print]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SCRIPTS = "workflow/scripts"
DATASETS = ("fcvid", "activitynet", "yfcc")
STEPS = ("download", "verify", "train", "encode", "lsh", "evaluate", "report")
METHODS = ("conmh", "lsh")
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


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem found."""


# --------------------------------------------------------------------------- config


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _resolve(schema: dict, root: dict) -> dict:
    """Follow local ``$ref`` pointers ("#/$defs/name") of the schema."""
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _convert_scalar(value: str, kind: str | list | None) -> Any:
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" in kinds:
        try:
            return int(value)
        except ValueError:
            pass
    if "number" in kinds:
        try:
            return float(value)
        except ValueError:
            pass
    if "boolean" in kinds and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    return value


def coerce(value: Any, schema: dict, root: dict | None = None) -> Any:
    """Convert strings to the types the schema asks for, recursively.

    ``snakemake --config 'bits=[16,32]'`` parses nested values with YAML's
    BaseLoader, which leaves every scalar a string; mapping keys given as
    numbers (checkpoint bits) become strings too, so that the schema can
    check them. Values that do not convert are left for the schema to refuse.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(value, dict):
        out = {}
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            key = str(key)
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            out[key] = coerce(item, sub, root) if sub else item
        return out
    if isinstance(value, list):
        sub = schema.get("items")
        return [coerce(v, sub, root) if sub else v for v in value]
    if isinstance(value, str):
        return _convert_scalar(value, schema.get("type"))
    return value


def _where(path: Iterator[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def config_problems(cfg: dict) -> list[str]:
    """Every schema violation of ``cfg``, one readable line each (empty when valid)."""
    import jsonschema

    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for err in sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path]):
        lines.append(f"{_where(err.absolute_path)}: {err.message}")
    return lines


def check_config(cfg: dict, source: str = "config.yaml") -> dict:
    """The checked configuration (types converted); ConfigError listing every problem otherwise."""
    cfg = coerce(copy.deepcopy(cfg), load_schema())
    problems = config_problems(cfg)
    if not problems:
        for dataset, runs in cfg["checkpoints"].items():
            for bits in runs:
                if int(bits) not in cfg["bits"]:
                    problems.append(
                        f"checkpoints.{dataset}.{bits}: {bits} bits is not among the code lengths to run "
                        f"(bits: {cfg['bits']})"
                    )
    if problems:
        raise ConfigError(
            f"{source} is not valid ({len(problems)} problem{'s' if len(problems) > 1 else ''}; "
            f"allowed keys and values: {SCHEMA_PATH.relative_to(ROOT)}):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return cfg


def load_config(path: str | Path = ROOT / "config.yaml") -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, found {type(raw).__name__}")
    return check_config(raw, str(path))


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Every path the pipeline writes. Arguments may be Snakemake wildcards ("{dataset}")."""

    data: str
    work: str
    results: str
    logs: str

    @classmethod
    def of(cls, cfg: dict) -> "Layout":
        p = cfg["paths"]
        return cls(*(p[k].rstrip("/") for k in ("data", "work", "results", "logs")))

    def miniature_dir(self, dataset: str) -> str:
        return f"{self.data}/miniature/{dataset}"

    def download_done(self, dataset: str) -> str:
        """A flag in the (uncommitted) data folder: a fresh clone, which has the committed
        results but no data, downloads or generates every dataset again."""
        return f"{self.data}/.downloaded/{dataset}"

    def manifest(self, dataset: str) -> str:
        return f"{self.results}/data/{dataset}/download.json"

    def verify_report(self, dataset: str) -> str:
        return f"{self.results}/data/{dataset}/verify.json"

    def train_dir(self, dataset: str, bits: Any) -> str:
        return f"{self.work}/train/{dataset}/{bits}bits"

    def model(self, dataset: str, bits: Any) -> str:
        return f"{self.train_dir(dataset, bits)}/model.pt"

    def train_log(self, dataset: str, bits: Any) -> str:
        return f"{self.results}/train/{dataset}/{bits}bits.jsonl"

    def codes(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.work}/codes/{dataset}/{method}-{bits}bits.h5"

    def metrics(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.results}/metrics/{dataset}/{method}-{bits}bits.json"

    def summary(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.results}/summary/{dataset}/{method}-{bits}bits.json"

    def report_files(self) -> dict[str, str]:
        r = self.results
        return {
            "table_csv": f"{r}/table.csv",
            "table_md": f"{r}/table.md",
            "table_tex": f"{r}/table.tex",
            "curves": f"{r}/plots/map_at_k.csv",
            "fig_map": f"{r}/figures/map_at_k.png",
            "fig_paper": f"{r}/figures/ours_vs_paper.png",
            "fig_loss": f"{r}/figures/loss_curves.png",
        }

    def log(self, step: str, name: str) -> str:
        return f"{self.logs}/{step}/{name}.log"

    def benchmark(self, step: str, name: str) -> str:
        return f"{self.logs}/benchmarks/{step}/{name}.tsv"


# --------------------------------------------------------------------------- per-run settings


def is_real(cfg: dict, dataset: str) -> bool:
    return cfg[dataset]["source"] == "real"


def data_dir(cfg: dict, dataset: str) -> str:
    """Where the dataset's files are read from: the miniature folder or the configured real folder."""
    if is_real(cfg, dataset):
        return cfg[dataset]["data_dir"]
    return Layout.of(cfg).miniature_dir(dataset)


def recipe(cfg: dict, dataset: str) -> dict:
    """The training recipe of ``dataset``: the paper's values, with the miniature overrides for miniatures."""
    out = dict(cfg[dataset]["recipe"])
    if not is_real(cfg, dataset):
        out.update(cfg["miniature"]["train"])
    return out


def preset(cfg: dict, dataset: str) -> str:
    return cfg["preset"] if is_real(cfg, dataset) else cfg["miniature"]["preset"]


def device(cfg: dict, dataset: str) -> str:
    return cfg["device"] if is_real(cfg, dataset) else cfg["miniature"]["device"]


def uses_gpu(cfg: dict, dataset: str) -> bool:
    """Whether a train/encode job of ``dataset`` should hold a GPU (declared as a Snakemake resource)."""
    return device(cfg, dataset) != "cpu" and is_real(cfg, dataset)


def world_size(cfg: dict) -> int:
    return cfg["distributed"]["nproc_per_node"] * cfg["distributed"]["nnodes"]


def train_gpus(cfg: dict, dataset: str) -> int:
    """GPUs a training job holds: one per process (all nodes together)."""
    return world_size(cfg) if uses_gpu(cfg, dataset) else 0


def released_checkpoint(cfg: dict, dataset: str, bits: Any) -> str | None:
    """The authors' checkpoint configured for this run, or None when the pipeline trains it."""
    return cfg["checkpoints"].get(dataset, {}).get(str(bits))


def runs(cfg: dict) -> list[tuple[str, int]]:
    return [(d, b) for d in cfg["datasets"] for b in cfg["bits"]]


def trained_runs(cfg: dict) -> list[tuple[str, int]]:
    return [(d, b) for d, b in runs(cfg) if released_checkpoint(cfg, d, b) is None]


def model_for(cfg: dict, dataset: str, bits: Any) -> str:
    """The weights that `encode` reads: a released checkpoint, or the pipeline's own model."""
    return released_checkpoint(cfg, dataset, bits) or Layout.of(cfg).model(dataset, bits)


# --------------------------------------------------------------------------- commands


def command(cfg: dict, step: str, dataset: str | None = None, bits: int | None = None, *,
            dvc: bool = False) -> list[str]:
    """The argv of one job. ``train`` and ``encode`` take ``--threads N`` appended by the caller.

    ``dvc=True`` only changes ``train`` for a run with a released checkpoint: DVC
    cannot drop a stage from its matrix, so its train stage copies the
    checkpoint into place instead of training (Snakemake skips the job).
    """
    lay = Layout.of(cfg)
    if step == "report":
        return report_command(cfg)
    if dataset is None:
        raise ValueError(f"step {step!r} needs a dataset")
    ddir = data_dir(cfg, dataset)
    if step == "download":
        argv = ["python", f"{SCRIPTS}/download.py", "--dataset", dataset, "--data-dir", ddir,
                "--manifest", lay.manifest(dataset), "--source", cfg[dataset]["source"]]
        if is_real(cfg, dataset):
            for name, url in sorted(cfg[dataset]["mirrors"].items()):
                argv += ["--mirror", f"{name}={url}"]
            for name, digest in sorted(cfg[dataset]["sha256"].items()):
                argv += ["--sha256", f"{name}={digest.lower()}"]
        else:
            argv += ["--seed", str(cfg["miniature"]["seed"])]
            for key, value in sorted(cfg["miniature"]["sizes"].get(dataset, {}).items()):
                argv += ["--size", f"{key}={value}"]
        return argv
    if step == "verify":
        argv = ["conmh", "verify", dataset, ddir, "--report", lay.verify_report(dataset)]
        if is_real(cfg, dataset):
            argv.append("--real")
        if not cfg["verify_checksums"]:
            argv.append("--no-checksums")
        return argv
    if bits is None:
        raise ValueError(f"step {step!r} needs a code length")
    bits = int(bits)
    if step == "train":
        wrapper = ["python", f"{SCRIPTS}/job.py", "train", "--out-dir", lay.train_dir(dataset, bits),
                   "--log-copy", lay.train_log(dataset, bits)]
        released = released_checkpoint(cfg, dataset, bits)
        if released is not None:
            if not dvc:
                raise ValueError(f"{dataset} {bits} bits uses a released checkpoint: nothing to train")
            return wrapper + ["--import-checkpoint", released]
        if is_real(cfg, dataset) and cfg["resume"]:
            wrapper.append("--resume")
        if uses_gpu(cfg, dataset):
            wrapper.append("--gpu")
        if world_size(cfg) > 1:
            wrapper += ["--nproc-per-node", str(cfg["distributed"]["nproc_per_node"]),
                        "--nnodes", str(cfg["distributed"]["nnodes"])]
        argv = ["conmh", "train", "--dataset", dataset, "--data-dir", ddir, "--bits", str(bits),
                "--out-dir", lay.train_dir(dataset, bits), "--preset", preset(cfg, dataset)]
        for key, value in recipe(cfg, dataset).items():
            argv += [RECIPE_OPTIONS[key], str(value)]
        if is_real(cfg, dataset):
            argv += ["--precision", cfg["precision"]]
            if cfg["activation_checkpointing"]:
                argv.append("--activation-checkpointing")
        argv += ["--device", device(cfg, dataset), "--no-progress"]
        return wrapper + ["--"] + argv
    if step == "encode":
        model = lay.model(dataset, bits) if dvc else model_for(cfg, dataset, bits)
        wrapper = ["python", f"{SCRIPTS}/job.py", "run", "--gpu", "--"] if uses_gpu(cfg, dataset) else []
        argv = ["conmh", "encode", "--checkpoint", model, "--dataset", dataset, "--data-dir", ddir,
                "--out", lay.codes("conmh", dataset, bits), "--preset", preset(cfg, dataset),
                "--bits", str(bits), "--device", device(cfg, dataset), "--no-progress"]
        return wrapper + argv
    if step == "lsh":
        return ["conmh", "lsh", "--dataset", dataset, "--data-dir", ddir, "--bits", str(bits),
                "--out", lay.codes("lsh", dataset, bits), "--seed", str(cfg["lsh_seed"])]
    if step == "evaluate":
        raise ValueError("use evaluate_command(cfg, method, dataset, bits)")
    raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")


def evaluate_command(cfg: dict, method: str, dataset: str, bits: int) -> list[str]:
    lay = Layout.of(cfg)
    return ["conmh", "evaluate", lay.codes(method, dataset, bits), "--out", lay.metrics(method, dataset, bits),
            "--ks", ",".join(str(k) for k in cfg["ks"])]


def report_command(cfg: dict) -> list[str]:
    lay = Layout.of(cfg)
    argv = ["python", f"{SCRIPTS}/report.py", "--out-dir", lay.results]
    for d in cfg["datasets"]:
        argv += ["--source", f"{d}={cfg[d]['source']}"]
    for d, b in runs(cfg):
        for method in METHODS:
            argv += ["--metrics", lay.metrics(method, d, b)]
        if released_checkpoint(cfg, d, b) is None:
            argv += ["--train-log", f"{d}:{b}={lay.train_log(d, b)}"]
        else:
            argv += ["--released", f"{d}:{b}"]
    return argv


def threads_for(cfg: dict, step: str) -> int | None:
    """Torch threads of a step that takes ``--threads`` (DVC runs use the configured number)."""
    return cfg["threads"].get(step) if step in ("train", "encode") else None


def shell(argv: list[str]) -> str:
    return shlex.join(argv)


# --------------------------------------------------------------------------- CLI (dvc.yaml)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--dataset", choices=DATASETS)
    parser.add_argument("--bits", type=int)
    parser.add_argument("--method", choices=METHODS, help="evaluate: which codes")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.step == "evaluate":
        if not (args.method and args.dataset and args.bits):
            parser.error("evaluate needs --method, --dataset and --bits")
        cmd = evaluate_command(cfg, args.method, args.dataset, args.bits)
    else:
        cmd = command(cfg, args.step, args.dataset, args.bits, dvc=True)
        threads = threads_for(cfg, args.step)
        if threads is not None and not (args.step == "train" and "--import-checkpoint" in cmd):
            cmd += ["--threads", str(threads)]
    if args.print:
        print(shell(cmd))
        return 0
    print(f"+ {shell(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
