# Datasets: generate the miniature or gather the real files, then check them.


rule download:
    output:
        manifest=LAYOUT.manifest("{dataset}"),
        done=touch(LAYOUT.download_done("{dataset}")),
    log:
        LAYOUT.log("download", "{dataset}"),
    params:
        config=CONFIG,
    shell:
        "conmh pipeline download --dataset {wildcards.dataset} --config {params.config} --log {log}"


rule verify:
    input:
        manifest=LAYOUT.manifest("{dataset}"),
        downloaded=downloaded,
    output:
        report=LAYOUT.verify_report("{dataset}"),
    log:
        LAYOUT.log("verify", "{dataset}"),
    params:
        config=CONFIG,
    shell:
        "conmh pipeline verify --dataset {wildcards.dataset} --config {params.config} --log {log}"
