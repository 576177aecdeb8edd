"""Forced PSF photometry at fixed positions (DiaForcedSource psfFlux/scienceFlux).

At a fixed position the only free parameter of a point-source model is its
flux, so the maximum-likelihood estimate under Gaussian pixel noise is linear:

    flux = Σ(P·I/σ²) / Σ(P²/σ²),    flux_err = 1 / sqrt(Σ(P²/σ²))

with ``P`` the PSF (normalised to unit sum, shifted to the sub-pixel position),
``I`` the image and ``σ²`` the variance plane. The error depends on the variance
plane only, so it is right whenever the variance plane is (difference images
carry a propagated variance). The background is assumed already removed (true
for difference images and background-subtracted calexps).

Pixels that are NaN in the image or the variance, have non-positive variance,
or carry one of ``bad_mask_planes`` are left out of the sums (the estimate
stays unbiased; only the error grows). A PSF footprint that runs off the image
gives NaN with the edge flag (like Rubin's ``psfFlux_flag_edge``), unless
``allow_partial=True``; no usable pixel gives NaN with the no-good-pixels flag.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..exposure.masks import bits
from ..exposure.psf import fractional_shift

__all__ = ["forced_psf_flux", "DEFAULT_BAD_MASK_PLANES"]

DEFAULT_BAD_MASK_PLANES = ("BAD", "SAT", "CR", "NO_DATA")


def _psf_provider(psf_image) -> tuple[Callable[[float, float], np.ndarray] | None, np.ndarray | None]:
    """Return (callable giving a shifted PSF at (x, y), or None; constant kernel or None)."""
    if hasattr(psf_image, "compute_image"):
        return psf_image.compute_image, None
    if callable(psf_image):
        return psf_image, None
    kernel = np.asarray(psf_image, dtype=float)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"psf_image must be an odd square kernel image, got shape {kernel.shape}")
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("psf_image must have a positive, finite sum")
    return None, kernel / total


def forced_psf_flux(
    image,
    variance,
    psf_image,
    x,
    y,
    *,
    mask=None,
    bad_mask_planes=DEFAULT_BAD_MASK_PLANES,
    xy0=(0, 0),
    allow_partial: bool = False,
    return_flags: bool = False,
):
    """PSF-weighted linear least-squares flux at fixed pixel positions.

    Parameters
    ----------
    image, variance : `numpy.ndarray`, shape (ny, nx)
        Background-subtracted image and its variance plane (same units²,
        e.g. nJy and nJy²), indexed ``[y, x]``.
    psf_image : `numpy.ndarray` or `diapipe.exposure.psf.PixelPsf` or callable
        Either one kernel image (odd square, centred on its central pixel)
        used at every position, shifted to each sub-pixel position with a
        Fourier phase ramp; or an object with ``compute_image(x, y)``
        (`~diapipe.exposure.psf.PixelPsf`), or a callable ``f(x, y)``,
        returning the PSF already shifted to (x, y) with its central pixel at
        ``round(x), round(y)`` (``numpy.round``). Normalised to unit sum here.
    x, y : array_like
        Positions in parent pixel coordinates (pixel centres are integers).
    mask : `numpy.ndarray` of int, optional
        Mask plane; pixels with any of ``bad_mask_planes`` are excluded.
    bad_mask_planes : sequence of `str`
        Mask planes to exclude (see `diapipe.exposure.masks`).
    xy0 : (int, int)
        Parent coordinates of ``image[0, 0]``.
    allow_partial : `bool`
        Measure positions whose PSF footprint is partly off the image (the
        edge flag is still set); default: NaN.
    return_flags : `bool`
        Also return a dict of per-position arrays: ``edge`` (footprint off the
        image), ``no_good_pixels`` (no usable pixel), ``n_pixels`` (pixels
        used; APDB ``psfNdata``).

    Returns
    -------
    flux, flux_err : `numpy.ndarray`
        In the image's units (total flux of a unit-sum PSF).
    flags : `dict`, only if ``return_flags``

    Examples
    --------
    >>> import numpy as np
    >>> from diapipe.exposure.psf import PixelPsf
    >>> psf = PixelPsf.gaussian(sigma=1.5, size=15)
    >>> image = np.zeros((40, 40))
    >>> image[13:28, 8:23] = 500.0 * psf.compute_kernel_image(20, 15)  # star at (15, 20)
    >>> variance = np.full(image.shape, 4.0)
    >>> flux, err = forced_psf_flux(image, variance, psf, [15.0, 1.0], [20.0, 1.0])
    >>> np.round(flux[0], 6), np.isnan(flux[1])  # second position runs off the image
    (np.float64(500.0), np.True_)
    >>> float(np.round(err[0], 3))  # 1/sqrt(Σ P²/σ²) = 2 sqrt(4π) σ_psf for a Gaussian
    10.635
    """
    # Planes stay in their own dtype; only the PSF stamps are converted (a full-frame
    # float64 copy of a 4k x 4k detector cost more than all the fits together).
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValueError(f"image {image.shape} and variance {variance.shape} must be 2-d of the same shape")
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape} and y {y.shape} must be 1-d of the same length")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask {mask.shape} must match image {image.shape}")
    bad_bits = bits(bad_mask_planes) if (mask is not None and bad_mask_planes) else 0

    def stamp_planes(rows, cols):
        """Inverse variance and inverse-variance-weighted image of one stamp, zero
        where a pixel is unusable, so sums simply skip those pixels."""
        img = np.asarray(image[rows, cols], dtype=float)
        var = np.asarray(variance[rows, cols], dtype=float)
        usable = np.isfinite(img) & np.isfinite(var) & (var > 0)
        if bad_bits:
            usable &= (mask[rows, cols] & bad_bits) == 0
        inv_var = np.where(usable, 1.0 / np.where(usable, var, 1.0), 0.0)
        return inv_var, np.where(usable, img, 0.0) * inv_var

    n = x.size
    flux = np.full(n, np.nan)
    flux_err = np.full(n, np.nan)
    edge = np.zeros(n, dtype=bool)
    no_good = np.zeros(n, dtype=bool)
    n_pix = np.zeros(n, dtype=np.int64)
    provider, kernel = _psf_provider(psf_image)
    ny, nx = image.shape
    x0, y0 = xy0
    finite_pos = np.isfinite(x) & np.isfinite(y)
    no_good[~finite_pos] = True

    for i in np.flatnonzero(finite_pos):
        xi, yi = x[i], y[i]
        cx, cy = int(np.round(xi)), int(np.round(yi))
        if provider is None:
            psf = fractional_shift(kernel, xi - cx, yi - cy)
        else:
            psf = np.asarray(provider(xi, yi), dtype=float)
            if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[0] != psf.shape[1]:
                raise ValueError(f"PSF at ({xi}, {yi}) has shape {psf.shape}; need an odd square image")
            psf = psf / psf.sum()
        half = psf.shape[0] // 2
        # Stamp bounds in local array coordinates, then clip to the image.
        lx0, ly0 = cx - x0 - half, cy - y0 - half
        lx1, ly1 = lx0 + psf.shape[1], ly0 + psf.shape[0]
        cx0, cy0, cx1, cy1 = max(lx0, 0), max(ly0, 0), min(lx1, nx), min(ly1, ny)
        if cx0 >= cx1 or cy0 >= cy1:
            edge[i] = no_good[i] = True
            continue
        if (cx0, cy0, cx1, cy1) != (lx0, ly0, lx1, ly1):
            edge[i] = True
            if not allow_partial:
                continue
        p = psf[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0]
        iv, weighted = stamp_planes(slice(cy0, cy1), slice(cx0, cx1))
        denom = float(np.sum(p * p * iv))
        n_pix[i] = int(np.count_nonzero(iv))
        if not denom > 0:
            no_good[i] = True
            continue
        flux[i] = float(np.sum(p * weighted)) / denom
        flux_err[i] = 1.0 / np.sqrt(denom)

    if return_flags:
        return flux, flux_err, {"edge": edge, "no_good_pixels": no_good, "n_pixels": n_pix}
    return flux, flux_err
