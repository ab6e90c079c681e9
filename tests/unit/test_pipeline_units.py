"""Unit tests of the pipeline (conmh.pipeline): config checking, dataset names, what each step runs,
GPU slots and resumable training folders, the download step (sha256, instructions), and the report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conmh.datasets import DATASETS, get_layout
from conmh.errors import ConfigError, DataError, LaunchError
from conmh.pipeline import config as settings
from conmh.pipeline import download, figures, gpus, launch, paper, steps, tables, training_run
from conmh.pipeline.cli import main as pipeline
from conmh.pipeline.paths import Layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg() -> dict:
    return settings.load_config(ROOT / "config.yaml")


def raw_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def checked_in(raw: dict, folder: Path) -> dict:
    """``raw`` checked, with the pipeline's data, work, results and logs in ``folder``."""
    raw["paths"] = {k: str(folder / k) for k in ("data", "work", "results", "logs")}
    return settings.check_config(raw)


TINY_YFCC = {"n_train": 40, "n_database": 30, "n_queries": 10, "feature_dim": 16}  # miniature sizes


# --------------------------------------------------------------------------- config


MINIATURES = [f"{d}-mini" for d in DATASETS]


def test_default_config_is_valid_and_runs_the_paper_grid_on_the_miniatures(cfg):
    assert cfg["datasets"] == MINIATURES
    assert cfg["bits"] == [16, 32, 64]
    assert not any(settings.is_real(d) for d in cfg["datasets"])
    # The paper's recipes live in conmh.recipes only: the config holds changes to them.
    assert all(cfg[d]["recipe"] == {} for d in settings.dataset_names())


def test_a_datasets_name_gives_its_folder_its_layout_and_its_kind(cfg):
    assert settings.dataset_names() == (*DATASETS, *MINIATURES)
    for real, mini in zip(DATASETS, MINIATURES):
        assert settings.data_dir(cfg, real) == f"data/{real}" and settings.data_dir(cfg, mini) == f"data/{mini}"
        assert settings.layout_of(real) == settings.layout_of(mini) == real
        assert settings.is_real(real) and not settings.is_real(mini)


def test_real_data_trains_with_the_papers_recipe_and_miniatures_with_their_overrides(cfg):
    assert settings.recipe_changes(cfg, "fcvid-mini") == cfg["miniature"]["train"]
    assert settings.recipe_changes(cfg, "fcvid") == {}
    cfg["fcvid"]["recipe"] = {"epochs": 100}
    assert settings.recipe_changes(cfg, "fcvid") == {"epochs": 100}


def test_the_schema_takes_datasets_and_presets_from_the_package():
    from conmh.device import PRECISIONS
    from conmh.presets import PRESETS

    schema = settings.load_schema()
    assert schema["$defs"]["dataset_name"]["enum"] == [*DATASETS, *MINIATURES]
    assert schema["$defs"]["miniature_name"]["enum"] == MINIATURES
    assert schema["$defs"]["preset_name"]["enum"] == list(PRESETS)
    assert schema["properties"]["precision"]["enum"] == list(PRECISIONS)
    assert all(d in schema["properties"] for d in settings.dataset_names())


