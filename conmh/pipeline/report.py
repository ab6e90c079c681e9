"""The ``report`` step: the paper's table, regenerated, with figures.

Reads the metrics JSON files written by ``conmh evaluate``, the training logs
and the verification reports, and writes (under ``paths.results``):

* ``table.csv`` / ``table.md`` / ``table.tex``: per dataset and code length,
  mAP@5, 20, 40, 60, 80, 100 (the paper's columns) of every method
  (``methods``: ConMH, ITQ, LSH by default); for real datasets also the paper's numbers (``paper_table.csv``) and
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
* ``figures/map_at_k.png`` (a panel per dataset, a colour per code length, a
  line style per method), ``figures/pr_curves.png`` (precision against recall by
  Hamming radius, a panel per dataset and code length), ``figures/per_class.png``
  (each class's mAP@K at the longest code length, classes sorted by the first method's),
  ``figures/ours_vs_paper.png`` (bars, only when a real dataset is run at the
  paper's code lengths) and ``figures/loss_curves.png`` (only when
  a run was trained): a figure with nothing to show is left out, not drawn
  empty (``figures_of``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_text_atomic
from . import figures, provenance, tables
from .config import method_runs, released_checkpoint, runs, trained_runs
from .paper import figures_of, method_names
from .paths import Layout


def write_report(cfg: dict) -> None:
    """Every report file of the configured runs (Layout.report_files, the summaries), from their metrics,
    training logs and verification reports."""
    import matplotlib

    matplotlib.use("Agg")
    lay = Layout.of(cfg)
    files = {name: Path(path) for name, path in lay.report_files(figures_of(cfg)).items()}
    datasets = cfg["datasets"]
    released = {(d, b) for d, b in runs(cfg) if released_checkpoint(cfg, d, b) is not None}
    names = method_names(cfg["methods"])
    logs = tables.load_logs({(d, b): Path(lay.fit_log("conmh", d, b)) for d, b in trained_runs(cfg)})
    details = tables.load_details({(d, m, b): Path(lay.metrics(m, d, b)) for m, d, b in method_runs(cfg)})
    long = tables.long_table(details)
    table = tables.build_table(long, datasets, released, methods=cfg["methods"])
    markdown = tables.to_markdown(table)
    csv = {"float_format": "%.6f", "index": False}
    write_text_atomic(files["table_csv"], table.to_csv(**csv))
    write_text_atomic(files["table_md"], markdown)
    write_text_atomic(files["table_tex"], tables.to_latex(table))
    for (dataset, method, bits), values in tables.summary(long, details).items():
        write_text_atomic(lay.summary(method, dataset, bits), json.dumps(values, indent=1) + "\n")
    write_text_atomic(files["curves"], tables.curves(long, datasets, names).to_csv(**csv))
    write_text_atomic(files["loss"], tables.loss_table(logs, datasets).to_csv(**csv))
    held_out = tables.training_map(logs, datasets, figures.TRAINING_MAP_K)
    write_text_atomic(files["train_map"], held_out.to_csv(**csv))
    pr = tables.pr_table(details, datasets, names)
    write_text_atomic(files["pr"], pr.to_csv(**csv))
    made = {
        "runtimes": (
            "Training runs",
            "Device, processes, precision, epochs and time of each trained run.",
            provenance.runtimes_table(logs),
        ),
        "data": ("Data", "Every file the verify step checked.", provenance.data_table(cfg)),
        "software": (
            "Software and machine",
            "What made these results, and the machine that wrote this page.",
            provenance.software_table(),
        ),
        "configuration": (
            "Configuration",
            "config.yaml with any --config values applied, one row per key.",
            provenance.configuration_table(cfg),
        ),
    }
    for name, (_, _, frame) in made.items():
        write_text_atomic(files[name], frame.to_csv(index=False))
    write_text_atomic(
        files["provenance_html"], provenance.html_page("How these results were made", list(made.values()))
    )
    write_text_atomic(
        files["table_html"],
        provenance.html_page("mAP@K", [("", " ".join(tables.table_notes(table)), tables.formatted(table))]),
    )
    figures.figure_map(long, datasets, files["fig_map_at_k"], names)
    figures.figure_pr(pr, files["fig_pr_curves"])
    k = figures.PER_CLASS_K if figures.PER_CLASS_K in cfg["ks"] else max(cfg["ks"])
    figures.figure_per_class(tables.per_class_table(details, datasets, k, names), k, files["fig_per_class"])
    if "fig_ours_vs_paper" in files:
        figures.figure_paper(long, datasets, files["fig_ours_vs_paper"])
    if "fig_loss_curves" in files:
        figures.figure_loss(logs, datasets, files["fig_loss_curves"], held_out, figures.TRAINING_MAP_K)
    print(markdown)
