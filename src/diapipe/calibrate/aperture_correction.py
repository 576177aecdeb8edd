"""Aperture correction: the ratio of a large-aperture flux to the PSF flux, over the detector.

A PSF flux measures the flux inside the PSF model's normalisation; where the
model misses wing light or varies imperfectly, it is low by a position-dependent
fraction. Following Rubin (MeasureApCorrTask: reference flux
``base_CircularApertureFlux_12_0``, Chebyshev order 2, 3σ clipping, 4 iterations)
we fit the ratio ``aperture_flux / psf_flux`` of bright isolated stars with a
low-order 2-D polynomial, clip outliers (blends, cosmic rays, galaxies) and
multiply PSF fluxes by it.

Rubin stops there: the calibration flux is the 12 px aperture flux and the zero point
absorbs the light outside it (a seeing-dependent fraction, ~1-3 % in 1.2-1.6" seeing for
a Moffat/Kolmogorov profile, which later global calibration fixes). diapipe's zero point
refers to total flux, so `measure_total_flux_correction` adds one more step, the curve of
growth of the same bright stars out to a seeing-scaled radius (several FWHM), and
`to_total_flux` folds that factor into the correction: PSF flux -> 12 px aperture flux
-> total flux. Large apertures are only as good as the background under them: the
characterize step estimates it with a mode statistic and grown detection masks (see
`diapipe.calibrate.characterize`) so that faint-source light does not bias it high.

Positions are 0-based pixels; ``bbox = (x_min, y_min, x_max, y_max)`` (inclusive),
mapped to [-1, 1] for the polynomial (terms as `diapipe.exposure.psf.polynomial_terms`).
"""

from __future__ import annotations

import numpy as np

from diapipe.exposure.psf import polynomial_terms

__all__ = ["ApertureCorrection", "ApertureCorrectionError", "fit_aperture_correction",
           "apply_aperture_correction", "measure_total_flux_correction", "to_total_flux"]


class ApertureCorrectionError(RuntimeError):
    """Too few usable stars to fit an aperture correction (``n_stars`` < ``threshold``)."""

    def __init__(self, message: str, *, n_stars: int | None = None, threshold: int | None = None):
        super().__init__(message)
        self.n_stars = n_stars
        self.threshold = threshold


