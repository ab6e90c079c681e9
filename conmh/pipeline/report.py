"""The ``report`` step: the paper's table, regenerated, with figures.

Reads the metrics JSON files written by ``conmh evaluate`` and the training
logs, and writes (under ``paths.results``):

* ``table.csv`` / ``table.md`` / ``table.tex``: per dataset and code length,
  mAP@5, 20, 40, 60, 80, 100 (the paper's columns) of ConMH and of the LSH
  baseline; for real datasets also the paper's numbers (``paper_table.csv``) and
  ours minus the paper's. Miniatures are labelled ``synthetic`` and never
  compared with the paper.
* ``summary/<dataset>/<method>-<bits>bits.json``: every mAP@K of one run, so
  that ``dvc metrics show`` lists a row per run.
* ``plots/map_at_k.csv``: the mAP@K curves in long form (dataset, method,
  bits, k, mAP), drawn by ``dvc plots show`` with ``.dvc/plots/map_at_k.json``.
* ``figures/map_at_k.png`` (a panel per dataset, a line per code length, LSH
  dashed), ``figures/ours_vs_paper.png`` (bars; a placeholder saying why when
  there are no real-data results) and ``figures/loss_curves.png``.
"""

from __future__ import annotations

import json
from importlib import resources
from io import StringIO
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path, write_text_atomic
from .config import METHODS, released_checkpoint, runs, trained_runs
from .paths import Layout


def paper_table() -> pd.DataFrame:
    """The paper's ConMH mAP@K (docs/reference.md §6), from ``paper_table.csv`` beside this module."""
    text = resources.files(__package__).joinpath("paper_table.csv").read_text(encoding="utf-8")
    return pd.read_csv(StringIO(text))


_PAPER_COLUMNS = [c for c in paper_table().columns if c.startswith("mAP@")]
PAPER_KS = tuple(int(c.removeprefix("mAP@")) for c in _PAPER_COLUMNS)
PAPER: dict[tuple[str, int], tuple[float, ...]] = {
    (dataset, int(bits)): tuple(float(v) for v in values)
    for dataset, bits, *values in paper_table()[["dataset", "bits", *_PAPER_COLUMNS]].itertuples(index=False)
}
DISPLAY = {"fcvid": "FCVID", "activitynet": "ActivityNet", "yfcc": "YFCC"}
METHOD_DISPLAY = {"conmh": "ConMH", "lsh": "LSH"}
ROW_OURS, ROW_LSH, ROW_PAPER, ROW_DIFF = "ConMH (ours)", "LSH (ours)", "ConMH (paper)", "ours - paper"
ROW_RELEASED = "ConMH (released checkpoint)"
SYNTHETIC_NOTE = (
    "Rows with data = synthetic come from the miniature datasets (seeded synthetic features with the "
    "real file layout). They show that the pipeline works and that training beats LSH; they are not "
    "comparable with the paper and are never compared with it."
)


def col(k: int) -> str:
    return f"mAP@{k}"


# --------------------------------------------------------------------------- data


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """Long table (dataset, method, bits, k, map) of every metrics file."""
    rows = []
    for path in paths:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
        for k, value in m["map"].items():
            rows.append(
                {
                    "dataset": m["dataset"],
                    "method": m["method"],
                    "bits": int(m["bits"]),
                    "k": int(k),
                    "map": float(value),
                }
            )
    return pd.DataFrame(rows, columns=["dataset", "method", "bits", "k", "map"])


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
    """The paper's table: a row per dataset x bits x {ours, LSH, paper, difference}.

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
            rows.append({**head, "result": ROW_LSH, **dict(zip(map(col, ks), values("lsh")))})
            if real and (dataset, bits) in PAPER:
                paper = dict(zip(PAPER_KS, PAPER[dataset, bits]))
                rows.append({**head, "result": ROW_PAPER, **{col(k): paper[k] for k in ks if k in paper}})
                rows.append(
                    {**head, "result": ROW_DIFF, **{col(k): o - paper[k] for k, o in zip(ks, ours) if k in paper}}
                )
    return pd.DataFrame(rows, columns=["dataset", "data", "bits", "result", *map(col, ks)])


def summary(long: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{"<dataset>/<method>-<bits>bits": {"mAP@K": value}}: one small metrics file per run."""
    out: dict[str, dict[str, float]] = {}
    for (dataset, method, bits), group in long.sort_values("k").groupby(["dataset", "method", "bits"]):
        out[f"{dataset}/{method}-{bits}bits"] = {
            col(int(k)): round(float(v), 6) for k, v in zip(group["k"], group["map"])
        }
    return out


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


