# Codes (ConMH and the LSH and ITQ baselines) and their mAP@K.


rule encode:
    input:
        model=lambda wc: settings.model_for(config, wc.dataset, wc.bits),
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
        gpu=encode_gpus,
    params:
        config=CONFIG,
    shell:
        "conmh pipeline encode --dataset {wildcards.dataset} --bits {wildcards.bits} --threads {threads}"
        " --config {params.config} --log {log}"


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
        config=CONFIG,
    shell:
        "conmh pipeline lsh --dataset {wildcards.dataset} --bits {wildcards.bits} --config {params.config} --log {log}"


rule itq:
    input:
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone downloads or generates it again
        downloaded=LAYOUT.download_done("{dataset}"),
    output:
        codes=LAYOUT.codes("itq", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("itq", "{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("itq", "{dataset}-{bits}bits")
    params:
        config=CONFIG,
    shell:
        "conmh pipeline itq --dataset {wildcards.dataset} --bits {wildcards.bits} --config {params.config} --log {log}"


rule evaluate:
    input:
        codes=LAYOUT.codes("{method}", "{dataset}", "{bits}"),
    output:
        metrics=LAYOUT.metrics("{method}", "{dataset}", "{bits}"),
        per_query=LAYOUT.per_query("{method}", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("evaluate", "{method}-{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("evaluate", "{method}-{dataset}-{bits}bits")
    params:
        config=CONFIG,
    shell:
        "conmh pipeline evaluate --method {wildcards.method} --dataset {wildcards.dataset} --bits {wildcards.bits}"
        " --config {params.config} --log {log}"
