"""Unit tests of the pipeline's scripts (workflow/scripts): config checking, the commands
both workflow engines run, GPU slots and resumable training folders, downloads
(sha256, quarantine, resume over HTTP and file://), and the report table."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import workflow/scripts/<name>.py under a name that cannot clash with other modules."""
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", ROOT / "workflow" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


download, job, report, steps = (_load(n) for n in ("download", "job", "report", "steps"))
_mirror_spec = importlib.util.spec_from_file_location("workflow_range_mirror", ROOT / "benchmarks" / "range_mirror.py")
range_mirror = importlib.util.module_from_spec(_mirror_spec)
_mirror_spec.loader.exec_module(range_mirror)
RangeMirror = range_mirror.RangeMirror


@pytest.fixture
def cfg() -> dict:
    return steps.load_config(ROOT / "config.yaml")


def raw_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


# --------------------------------------------------------------------------- config


def test_default_config_is_valid_and_runs_the_paper_grid(cfg):
    assert cfg["datasets"] == ["fcvid", "activitynet", "yfcc"]
    assert cfg["bits"] == [16, 32, 64]
    assert all(cfg[d]["source"] == "miniature" for d in steps.DATASETS)
    # The paper's recipes (docs/reference.md §4), epochs = the evaluated epoch.
    assert cfg["fcvid"]["recipe"] == {"mask_ratio": 0.75, "batch_size": 512, "epochs": 800, "alpha": 1.0,
                                      "temperature": 0.5, "tau_plus": 0.1, "lr": 1e-4, "seed": 1}
    assert cfg["activitynet"]["recipe"] == {"mask_ratio": 0.5, "batch_size": 128, "epochs": 500, "alpha": 0.2,
                                            "temperature": 0.5, "tau_plus": 0.05, "lr": 1e-4, "seed": 1}
    assert cfg["yfcc"]["recipe"] == {"mask_ratio": 0.75, "batch_size": 128, "epochs": 40, "alpha": 1.0,
                                     "temperature": 0.5, "tau_plus": 0.1, "lr": 1e-4, "seed": 1}


def test_config_recipes_match_the_package_recipes(cfg):
    from conmh.recipes import get_recipe

    for d in steps.DATASETS:
        package = get_recipe(d).to_dict()
        assert {k: package[k] for k in cfg[d]["recipe"]} == cfg[d]["recipe"]


def test_command_line_strings_are_converted_to_schema_types():
    # snakemake --config parses nested values with YAML's BaseLoader: all strings.
    raw = raw_config()
    raw["bits"] = ["16", "64"]
    raw["fcvid"]["recipe"]["epochs"] = "5"
    raw["fcvid"]["recipe"]["lr"] = "3e-4"
    raw["resume"] = "false"
    raw["checkpoints"] = {"fcvid": {64: "/models/f64.pth"}}
    cfg = steps.check_config(raw)
    assert cfg["bits"] == [16, 64]
    assert cfg["fcvid"]["recipe"]["epochs"] == 5 and cfg["fcvid"]["recipe"]["lr"] == pytest.approx(3e-4)
    assert cfg["resume"] is False
    assert cfg["checkpoints"] == {"fcvid": {"64": "/models/f64.pth"}}


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda c: c.update(datasets=["fcvidd"]), "datasets[0]"),
        (lambda c: c["fcvid"]["recipe"].update(mask_ratio=1.5), "fcvid.recipe.mask_ratio"),
        (lambda c: c["yfcc"].update(source="baidu"), "yfcc.source"),
        (lambda c: c["activitynet"].update(sha256={"train_feats.h5": "abc"}), "activitynet.sha256.train_feats.h5"),
        (lambda c: c["activitynet"].update(mirrors={"train_feats.h5": "ftp://x"}), "activitynet.mirrors"),
        (lambda c: c.update(bits=["x"]), "bits[0]"),
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
    with pytest.raises(steps.ConfigError) as err:
        steps.check_config(raw)
    assert f"  - {where}" in str(err.value)


