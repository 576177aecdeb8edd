"""Aperture correction: the ratio of a large-aperture flux to the PSF flux, over the detector.

A PSF flux measures the flux inside the PSF model's normalisation; where the
model misses wing light or varies imperfectly, it is low by a position-dependent
fraction. Following Rubin (MeasureApCorrTask: reference flux
``base_CircularApertureFlux_12_0``, Chebyshev order 2, 3σ clipping, 4 iterations)
we fit the ratio ``aperture_flux / psf_flux`` of bright isolated stars with a
low-order 2-D polynomial, clip outliers (blends, cosmic rays, galaxies) and
multiply PSF fluxes by it.

Positions are 0-based pixels; ``bbox = (x_min, y_min, x_max, y_max)`` (inclusive),
mapped to [-1, 1] for the polynomial (terms as `diapipe.exposure.psf.polynomial_terms`).
"""

from __future__ import annotations

import numpy as np

from diapipe.exposure.psf import polynomial_terms

__all__ = ["ApertureCorrection", "ApertureCorrectionError", "fit_aperture_correction",
           "apply_aperture_correction"]


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

    def __init__(self, coeffs, order: int, bbox, rms: float = 0.0):
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

    @classmethod
    def constant(cls, value: float, bbox) -> ApertureCorrection:
        """A spatially constant correction."""
        return cls([value], 0, bbox)

    coeffs = property(lambda self: self._coeffs, doc="Polynomial coefficients (read-only).")
    order = property(lambda self: self._order, doc="Polynomial order.")
    bbox = property(lambda self: self._bbox, doc="(x_min, y_min, x_max, y_max) box mapped to [-1, 1].")
    rms = property(lambda self: self._rms, doc="Scatter of the stars about the fit.")

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
                "bbox": list(self._bbox), "rms": self._rms}

    @classmethod
    def from_dict(cls, data: dict) -> ApertureCorrection:
        """Inverse of `to_dict`."""
        try:
            return cls(data["coeffs"], data["order"], data["bbox"], data.get("rms", 0.0))
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
    correction = ApertureCorrection(coeffs, used_order, bbox, rms=rms)
    used = np.zeros(x.shape, dtype=bool)
    used[idx[keep]] = True
    stats = {"n_stars": int(keep.sum()), "n_rejected": int(len(idx) - keep.sum()), "order": used_order,
             "rms": rms, "used": used}
    return correction, stats


def apply_aperture_correction(psf_flux, psf_flux_err, x, y, correction: ApertureCorrection):
    """Aperture-corrected PSF fluxes and errors: both multiplied by ``correction.evaluate(x, y)``."""
    factor = correction.evaluate(x, y)
    return np.asarray(psf_flux, dtype=float) * factor, np.asarray(psf_flux_err, dtype=float) * factor