def test_dvcs_miniature_stage_names_every_miniature_and_reads_datasets():
    """dvc.yaml's miniature stage lists the miniatures literally (a matrix over `datasets` would make a
    release's folder a DVC output): the same names as the package's. It generates only those `datasets`
    lists, so it depends on that key."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["miniature"]
    assert stage["matrix"]["dataset"] == MINIATURES
    assert "datasets" in stage["params"][0]["config.yaml"]


def test_a_datasets_recipe_takes_the_fields_conmh_train_can_change():
    from conmh.recipes import OVERRIDABLE

    recipe = settings.load_schema()["$defs"]["recipe"]["properties"]
    assert list(recipe) == [f.name for f in OVERRIDABLE]


def test_a_configured_recipe_change_reaches_conmh_train_under_the_fields_own_option(cfg):
    from conmh.cli import build_parser
    from conmh.recipes import OVERRIDABLE, RECIPES

    changes = {f.name: getattr(RECIPES["yfcc"], f.name) + 1 for f in OVERRIDABLE}
    cfg["yfcc"] = {**cfg["yfcc"], "recipe": changes}
    args = build_parser().parse_args(steps.train_command(cfg, "yfcc", 64)[1:])
    assert {name: getattr(args, name) for name in changes} == changes


def test_the_jobs_config_is_named_by_its_content(cfg, tmp_path):
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    first = settings.write_effective_config(cfg)
    assert settings.write_effective_config(cfg) == first and settings.load_config(first) == cfg
    other = dict(cfg, options={**cfg["options"], "lsh": {"seed": 2}})  # a run (or a dry run) with other --config values
    second = settings.write_effective_config(other)
    assert second != first and settings.load_config(first) == cfg and settings.load_config(second) == other


def test_command_line_strings_are_converted_to_schema_types():
    # snakemake --config parses nested values with YAML's BaseLoader: all strings.
    raw = raw_config()
    raw["bits"] = ["16", "64"]
    raw["fcvid"]["recipe"] = {"epochs": "5", "lr": "3e-4"}
    raw["resume"] = "false"
    raw["checkpoints"] = {"fcvid": {64: "/models/f64.pth"}}
    cfg = settings.check_config(raw)
    assert cfg["bits"] == [16, 64]
    assert cfg["fcvid"]["recipe"]["epochs"] == 5 and cfg["fcvid"]["recipe"]["lr"] == pytest.approx(3e-4)
    assert cfg["resume"] is False
    assert cfg["checkpoints"] == {"fcvid": {"64": "/models/f64.pth"}}


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda c: c.update(datasets=["fcvidd"]), "datasets[0]"),
        (lambda c: c["fcvid"]["recipe"].update(mask_ratio=1.5), "fcvid.recipe.mask_ratio"),
        (lambda c: c["fcvid"]["recipe"].update(epoch=800), "fcvid.recipe"),
        (lambda c: c["yfcc"].update(source="real"), "yfcc"),  # the key before data by name
        (lambda c: c.update(dvc_data_dirs={"fcvid": "data/fcvid"}), "(top level)"),  # likewise
        (lambda c: c["miniature"]["sizes"].update(fcvid={"n_train": 10}), "miniature.sizes"),  # a release's
        (lambda c: c["activitynet"].update(sha256={"train_feats.h5": "abc"}), "activitynet.sha256.train_feats.h5"),
        (lambda c: c["activitynet"].update(mirrors={"train_feats.h5": "https://x"}), "activitynet"),
        (lambda c: c.update(bits=["x"]), "bits[0]"),
        (lambda c: c.update(bits=[1]), "bits[0]"),  # the schema's minimum is 4
        (lambda c: c["fcvid-mini"]["recipe"].update(mask_ratio=1), "fcvid-mini.recipe.mask_ratio"),  # all masked
        (lambda c: c.update(bits=[16, 1000]), "bits[1]"),  # wider than the 256-dim feature it hashes
        (lambda c: c.update(distributed={"nproc_per_node": 0, "nnodes": 1}), "distributed.nproc_per_node"),
        (lambda c: c.update(precision="fp16"), "precision"),
        (lambda c: c.update(epochs=3), "(top level)"),
        (lambda c: c["miniature"]["train"].update(epoch=3), "miniature.train"),
    ],
)
def test_bad_config_values_are_refused_with_the_key_named(change, where):
    raw = raw_config()
    change(raw)
    with pytest.raises(ConfigError) as err:
        settings.check_config(raw)
    assert f"  - {where}" in str(err.value)


def test_every_problem_is_listed_at_once():
    raw = raw_config()
    raw["bits"] = [0]
    raw["fcvid"]["recipe"] = {"batch_size": 1}
    with pytest.raises(ConfigError, match="2 problems") as err:
        settings.check_config(raw)
    assert "bits[0]" in str(err.value) and "fcvid.recipe.batch_size" in str(err.value)


def test_checkpoint_for_a_code_length_not_run_is_refused():
    raw = raw_config()
    raw["checkpoints"] = {"fcvid": {128: "/m.pth"}}
    with pytest.raises(ConfigError, match="checkpoints.fcvid.128"):
        settings.check_config(raw)


def test_a_step_refuses_a_bad_config_file(tmp_path, capsys):
    raw = raw_config()
    raw["fcvid"]["recipe"] = {"epochs": 0}
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert pipeline(["download", "--dataset", "fcvid", "--config", str(bad)]) == 3
    assert "fcvid.recipe.epochs: 0 is less than the minimum of 1" in capsys.readouterr().err


def test_a_dataset_to_run_needs_its_section_and_a_miniature_has_no_release_sums():
    raw = raw_config()
    raw["datasets"] = ["fcvid", "yfcc-mini"]
    del raw["fcvid"]
    raw["yfcc-mini"]["sha256"] = {"yfcc_query_feats.h5": "0" * 64}
    with pytest.raises(ConfigError, match="2 problems") as err:
        settings.check_config(raw)
    assert "  - fcvid: missing; give every dataset of `datasets` a section" in str(err.value)
    assert "  - yfcc-mini.sha256: a miniature is generated, not released" in str(err.value)
    raw["datasets"] = ["yfcc"]  # a section that is not run may be left out
    raw["yfcc-mini"]["sha256"] = {}
    assert settings.check_config(raw)["datasets"] == ["yfcc"]


def test_the_miniature_step_refuses_a_release(cfg, tmp_path, capsys):
    """Generating into data/fcvid/ would mix synthetic files with the real release's."""
    assert pipeline(["miniature", "--dataset", "fcvid"]) == 3
    assert "fcvid is a released dataset, not a miniature" in capsys.readouterr().err


def test_a_step_without_its_dataset_or_bits_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        pipeline(["fit", "--method", "conmh", "--dataset", "fcvid"])
    assert exit_.value.code == 2 and "fit needs --bits" in capsys.readouterr().err


# --------------------------------------------------------------------------- what the steps run


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_miniature_training_uses_the_miniature_overrides(cfg):
    argv = steps.train_command(cfg, "activitynet-mini", 32)
    assert argv[:2] == ["conmh", "train"]
    assert _opt(argv, "--epochs") == str(cfg["miniature"]["train"]["epochs"])
    assert _opt(argv, "--batch-size") == str(cfg["miniature"]["train"]["batch_size"])
    assert "--alpha" not in argv and "--mask-ratio" not in argv  # the paper's (conmh train's default)
    assert _opt(argv, "--preset") == cfg["miniature"]["preset"] and _opt(argv, "--device") == "cpu"
    assert _opt(argv, "--data-dir") == "data/activitynet-mini" and _opt(argv, "--dataset") == "activitynet"
    assert not settings.uses_gpu(cfg, "activitynet-mini") and settings.train_gpus(cfg, "activitynet-mini") == 0


