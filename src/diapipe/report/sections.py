"""The report's sections, each built from `diapipe.report.inputs.ReportInputs`: a section
whose inputs are missing carries a note saying which, and no figure."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from ..analysis.dia_match import (
    binned_fraction,
    fraction_table,
    match_dia_objects_to_truth,
    single_frame_residuals,
    truth_variables,
)
from .inputs import read_cutout
from .page import Figure, Section, Table

__all__ = [
    "completeness_section",
    "cutout_section",
    "graph_section",
    "light_curve_section",
    "overview_section",
    "single_frame_section",
    "sky_section",
    "timing_section",
]


def _figure(outdir: Path, filename: str, alt: str, caption: str = "") -> Figure:
    from PIL import Image

    with Image.open(outdir / filename) as image:
        width, height = image.size
    return Figure(filename, alt, caption, width, height)


def _snr(table: pd.DataFrame) -> np.ndarray:
    snr = table["snr"].to_numpy(float) if "snr" in table else np.full(len(table), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = table["psfFlux"].to_numpy(float) / table["psfFluxErr"].to_numpy(float)
    return np.abs(np.where(np.isfinite(snr), snr, ratio))


def _flux_column(objects: pd.DataFrame, band: str) -> str | None:
    name = f"{band}_psfFluxMean"
    if name in objects and objects[name].notna().any():
        return name
    filled = [c for c in objects.columns if c.endswith("_psfFluxMean") and objects[c].notna().any()]
    return filled[0] if filled else None


# ---------------------------------------------------------------------------
def overview_section(inputs, matched) -> Section:
    """Counts at a glance and, from the metrics JSON, the accuracy bounds."""
    s = Section("overview", "Overview")
    visits = sorted({v for v, _ in inputs.visits})
    detectors = sorted({d for _, d in inputs.visits})
    s.intro = (f"Repository <code>{html.escape(inputs.repo)}</code>, collections "
               f"<code>{html.escape(', '.join(inputs.collections))}</code>.")
    s.tiles.append((len(inputs.visits), f"calexps ({len(visits)} visits × {len(detectors)} detectors)"))
    if inputs.dia_src is not None:
        s.tiles.append((len(inputs.dia_src), "DiaSources"))
    if matched is not None:
        sources, variables = matched
        s.tiles.append((int(sources["real"].sum()), "DiaSources matching truth (≤ 0.5″)"))
        s.tiles.append((int((~sources["real"]).sum()), "spurious DiaSources"))
        if len(variables):
            s.tiles.append((f"{100 * variables['detected'].mean():.0f} %",
                            f"of {len(variables)} (visit, truth variable) pairs detected"))
    if inputs.apdb is not None:
        s.tiles.append((len(inputs.apdb.dia_objects), "DiaObjects in the APDB"))
    if inputs.metrics and inputs.metrics.get("bounds"):
        rows = []
        for name, b in inputs.metrics["bounds"].items():
            status = {True: '<span class="pass">pass</span>', False: '<span class="fail">FAIL</span>',
                      None: "n/a"}[b.get("pass")]
            value = b.get("value")
            rows.append([html.escape(name), value if value is not None else "–",
                         html.escape(f"{b.get('op')} {b.get('bound')}"), status])
        s.tables.append(Table(["metric", "value", "requirement", "status"], rows,
                              "Accuracy against truth (metrics JSON; units in the metric names: mas, mmag, "
                              "fractions)"))
    elif "metrics" in inputs.missing:
        s.notes.append(f"accuracy bounds table: {inputs.missing['metrics']}")
    for key in ("calexp", "truth", "diaSrcTable", "apdb"):
        if key in inputs.missing:
            s.notes.append(inputs.missing[key])
    return s


def graph_section(inputs, outdir: Path) -> Section:
    s = Section("graph", "Pipeline graph")
    if not inputs.graphs:
        s.notes.append(inputs.missing.get("graphs", "no pipeline graph PNG"))
        return s
    s.intro = "The pipelines as drawn by <code>pipetask build --pipeline-dot</code> and graphviz <code>dot</code>."
    for k, graph in enumerate(inputs.graphs):
        name = f"graph_{k}_{Path(graph).name}"
        shutil.copyfile(graph, outdir / name)
        s.figures.append(_figure(outdir, name, f"Task graph of {Path(graph).stem}: tasks and the datasets they "
                                 "read and write", Path(graph).name))
    return s


def sky_section(inputs, outdir: Path) -> Section:
    s = Section("sky", "DIA Objects on the sky")
    if inputs.apdb is None:
        s.notes.append(inputs.missing.get("apdb", "no APDB"))
        return s
    objects = inputs.apdb.dia_objects
    if len(objects) == 0:
        s.notes.append(f"the APDB {inputs.apdb.path} holds no current DiaObject (validityEndMjdTai IS NULL)")
        return s
    truth_ra = truth_dec = None
    if inputs.truth is not None:
        var = truth_variables(inputs.truth).groupby("id")[["ra", "dec"]].median()
        truth_ra, truth_dec = var["ra"].to_numpy(), var["dec"].to_numpy()
    footprints = _footprints(inputs)
    plots.plot_sky(objects["ra"], objects["dec"], objects["nDiaSources"], outdir / "sky.png",
                   truth_ra=truth_ra, truth_dec=truth_dec, footprints=footprints)
    n = objects["nDiaSources"].to_numpy()
    s.intro = ("The guide's plot, read from the APDB with sqlite3 and pandas: <code>SELECT … FROM \"DiaObject\" "
               "WHERE \"validityEndMjdTai\" IS NULL</code> (the guide's <code>decl</code>, <code>validityEnd</code>"
               " and <code>gPSFluxMean</code> are today's <code>dec</code>, <code>validityEndMjdTai</code> and "
               "<code>g_psfFluxMean</code>).")
    s.figures.append(_figure(outdir, "sky.png",
                             f"Scatter plot of {len(objects)} DiaObjects in RA and Dec, marker size proportional to "
                             f"nDiaSources (1 to {int(n.max())}), over the detector footprints",
                             f"{len(objects)} DiaObjects; nDiaSources median {np.median(n):.0f}, max {int(n.max())}. "
                             "Crosses: truth variables, transients and moving objects on the calexps."))
    return s


def _footprints(inputs, limit: int = 60):
    out = []
    for visit, detector in inputs.visits[:limit]:
        try:
            wcs = inputs.butler.get("calexp.wcs", visit=visit, detector=detector)
            x0, y0, w, h = inputs.butler.get("calexp.bbox", visit=visit, detector=detector)
        except LookupError:
            continue
        xs = np.array([x0, x0 + w, x0 + w, x0]) - 0.5
        ys = np.array([y0, y0, y0 + h, y0 + h]) - 0.5
        ra, dec = wcs.all_pix2world(xs, ys, 0)
        out.append((ra, dec))
    return out


def light_curve_section(inputs, outdir: Path, *, band: str = "g", n_objects: int = 6) -> Section:
    s = Section("lightcurves", "Light curves of the brightest DIA Objects")
    if inputs.apdb is None:
        s.notes.append(inputs.missing.get("apdb", "no APDB"))
        return s
    objects = inputs.apdb.dia_objects
    column = _flux_column(objects, band)
    if len(objects) == 0 or column is None:
        s.notes.append(f"no DiaObject with a {band}_psfFluxMean in {inputs.apdb.path}")
        return s
    sources = inputs.apdb.dia_sources
    if len(sources) == 0 and inputs.dia_src is not None and "diaObjectId" in inputs.dia_src:
        sources = inputs.dia_src
    if len(sources) == 0:
        s.notes.append(f"no DiaSource rows in {inputs.apdb.path}")
        return s
    ranked = objects.assign(_abs=objects[column].abs()).sort_values("_abs", ascending=False)
    err_column = column + "Err"
    significant = ranked["nDiaSources"] >= 2
    if err_column in ranked:
        with np.errstate(divide="ignore", invalid="ignore"):
            significant &= (ranked["_abs"] / ranked[err_column]).to_numpy() >= 5.0
    first = ranked[significant]
    chosen = pd.concat([first, ranked.drop(first.index)]).head(n_objects)
    truth_ids = match_dia_objects_to_truth(chosen, inputs.truth) if inputs.truth is not None else None
    curves = []
    n_matched = 0
    for idx, obj in chosen.iterrows():
        rows = sources[sources["diaObjectId"] == obj["diaObjectId"]].sort_values("midpointMjdTai")
        title = f"DiaObject {int(obj['diaObjectId'])}, {column} {obj[column]:.0f} nJy"
        tmjd, tflux = np.array([]), np.array([])
        if truth_ids is not None and truth_ids[idx] >= 0:
            t = inputs.truth[inputs.truth["id"] == truth_ids[idx]]
            tmjd, tflux = t["mjd"].to_numpy(float), t["diff_flux_njy"].to_numpy(float)
            title += f"\ntruth {int(truth_ids[idx])} ({t['type'].iloc[0]})"
            n_matched += 1
        else:
            title += "\nno truth object within 0.5″"
        curves.append({"title": title, "mjd": rows["midpointMjdTai"].to_numpy(float),
                       "flux": rows["psfFlux"].to_numpy(float), "flux_err": rows["psfFluxErr"].to_numpy(float),
                       "truth_mjd": tmjd, "truth_flux": tflux})
    plots.plot_light_curves(curves, outdir / "light_curves.png", band=band)
    s.intro = (f"The {len(curves)} DiaObjects with the largest |{column}| (first those with ≥ 2 DiaSources and "
               "a mean flux of at least 5σ): "
               "DiaSource PSF fluxes on the difference images (points, 1σ errors) against the simulator's "
               "difference flux (truth flux − template flux) at every visit of the matched truth object (squares).")
    if inputs.truth is None:
        s.notes.append(f"truth light curves: {inputs.missing.get('truth', 'no truth')}")
    s.figures.append(_figure(outdir, "light_curves.png",
                             f"Light curves of {len(curves)} DiaObjects: difference flux in nJy against MJD, "
                             f"measured and true; {n_matched} of them match a truth object",
                             f"{n_matched} of {len(curves)} matched to truth within 0.5″."))
    return s


def cutout_section(inputs, outdir: Path, matched, *, n_each: int = 4, half: int = 15) -> Section:
    s = Section("cutouts", "Cut-outs: template, science, difference")
    if matched is None:
        s.notes.append(inputs.missing.get("diaSrcTable") or inputs.missing.get("truth") or "no DiaSources")
        return s
    sources = matched[0]
    needed = {"goodSeeingDiff_templateExp", "calexp", "goodSeeingDiff_differenceExp"}
    absent = needed - inputs.dataset_types
    if "goodSeeingDiff_differenceExp" in absent and "calexp" in absent:
        s.notes.append(f"no {', '.join(sorted(absent))} dataset types in the repository")
        return s
    if absent:
        s.notes.append(f"{', '.join(sorted(absent))} not in the repository: those panels are marked as missing")
    sources = sources.assign(_snr=_snr(sources))
    picks = []
    for real in (True, False):
        group = sources[sources["real"] == real].sort_values("_snr", ascending=False)
        if len(group) == 0:
            s.notes.append("no DiaSource matches truth" if real else "no spurious DiaSource: nothing to show")
            continue
        rows = np.unique(np.linspace(0, len(group) - 1, min(n_each, len(group))).round().astype(int))
        picks.extend(group.iloc[r] for r in rows)
    rows = []
    for src in picks:
        visit, detector, x, y = int(src["visit"]), int(src["detector"]), float(src["x"]), float(src["y"])
        images = {key: read_cutout(inputs.butler, name, visit, detector, x, y, half) if name not in absent else None
                  for key, name in (("template", "goodSeeingDiff_templateExp"), ("science", "calexp"),
                                    ("difference", "goodSeeingDiff_differenceExp"))}
        label = f"visit {visit}\nS/N {src['_snr']:.1f}"
        if src["real"]:
            label += f"\ntruth {src['truth_diff_flux_njy']:+.0f} nJy"
        rows.append({**images, "label": label, "real": bool(src["real"])})
    if not rows:
        return s
    plots.plot_cutouts(rows, outdir / "cutouts.png")
    n_real = sum(r["real"] for r in rows)
    s.intro = (f"{n_real} DiaSources matching a truth variable within 0.5″ (left) and {len(rows) - n_real} "
               "spurious ones (right), spread over the S/N range from the highest down. Template and science are in nJy per pixel with a "
               "1–99.7 % stretch each; the difference uses a symmetric colour scale (red positive, blue negative).")
    s.figures.append(_figure(outdir, "cutouts.png",
                             f"Grid of {len(rows)} rows of three image cut-outs (template, science, difference) "
                             "centred on DiaSources: truth-matched ones on the left, spurious ones on the right"))
    return s


def _metrics_completeness(metrics):
    """Completeness tables (lists of ``{lo, hi, n, k}``) and issue 5's figures from a
    metrics JSON, if it has them.

    ``diapipe metrics`` writes the S/N table and the figures of the visits that are not
    template inputs under ``dia.dia_sources.independent`` (returned as ``snr`` and
    ``independent``); a flat ``dia`` block with ``completeness_vs_snr`` /
    ``completeness_vs_mag`` is read too. (The metrics' ap_verify magnitude bins are too
    coarse to plot: the magnitude table is then computed from the repository.) An open
    last bin (``hi`` null in the JSON: infinite) is drawn as ``[lo, 2 lo)``.
    """
    if not metrics:
        return None
    block = metrics.get("dia") or metrics.get("dia_sources") or {}
    independent = (block.get("dia_sources") or {}).get("independent") or {}
    out = {}
    for key, bins in (("snr", independent.get("completeness_vs_snr") or block.get("completeness_vs_snr")),
                      ("mag", block.get("completeness_vs_mag"))):
        if not bins:
            continue
        frame = pd.DataFrame(bins)
        if not {"lo", "hi", "n", "k"} <= set(frame.columns):
            return None
        lo = frame["lo"].to_numpy(float)
        hi = pd.to_numeric(frame["hi"], errors="coerce").to_numpy(float)
        hi = np.where(np.isfinite(hi), hi, 2 * lo)
        out[key] = fraction_table(lo, hi, frame["n"], frame["k"])
    if independent:
        out["independent"] = independent
    return out or None


def completeness_section(inputs, outdir: Path, matched, *, say=print) -> Section:
    s = Section("completeness", "Completeness and spurious DiaSources")
    from_metrics = _metrics_completeness(inputs.metrics) or {}
    if matched is None and not from_metrics:
        s.notes.append(inputs.missing.get("diaSrcTable") or inputs.missing.get("truth") or "no DiaSources")
        return s
    vs_snr, vs_mag = from_metrics.get("snr"), from_metrics.get("mag")
    spurious_snr = real_snr = None
    area = None
    origins = []
    if vs_snr is not None or vs_mag is not None:
        snr_what = "completeness vs S/N" + (" on the visits that are not template inputs"
                                            if "independent" in from_metrics else "")
        origins.append("the metrics JSON (" + ", ".join(
            what for what, table in ((snr_what, vs_snr), ("completeness vs magnitude", vs_mag))
            if table is not None) + ")")
    if matched is not None:
        sources, variables = matched
        snr = _snr(sources)
        spurious_snr, real_snr = snr[~sources["real"].to_numpy()], snr[sources["real"].to_numpy()]
        # with the metrics' S/N table, its independent-visit density replaces the all-visit one
        # (which needs every difference image read again)
        truth_snr, area = _truth_snr_and_area(inputs, variables, say) if vs_snr is None else (None, None)
        origin = "goodSeeingDiff_diaSrcTable" if "diaSrcTable" in inputs.dia_src_origin else inputs.dia_src_origin
        if vs_mag is None:
            mags = 31.4 - 2.5 * np.log10(np.abs(variables["diff_flux_njy"].to_numpy(float)))
            lo, hi = np.floor(np.nanmin(mags)) if len(mags) else 18, np.ceil(np.nanmax(mags)) if len(mags) else 26
            step = 0.5 if hi - lo <= 8 else 1.0
            vs_mag = binned_fraction(mags, variables["detected"], np.arange(lo, hi + step, step))
            origins.append(f"{origin} matched to truth (completeness vs magnitude, all visits)")
        if vs_snr is None:
            if truth_snr is not None:
                finite = np.isfinite(truth_snr) & (truth_snr > 0)
                edges = np.geomspace(1.0, max(np.nanmax(truth_snr[finite]) * 1.01, 30.0), 13) if finite.any() else None
                if edges is not None:
                    vs_snr = binned_fraction(truth_snr[finite], variables["detected"].to_numpy()[finite], edges)
                    origins.append(f"{origin} matched to truth (completeness vs S/N, all visits)")
            else:
                s.notes.append("completeness vs S/N: no goodSeeingDiff_differenceExp to measure the truth S/N on")
    plots.plot_completeness(vs_snr, vs_mag, outdir / "completeness.png", spurious_snr=spurious_snr,
                            real_snr=real_snr, area_deg2=area)
    s.intro = ("A truth variable (variable star, transient or moving object with a nonzero difference flux at "
               "that visit, on the detector) counts as detected when a DiaSource lies within 0.5″; a DiaSource "
               "with no truth variable within 0.5″ is spurious. Truth S/N = |truth difference flux| / PSF-flux "
               "error at the true position on the difference image. Areas are difference-image pixels without "
               f"NO_DATA. Source: {html.escape('; '.join(origins))}.")
    if spurious_snr is not None:
        s.tiles.append((len(spurious_snr), "spurious DiaSources (all visits)"))
        if area:
            s.tiles.append((f"{len(spurious_snr) / area:.0f} /deg²", f"spurious density over {area:.4f} deg²"))
    independent = from_metrics.get("independent")
    if independent:
        _independent_tiles(s, independent)
    elif vs_snr is not None:
        bright = vs_snr[vs_snr["lo"] >= 6.0]
        if bright["n"].sum():
            s.tiles.append((f"{100 * bright['k'].sum() / bright['n'].sum():.0f} %", "completeness at truth S/N ≥ 6"))
    s.figures.append(_figure(outdir, "completeness.png",
                             "Completeness (fraction of truth variables detected) against truth S/N and magnitude, "
                             "and histograms of DiaSource S/N for real and spurious DiaSources"))
    return s


def _independent_tiles(s: Section, ind: dict) -> None:
    """Tiles of issue 5's figures (metrics JSON ``dia.dia_sources.independent``)."""
    def num(key, fmt, block=ind):
        value = block.get(key)
        return "–" if value is None else format(value, fmt)

    flux = ind.get("psf_flux") or {}
    spurious = (f"spurious density on visits not in the template ({ind.get('n_spurious')} over "
                f"{num('area_deg2', '.4f')} deg²)")
    s.tiles.extend([
        (f"{num('completeness_snr_ge_6', '.1%')}",
         f"completeness at truth S/N ≥ 6 ({ind.get('n_snr_ge_6')} truth variables; visits not in the template)"),
        (num("snr_at_50pct_completeness", ".2f"), "truth S/N of 50 % completeness"),
        (f"{num('spurious_per_deg2', '.0f')} /deg²", spurious),
        (num("flux_ratio_median", ".4f", flux),
         f"median PSF flux / true flux ({flux.get('n')} clean DiaSources, S/N ≥ 6)"),
        (num("pull_iqr_width", ".3f", flux), f"PSF-flux pull width (IQR/1.349; median {num('pull_median', '.2f', flux)})"),
    ])