def test_every_problem_is_listed_at_once():
    raw = raw_config()
    raw["bits"] = [0]
    raw["fcvid"]["recipe"]["batch_size"] = 1
    with pytest.raises(steps.ConfigError, match="2 problems") as err:
        steps.check_config(raw)
    assert "bits[0]" in str(err.value) and "fcvid.recipe.batch_size" in str(err.value)


def test_checkpoint_for_a_code_length_not_run_is_refused():
    raw = raw_config()
    raw["checkpoints"] = {"fcvid": {128: "/m.pth"}}
    with pytest.raises(steps.ConfigError, match="checkpoints.fcvid.128"):
        steps.check_config(raw)


def test_steps_cli_refuses_a_bad_config_file(tmp_path, capsys):
    raw = raw_config()
    raw["fcvid"]["recipe"]["epochs"] = 0
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert steps.main(["download", "--dataset", "fcvid", "--config", str(bad), "--print"]) == 3
    assert "fcvid.recipe.epochs: 0 is less than the minimum of 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- commands


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_miniature_training_uses_the_miniature_overrides(cfg):
    argv = steps.command(cfg, "train", "activitynet", 32)
    conmh = argv[argv.index("--") + 1:]
    assert conmh[:2] == ["conmh", "train"]
    assert _opt(conmh, "--epochs") == str(cfg["miniature"]["train"]["epochs"])
    assert _opt(conmh, "--batch-size") == str(cfg["miniature"]["train"]["batch_size"])
    assert _opt(conmh, "--alpha") == "0.2" and _opt(conmh, "--mask-ratio") == "0.5"  # the paper's, not overridden
    assert _opt(conmh, "--preset") == cfg["miniature"]["preset"] and _opt(conmh, "--device") == "cpu"
    assert _opt(conmh, "--data-dir") == "data/miniature/activitynet"
    assert "--gpu" not in argv and "--resume" not in argv[: argv.index("--")]
    assert not steps.uses_gpu(cfg, "activitynet")


def test_real_training_uses_the_paper_recipe_a_gpu_and_resume(cfg):
    cfg["fcvid"]["source"] = "real"
    argv = steps.command(cfg, "train", "fcvid", 64)
    wrapper, conmh = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    assert "--gpu" in wrapper and "--resume" in wrapper
    for option, value in [("--epochs", "800"), ("--batch-size", "512"), ("--lr", "0.0001"), ("--seed", "1"),
                          ("--preset", "small"), ("--device", "auto"), ("--data-dir", "data/real/fcvid")]:
        assert _opt(conmh, option) == value
    assert steps.uses_gpu(cfg, "fcvid")
    assert _opt(conmh, "--precision") == "auto" and "--activation-checkpointing" not in conmh
    cfg["activation_checkpointing"] = True
    assert "--activation-checkpointing" in steps.command(cfg, "train", "fcvid", 64)


def test_released_checkpoint_is_encoded_instead_of_trained(cfg):
    cfg["checkpoints"] = {"yfcc": {"32": "/models/yfcc_32.pth"}}
    assert ("yfcc", 32) not in steps.trained_runs(cfg) and ("yfcc", 64) in steps.trained_runs(cfg)
    with pytest.raises(ValueError, match="nothing to train"):
        steps.command(cfg, "train", "yfcc", 32)
    assert _opt(steps.command(cfg, "encode", "yfcc", 32), "--checkpoint") == "/models/yfcc_32.pth"
    # DVC keeps its train stage, which copies the checkpoint to where encode reads it.
    dvc_train = steps.command(cfg, "train", "yfcc", 32, dvc=True)
    assert _opt(dvc_train, "--import-checkpoint") == "/models/yfcc_32.pth"
    assert _opt(steps.command(cfg, "encode", "yfcc", 32, dvc=True), "--checkpoint") == "work/train/yfcc/32bits/model.pt"
    assert "--released" in steps.report_command(cfg) and "yfcc:32" in steps.report_command(cfg)


