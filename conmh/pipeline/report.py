"""The ``report`` step: the paper's table, regenerated, with figures.

Reads the metrics JSON files written by ``conmh evaluate``, the training logs
and the verification reports, and writes (under ``paths.results``):

* ``table.csv`` / ``table.md`` / ``table.tex``: per dataset and code length,
  mAP@5, 20, 40, 60, 80, 100 (the paper's columns) of ConMH and of the LSH
  and ITQ baselines; for real datasets also the paper's numbers (``paper_table.csv``) and
  ours minus the paper's. Miniatures are labelled ``synthetic`` and never
  compared with the paper.
* ``summary/<dataset>/<method>-<bits>bits.json``: every mAP@K of one run, so
  that ``dvc metrics show`` lists a row per run.
* ``plots/map_at_k.csv`` and ``plots/loss.csv``: the mAP@K curves and the
  training losses in long form, drawn by ``dvc plots show`` with the templates
  in ``.dvc/plots/``.
* ``provenance/``: the configuration used, the verified data files (shape,
  size, sha256), the software versions and machine, and each training run's
  device, precision and time: the Snakemake report shows them as tables.
* ``plots/pr_curve.csv``: precision and recall at every Hamming radius, long form.
* ``figures/map_at_k.png`` (a panel per dataset, a line per code length, ITQ
  dotted, LSH dashed), ``figures/pr_curves.png`` (precision against recall by
  Hamming radius, a panel per dataset and code length), ``figures/per_class.png``
  (each class's mAP@K at the longest code length, classes sorted by ConMH's),
  ``figures/ours_vs_paper.png`` (bars, only when a real dataset is run at the
  paper's code lengths) and ``figures/loss_curves.png`` (only when
  a run was trained): a figure with nothing to show is left out, not drawn
  empty (``figures_of``).
"""

from __future__ import annotations

import json
from importlib import resources
from io import StringIO
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path, write_text_atomic
from .config import METHODS, is_real, released_checkpoint, runs, trained_runs
from .paths import Layout


def paper_table() -> pd.DataFrame:
    """The paper's ConMH mAP@K (docs/reference.md §6), from ``paper_table.csv`` beside this module."""
    text = resources.files(__package__).joinpath("paper_table.csv").read_text(encoding="utf-8")
    return pd.read_csv(StringIO(text))


_PAPER_TABLE = paper_table()
_PAPER_COLUMNS = [c for c in _PAPER_TABLE.columns if c.startswith("mAP@")]
PAPER_KS = tuple(int(c.removeprefix("mAP@")) for c in _PAPER_COLUMNS)
PAPER: dict[tuple[str, int], tuple[float, ...]] = {
    (dataset, int(bits)): tuple(float(v) for v in values)
    for dataset, bits, *values in _PAPER_TABLE[["dataset", "bits", *_PAPER_COLUMNS]].itertuples(index=False)
}
DISPLAY = {"fcvid": "FCVID", "activitynet": "ActivityNet", "yfcc": "YFCC"}
METHOD_DISPLAY = {"conmh": "ConMH", "itq": "ITQ", "lsh": "LSH"}  # the figures' order
ROW_OURS, ROW_PAPER, ROW_DIFF = "ConMH (ours)", "ConMH (paper)", "ours - paper"
ROW_LSH, ROW_ITQ = "LSH (ours)", "ITQ (ours)"
ROW_RELEASED = "ConMH (released checkpoint)"
PER_CLASS_K = 20  # the K of the per-class figure (the largest configured K when 20 is not)
SYNTHETIC_NOTE = (
    "Rows with data = synthetic come from the miniature datasets (seeded synthetic features with the "
    "real file layout). They show that the pipeline works and how ConMH compares with the baselines; they are not "
    "comparable with the paper and are never compared with it."
)


def col(k: int) -> str:
    return f"mAP@{k}"


# --------------------------------------------------------------------------- data


def load_details(paths: list[Path]) -> dict[tuple[str, str, int], dict]:
    """Every metrics file by (dataset, method, bits), read once: mAP@K and the measures beyond it."""
    out = {}
    for path in paths:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
        out[m["dataset"], m["method"], int(m["bits"])] = m
    return out


def long_table(details: dict[tuple[str, str, int], dict]) -> pd.DataFrame:
    """Long table (dataset, method, bits, k, map) of the metrics files' mAP@K."""
    rows = [(d, m, b, int(k), float(v)) for (d, m, b), metrics in details.items() for k, v in metrics["map"].items()]
    return pd.DataFrame(rows, columns=["dataset", "method", "bits", "k", "map"])


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """Long table (dataset, method, bits, k, map) of every metrics file."""
    return long_table(load_details(paths))


