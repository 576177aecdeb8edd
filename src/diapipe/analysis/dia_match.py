"""DiaSources and DiaObjects matched to truth, and binned fractions (pure pandas/numpy); used by `diapipe metrics` and the report.

Definitions (the same as ``tests/diffim_pipeline/test_diffim_quality.py``):

- a *truth variable* at a visit is a ``truth_source`` row of type variable, transient or
  moving with ``diff_flux_njy != 0`` whose centre is on the detector: something a
  difference image should show;
- a DiaSource is *real* when a truth variable of its detector-visit lies within
  ``radius_arcsec`` (0.5"), *spurious* otherwise;
- a truth variable is *detected* when a DiaSource lies within ``radius_arcsec``.

Both matches are nearest-neighbour and not exclusive: two DiaSources on one transient
are both real, and two truth variables closer than the radius can share a DiaSource.

Issue 5's difference-imaging quality figures (`score_dia_sources`,
`difference_quality`), on visits that are not inputs of their template, add:

- *truth S/N* (`truth_snr`): ``|diff_flux_njy| / sigma_njy``, ``sigma_njy`` the forced
  PSF-flux error at the true position on the difference image (its variance plane, so
  it includes the object's own photon noise): the error a DiaSource there would get.
  Truth variables whose sigma is not finite (footprint not usable) are left out
  *before* matching, so a DiaSource on one of them counts as spurious;
- a DiaSource is *clean* when none of `DIA_SOURCE_BAD_FLAGS` is set and its PSF flux
  is finite;
- completeness against truth S/N in `SNR_BINS`, the S/N where it first reaches 50 %
  (`snr_at_completeness`), completeness at S/N >= 6;
- PSF-flux accuracy of detected truth variables whose DiaSource is clean, at S/N >= 6
  (`flux_pull_stats`): median ``psfFlux / diff_flux_njy`` and the median and IQR/1.349
  width of the pulls ``(psfFlux - diff_flux_njy) / psfFluxErr``.

These are the definitions of ``tests/diffim_pipeline/test_diffim_quality.py``, which
uses these functions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .truth_match import match_sky, nearest_sky

__all__ = [
    "DIA_SOURCE_BAD_FLAGS",
    "SNR_BINS",
    "VARIABLE_TYPES",
    "binned_fraction",
    "clean_dia_sources",
    "completeness_vs_snr",
    "difference_quality",
    "flux_pull_stats",
    "fraction_table",
    "match_dia_objects_to_truth",
    "match_dia_sources_to_truth",
    "score_dia_sources",
    "single_frame_residuals",
    "snr_at_completeness",
    "truth_snr",
    "truth_variables",
]

VARIABLE_TYPES = ("variable", "transient", "moving")


def truth_variables(truth: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``truth`` a difference image should show (see the module docstring)."""
    keep = truth["type"].isin(VARIABLE_TYPES) & (truth["diff_flux_njy"] != 0)
    if "on_detector" in truth:
        keep &= truth["on_detector"].astype(bool)
    return truth[keep]


