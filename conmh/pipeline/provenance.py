"""The report's provenance: the configuration, the verified data files, the software and machine, and
each training run's device, precision and time, as tables and one HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .config import is_real
from .paths import Layout


def configuration_table(cfg: dict) -> pd.DataFrame:
    """The configuration the run used, one row per leaf key ("fcvid.recipe.epochs"), sorted by key: the
    same table whether the run read config.yaml (DVC) or Snakemake's checked copy of it."""

    def leaves(node: object, prefix: str) -> list[tuple[str, str]]:
        if isinstance(node, dict) and node:
            return [pair for key, value in node.items() for pair in leaves(value, f"{prefix}{key}.")]
        return [(prefix.rstrip("."), node if isinstance(node, str) else json.dumps(node))]

    return pd.DataFrame(sorted(leaves(cfg, "")), columns=["key", "value"])


def data_table(cfg: dict) -> pd.DataFrame:
    """What ``verify`` checked: every file of every dataset, with its shape, size and sha256."""
    lay = Layout.of(cfg)
    rows = []
    for d in cfg["datasets"]:
        report = json.loads(Path(lay.verify_report(d)).read_text(encoding="utf-8"))
        manifest = json.loads(Path(lay.manifest(d)).read_text(encoding="utf-8"))
        sizes = {f["file"]: f.get("bytes") for f in manifest.get("files", [])}
        for f in report["files"]:
            shape = "x".join(str(n) for n in f.get("shape", []))
            rows.append(
                {
                    "dataset": d,
                    "source": "real" if is_real(d) else "miniature",
                    "folder": report.get("data_dir", ""),
                    "file": f["file"],
                    "key": f.get("key", ""),
                    "shape": shape,
                    "dtype": f.get("dtype", ""),
                    "bytes": sizes.get(f["file"]),
                    "sha256": f.get("sha256", "not computed"),
                }
            )
    return pd.DataFrame(
        rows, columns=["dataset", "source", "folder", "file", "key", "shape", "dtype", "bytes", "sha256"]
    )


def software_table() -> pd.DataFrame:
    """Versions of what made the results, and the machine that wrote the report."""
    import platform
    from importlib import metadata

    from ..machine import cpu_model

    rows = [("python", platform.python_version()), ("platform", platform.platform()), ("cpu", cpu_model())]
    for name in ("conmh", "torch", "numpy", "scipy", "h5py", "pandas", "matplotlib", "seaborn", "snakemake", "dvc"):
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return pd.DataFrame(rows, columns=["component", "version"])


def runtimes_table(logs: pd.DataFrame) -> pd.DataFrame:
    """Per trained run: where it trained, in which precision, how long, how fast (from its training log;
    what an older log did not record shows as missing)."""
    columns = ["dataset", "bits", "device", "processes", "precision", "epochs", "train_seconds", "videos_per_s"]
    if logs.empty:
        return pd.DataFrame(columns=columns)
    logs = logs.reindex(
        columns=sorted(set(logs.columns) | {"device", "world_size", "precision", "seconds", "videos_per_s"})
    )
    rows = []
    for (dataset, bits), run in logs.groupby(["dataset", "bits"], sort=False):
        last = run.iloc[-1]
        rows.append(
            {
                "dataset": dataset,
                "bits": int(bits),
                "device": last["device"],
                "processes": last["world_size"],
                "precision": last["precision"],
                "epochs": int(run["epoch"].max()),
                "train_seconds": round(float(run["seconds"].sum()), 1),
                "videos_per_s": round(float(run["videos_per_s"].mean()), 1),
            }
        )
    return pd.DataFrame(rows, columns=columns)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #1e293b; }}
h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
p {{ max-width: 60em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ padding: 0.25em 0.7em; border-bottom: 1px solid #e2e8f0; text-align: left; }}
th {{ background: #f1f5f9; }} td {{ font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


def html_page(title: str, sections: list[tuple[str, str, pd.DataFrame]]) -> str:
    """One HTML page of tables (heading, a sentence, the table): the Snakemake report shows HTML inline,
    while it only offers CSV files for download."""
    from html import escape

    body = "\n".join(
        (f"<h2>{escape(heading)}</h2>\n" if heading else "")
        + (f"<p>{escape(text)}</p>\n" if text else "")
        + table.to_html(index=False, border=0, na_rep="-", escape=True)
        for heading, text, table in sections
    )
    return _PAGE.format(title=escape(title), body=body)
