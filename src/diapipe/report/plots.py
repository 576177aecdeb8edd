"""The report's figures: matplotlib (Agg, no pyplot state) functions that take tables and
arrays and write one PNG each.

Every function returns the path written. None of them invents data: an empty input is
the caller's business (the report shows a note instead of calling them).
"""

from __future__ import annotations

import itertools

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

__all__ = [
    "plot_astrometry",
    "plot_completeness",
    "plot_cutouts",
    "plot_light_curves",
    "plot_photometry",
    "plot_sky",
    "plot_timings",
]

DPI = 100
REAL_COLOUR = "#1b7837"
SPURIOUS_COLOUR = "#c51b7d"
DATA_COLOUR = "#2166ac"
TRUTH_COLOUR = "#e08214"


def _figure(width, height):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def plot_sky(ra, dec, n_sources, path, *, truth_ra=None, truth_dec=None, footprints=()):
    """DiaObjects on the sky, marker area proportional to nDiaSources (the guide's plot),
    with the truth variables' positions (crosses) when given and detector outlines.

    ``footprints``: sequence of (ra corners, dec corners) polygons (deg).
    """
    ra, dec, n_sources = (np.asarray(a, float) for a in (ra, dec, n_sources))
    fig = _figure(7.0, 6.2)
    ax = fig.add_subplot()
    for k, (fra, fdec) in enumerate(footprints):
        ax.fill(fra, fdec, facecolor="#f2f2f2", edgecolor="#999999", lw=0.8, zorder=0,
                label="detector footprint" if k == 0 else None)
    if truth_ra is not None and len(truth_ra):
        ax.scatter(truth_ra, truth_dec, marker="x", s=30, lw=1.0, color=TRUTH_COLOUR, alpha=0.8, zorder=1,
                   label="truth variable / transient")
    scale = 12.0
    sc = ax.scatter(ra, dec, s=scale * n_sources, c=n_sources, cmap="viridis", alpha=0.55, edgecolors="k",
                    linewidths=0.4, zorder=2)
    cbar = fig.colorbar(sc, ax=ax, shrink=0.85)
    cbar.set_label("nDiaSources")
    levels = sorted({int(v) for v in np.nanquantile(n_sources, [0.0, 0.5, 1.0])} - {0}) if n_sources.size else []
    for n in levels:
        ax.scatter([], [], s=scale * n, facecolors="none", edgecolors="k", label=f"{n} DiaSource{'s' * (n != 1)}")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    ax.set_xlabel("RA (deg)")
    ax.set_ylabel("Dec (deg)")
    ax.invert_xaxis()  # east to the left, as on the sky
    ax.set_aspect(1.0 / max(np.cos(np.radians(np.nanmedian(dec) if dec.size else 0.0)), 0.1), adjustable="datalim")
    ax.set_title(f"{ra.size} DIA Objects on the sky, sized by nDiaSources")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _seasons(mjds, gap_days: float = 30.0):
    """(start, end) MJD of the groups of ``mjds`` separated by more than ``gap_days``."""
    mjds = np.sort(np.asarray([m for m in mjds if np.isfinite(m)], float))
    if mjds.size == 0:
        return [(0.0, 1.0)]
    cuts = np.flatnonzero(np.diff(mjds) > gap_days)
    starts = np.r_[mjds[0], mjds[cuts + 1]]
    ends = np.r_[mjds[cuts], mjds[-1]]
    return list(zip(starts, ends, strict=True))


