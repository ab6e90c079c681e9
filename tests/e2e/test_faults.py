"""Faults around the pipeline: interrupted and tampered downloads, and bad configurations given to snakemake.

Downloads: a transfer cut by the mirror or by SIGKILL leaves only ``NAME.part`` (which no later step
reads, so ``conmh verify`` reports the file missing rather than reading half of it), and the rerun
continues with an HTTP Range request; a file whose sha256 is wrong is moved to ``quarantine/``
with both sums in the message. Configurations: refused by ``snakemake`` itself, before any job,
with the key named. (The config checker and the download helpers have unit tests in
test_pipeline_units.py; these go through the commands a user types: the download step is
``conmh pipeline download`` with the mirror and the sha256 in its configuration file.)
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conmh.cli import main as conmh_main
from conmh.pipeline.cli import main as pipeline_main
from conmh.pipeline.paths import Layout
from helpers.range_mirror import RangeMirror

ROOT = Path(__file__).resolve().parents[2]
ACTIVITYNET = ("train_feats.h5", "test_feats.h5", "re_label.mat", "query_feats.h5", "q_label.mat")
TIMEOUT = 120
# `conmh pipeline ARGS` in a child process (conmh.pipeline.cli), with this Python.
PIPELINE = [sys.executable, "-m", "conmh", "pipeline"]


class Mirror(RangeMirror):
    """The mirror of these tests: ``cut`` drops the first full response, ``pause`` slows it."""

    ranges: list[str | None] = []


@pytest.fixture
def mirror(tmp_path: Path):
    root = tmp_path / "mirror"
    root.mkdir()
    Mirror.cut, Mirror.pause, Mirror.ranges = None, 0.0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Mirror(*a, directory=str(root), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _dataset_folder(tmp_path: Path, missing: str) -> Path:
    """A real-source ActivityNet folder that lacks one file (the others are made from a miniature)."""
    from conmh.synthetic import MiniatureSpec, make_miniature

    data = tmp_path / "data"
    make_miniature("activitynet", data, seed=0, spec=MiniatureSpec(16, 12, 6, 8, 4))
    (tmp_path / "release").mkdir()
    shutil.move(data / missing, tmp_path / "release" / missing)
    return data


def _paths(data: Path) -> dict[str, str]:
    """The pipeline's output folders (``paths``) of ``_download_argv``'s configuration."""
    return {k: str(data.parent / "pipeline" / k) for k in ("data", "work", "results", "logs")}


def _download_argv(data: Path, name: str, url: str, digest: str) -> list[str]:
    """The arguments of ``conmh pipeline download`` for a configuration (written beside ``data``) whose real
    ActivityNet folder is ``data``, with one mirror and its sha256."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    cfg["datasets"] = ["activitynet"]
    cfg["activitynet"].update(source="real", data_dir=str(data), mirrors={name: url}, sha256={name: digest})
    cfg["paths"] = _paths(data)
    config = data.parent / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return ["download", "--dataset", "activitynet", "--config", str(config)]


