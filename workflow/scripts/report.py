"""The ``report`` step: the paper's table, regenerated, with figures.

Reads the metrics JSON files written by ``conmh evaluate`` and the training
logs, and writes (under ``--out-dir``):

* ``table.csv`` / ``table.md`` / ``table.tex``: per dataset and code length,
  mAP@5, 20, 40, 60, 80, 100 (the paper's columns) of ConMH and of the LSH
  baseline; for real datasets also the paper's numbers (docs/reference.md §6) and
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

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

PAPER_KS = (5, 20, 40, 60, 80, 100)
# docs/reference.md §6: ConMH, mAP@5, 20, 40, 60, 80, 100.
PAPER: dict[tuple[str, int], tuple[float, ...]] = {
    ("fcvid", 16): (0.350, 0.252, 0.216, 0.196, 0.181, 0.169),
    ("fcvid", 32): (0.476, 0.332, 0.287, 0.263, 0.245, 0.230),
    ("fcvid", 64): (0.524, 0.373, 0.326, 0.301, 0.283, 0.267),
    ("activitynet", 16): (0.156, 0.081, 0.050, 0.036, 0.029, 0.024),
    ("activitynet", 32): (0.229, 0.124, 0.075, 0.054, 0.042, 0.035),
    ("activitynet", 64): (0.267, 0.150, 0.092, 0.066, 0.051, 0.042),
    ("yfcc", 16): (0.225, 0.146, 0.122, 0.113, 0.108, 0.104),
    ("yfcc", 32): (0.346, 0.185, 0.150, 0.136, 0.129, 0.123),
    ("yfcc", 64): (0.369, 0.195, 0.158, 0.144, 0.135, 0.130),
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
            rows.append({"dataset": m["dataset"], "method": m["method"], "bits": int(m["bits"]),
                         "k": int(k), "map": float(value)})
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


def build_table(long: pd.DataFrame, sources: dict[str, str], released: set[tuple[str, int]] = frozenset(),
                ks: tuple[int, ...] = PAPER_KS) -> pd.DataFrame:
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
            rows.append({**head, "result": ROW_RELEASED if (dataset, bits) in released else ROW_OURS,
                         **dict(zip(map(col, ks), ours))})
            rows.append({**head, "result": ROW_LSH, **dict(zip(map(col, ks), values("lsh")))})
            if real and (dataset, bits) in PAPER:
                paper = dict(zip(PAPER_KS, PAPER[dataset, bits]))
                rows.append({**head, "result": ROW_PAPER, **{col(k): paper[k] for k in ks if k in paper}})
                rows.append({**head, "result": ROW_DIFF,
                             **{col(k): o - paper[k] for k, o in zip(ks, ours) if k in paper}})
    return pd.DataFrame(rows, columns=["dataset", "data", "bits", "result", *map(col, ks)])


def summary(long: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{"<dataset>/<method>-<bits>bits": {"mAP@K": value}}: one small metrics file per run."""
    out: dict[str, dict[str, float]] = {}
    for (dataset, method, bits), group in long.sort_values("k").groupby(["dataset", "method", "bits"]):
        out[f"{dataset}/{method}-{bits}bits"] = {col(int(k)): round(float(v), 6)
                                                 for k, v in zip(group["k"], group["map"])}
    return out


def curves(long: pd.DataFrame, sources: dict[str, str]) -> pd.DataFrame:
    """mAP@K in long form, labelled for the plot (for ``dvc plots``)."""
    order = {d: i for i, d in enumerate(sources)}
    df = long.assign(order=long["dataset"].map(order)).sort_values(["order", "method", "bits", "k"])
    return pd.DataFrame({"dataset": [_label(d, sources) for d in df["dataset"]],
                         "method": df["method"].map(METHOD_DISPLAY).fillna(df["method"]).to_numpy(),
                         "bits": df["bits"].to_numpy(), "k": df["k"].to_numpy(), "mAP": df["map"].to_numpy()})


