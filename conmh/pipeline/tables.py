"""The report's tables (pandas): the paper's table beside ours, per-run summaries, and the long-form
curves that ``dvc plots`` and the figures draw, from the metrics files and training logs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .config import is_real
from .paper import PAPER, PAPER_KS, display, label, method_names

ROW_OURS, ROW_PAPER, ROW_DIFF = "ConMH (ours)", "ConMH (paper)", "ours - paper"

ROW_LSH, ROW_ITQ = "LSH (ours)", "ITQ (ours)"  # every other method: "<its DISPLAY> (ours)"

ROW_RELEASED = "ConMH (released checkpoint)"

SYNTHETIC_NOTE = (
    "Rows with data = synthetic come from the miniature datasets (seeded synthetic features with the "
    "real file layout). They show that the pipeline works and how ConMH compares with the baselines; they are not "
    "comparable with the paper and are never compared with it."
)


def col(k: int) -> str:
    return f"mAP@{k}"


def load_details(paths: dict[tuple[str, str, int], Path]) -> dict[tuple[str, str, int], dict]:
    """Every metrics file by the pipeline's (dataset, method, bits), read once: mAP@K and the measures beyond
    it. Keyed by the run, not by the file's own ``dataset``, which names the layout (fcvid for fcvid-mini)."""
    return {run: json.loads(Path(path).read_text(encoding="utf-8")) for run, path in paths.items()}


def names_of(methods: list[str] | None, long: pd.DataFrame) -> dict[str, str]:
    """method -> display name in the table's order: ``methods`` (config.yaml's), or else ConMH first and
    the others of ``long`` by name."""
    if methods is None:
        methods = ["conmh", *sorted(set(long["method"]) - {"conmh"})]
    return method_names(methods)


def long_table(details: dict[tuple[str, str, int], dict]) -> pd.DataFrame:
    """Long table (dataset, method, bits, k, map) of the metrics files' mAP@K."""
    rows = [(d, m, b, int(k), float(v)) for (d, m, b), metrics in details.items() for k, v in metrics["map"].items()]
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
    datasets: list[str],
    released: set[tuple[str, int]] = frozenset(),
    ks: tuple[int, ...] = PAPER_KS,
    methods: list[str] | None = None,
) -> pd.DataFrame:
    """The paper's table: a row per dataset x bits x {each method, paper, difference}.

    Datasets keep the order of ``datasets``, methods that of ``methods`` (see
    :func:`names_of`); paper and difference rows appear only for real
    datasets at the paper's code lengths, where ConMH was run.
    """
    ks = tuple(k for k in ks if k in set(long["k"]))
    names = names_of(methods, long)
    wide = long.pivot_table(index=["dataset", "bits", "method"], columns="k", values="map")
    rows = []
    for dataset in datasets:
        real = is_real(dataset)
        for bits in sorted(long.loc[long["dataset"] == dataset, "bits"].unique()):
            bits = int(bits)

            def values(method: str) -> list[float]:
                key = (dataset, bits, method)
                return [wide.loc[key, k] if key in wide.index else float("nan") for k in ks]

            head = {"dataset": display(dataset), "data": "real" if real else "synthetic", "bits": bits}
            for method, name in names.items():
                if method == "conmh":
                    row = ROW_RELEASED if (dataset, bits) in released else ROW_OURS
                    rows.append({**head, "result": row, **dict(zip(map(col, ks), values(method)))})
                elif (dataset, bits, method) in wide.index:  # a method that was run
                    rows.append({**head, "result": f"{name} (ours)", **dict(zip(map(col, ks), values(method)))})
            if real and (dataset, bits) in PAPER and "conmh" in names:
                ours = values("conmh")
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