def test_steps_cli_prints_the_command_snakemake_runs(cfg, capsys):
    assert steps.main(["train", "--dataset", "fcvid", "--bits", "16", "--print"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == steps.shell(steps.command(cfg, "train", "fcvid", 16)) + f" --threads {cfg['threads']['train']}"
    assert steps.main(["evaluate", "--method", "lsh", "--dataset", "yfcc", "--bits", "64", "--print"]) == 0
    assert capsys.readouterr().out.split() == steps.evaluate_command(cfg, "lsh", "yfcc", 64)


def test_dvc_yaml_declares_every_snakemake_step_and_its_code():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert set(dvc["stages"]) == set(steps.STEPS)
    assert dvc["vars"] == ["config.yaml"]
    for stage in dvc["stages"].values():
        assert stage["cmd"].startswith("python workflow/scripts/steps.py ")
    train_deps = set(dvc["stages"]["train"]["deps"])
    assert {f"conmh/{name}" for name in job.TRAINING_CODE} <= train_deps


# --------------------------------------------------------------------------- job.py


def test_visible_gpus_come_from_cuda_visible_devices():
    assert job.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert job.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert job.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_concurrent_jobs_get_different_gpus_and_a_third_waits(tmp_path):
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(job.gpu_slots(["0", "1"], tmp_path))
        second = stack.enter_context(job.gpu_slots(["0", "1"], tmp_path))
        assert sorted(first + second) == ["0", "1"]
        got: list[list[str]] = []

        def third() -> None:
            with job.gpu_slots(["0", "1"], tmp_path, poll=0.05) as gpus:
                got.append(gpus)

        waiter = threading.Thread(target=third)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # both GPUs are held
    waiter.join(5)
    assert got and len(got[0]) == 1 and got[0][0] in {"0", "1"}


def test_a_multi_gpu_job_holds_all_its_gpus_or_waits(tmp_path):
    with job.gpu_slots(["0", "1", "2"], tmp_path, count=2) as pair:
        assert len(set(pair)) == 2
        with job.gpu_slots(["0", "1", "2"], tmp_path) as single:  # the one left
            assert single == sorted({"0", "1", "2"} - set(pair))
        got: list[list[str]] = []

        def pair_job() -> None:
            with job.gpu_slots(["0", "1", "2"], tmp_path, count=2, poll=0.05) as gpus:
                got.append(gpus)

        waiter = threading.Thread(target=pair_job)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # one free GPU is not enough, and it is not kept meanwhile
        with job.gpu_slots(["0", "1", "2"], tmp_path) as single:
            assert len(single) == 1
    waiter.join(5)
    assert got and len(got[0]) == 2


def test_more_gpus_than_visible_is_refused(tmp_path):
    with pytest.raises(job.JobError, match="needs 4 GPUs, but only 2"):
        with job.gpu_slots(["0", "1"], tmp_path, count=4):
            pass


def test_no_gpu_means_no_lock(tmp_path):
    with job.gpu_slots([], tmp_path) as gpus:
        assert gpus == []


def test_launch_one_node_is_torchrun_standalone():
    cmd = ["conmh", "train", "--dataset", "fcvid", "--threads", "4"]
    assert job.launch_command(cmd, 1, 1, {}) == cmd
    assert job.launch_command(cmd, 4, 1, {}) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", "conmh.cli", "train", "--dataset", "fcvid", "--threads", "4"]


def test_launch_several_nodes_needs_slurm_and_meets_at_its_first_node(monkeypatch):
    cmd = ["conmh", "train", "--dataset", "yfcc"]
    with pytest.raises(job.JobError, match="needs a SLURM allocation"):
        job.launch_command(cmd, 4, 2, {})
    # The allocation's nodes come from slurmctld: a job step's SLURM_JOB_NODELIST names only the step's node.
    monkeypatch.setattr(job, "allocation_nodes", lambda job_id: {"4242": ["gpu07", "gpu08"]}[job_id])
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu07", "MASTER_PORT": "29611"}
    argv = job.launch_command(cmd, 4, 2, env)
    assert argv[:3] == ["srun", "--overlap", "--jobid=4242"] and "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    rdzv = argv[argv.index("torch.distributed.run") + 1:argv.index("-m", argv.index("torch.distributed.run"))]
    assert rdzv == ["--nproc-per-node", "4", "--nnodes", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu07:29611", "--rdzv-id", "4242"]
    assert argv[-4:] == ["conmh.cli", "train", "--dataset", "yfcc"]
    with pytest.raises(job.JobError, match="has 2 .*--nodes=3"):
        job.launch_command(cmd, 4, 3, env)


def test_the_multi_node_srun_runs_without_the_steps_slurm_variables():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "a", "SRUN_CPUS_PER_TASK": "8",
           "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin", "MASTER_PORT": "29611"}
    assert job.srun_env(env) == {"SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin", "MASTER_PORT": "29611"}


def test_launch_refuses_what_cannot_run_in_parallel():
    with pytest.raises(job.JobError, match="only `conmh train`"):
        job.launch_command(["conmh", "encode"], 2, 1, {})
    with pytest.raises(job.JobError, match=">= 1"):
        job.launch_command(["conmh", "train"], 0, 1, {})


TRAIN_CMD = ["conmh", "train", "--dataset", "fcvid", "--epochs", "800", "--device", "auto", "--threads", "8"]


def _leftovers(folder: Path) -> None:
    for name in job.TRAIN_FILES:
        (folder / name).write_text("old")


def test_an_identical_run_reuses_its_checkpoint(tmp_path):
    assert job.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True) is False
    _leftovers(tmp_path)
    # Threads, device and activation checkpointing (same weights) may change between the
    # interrupted run and its continuation.
    again = TRAIN_CMD[:-4] + ["--device", "cuda", "--threads", "4", "--activation-checkpointing"]
    assert job.prepare_train_dir(tmp_path, again, resume=True) is True
    assert (tmp_path / "checkpoint.pt").read_text() == "old"


@pytest.mark.parametrize("resume, other", [(True, TRAIN_CMD[:5] + ["500"] + TRAIN_CMD[6:]), (False, TRAIN_CMD)])
def test_a_changed_or_non_resumed_run_starts_from_scratch(tmp_path, resume, other):
    job.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True)
    _leftovers(tmp_path)
    assert job.prepare_train_dir(tmp_path, other, resume=resume) is False
    assert not any((tmp_path / name).exists() for name in job.TRAIN_FILES)


