"""Photometric calibration: a zero point against the reference catalogue, and `PhotoCalib`.

The calibration is one number per detector, ``calibration_mean`` in nJy per
electron (calexps are in electrons), as Rubin's PhotoCalib. It is fitted as an
inverse-variance weighted mean of the log flux ratios ``ln(ref / inst)`` of
matched stars, with:

- an extra scatter term added in quadrature to each star's error and chosen so
  the reduced χ² is 1 (Paule–Mandel), so that unmodelled scatter neither
  gives some stars absurd weights nor understates the error. By default
  (``scatter_model="flux"``) the term is a constant *flux* :math:`s` (electrons),
  i.e. :math:`s / F_i` in the log ratio: the excess scatter of real calibration
  stars is mostly additive light — faint neighbours and galaxies inside the PSF
  stamp, background errors — which matters for faint stars and not for bright
  ones. A constant log-ratio term (``"log"``; colour terms, flat-field residuals)
  flattens the weights instead, and then the many faint stars, whose
  contamination is one-sided (it only adds flux), pull the zero point by up to
  ~10 mmag on a detector where the bright stars agree to 1 mmag;
- iterative clipping of stars beyond ``n_sigma`` of that total error (variable
  stars, blends, mismatches), starting from the median so gross outliers cannot
  pull the first estimate.

AB magnitudes: :math:`m = 31.4 - 2.5 \\log_{10}(f / \\mathrm{nJy})`.
"""

from __future__ import annotations


import numpy as np

from ..exposure.photo_calib import AB_NJY_ZERO_POINT, PhotoCalib, mag_to_njy, njy_to_mag

__all__ = [
    "PhotoCalib",
    "PhotometryError",
    "fit_zero_point",
    "reference_flux_column",
    "reference_flux_err_column",
    "njy_to_mag",
    "mag_to_njy",
    "DEFAULT_FILTER_MAP_TEMPLATE",
]

#: Rubin's DC2 filterMap for ``cal_ref_cat_2_2``: band -> refcat flux field prefix.
DEFAULT_FILTER_MAP_TEMPLATE = "lsst_{band}_smeared"

_AB_NJY_ZP = AB_NJY_ZERO_POINT
_LN10_04 = 0.4 * np.log(10.0)


class PhotometryError(RuntimeError):
    """The zero point could not be determined (too few usable stars).

    ``n_stars`` is the number usable, ``threshold`` the minimum required.
    """

    def __init__(self, message: str, *, n_stars: int | None = None, threshold: int | None = None):
        super().__init__(message)
        self.n_stars = n_stars
        self.threshold = threshold


def reference_flux_column(band: str, filter_map: dict[str, str] | None = None) -> str:
    """Name of the reference-catalogue flux column (nJy) to calibrate ``band`` against.

    Mirrors Rubin's ``filterMap`` for ``cal_ref_cat_2_2``: the map gives the refcat
    "filter" name, to which ``_flux`` is appended.

    >>> reference_flux_column("g")
    'lsst_g_smeared_flux'
    >>> reference_flux_column("g", {"g": "lsst_g"})
    'lsst_g_flux'
    """
    if filter_map is None:
        return DEFAULT_FILTER_MAP_TEMPLATE.format(band=band) + "_flux"
    try:
        return f"{filter_map[band]}_flux"
    except KeyError as err:
        raise KeyError(f"band {band!r} is not in the filter map (bands: {sorted(filter_map)})") from err


def reference_flux_err_column(band: str, filter_map: dict[str, str] | None = None) -> str:
    """Name of the reference flux error column, e.g. ``'lsst_g_smeared_fluxErr'``."""
    return reference_flux_column(band, filter_map) + "Err"


def _weighted_mean_with_scatter(r, var, scale=None):
    """Weighted mean of ``r`` and extra variance ``s2 * scale`` making the reduced chi^2 one
    (``scale`` per point, default 1)."""
    n = len(r)
    scale = np.ones_like(r) if scale is None else np.asarray(scale, float)

    def mean_for(s2):
        w = 1.0 / (var + s2 * scale)
        return np.sum(w * r) / np.sum(w), w

    def excess(s2):
        m, w = mean_for(s2)
        return np.sum(w * (r - m) ** 2) - (n - 1)

    s2 = 0.0
    if n > 2 and excess(0.0) > 0:
        hi = max(np.var(r) / np.min(scale), 1e-12)
        while excess(hi) > 0:
            hi *= 4
        from scipy import optimize  # lazy (import time of the task modules)

        s2 = optimize.brentq(excess, 0.0, hi, xtol=1e-14, rtol=1e-10)
    m, w = mean_for(s2)
    return m, 1.0 / np.sqrt(np.sum(w)), s2


