"""The reproduction pipeline: what the Snakefile's rules and dvc.yaml's stages run.

Every rule and stage runs ``conmh pipeline STEP`` (``cli.py``), which calls the
function of the same name in ``steps.py``. The rest, one job each:

* ``config.py`` -- config.yaml loaded and checked once (``config.schema.yaml``),
  dataset names (a release or its ``-mini`` miniature), and what one run uses
  (data folder, recipe changes, device, GPUs);
* ``paths.py`` -- every path the pipeline writes;
* ``download.py`` -- miniature generation; real files present and their sha256;
* ``gpus.py`` -- which GPUs a job takes; ``launch.py`` -- torchrun and srun;
* ``training_run.py`` -- a training folder that resumes, and knows when it is stale;
* ``report.py`` -- the report step: ``tables.py`` (the paper's table beside ours,
  pandas), ``figures.py`` (seaborn), ``provenance.py`` (how it was made), and
  ``paper.py`` (the paper's numbers, which figures a run draws; no pandas, the
  Snakefile reads it).
"""
