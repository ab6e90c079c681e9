# Shared by every rule: wildcard patterns and the way a job runs its command.

wildcard_constraints:
    dataset="|".join(steps.DATASETS),
    bits=r"\d+",
    method="|".join(steps.METHODS),


def cmd(step):
    """params function: the job's command, built by steps.py exactly as dvc.yaml builds it."""

    def build(wildcards):
        return steps.shell(steps.command(config, step, wildcards.get("dataset"), wildcards.get("bits")))

    return build


def gpus(wildcards):
    """resources function: one GPU for real-data encode jobs (job.py picks which one)."""
    return int(steps.uses_gpu(config, wildcards.dataset))


def train_gpus(wildcards):
    """resources function: one GPU per DDP process of a real-data training job."""
    return steps.train_gpus(config, wildcards.dataset)


# The command writes to the job's log; when it fails the log is shown, so that a
# message such as the download instructions reaches the terminal.
RUN = "{params.cmd} > {log} 2>&1 || {{ status=$?; cat {log} >&2; exit $status; }}"
RUN_THREADS = "{params.cmd} --threads {threads} > {log} 2>&1 || {{ status=$?; cat {log} >&2; exit $status; }}"
