"""ConMH (AAAI 2023) reproduction pipeline: data -> train -> encode -> evaluate -> the paper's table.

    snakemake --cores all                      # default: miniature datasets, CPU, a few minutes
    snakemake --cores all --config 'fcvid={source: real}'   # real FCVID (see docs/pipeline.md)
    snakemake --report report.html             # HTML report with the table and figures

The commands of every job are built by workflow/scripts/steps.py, which dvc.yaml
calls too, so that the two pipelines cannot drift apart.
"""

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
import job  # noqa: E402
import steps  # noqa: E402

# Type conversion of --config values, then every key checked (all problems listed at once).
try:
    _checked = steps.check_config(config, "the configuration (config.yaml and --config)")
except steps.ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.clear()
config.update(_checked)
validate(config, "workflow/schemas/config.schema.yaml")

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

LAYOUT = steps.Layout.of(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        list(LAYOUT.report_files().values()),