def match_dia_sources_to_truth(dia_src: pd.DataFrame, truth: pd.DataFrame, radius_arcsec: float = 0.5):
    """Match DiaSources to truth variables per (visit, detector), nearest neighbour each
    way (see the module docstring).

    ``truth`` may be the full ``truth_source`` rows (with ``visit``/``detector``
    columns) or a subset of its truth variables: `truth_variables` selects from it.

    Returns
    -------
    sources : `pandas.DataFrame`
        ``dia_src`` with ``truth_id`` (-1 when spurious), ``truth_diff_flux_njy`` of the
        nearest truth variable within ``radius_arcsec`` and ``real`` added.
    variables : `pandas.DataFrame`
        The truth variables with ``detected`` and ``dia_source_row`` (index into
        ``sources`` of the nearest DiaSource, -1 when undetected) added.
    """
    sources = dia_src.reset_index(drop=True).copy()
    sources["truth_id"] = -1
    sources["truth_diff_flux_njy"] = np.nan
    variables = truth_variables(truth).reset_index(drop=True).copy()
    variables["detected"] = False
    variables["dia_source_row"] = -1
    if len(sources) == 0 or len(variables) == 0:
        sources["real"] = False
        return sources, variables
    for (visit, detector), var in variables.groupby(["visit", "detector"]):
        rows = sources.index[(sources["visit"] == visit) & (sources["detector"] == detector)]
        if len(rows) == 0:
            continue
        src_ra, src_dec = sources.loc[rows, "ra"], sources.loc[rows, "dec"]
        of_var = nearest_sky(var["ra"], var["dec"], src_ra, src_dec, radius_arcsec)
        hit = of_var >= 0
        variables.loc[var.index[hit], "detected"] = True
        variables.loc[var.index[hit], "dia_source_row"] = rows[of_var[hit]].to_numpy()
        of_src = nearest_sky(src_ra, src_dec, var["ra"], var["dec"], radius_arcsec)
        hit = of_src >= 0
        sources.loc[rows[hit], "truth_id"] = var["id"].to_numpy()[of_src[hit]]
        sources.loc[rows[hit], "truth_diff_flux_njy"] = var["diff_flux_njy"].to_numpy(float)[of_src[hit]]
    sources["real"] = sources["truth_id"] >= 0
    return sources, variables


def match_dia_objects_to_truth(dia_objects: pd.DataFrame, truth: pd.DataFrame,
                               radius_arcsec: float = 0.5) -> pd.Series:
    """Truth id of each DiaObject (index aligned; -1 = none): its position matched within
    ``radius_arcsec`` to the ``truth_source`` rows (each truth object once, at its median
    position over the visits; variables, transients and moving objects preferred over
    static objects, so a variable on a galaxy is found first)."""
    out = pd.Series(-1, index=dia_objects.index, dtype=np.int64)
    if len(dia_objects) == 0 or truth is None or len(truth) == 0:
        return out
    per_object = truth.groupby("id").agg(ra=("ra", "median"), dec=("dec", "median"), type=("type", "first"))
    remaining = np.ones(len(dia_objects), bool)
    for kinds in (VARIABLE_TYPES, None):
        cand = per_object if kinds is None else per_object[per_object["type"].isin(kinds)]
        rows = np.flatnonzero(remaining)
        if len(cand) == 0 or len(rows) == 0:
            continue
        i_obj, i_truth, _ = match_sky(dia_objects["ra"].to_numpy()[rows], dia_objects["dec"].to_numpy()[rows],
                                      cand["ra"], cand["dec"], radius_arcsec)
        out.iloc[rows[i_obj]] = cand.index.to_numpy()[i_truth]
        remaining[rows[i_obj]] = False
    return out


