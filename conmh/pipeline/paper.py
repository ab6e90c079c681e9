"""The paper's ConMH mAP@K (docs/reference.md §6), the display names, and which figures a run draws.

Read without pandas: the Snakefile imports this module to learn the report's files.
"""

from __future__ import annotations

import csv
from importlib import resources
from io import StringIO

from .config import is_real, layout_of, runs, trained_runs


def _paper_rows() -> list[dict[str, str]]:
    """``paper_table.csv`` beside this module: dataset, bits, mAP@5 ... mAP@100."""
    text = resources.files(__package__).joinpath("paper_table.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(StringIO(text)))


_ROWS = _paper_rows()
PAPER_KS = tuple(int(c.removeprefix("mAP@")) for c in _ROWS[0] if c.startswith("mAP@"))
PAPER: dict[tuple[str, int], tuple[float, ...]] = {
    (row["dataset"], int(row["bits"])): tuple(float(row[f"mAP@{k}"]) for k in PAPER_KS) for row in _ROWS
}
DISPLAY = {"fcvid": "FCVID", "activitynet": "ActivityNet", "yfcc": "YFCC"}


def method_names(methods: list[str]) -> dict[str, str]:
    """method -> its name in tables and figures (the module's DISPLAY), in the order given."""
    from .. import methods as registry

    return {m: registry.get(m).DISPLAY for m in methods}


def display(dataset: str) -> str:
    """The name of a dataset's release in tables ("FCVID" for fcvid and fcvid-mini)."""
    return DISPLAY[layout_of(dataset)]


def label(dataset: str) -> str:
    """A dataset's name in figures, marked when its data is synthetic."""
    return display(dataset) + ("" if is_real(dataset) else " (synthetic)")


def figures_of(cfg: dict) -> tuple[str, ...]:
    """The figures a run draws. A figure with nothing to show is left out (the report says why):
    ours_vs_paper needs a real dataset at one of the paper's code lengths and K values; loss_curves
    needs a trained run."""
    compared = any(is_real(d) and (d, b) in PAPER and set(cfg["ks"]) & set(PAPER_KS) for d, b in runs(cfg))
    return (
        ("map_at_k", "pr_curves", "per_class")
        + (("ours_vs_paper",) if compared else ())
        + (("loss_curves",) if trained_runs(cfg) else ())
    )
