"""The HTML report in a real headless Chromium: loads without console errors, shows the clusters."""

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup.config import load_config
from dedup.report import write_report
from dedup.runner import run_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and playwright (see .ci/run)")
        pytest.skip("needs Debian's chromium and the playwright package")
    return sync_playwright


@pytest.fixture(scope="module")
def report_run(synth_shards, tmp_path_factory):
    shards, _ = synth_shards
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(None, None, **{"methods": ["exact", "phash", "dhash"], "run.workers": 1})
    assert run_pipeline([str(shards)], str(out), cfg, progress=False).exit_code == 0
    return out, write_report(str(out))


def test_report_is_self_contained_and_bounded(report_run):
    out, path = report_run
    html = Path(path).read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count("data:image/jpeg;base64,") >= 12
    assert len(html) < 5_000_000


@pytest.mark.slow
def test_report_in_headless_chromium(report_run):
    sync_playwright = _browser_or_skip()
    out, path = report_run
    m = pq.read_table(out / "manifest.parquet").to_pylist()
    sizes = {}
    for r in m:
        if r["cluster_size"] and r["cluster_size"] > 1:
            sizes[r["cluster_id"]] = r["cluster_size"]
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(Path(path).as_uri())
        page.wait_for_load_state("load")
        shown = page.eval_on_selector_all(".cluster", "els => els.map(e => [e.dataset.keeper, +e.dataset.size])")
        broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length")
        n_imgs = page.eval_on_selector_all("img", "imgs => imgs.length")
        counts = page.inner_text("#counts-table")
        page.screenshot(path=str(out / "report.png"), full_page=False)
        browser.close()
    assert errors == []
    assert broken == 0 and n_imgs > 0
    # The clusters on the page are exactly the manifest's largest clusters, with their sizes.
    expect = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
    assert shown == [list(e) for e in expect]
    assert str(len(m)) in counts
    if os.environ.get("DEDUP_UPDATE_SCREENSHOT"):
        shutil.copy(out / "report.png", DOCS / "report-screenshot.png")


def test_report_shows_embedding_pairs_on_both_sides_of_the_threshold(synth_shards, tmp_path):
    """With embeddings, the borderline section lists pairs above and below the cosine threshold."""
    shards, _ = synth_shards
    out = tmp_path / "run"
    # With the pixel embedder exact copies score 1.0 (above) and 5% crops a little under 0.999 (below).
    cfg = load_config(None, None, **{"methods": ["embedding"], "embedding.spec": "pixel", "embedding.threshold": 0.999, "run.workers": 1})
    assert run_pipeline([str(shards)], str(out), cfg, progress=False).exit_code == 0
    html = Path(write_report(str(out))).read_text()
    section = html[html.index('id="borderline"'):html.index('id="distributions"')]
    assert 'class="pair above"' in section and 'class="pair below"' in section
