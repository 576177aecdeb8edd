"""Empirical PSF model from bright stars: selection, fit, residual check.

characterizeImage builds the PSF from its own image: pick bright, isolated,
unflagged point sources (`select_psf_stars`), cut their stamps, recentre them
to the stamp centre with sub-pixel Fourier shifts, normalise them to unit
flux and fit every kernel pixel as a polynomial of the star position
(`fit_psf`). Stars that fit badly (neighbours, binaries, galaxies that slipped
through, cosmic rays) are rejected and the fit is repeated, re-centring and
re-normalising the stars against the current model each time. `psf_residuals`
gives the chi² of stars against the model — the "consistent with noise"
check of the accuracy requirement.

The result is a `diapipe.exposure.psf.PixelPsf`. Arrays are ``[y, x]``,
centre of the first pixel at (0, 0).
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from diapipe.exposure.masks import bits
from diapipe.exposure.psf import PixelPsf, fractional_shift, polynomial_terms
from diapipe.measure.measurement import (
    PSF_FIT_BAD_PLANES,
    _adaptive_moments,
    fit_centroids,
    psf_flux,
    psf_kernels,
    shifted_psf_stamps,
)

__all__ = ["PsfFitError", "adaptive_fwhm", "fit_psf", "psf_residuals", "select_psf_stars"]

#: catalogue flags that disqualify a PSF star (missing columns are ignored)
PSF_STAR_BAD_FLAGS = (
    "flag_edge",
    "flag_saturated",
    "flag_saturatedCenter",
    "flag_interpolatedCenter",
    "flag_bad",
    "flag_cr",
    "flag_suspect",
    "flag_noData",
    "flag_centroid",
    "flag_shape",
    "flag_psfFlux",
)


class PsfFitError(RuntimeError):
    """Too few usable stars to fit a PSF; carries the measured count and the requirement."""

    def __init__(self, n_stars: int, n_required: int, reason: str = ""):
        self.n_stars = int(n_stars)
        self.n_required = int(n_required)
        super().__init__(f"PSF fit has {n_stars} usable stars, needs at least {n_required}{reason}")


def select_psf_stars(
    catalog: Table,
    *,
    min_snr: float = 50.0,
    max_snr: float = np.inf,
    isolation_pix: float = 10.0,
    size_clip: float = 3.0,
    max_stars: int | None = 300,
    flux_column: str = "psfFlux",
) -> np.ndarray:
    """Choose PSF stars from a measured catalogue (`measure_sources` columns).

    Keeps positive, unblended (``parent == 0`` and ``deblend_nChild == 0``)
    sources with S/N in ``[min_snr, max_snr]``, none of `PSF_STAR_BAD_FLAGS`,
    no other catalogue source within ``isolation_pix``, and adaptive size
    ``T = shape_xx + shape_yy`` within ``size_clip`` robust sigmas of the
    stellar locus (galaxies are larger; cosmic-ray remnants smaller).
    The stellar locus starts at the smallest tight clump of sizes
    (`_stellar_locus_centre`), refined by iterative clipping.

    Returns
    -------
    selected : `numpy.ndarray` of bool, one per catalogue row.
    """
    n = len(catalog)
    if n == 0:
        return np.zeros(0, bool)
    flux = np.asarray(catalog[flux_column], float)
    err = np.asarray(catalog[f"{flux_column}Err"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    keep = np.isfinite(snr) & (snr >= min_snr) & (snr <= max_snr)
    for name in PSF_STAR_BAD_FLAGS:
        if name in catalog.colnames:
            keep &= ~np.asarray(catalog[name], bool)
    if "is_negative" in catalog.colnames:
        keep &= ~np.asarray(catalog["is_negative"], bool)
    for name in ("parent", "deblend_nChild"):
        if name in catalog.colnames:
            keep &= np.asarray(catalog[name]) == 0
    x = np.asarray(catalog["centroid_x"], float)
    y = np.asarray(catalog["centroid_y"], float)
    if n > 1 and isolation_pix > 0:
        dist, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
        keep &= dist[:, 1] >= isolation_pix
    size = np.asarray(catalog["shape_xx"], float) + np.asarray(catalog["shape_yy"], float)
    keep &= np.isfinite(size) & (size > 0)
    if keep.sum() >= 3:
        s = size[keep]
        centre = _stellar_locus_centre(s)
        near = np.abs(np.log(s / centre)) < 0.06
        for _ in range(5):
            width = max(1.4826 * np.median(np.abs(s[near] - centre)), 0.01 * centre)
            near = np.abs(s - centre) < size_clip * width
            if near.sum() < 3:
                break
            centre = np.median(s[near])
        width = max(1.4826 * np.median(np.abs(s[near] - centre)), 0.01 * centre)
        keep &= np.abs(size - centre) < size_clip * width
    if max_stars is not None and keep.sum() > max_stars:
        idx = np.flatnonzero(keep)
        brightest = idx[np.argsort(-snr[idx])[:max_stars]]
        keep[:] = False
        keep[brightest] = True
    return keep


def _stellar_locus_centre(size: np.ndarray, bandwidth: float = 0.03) -> float:
    """Size of the smallest tight clump of sources: the stars.

    At DC2 density bright galaxies outnumber bright stars several times, so the
    median size is a galaxy's. Stars are the smallest sources and, at S/N > 50,
    share one size to a few per cent: take the smallest-size peak of a kernel
    density estimate of ln(size) that is at least a quarter of the highest peak
    and holds three or more sources.
    """
    logs = np.log(size)
    grid = np.linspace(logs.min() - 2 * bandwidth, logs.max() + 2 * bandwidth, 400)
    density = np.exp(-0.5 * ((grid[:, None] - logs[None, :]) / bandwidth) ** 2).sum(axis=1)
    peaks = np.flatnonzero((density[1:-1] >= density[:-2]) & (density[1:-1] > density[2:])) + 1
    for index in peaks:
        members = np.abs(logs - grid[index]) < 2 * bandwidth
        if density[index] >= 0.25 * density.max() and members.sum() >= 3:
            return float(np.exp(np.median(logs[members])))
    return float(np.median(size[size <= np.median(size)]))


def _cut_stamps(image, variance, mask, xs, ys, half):
    """Stamps (N, K, K) around the nearest pixels; False in ``ok`` where truncated or masked."""
    ny, nx = image.shape
    cx = np.floor(xs + 0.5).astype(int)
    cy = np.floor(ys + 0.5).astype(int)
    ok = (cx - half >= 0) & (cx + half < nx) & (cy - half >= 0) & (cy + half < ny)
    k = 2 * half + 1
    data = np.zeros((xs.size, k, k))
    var = np.ones((xs.size, k, k))
    for i in np.flatnonzero(ok):
        box = (slice(cy[i] - half, cy[i] + half + 1), slice(cx[i] - half, cx[i] + half + 1))
        data[i] = image[box]
        var[i] = variance[box]
        if mask is not None and (mask[box] & bits(PSF_FIT_BAD_PLANES)).any():
            ok[i] = False
    ok &= np.isfinite(data).all(axis=(1, 2)) & np.isfinite(var).all(axis=(1, 2)) & (var > 0).all(axis=(1, 2))
    return data, var, cx, cy, ok


def fit_psf(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    stars_xy,
    bbox=None,
    *,
    kernel_size: int = 25,
    order: int = 2,
    n_iter: int = 4,
    clip_sigma: float = 4.0,
    initial_sigma_pix: float | None = None,
    min_stars_per_term: int = 3,
    model_error_fraction: float = 0.03,
    return_used: bool = False,
):
    """Fit a spatially varying pixelized PSF to stars.

    Parameters
    ----------
    image, variance, mask : `numpy.ndarray`
        Background-subtracted image, variance and mask; stars whose stamps
        hold BAD/SAT/NO_DATA pixels or run off the image are not used.
    stars_xy : array-like, shape (N, 2)
        Approximate star centres (x, y) in pixels (e.g. catalogue centroids).
    bbox : `tuple`, optional
        ``(x_min, y_min, x_max, y_max)`` over which positions are normalised;
        default the whole image.
    kernel_size : `int`
        Odd kernel size in pixels (~ 8 FWHM holds the wings that matter).
    order : `int`
        Polynomial order of the spatial variation. Lowered automatically
        when there are fewer than ``min_stars_per_term`` stars per term.
    n_iter : `int`
        Fit/reject/recentre iterations.
    clip_sigma : `float`
        Stars with reduced chi² above ``median + clip_sigma * robust sigma``
        and pixels with ``|residual| > clip_sigma`` sigma are rejected.
    model_error_fraction : `float`
        Fractional model error added to the noise when judging outliers
        (stars and pixels), so the rejection does not prefer faint stars.
    initial_sigma_pix : `float`, optional
        Width of the Gaussian used to centre the stars at first
        (default: from the stars' unweighted moments).

    Returns
    -------
    psf : `PixelPsf` (and a boolean array of the stars kept if ``return_used``)

    Raises
    ------
    PsfFitError
        Fewer than 3 usable stars.

    Notes
    -----
    For each kernel pixel ``p`` the fit minimises

    .. math::

        \\sum_i w_i m_{ip} \\left(\\frac{S_i(p)}{F_i} - \\sum_k T_k(u_i, v_i) B_k(p)\\right)^2

    with ``S_i`` the recentred stamp of star ``i``, ``F_i`` its PSF flux,
    ``T_k`` the polynomial terms of its position, ``m_ip`` the pixel
    rejection mask, and per-star weight ``w_i = F_i^2 / \\bar V_i`` (one
    variance per star: weights that follow each pixel's noisy variance
    would bias the core of the PSF low).
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    stars_xy = np.asarray(stars_xy, float).reshape(-1, 2)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if bbox is None:
        bbox = (0.0, 0.0, image.shape[1] - 1.0, image.shape[0] - 1.0)
    half = kernel_size // 2
    xs, ys = stars_xy[:, 0].copy(), stars_xy[:, 1].copy()
    data, var, cx, cy, ok = _cut_stamps(image, variance, mask, xs, ys, half)
    if ok.sum() < 3:
        raise PsfFitError(
            int(ok.sum()), 3, " (stars off the image edge or with masked pixels are not usable)"
        )
    grid = np.arange(-half, half + 1, dtype=float)
    if initial_sigma_pix is None:
        # Moments of the summed stamps within 5 px: a rough, robust starting width.
        r2 = grid[None, :] ** 2 + grid[:, None] ** 2
        stack = np.sum(data[ok] / np.maximum(data[ok].sum(axis=(1, 2)), 1e-30)[:, None, None], axis=0)
        inner = r2 <= 25
        initial_sigma_pix = float(np.sqrt(max(np.sum(stack * r2 * inner) / np.sum(stack * inner) / 2, 0.25)))
    psf = PixelPsf.gaussian(initial_sigma_pix, size=kernel_size, bbox=bbox)
    use = ok.copy()
    usable_pixels = np.isfinite(image) & np.isfinite(variance)
    if mask is not None:
        usable_pixels &= (mask & bits(PSF_FIT_BAD_PLANES)) == 0
    pixel_ok = np.ones(data.shape, bool)
    for iteration in range(n_iter):
        # Re-centre and re-normalise the stars against the current model.
        idx = np.flatnonzero(ok)
        fx, fy, _, _, failed = fit_centroids(image, variance, usable_pixels, psf, xs[idx], ys[idx], 3, 2.0)
        xs[idx], ys[idx] = fx, fy
        use[idx[failed]] = False
        data, var, cx, cy, ok_now = _cut_stamps(image, variance, mask, xs, ys, half)
        use &= ok_now
        flux, _, _, _, _ = psf_flux(image, variance, mask, psf, xs, ys)
        use &= np.isfinite(flux) & (flux > 0)
        fit_order = order
        while fit_order > 0 and use.sum() < min_stars_per_term * (fit_order + 1) * (fit_order + 2) // 2:
            fit_order -= 1
        if use.sum() < 3:
            raise PsfFitError(int(use.sum()), 3, f" after {iteration} rejection iterations")
        sel = np.flatnonzero(use)
        shifted = np.array([fractional_shift(data[i], -(xs[i] - cx[i]), -(ys[i] - cy[i])) for i in sel])
        norm = shifted / flux[sel, None, None]
        model_now = psf_kernels(psf, xs[sel], ys[sel])
        mean_var = np.sum(model_now**2 * var[sel], axis=(1, 2)) / np.sum(model_now**2, axis=(1, 2))
        weight = flux[sel] ** 2 / mean_var
        basis = _solve_pixels(norm, weight[:, None, None] * pixel_ok[sel], xs[sel], ys[sel], bbox, fit_order)
        psf = PixelPsf(basis, fit_order, bbox)
        # Residuals of each star against the new model, at its own position.
        model = shifted_psf_stamps(psf_kernels(psf, xs[sel], ys[sel]), xs[sel] - cx[sel], ys[sel] - cy[sel])
        # Residuals in units of the noise plus a fractional model error, so that bright
        # stars are not rejected merely because they see the model's small imperfections
        # (which would leave the model fit only to faint stars).
        model_var = (model_error_fraction * flux[sel, None, None] * model) ** 2
        resid = (data[sel] - flux[sel, None, None] * model) / np.sqrt(var[sel] + model_var)
        core = model > 1e-3 * model.max(axis=(1, 2), keepdims=True)
        chi2_dof = np.sum(resid**2 * core, axis=(1, 2)) / np.maximum(core.sum(axis=(1, 2)), 1)
        if iteration < n_iter - 1:
            centre = np.median(chi2_dof)
            spread = 1.4826 * np.median(np.abs(chi2_dof - centre))
            use[sel[chi2_dof > centre + clip_sigma * max(spread, 0.05 * centre)]] = False
            pixel_ok[sel] = np.abs(resid) < clip_sigma * np.sqrt(max(centre, 1.0)) * 1.5
    if return_used:
        return psf, use
    return psf


def _solve_pixels(norm, weights, xs, ys, bbox, order):
    """Per-pixel weighted polynomial fit; returns the basis (n_terms, K, K)."""
    x0, y0, x1, y1 = bbox
    u = (2.0 * xs - (x0 + x1)) / max(x1 - x0, 1.0)
    v = (2.0 * ys - (y0 + y1)) / max(y1 - y0, 1.0)
    terms = polynomial_terms(u, v, order).T  # (N, n_terms)
    n, k, _ = norm.shape
    w = weights.reshape(n, -1)  # (N, P)
    d = norm.reshape(n, -1)
    normal = np.einsum("np,ni,nj->pij", w, terms, terms)
    rhs = np.einsum("np,np,ni->pi", w, d, terms)
    # Pixels with (almost) no data keep a tiny ridge so the solve stays finite.
    normal += (
        1e-12
        * np.eye(terms.shape[1])[None]
        * np.maximum(normal.trace(axis1=1, axis2=2), 1e-30)[:, None, None]
    )
    coeffs = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0]  # (P, n_terms)
    return coeffs.T.reshape(terms.shape[1], k, k)


