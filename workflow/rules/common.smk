# Shared by every rule: wildcard patterns, input functions and the GPUs a job holds.


wildcard_constraints:
    dataset="|".join(settings.dataset_names()),
    bits=r"\d+",
    method="|".join(config["methods"]),


def settings_of(step):
    """params function: the configuration keys a job of ``step`` depends on (config.STEP_KEYS), and only
    those: a change of another key (``ks``, another method's options) reruns nothing there. The jobs read
    the whole checked configuration from {CONFIG}, which is named by its content and so not a param."""
    return lambda wc: settings.step_settings(config, step, wc.dataset, getattr(wc, "method", ""))


def downloaded(wildcards):
    """input function: the dataset's download flag (LAYOUT.download_done) where the dataset's files are
    missing (a fresh clone: they are generated or checked before a job reads them) or where the flag
    exists; nothing where the files are all there without it (a clone that ran `dvc pull`), or any job
    that had to run would download again and rerun every job after it, training included."""
    flag = LAYOUT.download_done(wildcards.dataset)
    folder = Path(settings.data_dir(config, wildcards.dataset))
    names = [name for _, name, _ in get_layout(settings.layout_of(wildcards.dataset)).all_files()]
    if Path(flag).exists() or not all((folder / name).is_file() for name in names):
        return flag
    return []


def encode_inputs(wildcards):
    """input function (unpack) of encode: a released ConMH checkpoint as it is; the pipeline's own model
    as ancient(), since `dvc pull` writes it at any time, even after the codes made from it. A fit that
    runs still re-encodes, through its log: written by the same job after the model, in git (so older
    than pulled codes), and different whenever the model is (a baseline's log holds its model's sha256)."""
    released = settings.model_for(config, wildcards.method, wildcards.dataset, wildcards.bits)
    own = LAYOUT.model(wildcards.method, wildcards.dataset, wildcards.bits)
    if released != own:
        return {"model": released}
    return {"model": ancient(own), "fit_log": LAYOUT.fit_log(wildcards.method, wildcards.dataset, wildcards.bits)}


def fit_code(method):
    """input function: the files whose change refits ``method`` (ConMH: the package's training code), as
    paths relative to the working directory where they lie in it (this repository's conmh/): Snakemake
    reruns a job whose set of input paths changed, so absolute ones retrained everything in a moved or
    copied repository."""
    files = [f.resolve() for f in (training_code() if method == "conmh" else [method_file(method)])]
    here = Path.cwd().resolve()
    return [str(f.relative_to(here)) if f.is_relative_to(here) else str(f) for f in files]


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