def pr_table(details: dict[tuple[str, str, int], dict], datasets: list[str], names: dict[str, str]) -> pd.DataFrame:
    """Precision and recall at every Hamming radius, long form (dataset, method, bits, radius, precision,
    recall), for ``dvc plots`` and the figure; methods by their ``names`` (method -> display), in that order."""
    rows = [
        (label(d), names[m], b, r, p, rc)
        for d in datasets
        for (dd, m, b), metrics in sorted(details.items(), key=lambda kv: (kv[0][2], list(names).index(kv[0][1])))
        if dd == d and "pr_curve" in metrics
        for r, p, rc in zip(*(metrics["pr_curve"][c] for c in ("radius", "precision", "recall")))
    ]
    return pd.DataFrame(rows, columns=["dataset", "method", "bits", "radius", "precision", "recall"])


def per_class_table(
    details: dict[tuple[str, str, int], dict], datasets: list[str], k: int, names: dict[str, str]
) -> pd.DataFrame:
    """mAP@k of every class that has queries, at each dataset's longest code length (long form: dataset,
    method, class, queries, mAP); ``rank`` orders the classes by the value of ``ranked_by``, the first
    method of ``names`` that was run (ConMH by default), best first."""
    frames = []
    for d in datasets:
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
                        "dataset": f"{label(d)}, {bits} bits",
                        "method": names[m],
                        "class": range(len(per_class["n_queries"])),
                        "queries": per_class["n_queries"],
                        "mAP": [float("nan") if v is None else v for v in per_class["map"][str(k)]],
                    }
                )
            )
    columns = ["dataset", "method", "class", "queries", "mAP", "rank", "ranked_by"]
    if not frames:
        return pd.DataFrame(columns=columns)
    df = pd.concat(frames, ignore_index=True).dropna(subset=["mAP"])
    first = next(name for name in names.values() if name in set(df["method"]))  # ConMH, where it was run
    ours = df[df["method"] == first].sort_values(["dataset", "mAP", "class"], ascending=[True, False, True])
    rank = {(d, c): i for d, group in ours.groupby("dataset") for i, c in enumerate(group["class"])}
    df["rank"] = [rank.get((d, c), -1) for d, c in zip(df["dataset"], df["class"])]
    df["ranked_by"] = first
    return df[columns]


def curves(long: pd.DataFrame, datasets: list[str], names: dict[str, str]) -> pd.DataFrame:
    """mAP@K in long form, labelled for the plot (for ``dvc plots``)."""
    order = {d: i for i, d in enumerate(datasets)}
    df = long.assign(order=long["dataset"].map(order)).sort_values(["order", "method", "bits", "k"])
    return pd.DataFrame(
        {
            "dataset": [label(d) for d in df["dataset"]],
            "method": df["method"].map(names).to_numpy(),
            "bits": df["bits"].to_numpy(),
            "k": df["k"].to_numpy(),
            "mAP": df["map"].to_numpy(),
        }
    )


def loss_table(logs: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """The training losses in long form (for ``dvc plots``): dataset, bits, epoch, loss, recon, contrast."""
    columns = ["dataset", "bits", "epoch", "loss", "recon", "contrast"]
    if logs.empty:
        return pd.DataFrame(columns=columns)
    df = logs.assign(dataset=[label(d) for d in logs["dataset"]])
    return df[columns].sort_values(["dataset", "bits", "epoch"], kind="stable")


def training_map(logs: pd.DataFrame, datasets: list[str], k: int) -> pd.DataFrame:
    """The held-out split's mAP@k after the epochs evaluated while training (``conmh train --eval-every``), long
    form (for ``dvc plots`` and the loss figure): dataset, bits, epoch, mAP."""
    columns = ["dataset", "bits", "epoch", "mAP"]
    if logs.empty or "eval" not in logs.columns:
        return pd.DataFrame(columns=columns)
    rows = [
        (label(d), b, e, ev["map"][str(k)])
        for d, b, e, ev in zip(logs["dataset"], logs["bits"], logs["epoch"], logs["eval"])
        if isinstance(ev, dict) and str(k) in ev.get("map", {})
    ]
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "bits", "epoch"], kind="stable")


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
