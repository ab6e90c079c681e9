"""ConMH (AAAI 2023) reproduction pipeline: data -> fit -> encode -> evaluate -> the paper's table,
for every method (config.yaml `methods`, conmh/methods/) x dataset x code length.

    snakemake --cores all                      # default: the miniature datasets, CPU, a few minutes
    snakemake --cores all --config datasets=[fcvid]   # real FCVID, its files in data/fcvid (docs/pipeline.md)
    snakemake --report report.html             # HTML report with the table and figures

Every rule runs `conmh pipeline STEP ...` (conmh/pipeline/steps.py), as every
dvc.yaml stage does, so the two engines cannot drift apart.
"""

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from conmh.datasets import get_layout
from conmh.errors import ConfigError
from conmh.methods import method_file
from conmh.pipeline import config as settings
from conmh.pipeline.paths import Layout
from conmh.pipeline.paper import figures_of
from conmh.pipeline.training_run import training_code

min_version("9.0")


configfile: "config.yaml"


# config.yaml with --config applied, checked once (every problem listed at once); the jobs
# read this checked copy, so that they see the --config values too.
try:
    _checked = settings.check_config(config, "the configuration (config.yaml and --config)")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(_checked)
LAYOUT = Layout.of(config)
# The report's files, with only the figures this run has something to show in (paper.figures_of).
FIGURES = figures_of(config)
REPORT = LAYOUT.report_files(FIGURES)
CONFIG = settings.write_effective_config(config)

# A released checkpoint that is not there must stop the run: with earlier outputs
# in place Snakemake would otherwise see nothing to do and keep stale results.
_absent = [
    f"checkpoints.{d}.{b}: {path}"
    for d, by_bits in config["checkpoints"].items()
    for b, path in by_bits.items()
    if not Path(path).is_file()
]
if _absent:
    raise WorkflowError("released checkpoint file(s) not found:\n  " + "\n  ".join(_absent))


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        list(REPORT.values()),
