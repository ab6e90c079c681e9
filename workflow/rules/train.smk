# One training job per dataset x code length (none for a run with a released checkpoint).


rule train:
    input:
        verify=LAYOUT.verify_report("{dataset}"),
        # the data folder itself (not committed): a fresh clone downloads or generates it again
        downloaded=LAYOUT.download_done("{dataset}"),
        # the package's training code: changing it retrains, as under DVC
        code=training_code(),
    output:
        model=LAYOUT.model("{dataset}", "{bits}"),
        train_log=LAYOUT.train_log("{dataset}", "{bits}"),
    log:
        LAYOUT.log("train", "{dataset}-{bits}bits"),
    benchmark:
        LAYOUT.benchmark("train", "{dataset}-{bits}bits")
    threads: config["threads"]["train"]
    # TODO: a CPU-only (gloo) run on several nodes needs `tasks: <nnodes>` in the user's
    # profile (docs/pipeline.md), since the SLURM plugin submits jobs without GPUs with
    # --ntasks=1 and SLURM then shrinks the allocation to one node. Setting
    # tasks = nnodes here when the job has no GPU (0 otherwise) should fix it; untested.
    # GPUs: `gpu` (counted by Snakemake, --gpus on SLURM) on one node; `gres` (--gres=gpu:N, per node)
    # on several, so that SLURM gives every node one GPU per process.
    resources:
        gpu=train_gpus,
        gres=train_gres,
        nodes=config["distributed"]["nnodes"],
    params:
        config=CONFIG,
    shell:
        "conmh pipeline train --dataset {wildcards.dataset} --bits {wildcards.bits} --threads {threads}"
        " --config {params.config} --log {log}"