def test_changed_training_code_starts_from_scratch(tmp_path, monkeypatch):
    job.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True)
    _leftovers(tmp_path)
    monkeypatch.setattr(job, "code_fingerprint", lambda: "other code")
    assert job.prepare_train_dir(tmp_path, TRAIN_CMD, resume=True) is False
    assert not (tmp_path / "checkpoint.pt").exists()


def test_import_checkpoint_copies_it_without_training(tmp_path):
    released = tmp_path / "released.pth"
    released.write_bytes(b"weights")
    log = tmp_path / "results" / "log.jsonl"
    assert job.main(["train", "--out-dir", str(tmp_path / "run"), "--log-copy", str(log),
                     "--import-checkpoint", str(released)]) == 0
    assert (tmp_path / "run" / "model.pt").read_bytes() == b"weights" and log.read_text() == ""


def test_run_sets_cuda_visible_devices_to_the_locked_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setenv("CONMH_GPU_LOCK_DIR", str(tmp_path))
    out = tmp_path / "env.txt"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    assert job.main(["run", "--gpu", "--", sys.executable, "-c", code]) == 0
    assert out.read_text() == "5"


# --------------------------------------------------------------------------- download


class RangeHandler(RangeMirror):
    ranges: list[str | None] = []


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    RangeHandler.ranges = []
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ACTIVITYNET_FILES = ["train_feats.h5", "test_feats.h5", "re_label.mat", "query_feats.h5", "q_label.mat"]