def plot_light_curves(curves, path, *, band="g"):
    """One panel per DiaObject: DiaSource psfFlux ± psfFluxErr against midpointMjdTai and
    the truth difference flux at every visit of the truth object. Observing seasons more
    than 30 days apart get their own broken-axis segment, so that visits a few days
    apart stay readable.

    ``curves``: list of dicts with ``title``, ``mjd``, ``flux``, ``flux_err`` (DiaSources,
    nJy) and ``truth_mjd``, ``truth_flux`` (nJy; may be empty).
    """
    n = len(curves)
    ncol = 2 if n > 1 else 1
    nrow = int(np.ceil(n / ncol))
    seasons = _seasons(np.concatenate([np.r_[c["mjd"], c["truth_mjd"]] for c in curves]))
    pad = [max(0.08 * (b - a), 1.0) for a, b in seasons]
    widths = [b - a + 2 * p for (a, b), p in zip(seasons, pad, strict=True)]
    widths = [max(w, 0.35 * max(widths)) for w in widths]
    fig = _figure(5.4 * ncol, 3.0 * nrow)
    outer = fig.add_gridspec(nrow, ncol)
    for k, curve in enumerate(curves):
        inner = outer[k // ncol, k % ncol].subgridspec(1, len(seasons), width_ratios=widths, wspace=0.06)
        axes = []
        for j, ((a, b), p) in enumerate(zip(seasons, pad, strict=True)):
            ax = fig.add_subplot(inner[0, j], sharey=axes[0] if axes else None)
            axes.append(ax)
            tm = np.asarray(curve["truth_mjd"], float)
            if tm.size:
                order = np.argsort(tm)
                ax.plot(tm[order], np.asarray(curve["truth_flux"], float)[order], "-s", color=TRUTH_COLOUR, ms=4,
                        lw=1.2, mfc="none", label="truth diff_flux_njy")
            ax.errorbar(curve["mjd"], curve["flux"], yerr=curve["flux_err"], fmt="o", color=DATA_COLOUR, ms=4,
                        capsize=2, lw=1, label="DiaSource psfFlux ± 1σ")
            ax.axhline(0.0, color="0.6", lw=0.7)
            ax.set_xlim(a - p, b + p)
            ax.grid(alpha=0.3)
            ax.tick_params(axis="x", labelsize=7, labelrotation=30)
            ax.ticklabel_format(axis="x", useOffset=False, style="plain")
            if j > 0:
                ax.spines["left"].set_visible(False)
                ax.tick_params(axis="y", left=False, labelleft=False)
            if j < len(seasons) - 1:
                ax.spines["right"].set_visible(False)
        axes[0].set_ylabel(f"{band} difference flux (nJy)", fontsize=8)
        axes[0].set_title(curve["title"], fontsize=8.5, loc="left")
        axes[0].set_xlabel("MJD (TAI)" + (", axis broken between seasons" if len(seasons) > 1 else ""), fontsize=8,
                           loc="left")
        if k == 0:
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside upper center", ncols=2, fontsize=8)
    return _save(fig, path)


def _stretch(image, symmetric=False):
    finite = np.isfinite(image)
    if not finite.any():
        return 0.0, 1.0
    values = image[finite]
    if symmetric:
        v = float(np.percentile(np.abs(values), 99.5)) or 1.0
        return -v, v
    lo, hi = np.percentile(values, [1.0, 99.7])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _cutout_panel(ax, image, key):
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, f"no {key}\nimage", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_facecolor("#eeeeee")
        return
    vmin, vmax = _stretch(image, symmetric=key == "difference")
    cmap = "RdBu_r" if key == "difference" else "gray"
    ax.imshow(image, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    half = image.shape[0] // 2
    for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ax.plot([half + dx * 3, half + dx * 6], [half + dy * 3, half + dy * 6], color="#ffcc00", lw=1.2)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)


def plot_cutouts(rows, path, *, pixel_scale_arcsec=0.2):
    """Template, science and difference cut-outs, one triplet per DiaSource: those matching
    truth in the left block, spurious ones in the right block.

    ``rows``: list of dicts with ``template``, ``science``, ``difference`` (2-d arrays in
    nJy per pixel, NaN = no data, or None when the image is missing), ``label`` and
    ``real`` (bool).
    """
    blocks = [[r for r in rows if r["real"]], [r for r in rows if not r["real"]]]
    blocks = [b for b in blocks if b]
    nrow = max(len(b) for b in blocks)
    ncol = 4 * len(blocks) - 1
    ratios = ([1, 1, 1, 0.18] * len(blocks))[:ncol]
    fig = _figure(3.9 * len(blocks) + 0.6, 1.45 * nrow + 0.7)
    grid = fig.add_gridspec(nrow, ncol, width_ratios=ratios)
    keys = ("template", "science", "difference")
    for b, block in enumerate(blocks):
        for r, row in enumerate(block):
            for c, key in enumerate(keys):
                ax = fig.add_subplot(grid[r, 4 * b + c])
                _cutout_panel(ax, row[key], key)
                if r == 0:
                    head = ("matching truth" if row["real"] else "spurious") + "\n" if c == 1 else "\n"
                    ax.set_title(head + key, fontsize=9,
                                 color=(REAL_COLOUR if row["real"] else SPURIOUS_COLOUR) if c == 1 else "black")
                if c == 0:
                    ax.set_ylabel(row["label"], fontsize=7, color=REAL_COLOUR if row["real"] else SPURIOUS_COLOUR)
    first = next((r["science"] for r in rows if r["science"] is not None), None)
    if first is not None:
        size = first.shape[0]
        fig.suptitle(f"{size} × {size} px cut-outs ({size * pixel_scale_arcsec:.1f}″ square) centred on each "
                     "DiaSource (yellow ticks)", fontsize=9)
    return _save(fig, path)


def plot_completeness(vs_snr, vs_mag, path, *, spurious_snr=None, real_snr=None, area_deg2=None):
    """Completeness of truth variables against truth S/N and magnitude, and the S/N
    distribution of real and spurious DiaSources.

    ``vs_snr``/``vs_mag``: `diapipe.analysis.dia_match.binned_fraction` tables (either
    may be None); ``spurious_snr``/``real_snr``: |S/N| of DiaSources.
    """
    panels = [p for p in (("snr", vs_snr), ("mag", vs_mag)) if p[1] is not None]
    with_hist = spurious_snr is not None
    ncol = len(panels) + int(with_hist)
    fig = _figure(4.3 * ncol, 3.6)
    for k, (kind, table) in enumerate(panels):
        ax = fig.add_subplot(1, ncol, k + 1)
        ok = table["n"] > 0
        ax.errorbar(table["centre"][ok], table["fraction"][ok],
                    yerr=[table["err_lo"][ok], table["err_hi"][ok]], xerr=0.5 * (table["hi"] - table["lo"])[ok],
                    fmt="o", color=DATA_COLOUR, ms=4, capsize=0)
        for x, y, n in zip(table["centre"][ok], table["fraction"][ok], table["n"][ok], strict=True):
            ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                        color="0.35")
        ax.set_ylim(-0.05, 1.12)
        ax.axhline(1.0, color="0.6", lw=0.7)
        ax.grid(alpha=0.3)
        ax.set_ylabel("completeness (fraction detected)")
        if kind == "snr":
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000) if lo <= t <= hi]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("truth S/N on the difference image")
            ax.axvline(5.0, color="0.4", ls="--", lw=0.8)
            ax.set_title("completeness vs S/N (numbers: truth count)", fontsize=9)
        else:
            ax.set_xlabel("AB magnitude of |truth difference flux|")
            ax.set_title("completeness vs magnitude (numbers: truth count)", fontsize=9)
    if with_hist:
        ax = fig.add_subplot(1, ncol, ncol)
        allv = np.concatenate([np.asarray(real_snr if real_snr is not None else [], float),
                               np.asarray(spurious_snr, float)])
        allv = allv[np.isfinite(allv) & (allv > 0)]
        hi = max(float(allv.max()) if allv.size else 10.0, 10.0)
        edges = np.geomspace(3.0, hi * 1.1, 16)
        if real_snr is not None:
            ax.hist(np.clip(real_snr, edges[0], None), bins=edges, histtype="step", lw=1.6, color=REAL_COLOUR,
                    label=f"real ({len(real_snr)})")
        ax.hist(np.clip(spurious_snr, edges[0], None), bins=edges, histtype="stepfilled", alpha=0.45,
                color=SPURIOUS_COLOUR, label=f"spurious ({len(spurious_snr)})")
        ax.set_xscale("log")
        ticks = [t for t in (3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if edges[0] <= t <= edges[-1]]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("DiaSource |S/N|")
        ax.set_ylabel("DiaSources per bin")
        title = "DiaSources: real vs spurious"
        if area_deg2:
            title += f"\nspurious density {len(spurious_snr) / area_deg2:.0f} per deg²"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _running_median(x, y, nbins=8):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 5:
        return np.array([]), np.array([])
    edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, nbins + 1)))
    centres, medians = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = ok & (x >= lo) & (x <= hi)
        if sel.sum() >= 3:
            centres.append(np.median(x[sel]))
            medians.append(np.median(y[sel]))
    return np.asarray(centres), np.asarray(medians)


