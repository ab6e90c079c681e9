"""`dvc repro` of the .test configuration (one dataset at one code length, every stage) gives the
results of Snakemake's run of it, and DVC's metrics, plots, experiments and data tracking work on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from conmh.pipeline.config import load_config
from helpers.repo import ROOT, TEST_BITS, TEST_DATASET, metrics_of, output, run, with_test_config


def test_dvc_repro_in_a_fresh_copy_gives_the_results_of_snakemake(dvc_test_run, snakemake_test_run, tmp_path):
    """`dvc repro` and `snakemake` of the same configuration (.test/config.yaml) give the same codes,
    metrics and table; DVC's metrics, plots and experiments read them."""
    repo = dvc_test_run
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}  # data included

    ours, theirs = metrics_of(repo), metrics_of(snakemake_test_run)
    assert sorted(ours) == [f"{TEST_DATASET}/{m}-{TEST_BITS}bits.json" for m in ("conmh", "itq", "lsh")]
    for name in ours:
        assert ours[name]["map"] == theirs[name]["map"], name
    # The codes themselves are identical (file hashes may differ: a checkpoint's bytes,
    # whose sha256 the codes file records, are not reproducible, its weights are).
    codes = sorted((repo / "work" / "codes").glob("*/*.h5"))
    assert len(codes) == 3
    for path in codes:
        with h5py.File(snakemake_test_run / path.relative_to(repo)) as a, h5py.File(path) as b:
            arrays: list[str] = []
            a.visititems(lambda key, item: arrays.append(key) if isinstance(item, h5py.Dataset) else None)
            assert "database/codes" in arrays
            for key in arrays:
                assert np.array_equal(a[key][()], b[key][()]), (path, key)
    table = pd.read_csv(snakemake_test_run / "results" / "table.csv")
    assert len(table) == 3
    pd.testing.assert_frame_equal(pd.read_csv(repo / "results" / "table.csv"), table)

    shown = run(["dvc", "metrics", "show", "--json"], repo)
    assert shown.returncode == 0, output(shown)
    (workspace,) = json.loads(shown.stdout).values()
    rows = workspace["data"]
    assert len(rows) == 3 and rows[f"results/summary/{TEST_DATASET}/conmh-{TEST_BITS}bits.json"]["data"]["mAP@20"] > 0
    plots = run(["dvc", "plots", "show", "--json"], repo)
    assert plots.returncode == 0 and "errors" not in json.loads(plots.stdout), output(plots)
    drawn = json.loads(plots.stdout)["data"]["results/plots/map_at_k.csv"][0]["content"]["data"]["values"]
    assert len(drawn) == 3 * 7
    losses = json.loads(plots.stdout)["data"]["results/plots/loss.csv"][0]["content"]["data"]["values"]
    epochs = with_test_config(load_config(ROOT / "config.yaml"))["miniature"]["train"]["epochs"]
    assert len(losses) == epochs  # a point per trained run and epoch

    # The rest changes the workspace: in a clone of it, with a copy of its DVC cache.
    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", str(repo), str(clone)], tmp_path).returncode == 0
    shutil.copytree(repo / ".dvc" / "cache", clone / ".dvc" / "cache")
    proc = run(["dvc", "checkout"], clone)
    assert proc.returncode == 0 and json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}, output(proc)

    # A temporary experiment with another LSH seed runs in its own copy: its LSH metrics change, its
    # ConMH and ITQ metrics do not, and the workspace is untouched.
    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in (clone / "results").rglob("*") if p.is_file()}

    before = files()
    proc = run(["dvc", "exp", "run", "--temp", "-S", "config.yaml:options.lsh.seed=2"], clone, timeout=900)
    assert proc.returncode == 0, output(proc)[-5000:]
    assert files() == before
    shown = run(["dvc", "exp", "show", "--json"], clone)
    assert shown.returncode == 0, output(shown)
    revisions = json.loads(shown.stdout)
    (exp,) = [rev for entry in revisions for e in entry.get("experiments") or [] for rev in e["revs"]]
    assert exp["data"]["params"]["config.yaml"]["data"]["options"]["lsh"]["seed"] == 2
    base, changed = revisions[0]["data"]["metrics"], exp["data"]["metrics"]
    for name in base:
        same = base[name]["data"] == changed[name]["data"]
        assert same == ("/lsh-" not in name), name

    # The data is DVC's too: a changed feature file of one dataset shows as exactly that dataset's
    # miniature (a cached output) and the download stage that depends on it; the next `dvc repro`
    # restores the generated file from DVC's cache and runs nothing else.
    feats = clone / "data" / TEST_DATASET / "train_feats.h5"
    original = feats.read_bytes()
    with h5py.File(feats, "r+") as fh:
        fh["feats"][0, 0, 0] += 1
    status = run(["dvc", "status", "--json"], clone)
    assert json.loads(status.stdout) == {
        f"miniature@{TEST_DATASET}": [{"changed outs": {f"data/{TEST_DATASET}": "modified"}}],
        f"download@{TEST_DATASET}": [{"changed deps": {f"data/{TEST_DATASET}": "modified"}}],
    }, output(status)
    proc = run(["dvc", "repro"], clone)
    assert proc.returncode == 0 and "Running stage" not in proc.stdout, output(proc)[-5000:]
    assert feats.read_bytes() == original
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}
