"""The pipeline's configuration: loaded, converted and checked once, then read through small accessors.

``config.yaml`` holds the user's choices; every key is checked against
``config.schema.yaml`` beside this module (unknown keys are refused, every
problem is listed at once). The paper's recipes are not repeated there: a
dataset's ``recipe`` holds only the values the user changes, over
``conmh.recipes.RECIPES``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .paths import Layout

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def load_schema() -> dict:
    """config.schema.yaml with the names it takes from the package: datasets, presets and methods."""
    from .. import methods
    from ..presets import PRESETS

    schema = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
    schema["$defs"]["dataset_name"]["enum"] = list(dataset_names())
    schema["$defs"]["miniature_name"]["enum"] = [d for d in dataset_names() if not is_real(d)]
    schema["$defs"]["preset_name"]["enum"] = list(PRESETS)
    schema["$defs"]["method_name"]["enum"] = methods.names()
    schema["properties"].update({d: {"$ref": "#/$defs/dataset"} for d in dataset_names()})
    return schema


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

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_where(err.absolute_path)}: {err.message}" for err in errors]


def check_config(cfg: dict, source: str = "config.yaml") -> dict:
    """The checked configuration (types converted); ConfigError listing every problem otherwise."""
    cfg = coerce(copy.deepcopy(cfg), load_schema())
    problems = config_problems(cfg)
    if not problems:
        problems += [
            f"options.{m}: missing; give every method of `methods` an entry, {{}} for none (dvc.yaml tracks each)"
            for m in cfg["methods"]
            if m not in cfg["options"]
        ]
        problems += [
            f"{d}: missing; give every dataset of `datasets` a section, e.g. {d}: {{sha256: {{}}, recipe: {{}}}} "
            "(dvc.yaml tracks each)"
            for d in cfg["datasets"]
            if d not in cfg
        ]
        problems += [
            f"{d}.sha256: a miniature is generated, not released: it has no file sums to check; leave it {{}}"
            for d in dataset_names()
            if d in cfg and not is_real(d) and cfg[d]["sha256"]
        ]
        for dataset, by_bits in cfg["checkpoints"].items():
            for bits in by_bits:
                if int(bits) not in cfg["bits"]:
                    problems.append(
                        f"checkpoints.{dataset}.{bits}: {bits} bits is not among the code lengths to run "
                        f"(bits: {cfg['bits']})"
                    )
    if problems:
        raise ConfigError(
            f"{source} is not valid ({len(problems)} problem{'s' if len(problems) > 1 else ''}; "
            f"allowed keys and values: conmh/pipeline/{SCHEMA_PATH.name}):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return cfg


def load_config(path: str | Path = "config.yaml") -> dict:
    """Read and check a configuration file (config.yaml, or the copy a Snakemake run writes)."""
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


# --------------------------------------------------------------------------- dataset names

# A miniature is a dataset of its own name: the layout's name and this suffix ("fcvid-mini"). Its files
# are a seeded synthetic stand-in in the release's layout, generated into its own folder, so that it
# never shares a folder (or a result path) with the real release.
MINIATURE_SUFFIX = "-mini"


def dataset_names() -> tuple[str, ...]:
    """Every dataset the pipeline can run: the paper's three releases, then their miniatures."""
    from ..datasets import DATASETS

    return (*DATASETS, *(d + MINIATURE_SUFFIX for d in DATASETS))


def is_real(dataset: str) -> bool:
    """A released dataset (its files put in place by the user), not a generated miniature."""
    return not dataset.endswith(MINIATURE_SUFFIX)


def layout_of(dataset: str) -> str:
    """The name of the dataset's file layout in conmh.datasets, which the library functions take."""
    return dataset.removesuffix(MINIATURE_SUFFIX)


# --------------------------------------------------------------------------- what reruns a step

# The configuration keys each step's result depends on: changing one reruns the step (Snakemake: the
# rule's params, see step_settings; DVC: the stage's params in dvc.yaml, which a test keeps equal to
# this). "{dataset}" and "{method}" are the job's. The report depends on the whole configuration
# (its provenance lists every key).
STEP_KEYS = {
    "download": ("{dataset}.sha256", "miniature.seed", "miniature.sizes"),
    "verify": ("verify_checksums",),
    "fit": (
        "{dataset}.recipe",
        "miniature.preset",
        "miniature.device",
        "miniature.eval_every",
        "miniature.train",
        "preset",
        "device",
        "precision",
        "activation_checkpointing",
        "deterministic",
        "eval_every",
        "distributed",
        "resume",
        "checkpoints",
        "options.{method}",
    ),
    "encode": (
        "miniature.preset",
        "miniature.device",
        "preset",
        "device",
        "options.{method}",
    ),
    "evaluate": ("ks",),
}


def step_settings(cfg: dict, step: str, dataset: str, method: str = "") -> dict[str, Any]:
    """The values of ``STEP_KEYS[step]`` for one job, by key: a Snakemake rule's params, so that a change
    of another key (``ks``, another method's options) does not rerun the job."""
    out = {}
    for key in STEP_KEYS[step]:
        key = key.format(dataset=dataset, method=method)
        value: Any = cfg
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


# --------------------------------------------------------------------------- what one run uses


