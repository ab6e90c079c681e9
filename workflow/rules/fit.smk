# One fit per method x dataset x code length: ConMH's training (none for a run with a released
# checkpoint), the baselines' fits.


rule fit:
    input:
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone without it generates or checks it again
        downloaded=downloaded,
        # the method's code (for ConMH the package's training code): changing it refits, as under DVC
        code=lambda wc: fit_code(wc.method),
    output:
        model=LAYOUT.model("{method}", "{dataset}", "{bits}"),
        fit_log=LAYOUT.fit_log("{method}", "{dataset}", "{bits}"),
    log:
        LAYOUT.log("fit", "{method}-{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("fit", "{method}-{dataset}-{bits}bits")
    threads: config["threads"]["train"]
    # TODO: a CPU-only (gloo) run on several nodes needs `tasks: <nnodes>` in the user's
    # profile (docs/pipeline.md), since the SLURM plugin submits jobs without GPUs with
    # --ntasks=1 and SLURM then shrinks the allocation to one node. Setting
    # tasks = nnodes here when the job has no GPU (0 otherwise) should fix it; untested.
    # GPUs: `gpu` (counted by Snakemake, --gpus on SLURM) on one node; `gres` (--gres=gpu:N, per node)
    # on several, so that SLURM gives every node one GPU per process.
    resources:
        gpu=fit_gpus,
        gres=fit_gres,
        nodes=fit_nodes,
    params:
        settings=settings_of("fit"),
    shell:
        "conmh pipeline fit --method {wildcards.method} --dataset {wildcards.dataset} --bits {wildcards.bits}"
        " --threads {threads} --config {CONFIG} --log {log}"
