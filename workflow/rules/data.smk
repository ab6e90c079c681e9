# Datasets: generate the miniature or gather the real files, then check them.


rule download:
    output:
        manifest=LAYOUT.manifest("{dataset}"),
        done=touch(LAYOUT.download_done("{dataset}")),
    log:
        LAYOUT.log("download", "{dataset}"),
    params:
        settings=settings_of("download"),
    shell:
        "conmh pipeline download --dataset {wildcards.dataset} --config {CONFIG} --log {log}"


rule verify:
    input:
        manifest=LAYOUT.manifest("{dataset}"),
        downloaded=downloaded,
    output:
        report=LAYOUT.verify_report("{dataset}"),
    log:
        LAYOUT.log("verify", "{dataset}"),
    params:
        settings=settings_of("verify"),
    shell:
        "conmh pipeline verify --dataset {wildcards.dataset} --config {CONFIG} --log {log}"