def psf_residuals(image, variance, mask, psf: PixelPsf, stars_xy) -> Table:
    """Chi² of stars against the PSF model, after fitting each star's position and flux.

    Returns a Table with ``x``, ``y``, ``psfFlux``, ``psfFluxErr``, ``chi2``,
    ``ndof`` (core pixels minus 3 fitted parameters) and ``chi2_dof``. For a
    correct model and variance plane ``median(chi2_dof)`` is ~1 for stars of
    any brightness; it grows with S/N when the model is wrong.
    """
    stars_xy = np.asarray(stars_xy, float).reshape(-1, 2)
    good = np.isfinite(image) & np.isfinite(variance)
    if mask is not None:
        good &= (mask & bits(PSF_FIT_BAD_PLANES)) == 0
    x, y, _, _, _ = fit_centroids(image, variance, good, psf, stars_xy[:, 0], stars_xy[:, 1], 4, 2.0)
    flux, err, chi2, n_core, _ = psf_flux(image, variance, mask, psf, x, y)
    ndof = np.maximum(n_core - 3, 1)
    return Table(
        {
            "x": x,
            "y": y,
            "psfFlux": flux,
            "psfFluxErr": err,
            "chi2": chi2,
            "ndof": ndof,
            "chi2_dof": chi2 / ndof,
        }
    )


