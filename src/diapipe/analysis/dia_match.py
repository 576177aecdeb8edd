"""DiaSources and DiaObjects matched to truth, and binned fractions (pure pandas/numpy); used by `diapipe metrics` and the report.

Definitions (the same as ``tests/diffim_pipeline/test_diffim_quality.py``):

- a *truth variable* at a visit is a ``truth_source`` row of type variable, transient or
  moving with ``diff_flux_njy != 0`` whose centre is on the detector: something a
  difference image should show;
- a DiaSource is *real* when a truth variable of its detector-visit lies within
  ``radius_arcsec`` (0.5"), *spurious* otherwise;
- a truth variable is *detected* when a DiaSource lies within ``radius_arcsec``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .truth_match import match_sky

__all__ = [
    "VARIABLE_TYPES",
    "binned_fraction",
    "fraction_table",
    "match_dia_objects_to_truth",
    "match_dia_sources_to_truth",
    "single_frame_residuals",
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
    """Match DiaSources to truth variables per (visit, detector).

    Returns
    -------
    sources : `pandas.DataFrame`
        ``dia_src`` with ``truth_id`` (-1 when spurious), ``truth_diff_flux_njy`` and
        ``real`` added.
    variables : `pandas.DataFrame`
        The truth variables with ``detected`` and ``dia_source_row`` (index into
        ``sources``, -1 when undetected) added.
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
        i_src, i_var, _ = match_sky(sources.loc[rows, "ra"], sources.loc[rows, "dec"], var["ra"], var["dec"],
                                    radius_arcsec)
        src_rows = rows[i_src]
        var_rows = var.index[i_var]
        sources.loc[src_rows, "truth_id"] = variables.loc[var_rows, "id"].to_numpy()
        sources.loc[src_rows, "truth_diff_flux_njy"] = variables.loc[var_rows, "diff_flux_njy"].to_numpy()
        variables.loc[var_rows, "detected"] = True
        variables.loc[var_rows, "dia_source_row"] = src_rows.to_numpy()
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