def load_logs(logs: dict[tuple[str, int], Path]) -> pd.DataFrame:
    """Long table (dataset, bits, epoch, loss, recon, contrast) of the training logs (empty logs skipped)."""
    frames = []
    for (dataset, bits), path in logs.items():
        path = Path(path)
        if path.exists() and path.stat().st_size:
            df = pd.read_json(path, lines=True)
            frames.append(df.assign(dataset=dataset, bits=bits))
    if not frames:
        return pd.DataFrame(columns=["dataset", "bits", "epoch", "loss", "recon", "contrast"])
    return pd.concat(frames, ignore_index=True)


def build_table(
    long: pd.DataFrame,
    sources: dict[str, str],
    released: set[tuple[str, int]] = frozenset(),
    ks: tuple[int, ...] = PAPER_KS,
) -> pd.DataFrame:
    """The paper's table: a row per dataset x bits x {ours, ITQ, LSH, paper, difference}.

    Datasets keep the order of ``sources``; paper and difference rows appear
    only for real datasets at the paper's code lengths.
    """
    ks = tuple(k for k in ks if k in set(long["k"]))
    wide = long.pivot_table(index=["dataset", "bits", "method"], columns="k", values="map")
    rows = []
    for dataset, source in sources.items():
        real = source == "real"
        for bits in sorted(long.loc[long["dataset"] == dataset, "bits"].unique()):
            bits = int(bits)

            def values(method: str) -> list[float]:
                key = (dataset, bits, method)
                return [wide.loc[key, k] if key in wide.index else float("nan") for k in ks]

            head = {"dataset": DISPLAY[dataset], "data": "real" if real else "synthetic", "bits": bits}
            ours = values("conmh")
            rows.append(
                {
                    **head,
                    "result": ROW_RELEASED if (dataset, bits) in released else ROW_OURS,
                    **dict(zip(map(col, ks), ours)),
                }
            )
            for method, row in (("itq", ROW_ITQ), ("lsh", ROW_LSH)):
                if (dataset, bits, method) in wide.index:  # a baseline that was run
                    rows.append({**head, "result": row, **dict(zip(map(col, ks), values(method)))})
            if real and (dataset, bits) in PAPER:
                paper = dict(zip(PAPER_KS, PAPER[dataset, bits]))
                rows.append({**head, "result": ROW_PAPER, **{col(k): paper[k] for k in ks if k in paper}})
                rows.append(
                    {**head, "result": ROW_DIFF, **{col(k): o - paper[k] for k, o in zip(ks, ours) if k in paper}}
                )
    return pd.DataFrame(rows, columns=["dataset", "data", "bits", "result", *map(col, ks)])


def summary(long: pd.DataFrame, details: dict[tuple[str, str, int], dict]) -> dict[tuple[str, str, int], dict]:
    """{(dataset, method, bits): {"mAP@K": value, ..., "P@r<=2": value}}: one small metrics file per run
    (Layout.summary), so that ``dvc metrics show`` and ``dvc exp show`` list a row per run."""
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for (dataset, method, bits), group in long.sort_values("k").groupby(["dataset", "method", "bits"]):
        key = (dataset, method, int(bits))
        out[key] = {col(int(k)): round(float(v), 6) for k, v in zip(group["k"], group["map"])}
        if "precision_within_radius_2" in details.get(key, {}):
            out[key]["P@r<=2"] = round(float(details[key]["precision_within_radius_2"]), 6)
    return out


def pr_table(details: dict[tuple[str, str, int], dict], sources: dict[str, str]) -> pd.DataFrame:
    """Precision and recall at every Hamming radius, long form (dataset, method, bits, radius, precision,
    recall), for ``dvc plots`` and the figure."""
    rows = [
        (_label(d, sources), METHOD_DISPLAY.get(m, m), b, r, p, rc)
        for d in sources
        for (dd, m, b), metrics in sorted(
            details.items(), key=lambda kv: (kv[0][2], list(METHOD_DISPLAY).index(kv[0][1]))
        )
        if dd == d and "pr_curve" in metrics
        for r, p, rc in zip(*(metrics["pr_curve"][c] for c in ("radius", "precision", "recall")))
    ]
    return pd.DataFrame(rows, columns=["dataset", "method", "bits", "radius", "precision", "recall"])