# --------------------------------------------------------------------------- writers


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    _atomic(out_dir / "table.csv", table.to_csv(index=False, float_format="%.6f"))
    _atomic(out_dir / "table.md", to_markdown(table))
    _atomic(out_dir / "table.tex", to_latex(table))


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, path)


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

    df = long.assign(panel=[_label(d, sources) for d in long["dataset"]],
                     method=long["method"].map(METHOD_DISPLAY).fillna(long["method"]),
                     bits=long["bits"].map(lambda b: f"{b} bits"))
    order = [_label(d, sources) for d in sources if d in set(long["dataset"])]
    bits_order = [f"{b} bits" for b in sorted(long["bits"].unique())]
    grid = sns.relplot(data=df, kind="line", x="k", y="map", hue="bits", hue_order=bits_order, style="method",
                       style_order=["ConMH", "LSH"], dashes={"ConMH": "", "LSH": (4, 2)}, markers=True,
                       col="panel", col_order=order, height=3.2, aspect=1.1, facet_kws={"sharey": False})
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
                rows += [{"dataset": DISPLAY[dataset], "bits": f"{bits} bits", "K": k, "who": "ours", "mAP": ours[k]},
                         {"dataset": DISPLAY[dataset], "bits": f"{bits} bits", "K": k, "who": "paper", "mAP": paper}]
    if not rows:
        _placeholder(path, "No real-data results yet: the runs so far use synthetic miniature datasets,\n"
                           "which are never compared with the paper. Set <dataset>.source: real to fill this figure.")
        return
    df = pd.DataFrame(rows)
    grid = sns.catplot(data=df, kind="bar", x="K", y="mAP", hue="who", hue_order=["ours", "paper"],
                       col="bits", row="dataset", height=2.8, aspect=1.2, sharey="row")
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
    grid = sns.relplot(data=df, kind="line", x="epoch", y="value", hue="bits", marker="o", row="term",
                       row_order=parts, col="panel", col_order=order, height=2.4, aspect=1.3,
                       facet_kws={"sharey": False, "sharex": "col"})
    grid.set_titles("{col_name}: {row_name}")
    from matplotlib.ticker import MaxNLocator

    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    grid.figure.suptitle("Training loss per epoch (loss = recon + alpha * contrast)", y=1.02)
    _save(grid.figure, path)
    plt.close(grid.figure)


# --------------------------------------------------------------------------- CLI


def _run_key(text: str) -> tuple[str, int]:
    dataset, _, bits = text.partition(":")
    return dataset, int(bits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--source", action="append", default=[], metavar="DATASET=miniature|real", required=True)
    parser.add_argument("--metrics", action="append", default=[], type=Path, metavar="FILE", required=True)
    parser.add_argument("--train-log", action="append", default=[], metavar="DATASET:BITS=FILE")
    parser.add_argument("--released", action="append", default=[], metavar="DATASET:BITS",
                        help="runs evaluated from a released checkpoint")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    sources = dict(s.split("=", 1) for s in args.source)
    logs = {_run_key(k): Path(v) for k, v in (t.split("=", 1) for t in args.train_log)}
    released = {_run_key(r) for r in args.released}
    long = load_metrics(args.metrics)
    table = build_table(long, sources, released)
    out = args.out_dir
    write_tables(table, out)
    for run, values in summary(long).items():
        _atomic(out / "summary" / f"{run}.json", json.dumps(values, indent=1) + "\n")
    _atomic(out / "plots" / "map_at_k.csv", curves(long, sources).to_csv(index=False, float_format="%.6f"))
    figure_map(long, sources, out / "figures" / "map_at_k.png")
    figure_paper(long, sources, out / "figures" / "ours_vs_paper.png")
    figure_loss(load_logs(logs), sources, out / "figures" / "loss_curves.png")
    print(to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
