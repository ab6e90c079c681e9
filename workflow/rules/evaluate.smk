# Every method's codes and their mAP@K.


rule encode:
    input:
        unpack(encode_inputs),
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone without it generates or checks it again
        downloaded=downloaded,
    output:
        codes=LAYOUT.codes("{method}", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("encode", "{method}-{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("encode", "{method}-{dataset}-{bits}bits")
    threads: config["threads"]["encode"]
    resources:
        gpu=encode_gpus,
    params:
        settings=settings_of("encode"),
    shell:
        "conmh pipeline encode --method {wildcards.method} --dataset {wildcards.dataset} --bits {wildcards.bits}"
        " --threads {threads} --config {CONFIG} --log {log}"


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
        settings=settings_of("evaluate"),
    shell:
        "conmh pipeline evaluate --method {wildcards.method} --dataset {wildcards.dataset} --bits {wildcards.bits}"
        " --config {CONFIG} --log {log}"