def to_markdown(table: pd.DataFrame) -> str:
    shown = formatted(table)
    align = ["left", "left", "right", "left"] + ["right"] * (len(shown.columns) - 4)
    text = shown.to_markdown(index=False, disable_numparse=True, colalign=align)
    notes = []
    if (table["data"] == "synthetic").any():
        notes.append(SYNTHETIC_NOTE)
    if (table["data"] == "real").any():
        notes.append("For real datasets, 'ConMH (paper)' is the paper's table and 'ours - paper' the difference.")
    return text + "\n\n" + "\n\n".join(notes) + ("\n" if notes else "")


def to_latex(table: pd.DataFrame) -> str:
    shown = formatted(table).replace({"-": "--"})
    maps = [c for c in table.columns if c.startswith("mAP@")]
    return shown.style.hide(axis="index").to_latex(hrules=True, column_format="lllr" + "r" * len(maps))


def write_tables(table: pd.DataFrame, out_dir: Path) -> None:
    write_text_atomic(out_dir / "table.csv", table.to_csv(index=False, float_format="%.6f"))
    write_text_atomic(out_dir / "table.md", to_markdown(table))
    write_text_atomic(out_dir / "table.tex", to_latex(table))


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def _placeholder(path: Path, text: str) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 2.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    _save(fig, path)
    plt.close(fig)


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
        style_order=["ConMH", "LSH"],
        dashes={"ConMH": "", "LSH": (4, 2)},
        markers=True,
        col="panel",
        col_order=order,
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("K", "mAP@K")
    grid.figure.suptitle("mAP@K: ConMH (solid) vs LSH baseline (dashed)", y=1.04)
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
        _placeholder(
            path,
            "No real-data results yet: the runs so far use synthetic miniature datasets,\n"
            "which are never compared with the paper. Set <dataset>.source: real to fill this figure.",
        )
        return
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
        _placeholder(path, "No training logs: every run used a released checkpoint.")
        return
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


# --------------------------------------------------------------------------- the step


def write_report(cfg: dict) -> None:
    """Every report file of the configured runs (Layout.report_files, the summaries), from their metrics
    and training logs."""
    import matplotlib

    matplotlib.use("Agg")
    lay = Layout.of(cfg)
    sources = {d: cfg[d]["source"] for d in cfg["datasets"]}
    released = {(d, b) for d, b in runs(cfg) if released_checkpoint(cfg, d, b) is not None}
    logs = {(d, b): Path(lay.train_log(d, b)) for d, b in trained_runs(cfg)}
    long = load_metrics([Path(lay.metrics(m, d, b)) for d, b in runs(cfg) for m in METHODS])
    table = build_table(long, sources, released)
    out = Path(lay.results)
    write_tables(table, out)
    for run, values in summary(long).items():
        write_text_atomic(out / "summary" / f"{run}.json", json.dumps(values, indent=1) + "\n")
    write_text_atomic(out / "plots" / "map_at_k.csv", curves(long, sources).to_csv(index=False, float_format="%.6f"))
    figure_map(long, sources, out / "figures" / "map_at_k.png")
    figure_paper(long, sources, out / "figures" / "ours_vs_paper.png")
    figure_loss(load_logs(logs), sources, out / "figures" / "loss_curves.png")
    print(to_markdown(table))
