# Shared by every rule: wildcard patterns and the GPUs a job holds.


wildcard_constraints:
    dataset="|".join(DATASETS),
    bits=r"\d+",
    method="|".join(settings.METHODS),


def encode_gpus(wildcards):
    """resources function: one GPU for real-data encode jobs (the job picks which one)."""
    return int(settings.uses_gpu(config, wildcards.dataset))


def train_gpus(wildcards):
    """resources function: one GPU per DDP process of a real-data training job on one node."""
    return settings.train_gpus(config, wildcards.dataset)


def train_gres(wildcards):
    """resources function: "gpu:<nproc_per_node>" GPUs on each node of a multi-node GPU training job."""
    return settings.train_gres(config, wildcards.dataset)
