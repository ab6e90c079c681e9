"""The report's figures (seaborn), each drawn from one of the long tables of ``tables.py``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..atomic import atomic_path
from .paper import PAPER, PAPER_KS, display, label

TRAINING_MAP_K = 20  # the K of the held-out mAP drawn beside the loss (conmh.metrics.KS, evaluated while training)
PER_CLASS_K = 20  # the K of the per-class figure (the largest configured K when 20 is not)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


# Line styles of the mAP@K figure, (dashes, the title's word): ConMH solid, ITQ dotted, LSH dashed;
# other methods OTHER_DASHES in turn.
STYLES = {"conmh": ("", "solid"), "itq": ((1, 1.5), "dotted"), "lsh": ((4, 2), "dashed")}
OTHER_DASHES = [(3, 1, 1, 1), (6, 2, 1, 2), (2, 2), (8, 2)]


def figure_map(long: pd.DataFrame, datasets: list[str], path: Path, names: dict[str, str]) -> None:
    """A panel per dataset, a colour per code length, a line style per method (``names``: method -> display)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    others = iter(OTHER_DASHES * len(names))
    dashes = {name: STYLES[m][0] if m in STYLES else next(others) for m, name in names.items()}
    df = long.assign(
        panel=[label(d) for d in long["dataset"]],
        method=long["method"].map(names),
        bits=long["bits"].map(lambda b: f"{b} bits"),
    )
    order = [label(d) for d in datasets if d in set(long["dataset"])]
    bits_order = [f"{b} bits" for b in sorted(long["bits"].unique())]
    grid = sns.relplot(
        data=df,
        kind="line",
        x="k",
        y="map",
        hue="bits",
        hue_order=bits_order,
        style="method",
        style_order=list(names.values()),
        dashes=dashes,
        markers=True,
        col="panel",
        col_order=order,
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("K", "mAP@K")
    grid.figure.suptitle(
        "mAP@K: " + ", ".join(f"{n} ({STYLES[m][1] if m in STYLES else 'other'})" for m, n in names.items()), y=1.04
    )
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
        hue_order=list(dict.fromkeys(pr["method"])),  # the table's order of methods
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
        hue_order=list(dict.fromkeys(per_class["method"])),  # the table's order of methods
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
    ranked_by = per_class["ranked_by"].iloc[0]
    grid.set_axis_labels(f"class, by {ranked_by}'s mAP (best first)", f"mAP@{k} of the class's queries")
    grid.figure.suptitle(f"Per-class mAP@{k} at the longest code length", y=1.04)
    _save(grid.figure, path)
    plt.close(grid.figure)


def figure_paper(long: pd.DataFrame, datasets: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = []
    for (dataset, bits), values in PAPER.items():
        if dataset not in datasets:  # the releases run (PAPER's datasets are releases)
            continue
        ours = long[(long["dataset"] == dataset) & (long["bits"] == bits) & (long["method"] == "conmh")]
        ours = dict(zip(ours["k"], ours["map"]))
        for k, paper in zip(PAPER_KS, values):
            if k in ours:
                rows += [
                    {"dataset": display(dataset), "bits": f"{bits} bits", "K": k, "who": "ours", "mAP": ours[k]},
                    {"dataset": display(dataset), "bits": f"{bits} bits", "K": k, "who": "paper", "mAP": paper},
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


def figure_loss(
    logs: pd.DataFrame,
    datasets: list[str],
    path: Path,
    held_out: pd.DataFrame | None = None,
    k: int = TRAINING_MAP_K,
) -> None:
    """The loss and its terms per epoch, a row each, and below them the held-out mAP@k of the epochs evaluated
    while training (``held_out``: ``tables.training_map``), when there are any."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if logs.empty:
        raise ValueError("no training logs: figures_of() leaves this figure out")
    parts = [c for c in ("loss", "recon", "contrast") if c in logs.columns]
    df = logs.melt(id_vars=["dataset", "bits", "epoch"], value_vars=parts, var_name="term", value_name="value")
    df["panel"] = [label(d) for d in df["dataset"]]
    if held_out is not None and not held_out.empty:
        term = f"held-out mAP@{k}"
        df = pd.concat([df, held_out.rename(columns={"dataset": "panel", "mAP": "value"}).assign(term=term)])
        parts.append(term)
    df["bits"] = df["bits"].map(lambda b: f"{b} bits")
    order = [label(d) for d in datasets if d in set(logs["dataset"])]
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
    title = "Training loss per epoch (loss = recon + alpha * contrast)"
    if len(parts) > 3:
        title += f", and the held-out mAP@{k} of the epochs evaluated while training"
    grid.figure.suptitle(title, y=1.02)
    _save(grid.figure, path)
    plt.close(grid.figure)