def test_training_evaluates_every_n_epochs_as_configured(cfg):
    assert _opt(steps.train_command(cfg, "fcvid-mini", 64), "--eval-every") == "1"  # miniatures: every epoch
    assert "--eval-every" not in steps.train_command(cfg, "fcvid", 64)  # real data: never by default
    cfg["eval_every"] = 50
    assert _opt(steps.train_command(cfg, "fcvid", 64), "--eval-every") == "50"


def test_real_training_uses_the_paper_recipe_and_a_gpu(cfg):
    argv = steps.train_command(cfg, "fcvid", 64)
    for option in ("--epochs", "--batch-size", "--lr", "--seed", "--alpha"):
        assert option not in argv  # conmh train starts from the paper's recipe
    for option, value in [("--preset", "small"), ("--device", "auto"), ("--data-dir", "data/fcvid")]:
        assert _opt(argv, option) == value
    assert settings.uses_gpu(cfg, "fcvid") and settings.train_gpus(cfg, "fcvid") == 1
    assert _opt(argv, "--precision") == "auto" and "--activation-checkpointing" not in argv
    cfg["activation_checkpointing"] = True
    assert "--activation-checkpointing" in steps.train_command(cfg, "fcvid", 64)
    cfg["fcvid"]["recipe"] = {"epochs": 100}
    assert _opt(steps.train_command(cfg, "fcvid", 64), "--epochs") == "100"


def test_each_step_writes_what_the_conmh_command_writes(cfg, tmp_path, capsys):
    """A step calls the library as `conmh` does: the same files as the command a user would type."""
    from conmh.cli import main as conmh
    from conmh.codes import read_codes

    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    cfg["miniature"]["sizes"] = {
        "activitynet-mini": {"n_train": 40, "n_database": 60, "n_queries": 10, "feature_dim": 32}
    }
    lay, data = Layout.of(cfg), settings.data_dir(cfg, "activitynet-mini")
    assert steps.download(cfg, "activitynet-mini") == 0 and steps.verify(cfg, "activitynet-mini") == 0
    for method in ("lsh", "itq"):
        assert (
            steps.fit(cfg, method, "activitynet-mini", 16) == 0
            and Path(lay.fit_log(method, "activitynet-mini", 16)).exists()
        )
        assert steps.encode(cfg, method, "activitynet-mini", 16) == 0
        assert steps.evaluate(cfg, method, "activitynet-mini", 16) == 0
    by_hand = tmp_path / "by_hand"
    typed = [
        ["verify", "activitynet", data, "--report", f"{by_hand}/verify.json"],
        ["lsh", "--dataset", "activitynet", "--data-dir", data, "--bits", "16", "--out", f"{by_hand}/lsh.h5"],
        ["itq", "--dataset", "activitynet", "--data-dir", data, "--bits", "16", "--out", f"{by_hand}/itq.h5"],
    ]
    typed += [
        ["evaluate", f"{by_hand}/{m}.h5", "--out", f"{by_hand}/{m}.json", "--per-query", f"{by_hand}/{m}.csv"]
        for m in ("lsh", "itq")
    ]
    assert [conmh(argv) for argv in typed] == [0] * len(typed)
    capsys.readouterr()

    def report(path) -> dict:  # without the times it took
        return {k: v for k, v in json.loads(Path(path).read_text()).items() if k != "seconds"}

    assert report(lay.verify_report("activitynet-mini")) == report(by_hand / "verify.json")
    for method in ("lsh", "itq"):
        ours, theirs = read_codes(lay.codes(method, "activitynet-mini", 16)), read_codes(by_hand / f"{method}.h5")
        assert (ours.database == theirs.database).all() and (ours.queries == theirs.queries).all()
        assert ours.attrs == theirs.attrs
        metrics = json.loads(Path(lay.metrics(method, "activitynet-mini", 16)).read_text())
        metrics_by_hand = json.loads((by_hand / f"{method}.json").read_text())
        metrics.pop("codes_sha256"), metrics_by_hand.pop("codes_sha256")
        assert metrics == metrics_by_hand
        assert (
            Path(lay.per_query(method, "activitynet-mini", 16)).read_text() == (by_hand / f"{method}.csv").read_text()
        )


def test_released_checkpoint_is_encoded_instead_of_trained(cfg, tmp_path, monkeypatch):
    released = tmp_path / "yfcc_32.pth"
    released.write_bytes(b"weights")
    cfg["datasets"], cfg["checkpoints"] = ["yfcc"], {"yfcc": {"32": str(released)}}
    cfg["paths"] = {k: str(tmp_path / k) for k in ("data", "work", "results", "logs")}
    assert ("yfcc", 32) not in settings.trained_runs(cfg) and ("yfcc", 64) in settings.trained_runs(cfg)
    assert ("conmh", "yfcc", 32) not in settings.fitted_runs(cfg) and ("lsh", "yfcc", 32) in settings.fitted_runs(cfg)
    assert settings.model_for(cfg, "conmh", "yfcc", 32) == str(released)
    lay = Layout.of(cfg)
    assert settings.model_for(cfg, "lsh", "yfcc", 32) == lay.model("lsh", "yfcc", 32)  # ConMH's checkpoint only
    # dvc repro runs every fit stage of its matrix: this one copies the checkpoint into place.
    assert steps.fit(cfg, "conmh", "yfcc", 32) == 0
    model, log = Path(lay.model("conmh", "yfcc", 32)), Path(lay.fit_log("conmh", "yfcc", 32))
    assert model.read_bytes() == b"weights" and log.read_text() == ""