def fit_zero_point(inst_flux, inst_flux_err, ref_flux_njy, ref_flux_err_njy=None, *, n_sigma: float = 3.0,
                   max_iter: int = 10, min_stars: int = 5, min_snr: float = 5.0,
                   ref_colour_mag=None, colour_term_coeffs=None, scatter_model: str = "flux"):
    """Calibration (nJy per electron) from matched stars.

    Parameters
    ----------
    inst_flux, inst_flux_err : array_like
        Instrumental fluxes and errors (electrons), e.g. 12-px aperture or aperture-
        corrected PSF fluxes.
    ref_flux_njy, ref_flux_err_njy : array_like
        Reference fluxes and errors (nJy) through the filter map (`reference_flux_column`).
        Errors default to zero (the scatter term absorbs what they would add).
    n_sigma : `float`
        Clipping threshold in units of each star's total error.
    max_iter : `int`
        Maximum clipping iterations.
    min_stars : `int`
        Fewer usable stars raise `PhotometryError`.
    min_snr : `float`
        Stars with instrumental S/N below this are not used.
    ref_colour_mag, colour_term_coeffs : array_like, optional
        Colour-term hook: the reference magnitudes are corrected by
        ``sum_k coeffs[k] * colour**k`` (``colour`` per star, mag) before the fit.
    scatter_model : {"flux", "log"}
        Form of the fitted extra scatter: a constant flux (relative error ``s / F``,
        the default) or a constant relative error (see the module docstring).

    Returns
    -------
    calibration : `float`
        nJy per electron.
    calibration_err : `float`
        1σ error of ``calibration``.
    stats : `dict`
        ``n_stars`` (used), ``n_input``, ``n_rejected`` (clipped), ``zero_point_mag``
        (AB mag of 1 e⁻), ``zero_point_err_mag``, ``scatter_mmag`` (robust scatter of the used
        stars), ``extra_scatter_mmag`` (fitted :math:`s`), ``used`` (boolean mask over input).

    Raises
    ------
    PhotometryError
        Fewer than ``min_stars`` usable stars.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = 10 ** rng.uniform(4, 6, 100)
    >>> inst = ref / 2.5 * rng.normal(1, 0.01, 100)
    >>> cal, err, st = fit_zero_point(inst, 0.01 * inst, ref)
    >>> bool(abs(cal / 2.5 - 1) < 0.005)
    True
    """
    if scatter_model not in ("flux", "log"):
        raise ValueError(f"scatter_model must be 'flux' or 'log', got {scatter_model!r}")
    inst = np.asarray(inst_flux, dtype=float)
    inst_err = np.asarray(inst_flux_err, dtype=float)
    ref = np.asarray(ref_flux_njy, dtype=float)
    ref_err = np.zeros_like(ref) if ref_flux_err_njy is None else np.asarray(ref_flux_err_njy, dtype=float)
    if not (inst.shape == inst_err.shape == ref.shape == ref_err.shape):
        raise ValueError("inst_flux, inst_flux_err, ref_flux_njy and ref_flux_err_njy must have the "
                         "same shape")
    if colour_term_coeffs is not None:
        if ref_colour_mag is None:
            raise ValueError("colour_term_coeffs needs ref_colour_mag")
        colour = np.asarray(ref_colour_mag, dtype=float)
        dmag = sum(c * colour**k for k, c in enumerate(colour_term_coeffs))
        ref = ref * 10 ** (-0.4 * dmag)
        ref_err = ref_err * 10 ** (-0.4 * dmag)
    with np.errstate(divide="ignore", invalid="ignore"):
        valid = (np.isfinite(inst) & np.isfinite(inst_err) & np.isfinite(ref) & np.isfinite(ref_err)
                 & (inst > 0) & (ref > 0) & (inst_err > 0) & (ref_err >= 0) & (inst / inst_err >= min_snr))
    idx = np.flatnonzero(valid)
    if len(idx) < min_stars:
        raise PhotometryError(f"only {len(idx)} usable calibration stars (positive fluxes, "
                              f"S/N >= {min_snr:g}); need {min_stars}", n_stars=len(idx), threshold=min_stars)
    r = np.log(ref[idx] / inst[idx])
    var = (inst_err[idx] / inst[idx]) ** 2 + (ref_err[idx] / ref[idx]) ** 2
    # extra variance per star in units of s2: (median flux / flux)^2 for a constant flux s
    scale = (np.median(inst[idx]) / inst[idx]) ** 2 if scatter_model == "flux" else np.ones_like(r)
    # Robust start: median and the robust spread of normalised residuals.
    centre = np.median(r)
    z = (r - centre) / np.sqrt(var)
    z_scale = max(1.0, 1.4826 * np.median(np.abs(z - np.median(z))))
    keep = np.abs(z) <= n_sigma * z_scale
    s2 = 0.0
    for _ in range(max_iter):
        if keep.sum() < min_stars:
            raise PhotometryError(f"only {keep.sum()} calibration stars survive {n_sigma:g}-sigma clipping; "
                                  f"need {min_stars}", n_stars=int(keep.sum()), threshold=min_stars)
        centre, centre_err, s2 = _weighted_mean_with_scatter(r[keep], var[keep], scale[keep])
        new_keep = np.abs(r - centre) <= n_sigma * np.sqrt(var + s2 * scale)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    used = np.zeros(inst.shape, dtype=bool)
    used[idx[keep]] = True
    calibration = float(np.exp(centre))
    calibration_err = float(calibration * centre_err)
    resid = r[keep] - centre
    stats = {
        "n_stars": int(keep.sum()),
        "n_input": int(inst.size),
        "n_rejected": int(len(idx) - keep.sum()),
        "zero_point_mag": float(_AB_NJY_ZP - 2.5 * np.log10(calibration)),
        "zero_point_err_mag": float(centre_err / _LN10_04),
        "scatter_mmag": float(1.4826 * np.median(np.abs(resid - np.median(resid))) / _LN10_04 * 1e3),
        # at the median flux of the stars used (the same everywhere for scatter_model="log")
        "extra_scatter_mmag": float(np.sqrt(s2) / _LN10_04 * 1e3),
        "used": used,
    }
    return calibration, calibration_err, stats