def adaptive_fwhm(kernel: np.ndarray) -> float:
    """Gaussian-equivalent FWHM (px) from adaptive second moments of a centred kernel image.

    ``2.3548 (det M)^{1/4}`` with M the moments of the best-matching
    elliptical Gaussian (as HSM reports): insensitive to the noise in the
    far wings that dominates unweighted moments of a fitted kernel.
    """
    kernel = np.asarray(kernel, float)
    # start from the unweighted size: a fixed guess fails to converge for broad (bad-seeing) PSFs
    half_y, half_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    yy0, xx0 = np.mgrid[-half_y : half_y + 1, -half_x : half_x + 1]
    weight = np.clip(kernel, 0.0, None)
    total = weight.sum()
    sigma0 = np.sqrt(0.5 * (weight * (xx0**2 + yy0**2)).sum() / total) if total > 0 else 1.5
    sigma0 = float(np.clip(sigma0, 0.8, 0.25 * min(kernel.shape)))
    kernel = kernel[None]
    xx, yy, xy, failed = _adaptive_moments(kernel, np.ones(kernel.shape, bool), np.zeros(1), np.zeros(1), sigma0)
    if failed[0]:
        raise ValueError("adaptive moments of the kernel did not converge")
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * (xx[0] * yy[0] - xy[0] ** 2) ** 0.25)