def _manifest(data: Path) -> Path:
    """Where the download step writes its manifest (the later steps depend on it)."""
    return Path(Layout.of({"paths": _paths(data)}).manifest("activitynet"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_cut_transfer_is_never_taken_for_the_file_and_the_rerun_resumes(tmp_path: Path, mirror, capsys) -> None:
    root, url = mirror
    data = _dataset_folder(tmp_path, "test_feats.h5")
    release = tmp_path / "release" / "test_feats.h5"
    shutil.copy2(release, root / "test_feats.h5")
    Mirror.cut = release.stat().st_size // 3
    argv = _download_argv(data, "test_feats.h5", f"{url}/test_feats.h5", _sha(release))
    assert pipeline_main(argv) == 4
    err = capsys.readouterr().err
    assert "run the step again" in err and "Traceback" not in err
    assert not (data / "test_feats.h5").exists() and (data / "test_feats.h5.part").stat().st_size == Mirror.cut
    assert not _manifest(data).exists()
    # No later step reads the partial file: verify reports the file missing (exit 4), not half an HDF5 file.
    assert conmh_main(["verify", "activitynet", str(data), "--no-checksums"]) == 4
    assert "test_feats.h5" in capsys.readouterr().err
    Mirror.cut = None
    assert pipeline_main(argv) == 0
    assert Mirror.ranges[-1] == f"bytes={release.stat().st_size // 3}-"
    assert (data / "test_feats.h5").read_bytes() == release.read_bytes()
    assert not (data / "test_feats.h5.part").exists()
    assert conmh_main(["verify", "activitynet", str(data), "--no-checksums"]) == 0


def test_a_killed_download_leaves_only_the_part_file_and_the_rerun_completes(tmp_path: Path, mirror) -> None:
    root, url = mirror
    data = tmp_path / "data"
    data.mkdir()
    for name in ACTIVITYNET[1:]:
        (data / name).write_bytes(name.encode())
    payload = os.urandom(2 << 20)  # 32 slowed pieces of 64 KiB: about 1.6 s
    (root / "train_feats.h5").write_bytes(payload)
    Mirror.pause = 0.05
    argv = PIPELINE + _download_argv(
        data, "train_feats.h5", f"{url}/train_feats.h5", hashlib.sha256(payload).hexdigest()
    )
    part = data / "train_feats.h5.part"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (part.exists() and part.stat().st_size > 0) and proc.poll() is None:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not (data / "train_feats.h5").exists()
    assert 0 < part.stat().st_size < len(payload)
    have = part.stat().st_size
    Mirror.pause = 0.0
    assert pipeline_main(argv[len(PIPELINE) :]) == 0
    assert Mirror.ranges[-1] == f"bytes={have}-"
    assert (data / "train_feats.h5").read_bytes() == payload and not part.exists()


def test_a_wrong_sha256_quarantines_the_file_and_names_both_sums(tmp_path: Path, mirror, capsys) -> None:
    root, url = mirror
    data = _dataset_folder(tmp_path, "re_label.mat")
    genuine = tmp_path / "release" / "re_label.mat"
    tampered = genuine.read_bytes()[:-1] + b"\x01"
    (root / "re_label.mat").write_bytes(tampered)
    assert pipeline_main(_download_argv(data, "re_label.mat", f"{url}/re_label.mat", _sha(genuine))) == 4
    err = capsys.readouterr().err
    assert _sha(genuine) in err and hashlib.sha256(tampered).hexdigest() in err and "Traceback" not in err
    assert not (data / "re_label.mat").exists() and not list(data.glob("re_label.mat*"))
    [kept] = (data / "quarantine").iterdir()
    assert kept.read_bytes() == tampered and "quarantine" in err
    assert not _manifest(data).exists()
    assert conmh_main(["verify", "activitynet", str(data), "--no-checksums"]) == 4  # still missing, not wrong


# --------------------------------------------------------------------------- configuration through snakemake


def _workflow(tmp_path: Path) -> Path:
    dest = tmp_path / "pipeline"
    dest.mkdir()
    shutil.copy2(ROOT / "Snakefile", dest)
    shutil.copy2(ROOT / "config.yaml", dest)
    shutil.copytree(ROOT / "workflow", dest / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _snakemake_dry(cwd: Path, *config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            shutil.which("snakemake") or "snakemake",
            "-n",
            "--cores",
            "1",
            "--config",
            "datasets=[activitynet]",
            "bits=[16]",
            *config,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# Rules in the order the pipeline runs them, so that touched outputs look like an earlier complete run.
RULE_ORDER = {"download": 0, "verify": 1, "train": 2, "encode": 3, "lsh": 3, "itq": 3, "evaluate": 4, "report": 5}


def _touch_every_output(cwd: Path) -> None:
    """Create every output of the pipeline (as listed by ``snakemake --summary``), oldest first."""
    proc = subprocess.run(
        [
            shutil.which("snakemake") or "snakemake",
            "--summary",
            "--cores",
            "1",
            "--config",
            "datasets=[activitynet]",
            "bits=[16]",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    rows = [line.split("\t") for line in proc.stdout.splitlines()[1:] if line.count("\t") >= 2]
    assert rows, proc.stderr
    for i, (path, *_) in enumerate(sorted(rows, key=lambda r: RULE_ORDER.get(r[2], len(RULE_ORDER)))):
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).touch()
        os.utime(cwd / path, (1e9 + i, 1e9 + i))


needs_snakemake = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")


@needs_snakemake
@pytest.mark.parametrize(
    "config, named",
    [
        (
            ("fcvid={recipe: {epoch: 5}}",),
            "fcvid.recipe: Additional properties are not allowed ('epoch' was unexpected)",
        ),
        (("bits=[0]",), "bits[0]: 0 is less than the minimum of 4"),
        (("threads={train: two}",), "threads.train: 'two' is not of type 'integer'"),
    ],
    ids=["unknown-key", "bits-0", "wrong-type"],
)
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path: Path, config: tuple[str, ...], named: str) -> None:
    cwd = _workflow(tmp_path)
    proc = _snakemake_dry(cwd, *config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert named in out and "Traceback (most recent call last)" not in out
    assert not (cwd / "results").exists() and not (cwd / "work").exists()


@needs_snakemake
def test_a_released_checkpoint_that_does_not_exist_is_refused_even_with_earlier_outputs(tmp_path: Path) -> None:
    cwd = _workflow(tmp_path)
    _touch_every_output(cwd)
    proc = _snakemake_dry(cwd, "checkpoints={activitynet: {16: /nonexistent/an16.pth}}")
    assert proc.returncode != 0 and "/nonexistent/an16.pth" in proc.stdout + proc.stderr
