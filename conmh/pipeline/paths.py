"""Every path the pipeline writes, in one place (the Snakefile's rules and dvc.yaml's outs follow it).

Arguments may be Snakemake wildcards ("{dataset}"), so that one method gives
both a rule's pattern and a concrete path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    data: str
    work: str
    results: str
    logs: str

    @classmethod
    def of(cls, cfg: dict) -> Layout:
        p = cfg["paths"]
        return cls(*(p[k].rstrip("/") for k in ("data", "work", "results", "logs")))

    def data_dir(self, dataset: str) -> str:
        """Where a dataset's files are: a folder named after it (a miniature is generated there; real
        files are put there by the user, by a link, `dvc add` or `dvc import-url`)."""
        return f"{self.data}/{dataset}"

    def download_done(self, dataset: str) -> str:
        """A flag in the (uncommitted) data folder: a fresh clone, which has the committed
        results but no data, downloads or generates every dataset again."""
        return f"{self.data}/.downloaded/{dataset}"

    def manifest(self, dataset: str) -> str:
        return f"{self.results}/data/{dataset}/download.json"

    def verify_report(self, dataset: str) -> str:
        return f"{self.results}/data/{dataset}/verify.json"

    def fit_dir(self, method: str, dataset: str, bits: Any) -> str:
        """A method's folder for one run (ConMH trains in it: epoch checkpoint, log, resume state)."""
        return f"{self.work}/fit/{dataset}/{method}-{bits}bits"

    def model(self, method: str, dataset: str, bits: Any) -> str:
        """The fitted model, a PyTorch file whatever the method (conmh.methods)."""
        return f"{self.fit_dir(method, dataset, bits)}/model.pt"

    def fit_log(self, method: str, dataset: str, bits: Any) -> str:
        """The fit's log: ConMH's training log (a JSON line per epoch); for a method without epochs, one line
        with its model's sha256 (empty for a released checkpoint)."""
        return f"{self.results}/fit/{dataset}/{method}-{bits}bits.jsonl"

    def codes(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.work}/codes/{dataset}/{method}-{bits}bits.h5"

    def metrics(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.results}/metrics/{dataset}/{method}-{bits}bits.json"

    def per_query(self, method: str, dataset: str, bits: Any) -> str:
        """AP@K of every query (``conmh evaluate --per-query``): large at real size, so in work/ (DVC-cached)."""
        return f"{self.work}/metrics/{dataset}/{method}-{bits}bits.per_query.csv"

    def summary(self, method: str, dataset: str, bits: Any) -> str:
        return f"{self.results}/summary/{dataset}/{method}-{bits}bits.json"

    def report_files(
        self, figures: tuple[str, ...] = ("map_at_k", "pr_curves", "per_class", "ours_vs_paper", "loss_curves")
    ) -> dict[str, str]:
        """The report's files; ``figures`` names the figures this run draws (``paper.figures_of``)."""
        r = self.results
        return {
            "table_csv": f"{r}/table.csv",
            "table_md": f"{r}/table.md",
            "table_tex": f"{r}/table.tex",
            "table_html": f"{r}/table.html",
            "curves": f"{r}/plots/map_at_k.csv",
            "pr": f"{r}/plots/pr_curve.csv",
            "loss": f"{r}/plots/loss.csv",
            "train_map": f"{r}/plots/train_map.csv",
            "configuration": f"{r}/provenance/configuration.csv",
            "data": f"{r}/provenance/data.csv",
            "software": f"{r}/provenance/software.csv",
            "runtimes": f"{r}/provenance/runtimes.csv",
            "provenance_html": f"{r}/provenance/index.html",
            **{f"fig_{name}": f"{r}/figures/{name}.png" for name in figures},
        }

    def effective_config(self, digest: str) -> str:
        """The checked configuration a Snakemake run's jobs read (config.yaml with --config applied), named
        by its content, so that a run with other --config values (even a dry run) never changes the file
        the jobs of a run in progress read."""
        return f"{self.logs}/config-{digest}.yaml"

    def log(self, step: str, name: str) -> str:
        return f"{self.logs}/{step}/{name}.log"

    def benchmark(self, step: str, name: str) -> str:
        return f"{self.logs}/benchmarks/{step}/{name}.tsv"
