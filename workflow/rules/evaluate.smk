# Codes (ConMH and the LSH baseline) and their mAP@K.


rule encode:
    input:
        model=lambda wc: steps.model_for(config, wc.dataset, wc.bits),
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone downloads or generates it again
        downloaded=LAYOUT.download_done("{dataset}"),
    output:
        codes=LAYOUT.codes("conmh", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("encode", "{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("encode", "{dataset}-{bits}bits")
    threads: config["threads"]["encode"]
    resources:
        gpu=gpus,
    params:
        cmd=cmd("encode"),
    shell:
        RUN_THREADS


rule lsh:
    input:
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone downloads or generates it again
        downloaded=LAYOUT.download_done("{dataset}"),
    output:
        codes=LAYOUT.codes("lsh", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("lsh", "{dataset}-{bits}bits"),
    params:
        cmd=cmd("lsh"),
    shell:
        RUN


rule evaluate:
    input:
        codes=LAYOUT.codes("{method}", "{dataset}", "{bits}"),
    output:
        metrics=LAYOUT.metrics("{method}", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("evaluate", "{method}-{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("evaluate", "{method}-{dataset}-{bits}bits")
    params:
        cmd=lambda wc: steps.shell(steps.evaluate_command(config, wc.method, wc.dataset, int(wc.bits))),
    shell:
        RUN