def per_class_table(details: dict[tuple[str, str, int], dict], sources: dict[str, str], k: int) -> pd.DataFrame:
    """mAP@k of every class that has queries, at each dataset's longest code length (long form: dataset,
    method, class, queries, mAP); ``rank`` orders the classes by ConMH's value, best first."""
    frames = []
    for d in sources:
        runs_of = {(m, b): v for (dd, m, b), v in details.items() if dd == d and "per_class_map" in v}
        if not runs_of:
            continue
        bits = max(b for _, b in runs_of)
        for (m, b), metrics in runs_of.items():
            if b != bits or str(k) not in metrics["per_class_map"]["map"]:
                continue
            per_class = metrics["per_class_map"]
            frames.append(
                pd.DataFrame(
                    {
                        "dataset": f"{_label(d, sources)}, {bits} bits",
                        "method": METHOD_DISPLAY.get(m, m),
                        "class": range(len(per_class["n_queries"])),
                        "queries": per_class["n_queries"],
                        "mAP": [float("nan") if v is None else v for v in per_class["map"][str(k)]],
                    }
                )
            )
    columns = ["dataset", "method", "class", "queries", "mAP", "rank"]
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, ignore_index=True).dropna(subset=["mAP"])
    ours = df[df["method"] == "ConMH"].sort_values(["dataset", "mAP", "class"], ascending=[True, False, True])
    rank = {(d, c): i for d, group in ours.groupby("dataset") for i, c in enumerate(group["class"])}
    df["rank"] = [rank.get((d, c), -1) for d, c in zip(df["dataset"], df["class"])]
    return df[columns]


def curves(long: pd.DataFrame, sources: dict[str, str]) -> pd.DataFrame:
    """mAP@K in long form, labelled for the plot (for ``dvc plots``)."""
    order = {d: i for i, d in enumerate(sources)}
    df = long.assign(order=long["dataset"].map(order)).sort_values(["order", "method", "bits", "k"])
    return pd.DataFrame(
        {
            "dataset": [_label(d, sources) for d in df["dataset"]],
            "method": df["method"].map(METHOD_DISPLAY).fillna(df["method"]).to_numpy(),
            "bits": df["bits"].to_numpy(),
            "k": df["k"].to_numpy(),
            "mAP": df["map"].to_numpy(),
        }
    )


# --------------------------------------------------------------------------- writers


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """mAP columns as text: 3 decimals, differences signed, "-" where a value is missing."""
    diff = table["result"] == ROW_DIFF
    out = table.copy()
    for c in (c for c in table.columns if c.startswith("mAP@")):
        out[c] = ["-" if pd.isna(v) else (f"{v:+.3f}" if d else f"{v:.3f}") for v, d in zip(table[c], diff)]
    return out


def table_notes(table: pd.DataFrame) -> list[str]:
    """What a reader of the table must know: synthetic rows, paper rows."""
    notes = []
    if (table["data"] == "synthetic").any():
        notes.append(SYNTHETIC_NOTE)
    if (table["data"] == "real").any():
        notes.append("For real datasets, 'ConMH (paper)' is the paper's table and 'ours - paper' the difference.")
    return notes


def to_markdown(table: pd.DataFrame) -> str:
    shown = formatted(table)
    align = ["left", "left", "right", "left"] + ["right"] * (len(shown.columns) - 4)
    text = shown.to_markdown(index=False, disable_numparse=True, colalign=align)
    notes = table_notes(table)
    return text + "\n\n" + "\n\n".join(notes) + ("\n" if notes else "")


def to_latex(table: pd.DataFrame) -> str:
    shown = formatted(table).replace({"-": "--"})
    maps = [c for c in table.columns if c.startswith("mAP@")]
    return shown.style.hide(axis="index").to_latex(hrules=True, column_format="lllr" + "r" * len(maps))


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def _label(dataset: str, sources: dict[str, str]) -> str:
    return DISPLAY[dataset] + ("" if sources.get(dataset) == "real" else " (synthetic)")


