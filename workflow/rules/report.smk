# The paper's table (CSV, Markdown, LaTeX), metrics for DVC, and figures.

_REPORT = LAYOUT.report_files()


rule report:
    input:
        metrics=[LAYOUT.metrics(m, d, b) for d, b in settings.runs(config) for m in settings.METHODS],
        train_logs=[LAYOUT.train_log(d, b) for d, b in settings.trained_runs(config)],
    output:
        table_csv=report(_REPORT["table_csv"], caption="../report/table.rst", category="Table"),
        table_md=_REPORT["table_md"],
        table_tex=_REPORT["table_tex"],
        curves=_REPORT["curves"],
        fig_map=report(_REPORT["fig_map"], caption="../report/map_at_k.rst", category="Figures"),
        fig_paper=report(
            _REPORT["fig_paper"],
            caption="../report/ours_vs_paper.rst",
            category="Figures",
        ),
        fig_loss=report(_REPORT["fig_loss"], caption="../report/loss_curves.rst", category="Figures"),
        summary=[LAYOUT.summary(m, d, b) for d, b in settings.runs(config) for m in settings.METHODS],
    log:
        LAYOUT.log("report", "report"),
    params:
        config=CONFIG,
    shell:
        "conmh pipeline report --config {params.config} --log {log}"
