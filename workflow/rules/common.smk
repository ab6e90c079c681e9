# Shared by every rule: wildcard patterns, the code a fit depends on and the GPUs a job holds.


wildcard_constraints:
    dataset="|".join(DATASETS),
    bits=r"\d+",
    method="|".join(config["methods"]),


def fit_code(method):
    """input function: the files whose change refits ``method`` (ConMH: the package's training code)."""
    return training_code() if method == "conmh" else [method_file(method)]


def encode_gpus(wildcards):
    """resources function: one GPU for a real-data encode job of a method that uses one (the job picks which)."""
    return int(settings.uses_gpu(config, wildcards.dataset, wildcards.method))


def fit_gpus(wildcards):
    """resources function: one GPU per DDP process of a real-data ConMH training job on one node."""
    return settings.train_gpus(config, wildcards.dataset, wildcards.method)


def fit_gres(wildcards):
    """resources function: "gpu:<nproc_per_node>" GPUs on each node of a multi-node GPU training job."""
    return settings.train_gres(config, wildcards.dataset, wildcards.method)


def fit_nodes(wildcards):
    """resources function: the nodes of a ConMH training job (distributed.nnodes); one for other fits."""
    return config["distributed"]["nnodes"] if wildcards.method == "conmh" else 1