def figure_map(long: pd.DataFrame, sources: dict[str, str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = long.assign(
        panel=[_label(d, sources) for d in long["dataset"]],
        method=long["method"].map(METHOD_DISPLAY).fillna(long["method"]),
        bits=long["bits"].map(lambda b: f"{b} bits"),
    )
    order = [_label(d, sources) for d in sources if d in set(long["dataset"])]
    bits_order = [f"{b} bits" for b in sorted(long["bits"].unique())]
    grid = sns.relplot(
        data=df,
        kind="line",
        x="k",
        y="map",
        hue="bits",
        hue_order=bits_order,
        style="method",
        style_order=list(METHOD_DISPLAY.values()),
        dashes={"ConMH": "", "ITQ": (1, 1.5), "LSH": (4, 2)},
        markers=True,
        col="panel",
        col_order=order,
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("K", "mAP@K")
    grid.figure.suptitle("mAP@K: ConMH (solid) vs the ITQ (dotted) and LSH (dashed) baselines", y=1.04)
    _save(grid.figure, path)
    plt.close(grid.figure)


def figure_pr(pr: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = sns.relplot(
        data=pr.assign(bits=pr["bits"].map(lambda b: f"{b} bits")),
        kind="line",
        x="recall",
        y="precision",
        hue="method",
        hue_order=[m for m in METHOD_DISPLAY.values() if m in set(pr["method"])],
        sort=False,  # in order of radius, as the table lists them
        estimator=None,  # every point as it is: several radii can share a recall, and must not be averaged
        marker=".",
        col="dataset",
        row="bits",
        height=2.6,
        aspect=1.15,
    )
    grid.set_titles("{col_name}, {row_name}")
    grid.figure.suptitle("Precision against recall, a point per Hamming radius r = 0 .. bits", y=1.02)
    _save(grid.figure, path)
    plt.close(grid.figure)


def figure_per_class(per_class: pd.DataFrame, k: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = sns.relplot(
        data=per_class[per_class["rank"] >= 0],
        kind="line",
        x="rank",
        y="mAP",
        hue="method",
        hue_order=[m for m in METHOD_DISPLAY.values() if m in set(per_class["method"])],
        marker="o" if per_class["rank"].max() < 50 else None,
        col="dataset",
        height=3.0,
        aspect=1.2,
        facet_kws={"sharex": False},
    )
    from matplotlib.ticker import MaxNLocator

    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    grid.set_titles("{col_name}")
    grid.set_axis_labels("class, by ConMH's mAP (best first)", f"mAP@{k} of the class's queries")
    grid.figure.suptitle(f"Per-class mAP@{k} at the longest code length", y=1.04)
    _save(grid.figure, path)
    plt.close(grid.figure)


def figure_paper(long: pd.DataFrame, sources: dict[str, str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = []
    for (dataset, bits), values in PAPER.items():
        if sources.get(dataset) != "real":
            continue
        ours = long[(long["dataset"] == dataset) & (long["bits"] == bits) & (long["method"] == "conmh")]
        ours = dict(zip(ours["k"], ours["map"]))
        for k, paper in zip(PAPER_KS, values):
            if k in ours:
                rows += [
                    {"dataset": DISPLAY[dataset], "bits": f"{bits} bits", "K": k, "who": "ours", "mAP": ours[k]},
                    {"dataset": DISPLAY[dataset], "bits": f"{bits} bits", "K": k, "who": "paper", "mAP": paper},
                ]
    if not rows:
        raise ValueError("no real-data result at the paper's code lengths and K: figures_of() leaves this figure out")
    df = pd.DataFrame(rows)
    grid = sns.catplot(
        data=df,
        kind="bar",
        x="K",
        y="mAP",
        hue="who",
        hue_order=["ours", "paper"],
        col="bits",
        row="dataset",
        height=2.8,
        aspect=1.2,
        sharey="row",
    )
    grid.set_titles("{row_name}, {col_name}")
    grid.figure.suptitle("ConMH: this reproduction vs the paper's table", y=1.02)
    _save(grid.figure, path)
    plt.close(grid.figure)


def figure_loss(logs: pd.DataFrame, sources: dict[str, str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    if logs.empty:
        raise ValueError("no training logs: figures_of() leaves this figure out")
    parts = [c for c in ("loss", "recon", "contrast") if c in logs.columns]
    df = logs.melt(id_vars=["dataset", "bits", "epoch"], value_vars=parts, var_name="term", value_name="value")
    df["panel"] = [_label(d, sources) for d in df["dataset"]]
    df["bits"] = df["bits"].map(lambda b: f"{b} bits")
    order = [_label(d, sources) for d in sources if d in set(logs["dataset"])]
    grid = sns.relplot(
        data=df,
        kind="line",
        x="epoch",
        y="value",
        hue="bits",
        marker="o",
        row="term",
        row_order=parts,
        col="panel",
        col_order=order,
        height=2.4,
        aspect=1.3,
        facet_kws={"sharey": False, "sharex": "col"},
    )
    grid.set_titles("{col_name}: {row_name}")
    from matplotlib.ticker import MaxNLocator

    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    grid.figure.suptitle("Training loss per epoch (loss = recon + alpha * contrast)", y=1.02)
    _save(grid.figure, path)
    plt.close(grid.figure)


# --------------------------------------------------------------------------- provenance


def figures_of(cfg: dict) -> tuple[str, ...]:
    """The figures a run draws. A figure with nothing to show is left out (the report says why):
    ours_vs_paper needs a real dataset at one of the paper's code lengths and K values; loss_curves
    needs a trained run."""
    compared = any(is_real(cfg, d) and (d, b) in PAPER and set(cfg["ks"]) & set(PAPER_KS) for d, b in runs(cfg))
    return (
        ("map_at_k", "pr_curves", "per_class")
        + (("ours_vs_paper",) if compared else ())
        + (("loss_curves",) if trained_runs(cfg) else ())
    )


def loss_table(logs: pd.DataFrame, sources: dict[str, str]) -> pd.DataFrame:
    """The training losses in long form (for ``dvc plots``): dataset, bits, epoch, loss, recon, contrast."""
    columns = ["dataset", "bits", "epoch", "loss", "recon", "contrast"]
    if logs.empty:
        return pd.DataFrame(columns=columns)
    df = logs.assign(dataset=[_label(d, sources) for d in logs["dataset"]])
    return df[columns].sort_values(["dataset", "bits", "epoch"], kind="stable")


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
                    "source": cfg[d]["source"],
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

    from ..device import cpu_model

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


# --------------------------------------------------------------------------- the step


def write_report(cfg: dict) -> None:
    """Every report file of the configured runs (Layout.report_files, the summaries), from their metrics,
    training logs and verification reports."""
    import matplotlib

    matplotlib.use("Agg")
    lay = Layout.of(cfg)
    files = {name: Path(path) for name, path in lay.report_files(figures_of(cfg)).items()}
    sources = {d: cfg[d]["source"] for d in cfg["datasets"]}
    released = {(d, b) for d, b in runs(cfg) if released_checkpoint(cfg, d, b) is not None}
    logs = load_logs({(d, b): Path(lay.train_log(d, b)) for d, b in trained_runs(cfg)})
    metric_files = [Path(lay.metrics(m, d, b)) for d, b in runs(cfg) for m in METHODS]
    details = load_details(metric_files)
    long = long_table(details)
    table = build_table(long, sources, released)
    markdown = to_markdown(table)
    csv = {"float_format": "%.6f", "index": False}
    write_text_atomic(files["table_csv"], table.to_csv(**csv))
    write_text_atomic(files["table_md"], markdown)
    write_text_atomic(files["table_tex"], to_latex(table))
    for (dataset, method, bits), values in summary(long, details).items():
        write_text_atomic(lay.summary(method, dataset, bits), json.dumps(values, indent=1) + "\n")
    write_text_atomic(files["curves"], curves(long, sources).to_csv(**csv))
    write_text_atomic(files["loss"], loss_table(logs, sources).to_csv(**csv))
    pr = pr_table(details, sources)
    write_text_atomic(files["pr"], pr.to_csv(**csv))
    provenance = {
        "runtimes": (
            "Training runs",
            "Device, processes, precision, epochs and time of each trained run.",
            runtimes_table(logs),
        ),
        "data": ("Data", "Every file the verify step checked.", data_table(cfg)),
        "software": (
            "Software and machine",
            "What made these results, and the machine that wrote this page.",
            software_table(),
        ),
        "configuration": (
            "Configuration",
            "config.yaml with any --config values applied, one row per key.",
            configuration_table(cfg),
        ),
    }
    for name, (_, _, frame) in provenance.items():
        write_text_atomic(files[name], frame.to_csv(index=False))
    write_text_atomic(files["provenance_html"], html_page("How these results were made", list(provenance.values())))
    write_text_atomic(files["table_html"], html_page("mAP@K", [("", " ".join(table_notes(table)), formatted(table))]))
    figure_map(long, sources, files["fig_map_at_k"])
    figure_pr(pr, files["fig_pr_curves"])
    k = PER_CLASS_K if PER_CLASS_K in cfg["ks"] else max(cfg["ks"])
    figure_per_class(per_class_table(details, sources, k), k, files["fig_per_class"])
    if "fig_ours_vs_paper" in files:
        figure_paper(long, sources, files["fig_ours_vs_paper"])
    if "fig_loss_curves" in files:
        figure_loss(logs, sources, files["fig_loss_curves"])
    print(markdown)