def data_dir(cfg: dict, dataset: str) -> str:
    """Where the dataset's files are: ``<paths.data>/<dataset>`` (Layout.data_dir)."""
    return Layout.of(cfg).data_dir(dataset)


def recipe_changes(cfg: dict, dataset: str) -> dict:
    """The recipe values that differ from the paper's (conmh.recipes): the dataset's own, then the
    miniature overrides for a miniature."""
    out = dict(cfg[dataset]["recipe"])
    if not is_real(dataset):
        out.update(cfg["miniature"]["train"])
    return out


def preset(cfg: dict, dataset: str) -> str:
    return cfg["preset"] if is_real(dataset) else cfg["miniature"]["preset"]


def device(cfg: dict, dataset: str) -> str:
    return cfg["device"] if is_real(dataset) else cfg["miniature"]["device"]


def eval_every(cfg: dict, dataset: str) -> int:
    """Evaluate the held-out split every N epochs of training (0: never)."""
    return cfg["eval_every"] if is_real(dataset) else cfg["miniature"]["eval_every"]


def uses_gpu(cfg: dict, dataset: str, method: str = "conmh") -> bool:
    """Whether a fit/encode job of ``method`` on ``dataset`` holds GPUs (a Snakemake resource)."""
    from .. import methods

    return methods.uses_gpu(method) and device(cfg, dataset) != "cpu" and is_real(dataset)


def method_options(cfg: dict, method: str, dataset: str) -> dict:
    """The keyword options of a method's fit and encode: its ``options`` entry; ConMH's are the preset
    and device of the dataset (its recipe reaches the launched ``conmh train`` instead)."""
    if method == "conmh":
        return {"preset": preset(cfg, dataset), "device": device(cfg, dataset)}
    return dict(cfg["options"].get(method, {}))


def world_size(cfg: dict) -> int:
    return cfg["distributed"]["nproc_per_node"] * cfg["distributed"]["nnodes"]


def train_gpus(cfg: dict, dataset: str, method: str = "conmh") -> int:
    """The ``gpu`` resource of a training job on one node: one GPU per process. Snakemake counts it
    (``--resources gpu=N``) and the SLURM plugin asks ``--gpus=N``. 0 on several nodes: see train_gres."""
    if method != "conmh":  # fitted in the job's own process: one GPU where the method uses one
        return int(uses_gpu(cfg, dataset, method))
    single_node = cfg["distributed"]["nnodes"] == 1
    return world_size(cfg) if uses_gpu(cfg, dataset, method) and single_node else 0


def train_gres(cfg: dict, dataset: str, method: str = "conmh") -> str:
    """The ``gres`` resource of a training job on several nodes: ``gpu:<nproc_per_node>``, which SLURM
    grants on each node (``--gres``), so that every node has a GPU per process. ``--gpus=<world size>``
    would let SLURM split them unevenly, and a process's LOCAL_RANK exceed its node's GPUs. "" otherwise.
    (Several nodes run only under SLURM: no local Snakemake run counts these GPUs.)"""
    if method == "conmh" and uses_gpu(cfg, dataset, method) and cfg["distributed"]["nnodes"] > 1:
        return f"gpu:{cfg['distributed']['nproc_per_node']}"
    return ""


def released_checkpoint(cfg: dict, dataset: str, bits: Any) -> str | None:
    """The authors' ConMH checkpoint configured for this run, or None when the pipeline trains it."""
    return cfg["checkpoints"].get(dataset, {}).get(str(bits))


def runs(cfg: dict) -> list[tuple[str, int]]:
    """Every (dataset, bits) of the run: the paper's table has a row (per method) for each."""
    return [(d, b) for d in cfg["datasets"] for b in cfg["bits"]]


def method_runs(cfg: dict) -> list[tuple[str, str, int]]:
    """Every (method, dataset, bits): one set of codes and metrics each."""
    return [(m, d, b) for d, b in runs(cfg) for m in cfg["methods"]]


def fitted_runs(cfg: dict) -> list[tuple[str, str, int]]:
    """The (method, dataset, bits) the pipeline fits: all but the ConMH runs given a released checkpoint."""
    return [(m, d, b) for m, d, b in method_runs(cfg) if not (m == "conmh" and released_checkpoint(cfg, d, b))]


def trained_runs(cfg: dict) -> list[tuple[str, int]]:
    """The (dataset, bits) whose ConMH model the pipeline trains (the report draws their training logs)."""
    return [(d, b) for m, d, b in fitted_runs(cfg) if m == "conmh"]


def write_effective_config(cfg: dict) -> str:
    """Write checked ``cfg`` where a Snakemake run's jobs read it (Layout.effective_config); its path."""
    import hashlib

    from ..atomic import write_text_if_changed

    text = yaml.safe_dump(cfg, sort_keys=True)
    path = Layout.of(cfg).effective_config(hashlib.sha256(text.encode()).hexdigest()[:12])
    write_text_if_changed(path, text)
    return path


def model_for(cfg: dict, method: str, dataset: str, bits: Any) -> str:
    """The model that ``encode`` reads: a released ConMH checkpoint, or the pipeline's own fit."""
    released = released_checkpoint(cfg, dataset, bits) if method == "conmh" else None
    return released or Layout.of(cfg).model(method, dataset, bits)