def fraction_table(lo, hi, n, k) -> pd.DataFrame:
    """Per bin [lo, hi): ``n`` trials, ``k`` successes -> ``fraction`` with a binomial
    (Wilson, 68 %) interval ``err_lo``/``err_hi`` (NaN for empty bins); also ``centre``."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    n, k = np.asarray(n, int), np.asarray(k, int)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        denom = 1 + 1 / n
        centre = (p + 1 / (2 * n)) / denom
        half = np.sqrt(p * (1 - p) / n + 1 / (4 * n**2)) / denom
    # the Wilson interval contains p; clip the rounding that can make an end cross it (p = 0 or 1)
    err_lo = np.where(n > 0, np.clip(p - np.maximum(centre - half, 0.0), 0.0, None), np.nan)
    err_hi = np.where(n > 0, np.clip(np.minimum(centre + half, 1.0) - p, 0.0, None), np.nan)
    return pd.DataFrame({"lo": lo, "hi": hi, "centre": 0.5 * (lo + hi), "n": n, "k": k, "fraction": p,
                         "err_lo": err_lo, "err_hi": err_hi})


def binned_fraction(values, success, edges) -> pd.DataFrame:
    """Fraction of ``success`` per bin of ``values`` (`fraction_table` of the counts)."""
    values = np.asarray(values, float)
    success = np.asarray(success, bool)
    edges = np.asarray(edges, float)
    which = np.digitize(values, edges) - 1
    nbins = len(edges) - 1
    inside = (which >= 0) & (which < nbins)
    n = np.bincount(which[inside], minlength=nbins)
    k = np.bincount(which[inside], weights=success[inside].astype(float), minlength=nbins).astype(int)
    return fraction_table(edges[:-1], edges[1:], n, k)


#: Truth S/N bin edges of issue 5's completeness table (50 % by S/N 5.5, >= 90 % from 6)
SNR_BINS = (3.0, 4.0, 5.0, 5.5, 6.0, 7.0, 8.0, 10.0, 15.0, 30.0, np.inf)
#: DiaSource flags that make its position or PSF flux untrustworthy (`clean_dia_sources`)
DIA_SOURCE_BAD_FLAGS = ("pixelFlags_saturated", "pixelFlags_bad", "pixelFlags_edge", "pixelFlags_nodataCenter",
                        "pixelFlags_saturatedCenter", "psfFlux_flag")


def truth_snr(diff_flux_njy, sigma_njy) -> np.ndarray:
    """Truth S/N ``|diff_flux_njy| / sigma_njy`` (NaN where ``sigma_njy`` is not finite and
    positive); ``sigma_njy`` is the forced PSF-flux error at the true position."""
    flux = np.abs(np.asarray(diff_flux_njy, float))
    sigma = np.asarray(sigma_njy, float)
    good = np.isfinite(sigma) & (sigma > 0)
    return np.where(good, flux / np.where(good, sigma, 1.0), np.nan)


def clean_dia_sources(sources: pd.DataFrame) -> np.ndarray:
    """DiaSources with none of `DIA_SOURCE_BAD_FLAGS` set (flag columns the table lacks
    are ignored) and a finite ``psfFlux``."""
    flags = [name for name in DIA_SOURCE_BAD_FLAGS if name in sources]
    bad = sources[flags].fillna(False).astype(bool).any(axis=1).to_numpy() if flags else np.zeros(len(sources), bool)
    flux = sources["psfFlux"].to_numpy(float) if "psfFlux" in sources else np.full(len(sources), np.nan)
    return ~bad & np.isfinite(flux)


def score_dia_sources(dia_src: pd.DataFrame, truth: pd.DataFrame, radius_arcsec: float = 0.5):
    """DiaSources and truth variables scored for issue 5's figures (module docstring).

    Parameters
    ----------
    dia_src : `pandas.DataFrame`
        DiaSources with ``visit``, ``detector``, ``ra``, ``dec`` (deg), ``psfFlux``,
        ``psfFluxErr`` (nJy) and the flag columns of `DIA_SOURCE_BAD_FLAGS`.
    truth : `pandas.DataFrame`
        ``truth_source`` rows with ``visit``, ``detector`` and ``sigma_njy``, the forced
        PSF-flux error at the true position on the difference image (NaN where not
        measured; `diapipe.analysis.dia.forced_sigma_njy`).

    Returns
    -------
    sources : `pandas.DataFrame`
        `match_dia_sources_to_truth`'s, plus ``clean``.
    variables : `pandas.DataFrame`
        The truth variables with a usable ``sigma_njy``: `match_dia_sources_to_truth`'s
        columns plus ``snr`` and, from the nearest DiaSource (NaN / False when
        undetected), ``psfFlux``, ``psfFluxErr``, ``clean``.
    """
    if "sigma_njy" not in truth:
        raise ValueError("score_dia_sources: truth has no sigma_njy column (forced PSF-flux error at the truth "
                         "positions)")
    var = truth_variables(truth)
    sigma = var["sigma_njy"].to_numpy(float)
    sources, variables = match_dia_sources_to_truth(dia_src, var[np.isfinite(sigma) & (sigma > 0)], radius_arcsec)
    sources["clean"] = clean_dia_sources(sources)
    variables["snr"] = truth_snr(variables["diff_flux_njy"], variables["sigma_njy"])
    row = variables["dia_source_row"].to_numpy(int)
    hit = row >= 0
    for name in ("psfFlux", "psfFluxErr"):
        values = np.full(len(variables), np.nan)
        if name in sources:
            values[hit] = sources[name].to_numpy(float)[row[hit]]
        variables[name] = values
    clean = np.zeros(len(variables), bool)
    clean[hit] = sources["clean"].to_numpy(bool)[row[hit]]
    variables["clean"] = clean
    return sources, variables


def completeness_vs_snr(snr, detected, edges=SNR_BINS) -> pd.DataFrame:
    """Completeness of truth variables per truth S/N bin (`binned_fraction`; values
    outside ``edges`` and NaN are left out)."""
    return binned_fraction(snr, detected, edges)


def snr_at_completeness(table: pd.DataFrame, level: float = 0.5) -> float:
    """Truth S/N where the completeness of ``table`` (`completeness_vs_snr`) first reaches
    ``level``: linear interpolation between the centres of the last non-empty bin below
    ``level`` and the first one at or above it. An open last bin ``[lo, inf)`` counts at
    ``lo``. When the lowest non-empty bin is already at ``level``, its centre (an upper
    limit); NaN when no bin reaches it."""
    t = table[table["n"] > 0]
    lo, hi = t["lo"].to_numpy(float), t["hi"].to_numpy(float)
    centre = np.where(np.isfinite(hi), 0.5 * (lo + hi), lo)
    frac = t["fraction"].to_numpy(float)
    above = np.flatnonzero(frac >= level)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(centre[0])
    x0, x1, f0, f1 = centre[i - 1], centre[i], frac[i - 1], frac[i]
    return float(x0 + (level - f0) * (x1 - x0) / (f1 - f0))


def flux_pull_stats(variables: pd.DataFrame, min_snr: float = 6.0) -> dict:
    """PSF flux of the DiaSources of detected truth variables with a clean DiaSource and
    truth S/N >= ``min_snr`` (``variables`` from `score_dia_sources`) against the truth.

    Returns ``n``, ``flux_ratio_median`` (median psfFlux / diff_flux_njy),
    ``pull_median`` and ``pull_iqr_width`` (IQR / 1.349 of the pulls
    ``(psfFlux - diff_flux_njy) / psfFluxErr``; 1 for correct errors); NaN when n = 0.
    """
    ok = variables[variables["detected"].to_numpy(bool) & variables["clean"].to_numpy(bool)
                   & (variables["snr"].to_numpy(float) >= min_snr)]
    if len(ok) == 0:
        nan = float("nan")
        return {"n": 0, "flux_ratio_median": nan, "pull_median": nan, "pull_iqr_width": nan}
    flux, truth, err = (ok[c].to_numpy(float) for c in ("psfFlux", "diff_flux_njy", "psfFluxErr"))
    pulls = (flux - truth) / err
    q25, q75 = np.percentile(pulls, [25, 75])
    return {"n": len(ok), "flux_ratio_median": float(np.median(flux / truth)),
            "pull_median": float(np.median(pulls)), "pull_iqr_width": float((q75 - q25) / 1.349)}


def difference_quality(sources: pd.DataFrame, variables: pd.DataFrame, area_deg2: float) -> dict:
    """Issue 5's figures from `score_dia_sources`'s tables, JSON-able.

    ``area_deg2``: the usable area of the difference images the DiaSources come from
    (`diapipe.analysis.dia.usable_area_deg2`: pixels without NO_DATA).

    Returns counts (``n_dia_sources``, ``n_real``, ``n_spurious``,
    ``n_spurious_unflagged``), ``area_deg2``, ``spurious_per_deg2``,
    ``unflagged_spurious_per_deg2``, ``n_truth_variables``, ``completeness``,
    ``completeness_vs_snr`` (``{lo, hi, n, k}`` per `SNR_BINS` bin),
    ``snr_at_50pct_completeness`` (`snr_at_completeness`), ``n_snr_ge_6``,
    ``completeness_snr_ge_6`` and ``psf_flux`` (`flux_pull_stats` at S/N >= 6).
    """
    real = sources["real"].to_numpy(bool)
    clean = sources["clean"].to_numpy(bool)
    n_spurious = int((~real).sum())
    n_unflagged = int((~real & clean).sum())
    detected = variables["detected"].to_numpy(bool)
    snr = variables["snr"].to_numpy(float)
    table = completeness_vs_snr(snr, detected)
    bright = snr >= 6.0
    nan = float("nan")
    per_area = (lambda n: float(n / area_deg2)) if area_deg2 > 0 else (lambda n: nan)
    return {
        "n_dia_sources": len(sources),
        "n_real": int(real.sum()),
        "n_spurious": n_spurious,
        "n_spurious_unflagged": n_unflagged,
        "area_deg2": float(area_deg2),
        "spurious_per_deg2": per_area(n_spurious),
        "unflagged_spurious_per_deg2": per_area(n_unflagged),
        "n_truth_variables": len(variables),
        "completeness": float(detected.mean()) if len(variables) else nan,
        "completeness_vs_snr": [{"lo": float(r.lo), "hi": float(r.hi), "n": int(r.n), "k": int(r.k)}
                                for r in table.itertuples()],
        "snr_at_50pct_completeness": snr_at_completeness(table, 0.5),
        "n_snr_ge_6": int(bright.sum()),
        "completeness_snr_ge_6": float(detected[bright].mean()) if bright.any() else nan,
        "psf_flux": flux_pull_stats(variables, 6.0),
    }


def single_frame_residuals(src, truth: pd.DataFrame, *, min_snr: float = 10.0, radius_pix: float = 2.0,
                           xy0=(0, 0)) -> pd.DataFrame:
    """Calexp ``src`` measurements of truth stars: position residuals (mas) and PSF flux /
    true flux, for unflagged sources above ``min_snr``.

    ``src``: astropy Table with ``centroid_x/y``, ``coord_ra/dec`` (deg), ``psfFlux_nJy``,
    ``psfFluxErr_nJy`` and ``flag_*`` columns; ``truth``: the detector-visit's
    ``truth_source``. Matching is on pixel positions within ``radius_pix``; only
    non-variable stars (``type == 'star'``) count.

    Returns a DataFrame with ``truth_mag``, ``dra_mas`` (ΔRA cos δ), ``ddec_mas``,
    ``flux_ratio``, ``snr``.
    """
    from ..analysis.truth_match import match_xy

    names = src.colnames
    flux = np.asarray(src["psfFlux_nJy"], float)
    err = np.asarray(src["psfFluxErr_nJy"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    flagged = np.zeros(len(src), bool)
    for name in ("flag_edge", "flag_saturated", "flag_saturatedCenter", "flag_interpolatedCenter", "flag_bad",
                 "flag_psfFlux", "flag_cr", "flag_centroid"):
        if name in names:
            flagged |= np.asarray(src[name], bool)
    if "parent" in names and "deblend_nChild" in names:
        flagged |= np.asarray(src["deblend_nChild"]) > 0
    good = np.flatnonzero((snr > min_snr) & ~flagged)
    stars = truth[(truth["type"] == "star") & (truth["flux_njy"] > 0)]
    i_src, i_truth, _ = match_xy(np.asarray(src["centroid_x"], float)[good], np.asarray(src["centroid_y"], float)[good],
                                 stars["x"].to_numpy(float), stars["y"].to_numpy(float), radius_pix)
    rows = good[i_src]
    matched = stars.iloc[i_truth]
    ra = np.asarray(src["coord_ra"], float)[rows]
    dec = np.asarray(src["coord_dec"], float)[rows]
    tra, tdec = matched["ra"].to_numpy(float), matched["dec"].to_numpy(float)
    return pd.DataFrame({
        "truth_mag": matched["mag"].to_numpy(float),
        "dra_mas": ((ra - tra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(tdec)) * 3.6e6,
        "ddec_mas": (dec - tdec) * 3.6e6,
        "flux_ratio": flux[rows] / matched["flux_njy"].to_numpy(float),
        "snr": snr[rows],
    })
