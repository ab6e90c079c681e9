# The paper's table (CSV, Markdown, LaTeX), metrics and plots for DVC, provenance
# tables and figures; a figure with nothing to show is left out (paper.figures_of).


rule report:
    input:
        metrics=[LAYOUT.metrics(m, d, b) for m, d, b in settings.method_runs(config)],
        train_logs=[LAYOUT.fit_log("conmh", d, b) for d, b in settings.trained_runs(config)],
        verified=[LAYOUT.verify_report(d) for d in config["datasets"]],
        manifests=[LAYOUT.manifest(d) for d in config["datasets"]],
    output:
        table_html=report(REPORT["table_html"], caption="../report/table.rst", category="1. Table"),
        table_csv=REPORT["table_csv"],
        table_md=REPORT["table_md"],
        table_tex=REPORT["table_tex"],
        curves=REPORT["curves"],
        pr=REPORT["pr"],
        loss=REPORT["loss"],
        train_map=REPORT["train_map"],
        figures=[
            report(REPORT[f"fig_{name}"], caption=f"../report/{name}.rst", category="2. Figures") for name in FIGURES
        ],
        provenance=report(REPORT["provenance_html"], caption="../report/provenance.rst", category="3. How it was made"),
        configuration=REPORT["configuration"],
        data=REPORT["data"],
        software=REPORT["software"],
        runtimes=REPORT["runtimes"],
        summary=[LAYOUT.summary(m, d, b) for m, d, b in settings.method_runs(config)],
    log:
        LAYOUT.log("report", "report"),
    params:
        # the whole configuration, by its digest: the provenance lists every key
        config=CONFIG,
    shell:
        "conmh pipeline report --config {params.config} --log {log}"