def plot_astrometry(dra_mas, ddec_mas, mag, path, *, snr=None, bright_snr=50.0):
    """Calexp source positions minus truth (mas): the 2-d scatter with the circle holding
    68 % of the bright stars (S/N > ``bright_snr``, where centroid noise is small; robust to
    blended outliers), and the residual against magnitude."""
    dra, ddec, mag = (np.asarray(a, float) for a in (dra_mas, ddec_mas, mag))
    snr = np.full(dra.size, np.inf) if snr is None else np.asarray(snr, float)
    bright = snr > bright_snr
    sep = np.hypot(dra, ddec)
    r68 = float(np.nanpercentile(sep[bright], 68.27)) if bright.any() else float("nan")
    fig = _figure(10.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(dra[~bright], ddec[~bright], s=6, alpha=0.5, color="0.6", label=f"S/N ≤ {bright_snr:g}")
    ax.scatter(dra[bright], ddec[bright], s=8, alpha=0.7, color=DATA_COLOUR, label=f"S/N > {bright_snr:g}")
    if np.isfinite(r68):
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(r68 * np.cos(circle), r68 * np.sin(circle), color=TRUTH_COLOUR, lw=1.5,
                label=f"68 % of S/N > {bright_snr:g} within {r68:.1f} mas")
    lim = float(np.nanpercentile(sep, 95)) * 1.3 if sep.size else 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.6", lw=0.7)
    ax.axvline(0, color="0.6", lw=0.7)
    ax.set_xlabel("ΔRA cos δ (mas)")
    ax.set_ylabel("ΔDec (mas)")
    ax.set_title(f"src − truth position, {dra.size} stars", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    ax.scatter(mag, sep, s=6, alpha=0.5, color=DATA_COLOUR)
    xc, yc = _running_median(mag, sep)
    if xc.size:
        ax.plot(xc, yc, "-o", color=TRUTH_COLOUR, ms=4, label="running median")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("truth magnitude (AB)")
    ax.set_ylabel("|position residual| (mas)")
    ax.set_title("position residual vs magnitude", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_photometry(mag, flux_ratio, path):
    """Calexp PSF flux / true flux of stars against true magnitude, with a running median."""
    mag, ratio = np.asarray(mag, float), np.asarray(flux_ratio, float)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.scatter(mag, ratio, s=6, alpha=0.5, color=DATA_COLOUR, label=f"{mag.size} stars")
    xc, yc = _running_median(mag, ratio)
    if xc.size:
        ax.plot(xc, yc, "-o", color=TRUTH_COLOUR, ms=4, label="running median")
    ax.axhline(1.0, color="0.3", lw=0.8)
    bright = mag <= np.nanpercentile(mag, 25) if mag.size else np.zeros(0, bool)
    med = float(np.nanmedian(ratio[bright])) if bright.any() else float("nan")
    ax.set_ylim(0.8, 1.2)
    ax.set_xlabel("truth magnitude (AB)")
    ax.set_ylabel("psfFlux_nJy / true flux")
    ax.set_title(f"calexp PSF photometry vs truth (brightest quarter: median ratio {med:.4f})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_timings(labels, wall_s, cpu_s, path):
    """Horizontal bars: total wall-clock and CPU seconds per pipeline task."""
    order = np.argsort(wall_s)
    labels = [labels[i] for i in order]
    wall = np.asarray(wall_s, float)[order]
    cpu = np.asarray(cpu_s, float)[order]
    fig = _figure(7.0, 0.45 * len(labels) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(y + 0.2, wall, height=0.4, color=DATA_COLOUR, label="wall clock")
    ax.barh(y - 0.2, np.nan_to_num(cpu), height=0.4, color=TRUTH_COLOUR, label="CPU")
    ax.set_yticks(y, labels)
    ax.set_xlabel("total time over all quanta (s)")
    ax.set_title("run time per task", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
