# Datasets: generate the miniature or gather the real files, then check them.


rule download:
    output:
        manifest=LAYOUT.manifest("{dataset}"),
        done=touch(LAYOUT.download_done("{dataset}")),
    log:
        LAYOUT.log("download", "{dataset}"),
    params:
        cmd=cmd("download"),
    shell:
        RUN


rule verify:
    input:
        manifest=LAYOUT.manifest("{dataset}"),
        downloaded=LAYOUT.download_done("{dataset}"),
    output:
        report=LAYOUT.verify_report("{dataset}"),
    log:
        LAYOUT.log("verify", "{dataset}"),
    params:
        cmd=cmd("verify"),
    shell:
        RUN
