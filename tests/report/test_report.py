"""``diapipe report`` built from the ApTemplate run (``template_all_repo``) plus synthetic
ApPipe outputs and APDB (`_synthetic`): every figure is written and has content, the
counts it shows match what was injected, sections without inputs say so, and the page
renders in headless Chromium with every image loaded and no console error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from testing_helpers import TEMPLATE_ALL_COLLECTION, build_once


def _load_helpers():
    # by path: the test directories are not packages, and another one has a `_synthetic`
    import importlib.util

    spec = importlib.util.spec_from_file_location("_report_synthetic", Path(__file__).with_name("_report_synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _load_helpers()
N_SPURIOUS = _helpers.N_SPURIOUS
SYNTHETIC_COLLECTION = _helpers.SYNTHETIC_COLLECTION
write_synthetic_apdb = _helpers.write_synthetic_apdb
write_synthetic_outputs = _helpers.write_synthetic_outputs

TEMPLATES = TEMPLATE_ALL_COLLECTION
FIGURES = ("sky.png", "light_curves.png", "cutouts.png", "completeness.png", "astrometry.png", "photometry.png",
           "timings.png")


@pytest.fixture(scope="module")
def synthetic(template_all_repo, tmp_path_factory):
    """The synthetic datasets (written once per session into their own collection) and a
    fresh APDB file."""
    state = {}

    def build(marker):
        sources = write_synthetic_outputs(template_all_repo, TEMPLATES)
        marker.mkdir(parents=True, exist_ok=True)
        sources.to_parquet(marker / "sources.parquet")

    marker = build_once(tmp_path_factory, "report_synthetic", build)
    import pandas as pd

    state["sources"] = pd.read_parquet(marker / "sources.parquet")
    apdb = tmp_path_factory.mktemp("report_apdb") / "apdb.db"
    state["objects"] = write_synthetic_apdb(apdb, state["sources"])
    state["apdb"] = apdb
    return state


@pytest.fixture(scope="module")
def graph_png(tmp_path_factory):
    """A stand-in for the demo's ApTemplate.png (graphviz may be absent): a PNG beside a .dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = tmp_path_factory.mktemp("workdir")
    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "isr -> characterizeImage", ha="center")
    fig.savefig(folder / "ApTemplate.png")
    (folder / "ApTemplate.dot").write_text("digraph { isr -> characterizeImage }\n")
    (folder / "unrelated.png").write_bytes((folder / "ApTemplate.png").read_bytes())
    return folder


@pytest.fixture(scope="module")
def report(template_all_repo, synthetic, graph_png, tmp_path_factory):
    from diapipe.report import make_report
    from diapipe.report.inputs import find_pipeline_graphs

    outdir = tmp_path_factory.mktemp("report")
    index = make_report(template_all_repo, collections=[SYNTHETIC_COLLECTION, TEMPLATES], apdb=synthetic["apdb"],
                        outdir=outdir, graphs=find_pipeline_graphs(graph_png))
    return index


def test_pipeline_graph_found_beside_its_dot(graph_png):
    from diapipe.report.inputs import find_pipeline_graphs

    assert [p.name for p in find_pipeline_graphs(graph_png)] == ["ApTemplate.png"]


def test_every_figure_written_with_content(report):
    from PIL import Image

    outdir = report.parent
    names = list(FIGURES) + ["graph_0_ApTemplate.png"]
    for name in names:
        path = outdir / name
        assert path.exists(), f"{name} not written"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), float)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
        assert pixels.std() > 10, f"{name} looks blank (std {pixels.std():.1f})"
        assert np.mean(pixels < 200) > 0.02, f"{name} has almost no ink"
    html = report.read_text()
    for name in names:
        assert f'src="{name}"' in html
    assert (outdir / "style.css").exists()