def _truth_snr_and_area(inputs, variables, say):
    """Truth S/N of each variable (`diapipe.analysis.dia.forced_sigma_njy`) and the usable
    difference-image area (deg², `diapipe.analysis.dia.usable_area_deg2`)."""
    if "goodSeeingDiff_differenceExp" not in inputs.dataset_types:
        return None, None
    from ..analysis.dia import forced_sigma_njy, usable_area_deg2
    from ..analysis.dia_match import truth_snr

    sigma = np.full(len(variables), np.nan)
    area = 0.0
    for (visit, detector), group in variables.groupby(["visit", "detector"]):
        try:
            diff = inputs.butler.get("goodSeeingDiff_differenceExp", visit=int(visit), detector=int(detector))
        except LookupError:
            continue
        sigma[variables.index.get_indexer(group.index)] = forced_sigma_njy(diff, group["x"], group["y"])
        area += usable_area_deg2(diff.mask)
    return truth_snr(variables["diff_flux_njy"], sigma), (area or None)


def single_frame_section(inputs, outdir: Path, *, max_calexps: int = 40) -> Section:
    s = Section("single_frame", "Calexp astrometry and photometry against truth")
    if not inputs.visits or inputs.truth is None or "src" not in inputs.dataset_types:
        for key in ("calexp", "truth"):
            if key in inputs.missing:
                s.notes.append(inputs.missing[key])
        if "src" not in inputs.dataset_types:
            s.notes.append("no src catalogues in the repository")
        return s
    frames = []
    step = max(1, len(inputs.visits) // max_calexps)
    for visit, detector in inputs.visits[::step]:
        truth = inputs.truth[(inputs.truth["visit"] == visit) & (inputs.truth["detector"] == detector)]
        try:
            src = inputs.butler.get("src", visit=visit, detector=detector)
        except LookupError:
            continue
        frames.append(single_frame_residuals(src, truth))
    res = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(res) == 0:
        s.notes.append("no src source matched a truth star (S/N > 10, unflagged, within 2 px)")
        return s
    used = len(inputs.visits[::step])
    plots.plot_astrometry(res["dra_mas"], res["ddec_mas"], res["truth_mag"], outdir / "astrometry.png",
                          snr=res["snr"])
    plots.plot_photometry(res["truth_mag"], res["flux_ratio"], outdir / "photometry.png")
    bright = res[res["snr"] > 50]
    sep = np.hypot(bright["dra_mas"], bright["ddec_mas"])
    r68 = float(np.percentile(sep, 68.27)) if len(bright) else float("nan")
    s.intro = (f"Calexp <code>src</code> measurements (S/N &gt; 10, unflagged) of constant truth stars on {used} "
               "calexps, matched within 2 px: sky position from the fitted WCS minus the true position, and "
               "calibrated PSF flux over the true flux.")
    s.tiles.extend([(len(res), "matched stars"), (f"{r68:.1f} mas", "68 % radius of position residuals, S/N > 50"),
                    (f"{np.median(res['flux_ratio']):.4f}", "median psfFlux / true flux")])
    summary = (inputs.metrics or {}).get("summary") or {}
    for key, what in (("astrometry_rms_mas_median", "WCS vs true WCS, median over calexps (mas)"),
                      ("zp_offset_mmag_median", "zero-point offset, median (mmag)")):
        if summary.get(key) is not None:
            s.tiles.append((f"{summary[key]:.2f}", what))
    s.figures.append(_figure(outdir, "astrometry.png",
                             f"Position residuals of {len(res)} stars in milliarcseconds: RA against Dec scatter "
                             f"with the circle holding 68 % of the stars above S/N 50 ({r68:.1f} mas), and residual against "
                             "magnitude"))
    s.figures.append(_figure(outdir, "photometry.png",
                             f"Ratio of measured PSF flux to true flux for {len(res)} stars against true magnitude, "
                             "with a running median near 1"))
    return s


def timing_section(inputs, outdir: Path) -> Section:
    s = Section("timings", "Run time per task")
    if not inputs.timings:
        s.notes.append(inputs.missing.get("timings", "no task timings"))
        return s
    items = sorted(inputs.timings.items(), key=lambda kv: -(kv[1].get("wall_s_total") or 0.0))
    rows = []
    for label, t in items:
        rows.append([html.escape(label), int(t.get("n_quanta", 0)), _num(t.get("wall_s_total")),
                     _num(t.get("wall_s_mean")), _num(t.get("wall_s_max")), _num(t.get("cpu_s_total")),
                     _num(t.get("max_rss_mb"))])
    total = sum(_num(t.get("wall_s_total")) for _, t in items if np.isfinite(_num(t.get("wall_s_total"))))
    plots.plot_timings([label for label, _ in items], [_num(t.get("wall_s_total")) for _, t in items],
                       [_num(t.get("cpu_s_total")) for _, t in items], outdir / "timings.png")
    origin = "the metrics JSON" if inputs.metrics and inputs.metrics.get("timings") else \
        "the <code>&lt;label&gt;_metadata</code> datasets"
    s.intro = (f"From {origin}: pipe_base records <code>quantum.startUtc/endUtc</code> (wall clock), "
               "<code>startCpuTime/endCpuTime</code> and <code>endMaxResidentSetSize</code> around each quantum. "
               f"Total {total:.1f} s of wall-clock time in quanta.")
    s.figures.append(_figure(outdir, "timings.png", "Bar chart of total wall-clock and CPU seconds per pipeline task"))
    s.tables.append(Table(["task", "quanta", "wall total (s)", "wall mean (s)", "wall max (s)", "CPU total (s)",
                           "peak RSS (MB)"], rows))
    return s


def _num(value) -> float:
    return float("nan") if value is None else float(value)