def test_download_fetches_from_a_mirror_and_checks_sha256(tmp_path, server):
    root, url = server
    payload = os.urandom(3 * download.CHUNK + 123)
    (root / "train_feats.h5").write_bytes(payload)
    data = tmp_path / "data"
    data.mkdir()
    for name in ACTIVITYNET_FILES[1:]:
        (data / name).write_bytes(name.encode())
    manifest = tmp_path / "download.json"
    result = download.real("activitynet", data, manifest, {"train_feats.h5": f"{url}/train_feats.h5"},
                           {"train_feats.h5": _sha(payload)}, progress=False)
    assert (data / "train_feats.h5").read_bytes() == payload
    assert not (data / "train_feats.h5.part").exists()
    entry = {f["file"]: f for f in result["files"]}["train_feats.h5"]
    assert entry["sha256"] == _sha(payload) and entry["bytes"] == len(payload)
    assert [f["file"] for f in result["files"]] == ACTIVITYNET_FILES


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path, server):
    root, url = server
    payload = os.urandom(2 * download.CHUNK + 77)
    (root / "f.bin").write_bytes(payload)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(payload[:1000])
    download.fetch(f"{url}/f.bin", dest, progress=False)
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == payload


def test_download_resumes_from_a_file_url(tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(download.CHUNK + 5)
    src.write_bytes(payload)
    dest = tmp_path / "out" / "dst.bin"
    dest.parent.mkdir()
    (dest.parent / "dst.bin.part").write_bytes(payload[:10])
    download.fetch(src.as_uri(), dest, progress=False)
    assert dest.read_bytes() == payload


def test_a_file_with_the_wrong_sha256_is_quarantined(tmp_path, server):
    root, url = server
    (root / "train_feats.h5").write_bytes(b"tampered")
    data = tmp_path / "data"
    data.mkdir()
    for name in ACTIVITYNET_FILES[1:]:
        (data / name).write_bytes(b"x")
    with pytest.raises(download.DownloadError) as err:
        download.real("activitynet", data, tmp_path / "m.json", {"train_feats.h5": f"{url}/train_feats.h5"},
                      {"train_feats.h5": _sha(b"genuine")}, progress=False)
    assert err.value.exit_code == download.EXIT_MISSING
    assert "differs from the configured" in str(err.value)
    assert not (data / "train_feats.h5").exists()
    quarantined = list((data / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == b"tampered"


def test_a_local_file_with_the_wrong_sha256_is_quarantined_then_refetched(tmp_path, server):
    root, url = server
    (root / "q_label.mat").write_bytes(b"good")
    data = tmp_path / "data"
    data.mkdir()
    for name in ACTIVITYNET_FILES:
        (data / name).write_bytes(b"bad" if name == "q_label.mat" else b"x")
    download.real("activitynet", data, tmp_path / "m.json", {"q_label.mat": f"{url}/q_label.mat"},
                  {"q_label.mat": _sha(b"good")}, progress=False)
    assert (data / "q_label.mat").read_bytes() == b"good"
    assert [p.read_bytes() for p in (data / "quarantine").iterdir()] == [b"bad"]


def test_missing_files_give_instructions_not_a_traceback(tmp_path, capsys):
    data = tmp_path / "nowhere"
    data.mkdir()
    (data / "fcv_test_feats.h5").write_bytes(b"x")
    code = download.main(["--dataset", "fcvid", "--data-dir", str(data), "--manifest", str(tmp_path / "m.json"),
                          "--source", "real"])
    err = capsys.readouterr().err
    assert code == 4
    assert "Traceback" not in err
    assert "huangmozhi9527/ConMH" in err and "Baidu" in err
    assert "fcv_train_feats.h5" in err and "fcv_test_labels.mat" in err
    assert "fcv_test_feats.h5  (" not in err  # present files are not listed
    assert str(data) in err
    assert not (tmp_path / "m.json").exists()


def test_unknown_mirror_file_names_are_refused(tmp_path):
    with pytest.raises(download.DownloadError, match="not part of the release"):
        download.real("yfcc", tmp_path, tmp_path / "m.json", {"yfcc_train.h5": "file:///x"}, {}, progress=False)


def test_miniature_is_generated_once_then_kept(tmp_path):
    data, manifest = tmp_path / "mini", tmp_path / "m.json"
    sizes = {"n_train": 40, "n_database": 30, "n_queries": 10, "feature_dim": 16}
    assert download.main(["--dataset", "yfcc", "--data-dir", str(data), "--manifest", str(manifest),
                          "--source", "miniature", "--seed", "3"] + [f"--size={k}={v}" for k, v in sizes.items()]) == 0
    first = json.loads(manifest.read_text())
    assert first["spec"]["n_train"] == 40 and first["seed"] == 3
    assert sorted(f["file"] for f in first["files"]) == sorted(f for _, f, _ in __import__(
        "conmh.data", fromlist=["get_layout"]).get_layout("yfcc").all_files())
    stamps = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    manifest_stamp = manifest.stat().st_mtime_ns
    assert download.main(["--dataset", "yfcc", "--data-dir", str(data), "--manifest", str(manifest),
                          "--source", "miniature", "--seed", "3"] + [f"--size={k}={v}" for k, v in sizes.items()]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == stamps
    assert manifest.stat().st_mtime_ns == manifest_stamp


# --------------------------------------------------------------------------- report


def _metrics(dataset: str, method: str, bits: int, value: float, ks=(5, 10, 20, 40, 60, 80, 100)) -> dict:
    return {"dataset": dataset, "method": method, "bits": bits, "map": {str(k): value - k / 1000 for k in ks}}


def _long(tmp_path: Path, runs: list[tuple[str, int]], ks=(5, 10, 20, 40, 60, 80, 100)) -> pd.DataFrame:
    paths = []
    for d, b in runs:
        for method, value in (("conmh", 0.6), ("lsh", 0.3)):
            p = tmp_path / f"{d}-{method}-{b}.json"
            p.write_text(json.dumps(_metrics(d, method, b, value + b / 1000, ks)))
            paths.append(p)
    return report.load_metrics(paths)


def test_report_table_has_a_row_per_dataset_bits_and_method_for_miniatures(tmp_path):
    runs = [(d, b) for d in steps.DATASETS for b in (16, 32, 64)]
    table = report.build_table(_long(tmp_path, runs), {d: "miniature" for d in steps.DATASETS})
    assert list(table.columns) == ["dataset", "data", "bits", "result", "mAP@5", "mAP@20", "mAP@40", "mAP@60",
                                   "mAP@80", "mAP@100"]
    assert len(table) == 9 * 2
    assert set(table["data"]) == {"synthetic"}
    assert set(table["result"]) == {report.ROW_OURS, report.ROW_LSH}  # never compared with the paper
    assert list(table["dataset"].unique()) == ["FCVID", "ActivityNet", "YFCC"]
    row = table[(table["dataset"] == "YFCC") & (table["bits"] == 32) & (table["result"] == report.ROW_OURS)]
    assert row["mAP@20"].item() == pytest.approx(0.6 + 0.032 - 0.020)


def test_report_puts_the_paper_beside_real_results_with_the_difference(tmp_path):
    runs = [("fcvid", b) for b in (16, 32, 64)] + [("yfcc", 16)]
    table = report.build_table(_long(tmp_path, runs), {"fcvid": "real", "yfcc": "miniature"})
    assert len(table) == 3 * 4 + 2
    fc64 = table[(table["dataset"] == "FCVID") & (table["bits"] == 64)].set_index("result")
    assert list(fc64.index) == [report.ROW_OURS, report.ROW_LSH, report.ROW_PAPER, report.ROW_DIFF]
    # docs/reference.md §6, FCVID 64 bits.
    assert list(fc64.loc[report.ROW_PAPER, ["mAP@5", "mAP@20", "mAP@40", "mAP@60", "mAP@80", "mAP@100"]]) == [
        0.524, 0.373, 0.326, 0.301, 0.283, 0.267]
    for k in report.PAPER_KS:
        assert fc64.loc[report.ROW_DIFF, f"mAP@{k}"] == pytest.approx(
            fc64.loc[report.ROW_OURS, f"mAP@{k}"] - fc64.loc[report.ROW_PAPER, f"mAP@{k}"])
    assert set(table.loc[table["dataset"] == "YFCC", "result"]) == {report.ROW_OURS, report.ROW_LSH}


def test_paper_table_matches_the_reference():
    assert len(report.PAPER) == 9
    assert report.PAPER["activitynet", 16] == (0.156, 0.081, 0.050, 0.036, 0.029, 0.024)
    assert report.PAPER["yfcc", 64] == (0.369, 0.195, 0.158, 0.144, 0.135, 0.130)
    for values in report.PAPER.values():  # mAP@K falls with K in the paper's table
        assert list(values) == sorted(values, reverse=True)


def test_report_leaves_missing_ks_empty(tmp_path):
    table = report.build_table(_long(tmp_path, [("fcvid", 16)], ks=(5, 20)), {"fcvid": "real"})
    assert [c for c in table.columns if c.startswith("mAP@")] == ["mAP@5", "mAP@20"]
    md = report.to_markdown(table)
    assert "+0." in md or "-0." in md  # differences are signed


def test_report_writes_tables_figures_metrics_and_plots(tmp_path):
    runs = [("activitynet", 16), ("activitynet", 64)]
    metric_files = []
    for d, b in runs:
        for method, value in (("conmh", 0.5), ("lsh", 0.2)):
            p = tmp_path / f"{d}-{method}-{b}.json"
            p.write_text(json.dumps(_metrics(d, method, b, value)))
            metric_files.append(p)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "loss": 3 - e / 10, "recon": 1.0, "contrast": 2 - e / 10}) + "\n"
                           for e in (1, 2, 3)))
    out = tmp_path / "out"
    args = ["--out-dir", str(out), "--source", "activitynet=miniature", "--train-log", f"activitynet:16={log}"]
    for p in metric_files:
        args += ["--metrics", str(p)]
    assert report.main(args) == 0
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 4 and set(table["data"]) == {"synthetic"}
    assert "synthetic" in (out / "table.md").read_text()
    assert (out / "table.tex").read_text().startswith("\\begin{tabular}")
    assert sorted(p.relative_to(out / "summary").as_posix() for p in (out / "summary").rglob("*.json")) == [
        "activitynet/conmh-16bits.json", "activitynet/conmh-64bits.json",
        "activitynet/lsh-16bits.json", "activitynet/lsh-64bits.json"]
    summary = json.loads((out / "summary" / "activitynet" / "conmh-16bits.json").read_text())
    assert list(summary) == [f"mAP@{k}" for k in (5, 10, 20, 40, 60, 80, 100)]
    assert summary["mAP@5"] == pytest.approx(0.495)
    curves = pd.read_csv(out / "plots" / "map_at_k.csv")
    assert list(curves.columns) == ["dataset", "method", "bits", "k", "mAP"]
    assert len(curves) == 2 * 2 * 7 and set(curves["dataset"]) == {"ActivityNet (synthetic)"}
    lsh64 = curves[(curves["method"] == "LSH") & (curves["bits"] == 64)]
    assert list(lsh64["k"]) == [5, 10, 20, 40, 60, 80, 100]
    assert list(lsh64["mAP"]) == pytest.approx([0.2 - k / 1000 for k in (5, 10, 20, 40, 60, 80, 100)])
    for name in ("map_at_k.png", "ours_vs_paper.png", "loss_curves.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