class ApertureCorrection:
    """A 2-D polynomial of the aperture/PSF flux ratio over a pixel box (immutable).

    Parameters
    ----------
    coeffs : array_like
        Coefficients of `polynomial_terms` of order ``order`` in the normalised position.
    order : `int`
        Total polynomial order.
    bbox : `tuple` of 4 `float`
        ``(x_min, y_min, x_max, y_max)`` mapped to [-1, 1]; evaluating outside extrapolates.
    rms : `float`
        Scatter of the stars' ratios about the fit (informational).

    Examples
    --------
    >>> ac = ApertureCorrection.constant(1.02, bbox=(0, 0, 99, 99))
    >>> float(ac.evaluate(10.0, 20.0))
    1.02
    """

    def __init__(self, coeffs, order: int, bbox, rms: float = 0.0, err: float = 0.0):
        coeffs = np.array(coeffs, dtype=float)
        if coeffs.shape != ((order + 1) * (order + 2) // 2,):
            raise ValueError(f"order {order} needs {(order + 1) * (order + 2) // 2} coefficients, "
                             f"got shape {coeffs.shape}")
        if len(bbox) != 4 or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise ValueError(f"bbox must be (x_min, y_min, x_max, y_max) with max > min, got {bbox!r}")
        coeffs.flags.writeable = False
        self._coeffs = coeffs
        self._order = int(order)
        self._bbox = tuple(float(b) for b in bbox)
        self._rms = float(rms)
        self._err = float(err)

    @classmethod
    def constant(cls, value: float, bbox) -> ApertureCorrection:
        """A spatially constant correction."""
        return cls([value], 0, bbox)

    @classmethod
    def fit_values(cls, x, y, values, order: int, bbox, rms: float = 0.0, err: float = 0.0) -> ApertureCorrection:
        """The polynomial of ``order`` over ``bbox`` that fits correction ``values`` at
        positions ``(x, y)`` in least squares (e.g. a correction sampled on a grid)."""
        u, v = cls.constant(1.0, bbox)._normalised(np.ravel(x), np.ravel(y))
        coeffs, *_ = np.linalg.lstsq(polynomial_terms(u, v, order).T, np.ravel(values), rcond=None)
        return cls(coeffs, order, bbox, rms=rms, err=err)

    coeffs = property(lambda self: self._coeffs, doc="Polynomial coefficients (read-only).")
    order = property(lambda self: self._order, doc="Polynomial order.")
    bbox = property(lambda self: self._bbox, doc="(x_min, y_min, x_max, y_max) box mapped to [-1, 1].")
    rms = property(lambda self: self._rms, doc="Scatter of the stars about the fit.")
    err = property(lambda self: self._err,
                   doc="Relative 1-sigma error of the correction (common to every source it is applied to).")

    def _normalised(self, x, y):
        x0, y0, x1, y1 = self._bbox
        return (2 * (np.asarray(x, dtype=float) - x0) / (x1 - x0) - 1,
                2 * (np.asarray(y, dtype=float) - y0) / (y1 - y0) - 1)

    def evaluate(self, x, y):
        """Correction factor (multiply PSF fluxes by it) at pixel positions ``(x, y)``."""
        u, v = self._normalised(x, y)
        value = np.tensordot(self._coeffs, polynomial_terms(u, v, self._order), axes=1)
        return value if np.ndim(value) else float(value)

    def to_dict(self) -> dict:
        """Plain-type dict for YAML/JSON storage."""
        return {"coeffs": [float(c) for c in self._coeffs], "order": self._order,
                "bbox": list(self._bbox), "rms": self._rms, "err": self._err}

    @classmethod
    def from_dict(cls, data: dict) -> ApertureCorrection:
        """Inverse of `to_dict`."""
        try:
            return cls(data["coeffs"], data["order"], data["bbox"], data.get("rms", 0.0), data.get("err", 0.0))
        except KeyError as err:
            raise ValueError(f"ApertureCorrection dict lacks {err.args[0]!r}: {data!r}") from err

    def __eq__(self, other) -> bool:
        return (isinstance(other, ApertureCorrection) and self._order == other._order
                and self._bbox == other._bbox and np.array_equal(self._coeffs, other._coeffs))

    def __hash__(self):
        return hash((self._order, self._bbox, self._coeffs.tobytes()))

    def __repr__(self) -> str:
        return f"ApertureCorrection(order={self._order}, bbox={self._bbox}, coeffs={self._coeffs.tolist()})"


def fit_aperture_correction(x, y, aperture_flux, aperture_flux_err, psf_flux, psf_flux_err, *, bbox,
                            order: int = 2, n_sigma: float = 3.0, max_iter: int = 4, min_snr: float = 20.0,
                            min_dof: int = 1) -> tuple[ApertureCorrection, dict]:
    """Fit ``aperture_flux / psf_flux`` of stars as a polynomial over the detector.

    Parameters
    ----------
    x, y : array_like
        Star positions, pixels (0-based).
    aperture_flux, aperture_flux_err : array_like
        Large-aperture fluxes (e.g. 12 px radius) and errors (electrons).
    psf_flux, psf_flux_err : array_like
        PSF fluxes and errors of the same stars.
    bbox : `tuple`
        Detector box ``(x_min, y_min, x_max, y_max)``.
    order : `int`
        Polynomial order (total degree); lowered while ``n_stars < n_coeffs + min_dof``.
    n_sigma, max_iter : `float`, `int`
        Clipping on residuals normalised by each star's ratio error, rescaled by their
        robust spread when that exceeds 1.
    min_snr : `float`
        Stars with aperture-flux S/N below this are ignored.
    min_dof : `int`
        Degrees of freedom to keep; fewer than ``1 + min_dof`` stars raise.

    Returns
    -------
    correction : `ApertureCorrection`
    stats : `dict`
        ``n_stars`` (used), ``n_rejected``, ``order`` (used), ``rms`` (robust scatter of the
        used stars' ratios about the fit), ``used`` (boolean mask over the input).

    Raises
    ------
    ApertureCorrectionError
        Too few usable stars.
    """
    arrays = [np.asarray(a, dtype=float)
              for a in (x, y, aperture_flux, aperture_flux_err, psf_flux, psf_flux_err)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("x, y, aperture_flux(_err) and psf_flux(_err) must have the same shape")
    x, y, ap, ap_err, psf, psf_err = arrays
    with np.errstate(divide="ignore", invalid="ignore"):
        valid = (np.all([np.isfinite(a) for a in arrays], axis=0) & (ap > 0) & (psf > 0) & (ap_err > 0)
                 & (psf_err >= 0) & (ap / ap_err >= min_snr))
    idx = np.flatnonzero(valid)
    if len(idx) < 1 + min_dof:
        raise ApertureCorrectionError(f"only {len(idx)} usable aperture-correction stars "
                                      f"(S/N >= {min_snr:g}); need {1 + min_dof}",
                                      n_stars=len(idx), threshold=1 + min_dof)
    ratio = ap[idx] / psf[idx]
    sigma = ratio * np.hypot(ap_err[idx] / ap[idx], psf_err[idx] / psf[idx])
    correction = ApertureCorrection.constant(1.0, bbox)
    u, v = correction._normalised(x[idx], y[idx])
    keep = np.ones(len(idx), dtype=bool)
    if len(idx) >= 10:
        # Gross outliers first, against the median ratio and the robust spread (which includes
        # the spatial trend), so that bright blends cannot pull the first fit.
        z = (ratio - np.median(ratio)) / sigma
        keep &= np.abs(z) <= n_sigma * max(1.0, 1.4826 * np.median(np.abs(z - np.median(z))))
    used_order = order
    for _ in range(max_iter):
        used_order = order
        while used_order > 0 and keep.sum() < (used_order + 1) * (used_order + 2) // 2 + min_dof:
            used_order -= 1
        if keep.sum() < 1 + min_dof:
            raise ApertureCorrectionError(
                f"only {keep.sum()} aperture-correction stars survive clipping; need {1 + min_dof}",
                n_stars=int(keep.sum()), threshold=1 + min_dof)
        design = polynomial_terms(u, v, used_order).T
        w = 1.0 / sigma
        coeffs, *_ = np.linalg.lstsq(design[keep] * w[keep, None], ratio[keep] * w[keep], rcond=None)
        resid = ratio - design @ coeffs
        z = resid / sigma
        z_scale = max(1.0, 1.4826 * np.median(np.abs(z[keep])))
        new_keep = np.abs(z) <= n_sigma * z_scale
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    rms = float(1.4826 * np.median(np.abs(resid[keep])))
    # error of the fitted surface at a typical point: the scatter over sqrt(stars per term)
    n_terms = (used_order + 1) * (used_order + 2) // 2
    err = float(rms * np.sqrt(n_terms / keep.sum()) / np.mean(ratio[keep]))
    correction = ApertureCorrection(coeffs, used_order, bbox, rms=rms, err=err)
    used = np.zeros(x.shape, dtype=bool)
    used[idx[keep]] = True
    stats = {"n_stars": int(keep.sum()), "n_rejected": int(len(idx) - keep.sum()), "order": used_order,
             "rms": rms, "err": err, "used": used}
    return correction, stats


def apply_aperture_correction(psf_flux, psf_flux_err, x, y, correction: ApertureCorrection):
    """Aperture-corrected PSF fluxes and errors: both multiplied by ``correction.evaluate(x, y)``."""
    factor = correction.evaluate(x, y)
    return np.asarray(psf_flux, dtype=float) * factor, np.asarray(psf_flux_err, dtype=float) * factor


def measure_total_flux_correction(image, variance, mask, x, y, fwhm_pix: float, *, calib_radius_pix: float = 12.0,
                                  total_radius_fwhm: float = 3.5, n_sigma: float = 3.0, max_iter: int = 10,
                                  min_stars: int = 3):
    """Ratio of total flux to the ``calib_radius_pix`` aperture flux, from bright stars' curves of growth.

    For each star, the flux inside ``R = max(calib_radius_pix, total_radius_fwhm * fwhm_pix)``
    over the flux inside ``calib_radius_pix`` on the background-subtracted image; a
    β≈4.8 Moffat (a Kolmogorov-like PSF) holds all but ~1e-4 of its light within 3.5 FWHM,
    while 12 px is only ~1.5 FWHM in 1.6" seeing (a few per cent missing). The log ratios
    are combined by their inverse-variance weighted median (bright stars dominate: their
    large apertures are least affected by noise and by any background error; a median
    because faint neighbours inside the big aperture skew fainter stars' ratios high)
    with iterative ``n_sigma`` clipping (blends, cosmic rays).

    Parameters
    ----------
    image, variance, mask : `numpy.ndarray`
        Background-subtracted image (electrons), its variance and mask (NO_DATA pixels are
        left out of the sums; apertures running off the image are not used).
    x, y : array_like
        Bright isolated star positions (pixels), e.g. the PSF stars.
    fwhm_pix : `float`
        PSF FWHM (pixels), scaling the total aperture.

    Returns
    -------
    factor : `float`
        Multiply calibration-aperture fluxes by it to get total fluxes (≥ 1 expected).
    factor_err : `float`
    stats : `dict`
        ``n_stars`` (used), ``n_input``, ``total_radius_pix``, ``scatter`` (robust spread of
        the used stars' log ratios), ``used`` (boolean mask over the input).

    Raises
    ------
    ApertureCorrectionError
        Fewer than ``min_stars`` usable stars.
    ValueError
        ``fwhm_pix`` not positive.
    """
    from diapipe.measure.measurement import aperture_flux

    if not np.isfinite(fwhm_pix) or fwhm_pix <= 0:
        raise ValueError(f"fwhm_pix must be positive and finite, got {fwhm_pix!r}")
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    r_tot = float(max(calib_radius_pix, total_radius_fwhm * fwhm_pix))
    aps = aperture_flux(image, variance, x, y, (float(calib_radius_pix), r_tot), mask)
    ap_cal, ap_cal_err, flag_cal = aps[float(calib_radius_pix)]
    total, total_err, flag_tot = aps[r_tot]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = total / ap_cal
        # the inner aperture is part of the outer one: the ratio's noise is that of the ring
        # between them (plus the inner flux's own, second order)
        ring_var = np.clip(total_err**2 - ap_cal_err**2, 0.0, None)
        ratio_err = np.sqrt(ring_var + (ratio - 1.0) ** 2 * ap_cal_err**2) / ap_cal
        valid = (np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0) & (ap_cal > 0) & (total > 0)
                 & ~np.asarray(flag_cal, bool) & ~np.asarray(flag_tot, bool))
    idx = np.flatnonzero(valid)
    stats = {"n_input": int(x.size), "total_radius_pix": r_tot}
    if len(idx) < min_stars:
        raise ApertureCorrectionError(f"only {len(idx)} stars with a usable curve of growth to "
                                      f"{r_tot:.1f} px (positive fluxes, inside the image); need {min_stars}",
                                      n_stars=len(idx), threshold=min_stars)
    r = np.log(ratio[idx])
    var = (ratio_err[idx] / ratio[idx]) ** 2
    keep = np.ones(len(idx), dtype=bool)
    centre = _weighted_median(r, 1.0 / var)
    for _ in range(max_iter):
        z = (r - centre) / np.sqrt(var)
        z_scale = max(1.0, 1.4826 * np.median(np.abs(z[keep])))
        new_keep = np.abs(z) <= n_sigma * z_scale
        if new_keep.sum() < min_stars:
            raise ApertureCorrectionError(f"only {new_keep.sum()} curve-of-growth stars survive clipping; "
                                          f"need {min_stars}", n_stars=int(new_keep.sum()), threshold=min_stars)
        converged = np.array_equal(new_keep, keep)
        keep = new_keep
        centre = _weighted_median(r[keep], 1.0 / var[keep])
        if converged:
            break
    w = 1.0 / var[keep]
    chi2_dof = np.sum(w * (r[keep] - centre) ** 2) / max(keep.sum() - 1, 1)
    # error of a weighted median: ~1.25 x that of the weighted mean, inflated by the excess scatter
    centre_err = 1.2533 / np.sqrt(np.sum(w)) * np.sqrt(max(chi2_dof, 1.0))
    used = np.zeros(x.shape, dtype=bool)
    used[idx[keep]] = True
    resid = r[keep] - centre
    factor = float(np.exp(centre))
    stats.update({"n_stars": int(keep.sum()), "used": used,
                  "scatter": float(1.4826 * np.median(np.abs(resid - np.median(resid))))})
    return factor, float(factor * centre_err), stats


def _weighted_median(values, weights) -> float:
    """Weighted median: the value where the cumulative weight (sorted by value) reaches half,
    interpolated between neighbouring values."""
    order = np.argsort(values)
    v = np.asarray(values, float)[order]
    w = np.asarray(weights, float)[order]
    cum = np.cumsum(w) - 0.5 * w
    return float(np.interp(0.5 * w.sum(), cum, v))


def to_total_flux(correction: ApertureCorrection, factor: float, factor_err: float = 0.0) -> ApertureCorrection:
    """The aperture correction times a constant curve-of-growth ``factor`` ± ``factor_err``
    (`measure_total_flux_correction`): PSF flux -> total flux; the relative errors add in
    quadrature."""
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"curve-of-growth factor must be positive and finite, got {factor!r}")
    return ApertureCorrection(correction.coeffs * factor, correction.order, correction.bbox,
                              rms=correction.rms * factor, err=float(np.hypot(correction.err, factor_err / factor)))