def test_dvc_yaml_runs_the_same_steps_and_names_the_training_code():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    from conmh.pipeline.cli import STEPS

    assert set(dvc["stages"]) == set(STEPS)
    assert dvc["vars"] == ["config.yaml"]
    for name, stage in dvc["stages"].items():
        stage = stage.get("do", stage)  # a foreach stage
        # python -m conmh: an experiment runs its own copy of the code
        assert stage["cmd"].startswith(f"python -m conmh pipeline {name} ") or stage["cmd"] == (
            "python -m conmh pipeline report"
        )
    fit_deps = {d for d in dvc["stages"]["fit"]["deps"] if d.startswith("conmh/")}
    assert fit_deps == {f"conmh/{name}" for name in training_run.TRAINING_CODE} | {
        "conmh/methods/${item.method}.py",
        "conmh/methods/__init__.py",
    }
    for name in ("fit", "encode", "evaluate"):
        assert dvc["stages"][name]["matrix"]["method"] == "${methods}"  # the methods of config.yaml


def test_dvc_yaml_and_snakemake_rerun_a_step_for_the_same_keys():
    """dvc.yaml's params of each stage are settings.STEP_KEYS, the keys a Snakemake rule's params hold."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for step, keys in settings.STEP_KEYS.items():
        stage = dvc["stages"][step]
        stage = stage.get("do", stage)  # a foreach stage
        (params,) = [p["config.yaml"] for p in stage["params"]]
        named = [k.replace("${item.dataset}", "{dataset}").replace("${key}", "{dataset}") for k in params]
        assert [k.replace("${item.method}", "{method}") for k in named] == list(keys), step


def test_a_job_depends_on_its_own_keys_only(cfg):
    fit = settings.step_settings(cfg, "fit", "fcvid", "lsh")
    assert fit["options.lsh"] == {"seed": 1} and "options.itq" not in fit and "ks" not in fit
    assert fit["fcvid.recipe"] == {} and "yfcc.recipe" not in fit
    assert settings.step_settings(cfg, "evaluate", "fcvid", "lsh") == {"ks": cfg["ks"]}


def test_snakefile_rules_run_the_same_steps():
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    from conmh.pipeline.cli import STEPS

    for name in STEPS:
        if name != "miniature":  # DVC only: Snakemake's download generates a miniature itself
            assert f'"conmh pipeline {name} ' in rules


def test_a_failing_step_writes_its_log_and_shows_it(tmp_path, capsys):
    raw = raw_config()
    raw["paths"]["data"] = str(tmp_path / "nowhere")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "logs" / "download.log"
    assert pipeline(["download", "--dataset", "yfcc", "--config", str(config), "--log", str(log)]) == 4
    assert "yfcc_train_feats_1.h5" in log.read_text()
    assert log.read_text() in capsys.readouterr().err


# --------------------------------------------------------------------------- GPUs, launch, training folders


def test_visible_gpus_come_from_cuda_visible_devices():
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_concurrent_jobs_get_different_gpus_and_a_third_waits(tmp_path):
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(gpus.gpu_slots(["0", "1"], tmp_path))
        second = stack.enter_context(gpus.gpu_slots(["0", "1"], tmp_path))
        assert sorted(first + second) == ["0", "1"]
        got: list[list[str]] = []

        def third() -> None:
            with gpus.gpu_slots(["0", "1"], tmp_path, poll=0.05) as held:
                got.append(held)

        waiter = threading.Thread(target=third)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # both GPUs are held
    waiter.join(5)
    assert got and len(got[0]) == 1 and got[0][0] in {"0", "1"}


def test_a_multi_gpu_job_holds_all_its_gpus_or_waits(tmp_path):
    with gpus.gpu_slots(["0", "1", "2"], tmp_path, count=2) as pair:
        assert len(set(pair)) == 2
        with gpus.gpu_slots(["0", "1", "2"], tmp_path) as single:  # the one left
            assert single == sorted({"0", "1", "2"} - set(pair))
        got: list[list[str]] = []

        def pair_job() -> None:
            with gpus.gpu_slots(["0", "1", "2"], tmp_path, count=2, poll=0.05) as held:
                got.append(held)

        waiter = threading.Thread(target=pair_job)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # one free GPU is not enough, and it is not kept meanwhile
        with gpus.gpu_slots(["0", "1", "2"], tmp_path) as single:
            assert len(single) == 1
    waiter.join(5)
    assert got and len(got[0]) == 2


def test_more_gpus_than_visible_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="needs 4 GPUs, but only 2"):
        with gpus.gpu_slots(["0", "1"], tmp_path, count=4):
            pass


def test_no_gpu_means_no_lock(tmp_path):
    with gpus.gpu_slots([], tmp_path) as held:
        assert held == []


def test_launch_one_node_is_torchrun_standalone():
    cmd = ["conmh", "train", "--dataset", "fcvid", "--threads", "4"]
    assert launch.launch_command(cmd, 1, 1, {}) == [sys.executable, "-m", "conmh", *cmd[1:]]
    assert launch.launch_command(cmd, 4, 1, {}) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "conmh",
        "train",
        "--dataset",
        "fcvid",
        "--threads",
        "4",
    ]


def test_launch_several_nodes_needs_slurm_and_meets_at_its_first_node(monkeypatch):
    cmd = ["conmh", "train", "--dataset", "yfcc"]
    with pytest.raises(LaunchError, match="needs a SLURM allocation"):
        launch.launch_command(cmd, 4, 2, {})
    # The allocation's nodes come from slurmctld: a job step's SLURM_JOB_NODELIST names only the step's node.
    monkeypatch.setattr(launch, "allocation_nodes", lambda job_id: {"4242": ["gpu07", "gpu08"]}[job_id])
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu07", "MASTER_PORT": "29611"}
    argv = launch.launch_command(cmd, 4, 2, env)
    assert argv[:3] == ["srun", "--overlap", "--jobid=4242"] and "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    rdzv = argv[argv.index("torch.distributed.run") + 1 : argv.index("-m", argv.index("torch.distributed.run"))]
    assert rdzv == [
        "--nproc-per-node",
        "4",
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "gpu07:29611",
        "--rdzv-id",
        "4242",
    ]
    assert argv[-4:] == ["conmh", "train", "--dataset", "yfcc"]
    with pytest.raises(LaunchError, match="has 2 .*--nodes=3"):
        launch.launch_command(cmd, 4, 3, env)


def test_the_multi_node_srun_runs_without_the_steps_slurm_variables():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "a",
        "SRUN_CPUS_PER_TASK": "8",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "PATH": "/bin",
        "MASTER_PORT": "29611",
    }
    assert launch.srun_env(env) == {"SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin", "MASTER_PORT": "29611"}


def test_launch_refuses_what_cannot_run_in_parallel():
    with pytest.raises(LaunchError, match="only `conmh train`"):
        launch.launch_command(["conmh", "encode"], 2, 1, {})
    with pytest.raises(LaunchError, match=">= 1"):
        launch.launch_command(["conmh", "train"], 0, 1, {})


TRAIN_CMD = ["conmh", "train", "--dataset", "fcvid", "--epochs", "800", "--device", "auto", "--threads", "8"]


def _leftovers(folder: Path) -> None:
    for name in training_run.TRAIN_FILES:
        (folder / name).write_text("old")


def test_an_identical_run_reuses_its_checkpoint(tmp_path):
    assert training_run.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True) is False
    _leftovers(tmp_path)
    # Threads, device and activation checkpointing (same weights) may change between the
    # interrupted run and its continuation.
    again = TRAIN_CMD[:-4] + ["--device", "cuda", "--threads", "4", "--activation-checkpointing"]
    assert training_run.prepare_train_dir(tmp_path, again, resume=True) is True
    assert (tmp_path / "checkpoint.pt").read_text() == "old"


@pytest.mark.parametrize("resume, other", [(True, TRAIN_CMD[:5] + ["500"] + TRAIN_CMD[6:]), (False, TRAIN_CMD)])
def test_a_changed_or_non_resumed_run_starts_from_scratch(tmp_path, resume, other):
    training_run.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True)
    _leftovers(tmp_path)
    assert training_run.prepare_train_dir(tmp_path, other, resume=resume) is False
    assert not any((tmp_path / name).exists() for name in training_run.TRAIN_FILES)


def test_changed_training_code_starts_from_scratch(tmp_path, monkeypatch):
    training_run.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True)
    _leftovers(tmp_path)
    monkeypatch.setattr(training_run, "code_fingerprint", lambda: "other code")
    assert training_run.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True) is False
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_gpu_step_sets_cuda_visible_devices_to_the_locked_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    monkeypatch.setenv("CONMH_GPU_LOCK_DIR", str(tmp_path))
    with gpus.on_free_gpus(1) as held:
        assert held == [os.environ["CUDA_VISIBLE_DEVICES"]] and held[0] in {"5", "6"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
    with gpus.on_free_gpus(0) as held:
        assert held == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"


def test_the_training_code_is_the_packages_own_modules():
    paths = training_run.training_code()
    assert [p.name for p in paths] == list(training_run.TRAINING_CODE) and all(p.is_file() for p in paths)


# --------------------------------------------------------------------------- download


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ACTIVITYNET_FILES = ["train_feats.h5", "test_feats.h5", "re_label.mat", "query_feats.h5", "q_label.mat"]


def _release(folder: Path) -> Path:
    folder.mkdir()
    for name in ACTIVITYNET_FILES:
        (folder / name).write_bytes(name.encode())
    return folder


def test_real_files_are_recorded_with_their_configured_sha256(tmp_path):
    data, manifest = _release(tmp_path / "data"), tmp_path / "download.json"
    result = download.real("activitynet", data, manifest, {"re_label.mat": _sha(b"re_label.mat")})
    assert [f["file"] for f in result["files"]] == ACTIVITYNET_FILES
    entry = {f["file"]: f for f in result["files"]}["re_label.mat"]
    assert entry["sha256"] == _sha(b"re_label.mat") and entry["bytes"] == len(b"re_label.mat")


def test_a_file_with_the_wrong_sha256_is_refused_naming_it_and_both_sums(tmp_path):
    data = _release(tmp_path / "data")
    with pytest.raises(DataError) as err:
        download.real("activitynet", data, tmp_path / "m.json", {"q_label.mat": _sha(b"genuine")})
    assert err.value.exit_code == 3
    message = str(err.value)
    assert str(data / "q_label.mat") in message and _sha(b"genuine") in message and _sha(b"q_label.mat") in message
    assert (data / "q_label.mat").read_bytes() == b"q_label.mat"  # the user's file is left where it is


def test_a_known_sum_is_reused_for_an_unchanged_file_and_computed_again_for_a_changed_one(tmp_path, monkeypatch):
    data, manifest = _release(tmp_path / "data"), tmp_path / "download.json"
    sums = {"train_feats.h5": _sha(b"train_feats.h5")}
    manifest.write_text(json.dumps(download.real("activitynet", data, manifest, sums)))
    hashed = []
    monkeypatch.setattr(download, "sha256_of", lambda path: hashed.append(path.name) or _sha(path.read_bytes()))
    download.real("activitynet", data, manifest, sums)
    assert hashed == []
    (data / "train_feats.h5").write_bytes(b"other")
    with pytest.raises(DataError, match="differs from the configured"):
        download.real("activitynet", data, manifest, sums)
    assert hashed == ["train_feats.h5"]


def test_missing_files_give_instructions_not_a_traceback(tmp_path, capsys):
    data = tmp_path / "data" / "fcvid"
    data.mkdir(parents=True)
    (data / "fcv_test_feats.h5").write_bytes(b"x")
    raw = raw_config()
    raw["paths"].update(data=str(tmp_path / "data"), results=str(tmp_path / "results"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = pipeline(["download", "--dataset", "fcvid", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 4
    assert "Traceback" not in err
    assert "huangmozhi9527/ConMH" in err and "Baidu" in err
    assert "fcv_train_feats.h5" in err and "fcv_test_labels.mat" in err
    assert "fcv_test_feats.h5  (" not in err  # present files are not listed
    assert str(data) in err
    assert not (tmp_path / "results" / "data" / "fcvid" / "download.json").exists()


def test_sums_of_files_outside_the_release_are_refused(tmp_path):
    with pytest.raises(DataError, match="not part of the release"):
        download.real("yfcc", tmp_path, tmp_path / "m.json", {"yfcc_train.h5": "0" * 64})


def test_miniature_is_generated_once_then_kept(tmp_path):
    raw = raw_config()
    raw["miniature"].update(seed=3, sizes={"yfcc-mini": TINY_YFCC})
    cfg = checked_in(raw, tmp_path)
    data, manifest = Path(settings.data_dir(cfg, "yfcc-mini")), Path(Layout.of(cfg).manifest("yfcc-mini"))
    assert steps.download(cfg, "yfcc-mini") == 0
    first = json.loads(manifest.read_text())
    assert first["spec"]["n_train"] == 40 and first["seed"] == 3 and first["dataset"] == "yfcc-mini"
    assert sorted(f["file"] for f in first["files"]) == sorted(f for _, f, _ in get_layout("yfcc").all_files())
    stamps = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    manifest_stamp = manifest.stat().st_mtime_ns
    assert steps.download(cfg, "yfcc-mini") == 0
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == stamps
    assert manifest.stat().st_mtime_ns == manifest_stamp


def test_dvcs_miniature_stage_generates_only_the_listed_miniatures(tmp_path):
    """DVC's matrix names every miniature: a listed one is generated, any other gets an empty folder
    (its stage's output), and nothing of a release is ever generated."""
    raw = raw_config()
    raw["datasets"] = ["yfcc-mini"]
    raw["miniature"]["sizes"] = {"yfcc-mini": TINY_YFCC}
    cfg = checked_in(raw, tmp_path)
    assert steps.miniature(cfg, "yfcc-mini") == 0
    listed = Path(settings.data_dir(cfg, "yfcc-mini"))
    assert sorted(p.name for p in listed.iterdir()) == sorted(f for _, f, _ in get_layout("yfcc").all_files())
    assert steps.miniature(cfg, "fcvid-mini") == 0
    assert list(Path(settings.data_dir(cfg, "fcvid-mini")).iterdir()) == []
    assert not Path(Layout.of(cfg).manifest("fcvid-mini")).exists()
    with pytest.raises(ConfigError, match="not a miniature"):
        steps.miniature(cfg, "fcvid")


# --------------------------------------------------------------------------- report


def _metrics(dataset: str, method: str, bits: int, value: float, ks=(5, 10, 20, 40, 60, 80, 100)) -> dict:
    radius = list(range(bits + 1))
    return {
        "dataset": dataset,
        "method": method,
        "bits": bits,
        "map": {str(k): value - k / 1000 for k in ks},
        "precision_within_radius_2": value / 2,
        "pr_curve": {
            "radius": radius,
            "precision": [value / (1 + r) for r in radius],
            "recall": [r / bits for r in radius],
        },
        # three classes, the last without a query
        "per_class_map": {"n_queries": [4, 2, 0], "map": {str(k): [value, value / 3, None] for k in ks}},
    }


def _long(tmp_path: Path, runs: list[tuple[str, int]], ks=(5, 10, 20, 40, 60, 80, 100)) -> pd.DataFrame:
    """The metrics files of ``runs`` (dataset, bits) for ConMH and LSH. A file names the dataset's layout,
    as ``conmh evaluate`` writes it: the report keys it by the run."""
    paths = {}
    for d, b in runs:
        for method, value in (("conmh", 0.6), ("lsh", 0.3)):
            p = tmp_path / f"{d}-{method}-{b}.json"
            p.write_text(json.dumps(_metrics(settings.layout_of(d), method, b, value + b / 1000, ks)))
            paths[d, method, b] = p
    return tables.long_table(tables.load_details(paths))


def test_report_table_has_a_row_per_dataset_bits_and_method_for_miniatures(tmp_path):
    runs = [(d, b) for d in MINIATURES for b in (16, 32, 64)]
    table = tables.build_table(_long(tmp_path, runs), MINIATURES)
    assert list(table.columns) == [
        "dataset",
        "data",
        "bits",
        "result",
        "mAP@5",
        "mAP@20",
        "mAP@40",
        "mAP@60",
        "mAP@80",
        "mAP@100",
    ]
    assert len(table) == 9 * 2
    assert set(table["data"]) == {"synthetic"}
    assert set(table["result"]) == {tables.ROW_OURS, tables.ROW_LSH}  # never compared with the paper
    assert list(table["dataset"].unique()) == ["FCVID", "ActivityNet", "YFCC"]
    row = table[(table["dataset"] == "YFCC") & (table["bits"] == 32) & (table["result"] == tables.ROW_OURS)]
    assert row["mAP@20"].item() == pytest.approx(0.6 + 0.032 - 0.020)


def test_report_puts_the_paper_beside_real_results_with_the_difference(tmp_path):
    runs = [("fcvid", b) for b in (16, 32, 64)] + [("fcvid-mini", 64), ("yfcc-mini", 16)]
    table = tables.build_table(_long(tmp_path, runs), ["fcvid", "fcvid-mini", "yfcc-mini"])
    assert len(table) == 3 * 4 + 2 + 2
    mini = table[(table["dataset"] == "FCVID") & (table["data"] == "synthetic")]  # a release and its miniature
    assert list(mini["bits"]) == [64, 64] and list(mini["result"]) == [tables.ROW_OURS, tables.ROW_LSH]
    fc64 = table[(table["dataset"] == "FCVID") & (table["bits"] == 64) & (table["data"] == "real")].set_index("result")
    assert list(fc64.index) == [tables.ROW_OURS, tables.ROW_LSH, tables.ROW_PAPER, tables.ROW_DIFF]
    # docs/reference.md §6, FCVID 64 bits.
    assert list(fc64.loc[tables.ROW_PAPER, ["mAP@5", "mAP@20", "mAP@40", "mAP@60", "mAP@80", "mAP@100"]]) == [
        0.524,
        0.373,
        0.326,
        0.301,
        0.283,
        0.267,
    ]
    for k in paper.PAPER_KS:
        assert fc64.loc[tables.ROW_DIFF, f"mAP@{k}"] == pytest.approx(
            fc64.loc[tables.ROW_OURS, f"mAP@{k}"] - fc64.loc[tables.ROW_PAPER, f"mAP@{k}"]
        )
    assert set(table.loc[table["dataset"] == "YFCC", "result"]) == {tables.ROW_OURS, tables.ROW_LSH}


def test_paper_table_matches_the_reference():
    assert len(paper.PAPER) == 9
    assert paper.PAPER["activitynet", 16] == (0.156, 0.081, 0.050, 0.036, 0.029, 0.024)
    assert paper.PAPER["yfcc", 64] == (0.369, 0.195, 0.158, 0.144, 0.135, 0.130)
    for values in paper.PAPER.values():  # mAP@K falls with K in the paper's table
        assert list(values) == sorted(values, reverse=True)


def test_report_leaves_missing_ks_empty(tmp_path):
    table = tables.build_table(_long(tmp_path, [("fcvid", 16)], ks=(5, 20)), ["fcvid"])
    assert [c for c in table.columns if c.startswith("mAP@")] == ["mAP@5", "mAP@20"]
    md = tables.to_markdown(table)
    assert "+0." in md or "-0." in md  # differences are signed


def test_paper_table_csv_is_the_table_of_docs_reference():
    doc = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for (dataset, bits), values in paper.PAPER.items():
        assert any(str(bits) in line and all(f"{v:.3f}" in line for v in values) for line in doc.splitlines()), (
            dataset,
            bits,
        )


def test_report_writes_tables_figures_metrics_and_plots(tmp_path):
    raw = raw_config()
    raw.update(datasets=["activitynet-mini"], bits=[16, 64])
    cfg = checked_in(raw, tmp_path)
    lay = Layout.of(cfg)
    for d, b in settings.runs(cfg):
        for method, value in (("conmh", 0.5), ("lsh", 0.2), ("itq", 0.3)):
            path = Path(lay.metrics(method, d, b))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_metrics(d, method, b, value)))
    for b in (16, 64):
        log = Path(lay.fit_log("conmh", "activitynet-mini", b))
        log.parent.mkdir(parents=True, exist_ok=True)
        entries = [
            {
                "epoch": e,
                "loss": 3 - e / 10,
                "recon": 1.0,
                "contrast": 2 - e / 10,
                "precision": "fp32",
                "device": "cpu (Test CPU)",
                "world_size": 1,
                "seconds": 2.0,
                "videos_per_s": 50.0,
                # evaluated after epochs 2 and 3 (eval_every), at 16 bits only
                **({"eval": {"map": {"20": b / 100 + e / 10}, "seconds": 0.5}} if b == 16 and e > 1 else {}),
            }
            for e in (1, 2, 3)
        ]
        log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    verified = Path(lay.verify_report("activitynet-mini"))
    verified.parent.mkdir(parents=True)
    verified.write_text(
        json.dumps(
            {
                "data_dir": "data/activitynet-mini",
                "files": [
                    {
                        "file": "train_feats.h5",
                        "key": "feats",
                        "shape": [6, 30, 8],
                        "dtype": "float32",
                        "sha256": "ab" * 32,
                    }
                ],
            }
        )
    )
    Path(lay.manifest("activitynet-mini")).write_text(json.dumps({"files": [{"file": "train_feats.h5", "bytes": 7}]}))
    assert steps.report(cfg) == 0
    out = Path(lay.results)
    # How it was made: each table as CSV, and all of them on one HTML page for the Snakemake report.
    runtimes = pd.read_csv(out / "provenance" / "runtimes.csv")
    assert runtimes[["bits", "device", "epochs", "train_seconds"]].values.tolist() == [
        [16, "cpu (Test CPU)", 3, 6.0],
        [64, "cpu (Test CPU)", 3, 6.0],
    ]
    data = pd.read_csv(out / "provenance" / "data.csv")
    assert data[["dataset", "source", "folder", "file", "shape", "bytes", "sha256"]].values.tolist() == [
        ["activitynet-mini", "miniature", "data/activitynet-mini", "train_feats.h5", "6x30x8", 7, "ab" * 32]
    ]
    configuration = pd.read_csv(out / "provenance" / "configuration.csv").set_index("key")["value"]
    assert list(configuration.index) == sorted(configuration.index)  # whichever engine read the config
    assert configuration["bits"] == "[16, 64]" and configuration["datasets"] == '["activitynet-mini"]'
    assert set(pd.read_csv(out / "provenance" / "software.csv")["component"]) >= {"python", "conmh", "torch", "cpu"}
    page = (out / "provenance" / "index.html").read_text()
    assert all(h in page for h in ("Training runs", "Data", "Software and machine", "Configuration"))
    assert "ConMH (ours)" in (out / "table.html").read_text()
    loss = pd.read_csv(out / "plots" / "loss.csv")
    assert list(loss.columns) == ["dataset", "bits", "epoch", "loss", "recon", "contrast"] and len(loss) == 6
    held_out = pd.read_csv(out / "plots" / "train_map.csv")
    assert held_out.to_dict("list") == {
        "dataset": ["ActivityNet (synthetic)"] * 2,
        "bits": [16, 16],
        "epoch": [2, 3],
        "mAP": [pytest.approx(0.36), pytest.approx(0.46)],
    }
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 6 and set(table["data"]) == {"synthetic"}
    assert list(table["result"][:3]) == ["ConMH (ours)", "ITQ (ours)", "LSH (ours)"]
    assert "synthetic" in (out / "table.md").read_text()
    assert (out / "table.tex").read_text().startswith("\\begin{tabular}")
    assert sorted(p.relative_to(out / "summary").as_posix() for p in (out / "summary").rglob("*.json")) == [
        "activitynet-mini/conmh-16bits.json",
        "activitynet-mini/conmh-64bits.json",
        "activitynet-mini/itq-16bits.json",
        "activitynet-mini/itq-64bits.json",
        "activitynet-mini/lsh-16bits.json",
        "activitynet-mini/lsh-64bits.json",
    ]
    summary = json.loads((out / "summary" / "activitynet-mini" / "conmh-16bits.json").read_text())
    assert list(summary) == [f"mAP@{k}" for k in (5, 10, 20, 40, 60, 80, 100)] + ["P@r<=2"]
    assert summary["mAP@5"] == pytest.approx(0.495) and summary["P@r<=2"] == pytest.approx(0.25)
    pr = pd.read_csv(out / "plots" / "pr_curve.csv")
    assert list(pr.columns) == ["dataset", "method", "bits", "radius", "precision", "recall"]
    assert len(pr) == 3 * (17 + 65) and list(pr["method"].unique()) == ["ConMH", "ITQ", "LSH"]
    lsh16 = pr[(pr["method"] == "LSH") & (pr["bits"] == 16)]
    assert list(lsh16["radius"]) == list(range(17)) and lsh16["precision"].iloc[2] == pytest.approx(0.2 / 3, abs=1e-6)
    curves = pd.read_csv(out / "plots" / "map_at_k.csv")
    assert list(curves.columns) == ["dataset", "method", "bits", "k", "mAP"]
    assert len(curves) == 3 * 2 * 7 and set(curves["dataset"]) == {"ActivityNet (synthetic)"}
    lsh64 = curves[(curves["method"] == "LSH") & (curves["bits"] == 64)]
    assert list(lsh64["k"]) == [5, 10, 20, 40, 60, 80, 100]
    assert list(lsh64["mAP"]) == pytest.approx([0.2 - k / 1000 for k in (5, 10, 20, 40, 60, 80, 100)])
    # No real dataset: no comparison with the paper, and no figure drawn empty to say so.
    drawn = ["loss_curves.png", "map_at_k.png", "per_class.png", "pr_curves.png"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == drawn
    for name in drawn:
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_figure_with_nothing_to_show_is_left_out(cfg):
    always = ("map_at_k", "pr_curves", "per_class")
    assert paper.figures_of(cfg) == (*always, "loss_curves")  # miniatures only
    cfg["datasets"] = [*cfg["datasets"], "yfcc"]
    assert paper.figures_of(cfg) == (*always, "ours_vs_paper", "loss_curves")
    cfg["bits"] = [128]  # no paper numbers at 128 bits
    assert paper.figures_of(cfg) == (*always, "loss_curves")
    cfg["bits"] = [64]
    cfg["checkpoints"] = {d: {"64": f"/m/{d}.pth"} for d in cfg["datasets"]}  # nothing trained
    assert paper.figures_of(cfg) == (*always, "ours_vs_paper")


def test_the_pr_figure_draws_every_radius_as_it_is(tmp_path):
    """Radii that share a recall are points of their own: not averaged (with a random bootstrap band)."""
    import matplotlib

    matplotlib.use("Agg")
    recall = [0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]  # a code length's radii often reach the same recall
    pr = pd.DataFrame(
        {
            "dataset": "FCVID (synthetic)",
            "method": ["ConMH"] * 7 + ["LSH"] * 7,
            "bits": 6,
            "radius": list(range(7)) * 2,
            "precision": [0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.1, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1],
            "recall": recall * 2,
        }
    )
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    figures.figure_pr(pr, first)
    figures.figure_pr(pr, second)
    assert first.read_bytes() == second.read_bytes()
