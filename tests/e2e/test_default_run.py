"""The README's main job: the default pipeline (three miniatures x 16/32/64 bits x every method), run once
per test session (tests/conftest.py `snakemake_run`), end to end, then read as users read it: the table,
figures and metrics, a second run with nothing to do, and the HTML report in a browser. Its own file, so
that pytest-xdist can give the other end-to-end files to another worker meanwhile."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from conmh.pipeline.paper import PAPER_KS
from helpers.repo import DEFAULT_BITS, DEFAULT_DATASETS, DEFAULT_METHODS, metrics_of, output, snakemake


def test_miniature_pipeline_runs_end_to_end_and_training_beats_lsh(snakemake_run):
    table = pd.read_csv(snakemake_run / "results" / "table.csv")
    assert len(table) == len(DEFAULT_DATASETS) * len(DEFAULT_BITS) * len(DEFAULT_METHODS)
    assert set(table["data"]) == {"synthetic"}
    cols = [f"mAP@{k}" for k in PAPER_KS]
    for (dataset, bits), group in table.groupby(["dataset", "bits"]):
        rows = group.set_index("result")
        ours, lsh = rows.loc["ConMH (ours)", cols], rows.loc["LSH (ours)", cols]
        assert (ours > lsh).all(), f"{dataset} {bits} bits: ConMH {list(ours)} vs LSH {list(lsh)}"
    assert len(metrics_of(snakemake_run)) == 27
    figures = snakemake_run / "results" / "figures"
    drawn = ["loss_curves.png", "map_at_k.png", "per_class.png", "pr_curves.png"]  # miniatures only: no paper
    assert sorted(p.name for p in figures.iterdir()) == drawn
    for name in drawn:
        assert (figures / name).stat().st_size > 1000
    pr = pd.read_csv(snakemake_run / "results" / "plots" / "pr_curve.csv")
    # a point per radius 0..bits
    assert len(pr) == len(DEFAULT_DATASETS) * len(DEFAULT_METHODS) * sum(b + 1 for b in DEFAULT_BITS)
    per_query = pd.read_csv(snakemake_run / "work" / "metrics" / "yfcc-mini" / "itq-64bits.per_query.csv")
    assert per_query["ap@20"].mean() == pytest.approx(
        metrics_of(snakemake_run)["yfcc-mini/itq-64bits.json"]["map"]["20"]
    )
    log = (snakemake_run / "results" / "fit" / "yfcc-mini" / "conmh-64bits.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_a_second_run_has_nothing_to_do_and_the_html_report_builds(snakemake_run):
    proc = snakemake(snakemake_run, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in output(proc), output(proc)
    proc = snakemake(snakemake_run, "--report", "report.html")
    assert proc.returncode == 0, output(proc)
    assert (snakemake_run / "report.html").stat().st_size > 10_000


def test_the_html_report_reads_well_in_a_browser(snakemake_run, tmp_path):
    """The report opened in headless Chromium, clicked through as a reader would: the table, the figures
    (none drawn empty), and how the results were made. Screenshots are left in the test's folder."""
    browser_path = chromium()
    report = snakemake_run / "report.html"
    if not report.exists():
        assert snakemake(snakemake_run, "--report", "report.html").returncode == 0
    from playwright.sync_api import sync_playwright

    def open_entry(page, category: str, name: str) -> str:
        """From the start page, click the category, then the eye of the file; the text of the page it shows."""
        page.goto(report.as_uri())
        page.get_by_text(category, exact=True).first.click()
        page.locator("tr", has_text=name).first.locator("a").first.click()
        page.wait_for_timeout(500)
        page.screenshot(path=tmp_path / f"{name}.png")
        return "\n".join(frame.inner_text("body") for frame in page.frames[1:])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(report.as_uri())
        home = page.inner_text("body")
        assert "synthetic miniatures only" in home and "left out" in home  # why there is no paper figure
        assert ["1. Table", "2. Figures", "3. How it was made"] == [
            c for c in ("1. Table", "2. Figures", "3. How it was made") if c in home
        ]
        table = open_entry(page, "1. Table", "table.html")
        assert table.count("ConMH (ours)") == 9 and "never compared" in table
        page.goto(report.as_uri())
        page.get_by_text("2. Figures", exact=True).first.click()
        figures = page.inner_text("body")
        for name in ("map_at_k.png", "pr_curves.png", "per_class.png", "loss_curves.png"):
            assert name in figures
        assert "ours_vs_paper.png" not in figures
        made = open_entry(page, "3. How it was made", "index.html")
        for heading in ("Training runs", "Data", "Software and machine", "Configuration"):
            assert heading in made
        assert "fcv_train_feats.h5" in made and "torch" in made and "miniature.train.epochs" in made
        assert made.count("cpu (") >= 9  # every training run names its device
        browser.close()


def chromium() -> str:
    """Debian's Chromium (apt-get install chromium); the test is skipped without it, unless
    CONMH_REQUIRE_BROWSER is set (as .ci/run does)."""
    import os

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CONMH_REQUIRE_BROWSER"):
            pytest.fail("CONMH_REQUIRE_BROWSER is set, but there is no chromium on PATH", pytrace=False)
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return path