def test_page_structure_and_counts(report, synthetic):
    html = report.read_text()
    sources = synthetic["sources"]
    n_real = int((sources.truth_id >= 0).sum())
    n_spurious = int((sources.truth_id < 0).sum())
    assert n_spurious == N_SPURIOUS * sources.visit.nunique()
    # the overview tiles: every injected real DiaSource matched, every spurious one not
    assert re.search(rf'<div class="value">{n_real}</div><div class="what">DiaSources matching truth', html)
    assert re.search(rf'<div class="value">{n_spurious}</div><div class="what">spurious DiaSources', html)
    # the superseded DiaObject version is not counted
    assert re.search(rf'<div class="value">{len(synthetic["objects"])}</div><div class="what">DiaObjects', html)
    for heading in ("DIA Objects on the sky", "Light curves of the brightest DIA Objects", "Cut-outs",
                    "Completeness", "Calexp astrometry and photometry", "Run time per task", "Pipeline graph"):
        assert f"<h2>{heading}" in html, heading
    # every image has alt text; only the metrics JSON is reported missing
    for tag in re.findall(r"<img [^>]*>", html):
        assert re.search(r'alt="[^"]{20,}"', tag), tag
    notes = re.findall(r'<p class="note">(.*?)</p>', html)
    assert len(notes) == 1 and "metrics JSON" in notes[0], notes
    # light curves: all six plotted objects are the brightest ones and match their truth
    assert "6 of 6 matched to truth" in html
    # timings from the ApTemplate run's task metadata
    for label in ("isr", "calibrate", "assembleCoadd"):
        assert f"<td>{label}</td>" in html


def test_missing_inputs_are_noted_not_drawn(template_all_repo, tmp_path):
    """Only the ApTemplate outputs, plus a metrics JSON: sections without their inputs carry
    a note and no figure; the JSON's bounds, timings and completeness table are shown."""
    from diapipe.report import make_report

    metrics = {
        "bounds": {"astrometry_rms_mas_max": {"value": 4.2, "op": "<", "bound": 10.0, "pass": True},
                   "zp_offset_mmag_abs_max": {"value": 7.5, "op": "<", "bound": 5.0, "pass": False}},
        "summary": {"astrometry_rms_mas_median": 3.1, "zp_offset_mmag_median": -1.2},
        "timings": {"isr": {"n_quanta": 9, "wall_s_total": 12.5, "wall_s_mean": 1.39, "wall_s_max": 2.0,
                            "cpu_s_total": 10.0, "max_rss_mb": 400.0}},
        "dia": {"completeness_vs_snr": [{"lo": 3, "hi": 6, "n": 10, "k": 4}, {"lo": 6, "hi": 20, "n": 8, "k": 8}]},
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    index = make_report(template_all_repo, collections=[TEMPLATES], metrics_json=path, outdir=tmp_path / "r",
                        graphs=[], timings=False)
    html = index.read_text()
    outdir = index.parent
    for absent in ("sky.png", "light_curves.png", "cutouts.png"):
        assert not (outdir / absent).exists(), absent
    notes = " ".join(re.findall(r'<p class="note">(.*?)</p>', html))
    assert "no APDB given" in notes
    assert "no pipeline graph" in notes
    assert "goodSeeingDiff_diaSrcTable" in notes
    assert (outdir / "completeness.png").exists()  # from the metrics JSON alone
    assert "Source: the metrics JSON" in html
    assert '<span class="fail">FAIL</span>' in html and '<span class="pass">pass</span>' in html
    assert "<td>isr</td>" in html and "12.5" in html


# ---------------------------------------------------------------------------
# headless Chromium
# ---------------------------------------------------------------------------
_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (img) {
    out.push(img.getAttribute('src') + '=' + (img.complete && img.naturalWidth > 0 ? 'ok' : 'FAILED'));
  });
  var pre = document.createElement('pre');
  pre.id = 'render-check';
  pre.textContent = 'css=' + getComputedStyle(document.querySelector('header')).backgroundColor + ';' + out.join(';');
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser: install Debian's `chromium` (apt-get install chromium) to run this check")


def _run_chromium(exe, url, tmp_path, *extra):
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000", *extra, url]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)


def test_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    outdir = report.parent
    # the page itself has no script: check a copy (same folder, so relative paths hold)
    # with a load-time probe appended that records each image's load state and the CSS
    probe = outdir / "_render_check.html"
    probe.write_text(report.read_text().replace("</body>", _CHECK_SCRIPT + "\n</body>"))
    try:
        result = _run_chromium(exe, probe.as_uri(), tmp_path, "--dump-dom")
    finally:
        probe.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="render-check">([^<]*)</pre>', result.stdout)
    assert match, f"the page did not finish loading:\n{result.stderr[-2000:]}"
    css, *images = match.group(1).split(";")
    assert css == "css=rgb(23, 50, 77)", f"style.css not applied: {css}"
    assert len(images) == len(FIGURES) + 1
    assert all(item.endswith("=ok") for item in images), images
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    # the real page, as a user sees it: no console output either
    shot = tmp_path / "report.png"
    result = _run_chromium(exe, report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,6000",
                           "--hide-scrollbars")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert shot.exists() and shot.stat().st_size > 50_000
    shutil.copyfile(shot, outdir / "_screenshot.png")  # kept with the report for a person to look at
