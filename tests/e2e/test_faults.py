"""Faults around the pipeline's data and configuration, through the commands a user types.

Data: a real release fetched from a lab's own HTTP server with ``dvc import-url`` (what
docs/pipeline.md says to use for a mirror) passes the download and verify steps, and a file the
server changed, fetched again with ``dvc update``, is refused by its configured sha256 with both
sums named. Configurations: refused by ``snakemake`` itself, before any job, with the key named.
(The config checker and the download step's checks have unit tests in test_pipeline_units.py.)
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conmh.cli import main as conmh_main
from conmh.pipeline.cli import main as pipeline_main
from helpers.repo import copy_workflow

ROOT = Path(__file__).resolve().parents[2]
ACTIVITYNET = ("train_feats.h5", "test_feats.h5", "re_label.mat", "query_feats.h5", "q_label.mat")
TIMEOUT = 120


@pytest.fixture
def http_server(tmp_path: Path):
    """A plain HTTP server on localhost serving the folder it yields (with its URL)."""
    from functools import partial

    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no line per request in the test's output
            pass

    handler = partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_a_release_imported_from_a_labs_http_server_passes_and_a_changed_file_is_refused(
    tmp_path: Path, http_server, capsys
) -> None:
    from conmh.synthetic import MiniatureSpec, make_miniature

    served, url = http_server
    make_miniature("activitynet", served, seed=0, spec=MiniatureSpec(16, 12, 6, 8, 4))
    repo = tmp_path / "lab"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    (repo / "data" / "activitynet").mkdir(parents=True)
    for name in ACTIVITYNET:  # docs/pipeline.md: one `dvc import-url` per file of the release
        _run(["dvc", "import-url", f"{url}/{name}", f"data/activitynet/{name}"], repo)
    data = repo / "data" / "activitynet"
    assert all((data / name).read_bytes() == (served / name).read_bytes() for name in ACTIVITYNET)
    config = _config(tmp_path, data, {name: _sha(served / name) for name in ACTIVITYNET})
    assert pipeline_main(["download", "--dataset", "activitynet", "--config", str(config)]) == 0
    # the layout, keys, shapes and labels (`--real`, which the step adds, would also want the release's counts)
    assert conmh_main(["verify", "activitynet", str(data)]) == 0
    capsys.readouterr()

    # The server's copy changes (a damaged or different file); `dvc update` fetches it again.
    genuine = _sha(served / "re_label.mat")
    (served / "re_label.mat").write_bytes((served / "re_label.mat").read_bytes()[:-1] + b"\x01")
    _run(["dvc", "update", "data/activitynet/re_label.mat.dvc"], repo)
    assert pipeline_main(["download", "--dataset", "activitynet", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert str(data / "re_label.mat") in err and genuine in err and _sha(served / "re_label.mat") in err
    assert "Traceback" not in err


def _config(tmp_path: Path, data: Path, sums: dict[str, str]) -> Path:
    """A configuration whose real ActivityNet folder is ``data`` (``<paths.data>/activitynet``), with those
    sha256 sums."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    cfg["datasets"] = ["activitynet"]
    cfg["activitynet"].update(sha256=sums)
    cfg["paths"] = {k: str(tmp_path / "pipeline" / k) for k in ("work", "results", "logs")}
    cfg["paths"]["data"] = str(data.parent)
    assert data.name == "activitynet"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return config


# --------------------------------------------------------------------------- configuration through snakemake


def _snakemake_dry(cwd: Path, *config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            shutil.which("snakemake") or "snakemake",
            "-n",
            "--cores",
            "1",
            "--config",
            "datasets=[activitynet-mini]",
            "bits=[16]",
            *config,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# Rules in the order the pipeline runs them, so that touched outputs look like an earlier complete run.
RULE_ORDER = {"download": 0, "verify": 1, "fit": 2, "encode": 3, "evaluate": 4, "report": 5}


def _touch_every_output(cwd: Path) -> None:
    """Create every output of the pipeline (as listed by ``snakemake --summary``), oldest first."""
    proc = subprocess.run(
        [
            shutil.which("snakemake") or "snakemake",
            "--summary",
            "--cores",
            "1",
            "--config",
            "datasets=[activitynet-mini]",
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
    cwd = copy_workflow(tmp_path / "pipeline")
    proc = _snakemake_dry(cwd, *config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert named in out and "Traceback (most recent call last)" not in out
    assert not (cwd / "results").exists() and not (cwd / "work").exists()


@needs_snakemake
def test_a_released_checkpoint_that_does_not_exist_is_refused_even_with_earlier_outputs(tmp_path: Path) -> None:
    cwd = copy_workflow(tmp_path / "pipeline")
    _touch_every_output(cwd)
    proc = _snakemake_dry(cwd, "checkpoints={activitynet-mini: {16: /nonexistent/an16.pth}}")
    assert proc.returncode != 0 and "/nonexistent/an16.pth" in proc.stdout + proc.stderr
