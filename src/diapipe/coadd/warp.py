"""Resampling an image (image, variance, mask) from one WCS onto another pixel grid.

This is the pure-array core of makeWarp: a calexp is resampled onto a patch
grid with a Lanczos kernel (as Rubin's afw ``warpExposure``, default
``lanczos3``), and its PSF is transformed to match (`warp_psf`).

How a destination pixel is computed
-----------------------------------
For a destination pixel at parent position :math:`p` the source position is
:math:`s(p) = W_{src}^{-1}(W_{dst}(p))`. WCS calls are slow, so :math:`s` is
evaluated exactly on a coarse grid (every ``grid_step`` pixels, plus the edges)
and interpolated with a bicubic spline: for TAN/TAN-SIP mappings the error is
far below 1e-3 px. With :math:`s = (u, v)`, :math:`i = \\lfloor u \\rfloor`,
:math:`j = \\lfloor v \\rfloor` and the 1-d Lanczos weights
:math:`a_k = L_n(u - i - k)`, :math:`b_l = L_n(v - j - l)` for
:math:`k, l = -n+1 \\dots n` (each normalised to sum 1, so a flat image stays
flat):

.. math::

    I_{dst}(p) = J(p) \\sum_{k,l} a_k b_l I_{src}[j + l, i + k], \\qquad
    V_{dst}(p) = J(p)^2 \\sum_{k,l} a_k^2 b_l^2 V_{src}[j + l, i + k]

where :math:`J = |\\det \\partial s / \\partial p|` is the area of a
destination pixel in source pixels. Images are in flux per pixel (nJy/pixel),
so multiplying by :math:`J` conserves total flux when the pixel scales differ
(for equal scales :math:`J = 1` and flux per pixel is unchanged). Note that
Rubin's afw warping does *not* apply this Jacobian (it preserves surface
brightness and leaves it to the photometric calibration).

The variance is exact for each pixel on its own, but resampling correlates
neighbouring pixels; that covariance is neglected (not stored), as in Rubin.
Measured per-pixel noise of a warp therefore matches ``variance``, while noise
summed over an aperture is larger than the sum of variances (a few tens of
percent for Lanczos-3).

Mask bits are OR-ed over the bilinear footprint: the (up to) four source
pixels around :math:`s(p)` whose bilinear weight exceeds
``mask_weight_threshold`` (this is afw's default ``maskWarpingKernelName =
"bilinear"``, so a defect grows by at most one pixel). Planes in
``full_footprint_planes`` (default ``NO_DATA``) are OR-ed over the whole
Lanczos footprint. A destination pixel is ``NO_DATA`` (image NaN, variance
+inf, as afw's edge pixel) when its Lanczos footprint leaves the source image
or touches a source pixel that is non-finite or ``NO_DATA``.
"""

from __future__ import annotations

import math
import re

import numpy as np

from diapipe.exposure.masks import MASK_DTYPE, bit, bits
from diapipe.exposure.psf import PixelPsf, fractional_shift, polynomial_terms

__all__ = ["warp_image", "warp_psf", "warp_aperture_correction", "lanczos_weights", "pixel_mapping", "local_affine"]


_TABLE_STEPS = 1024


def _weight_table(order: int) -> np.ndarray:
    """Weights at frac = i / _TABLE_STEPS, i = 0 .. _TABLE_STEPS (shape (2n, steps + 1))."""
    table = _WEIGHT_TABLES.get(order)
    if table is None:
        table = lanczos_weights(np.linspace(0.0, 1.0, _TABLE_STEPS + 1), order, np.float32)
        _WEIGHT_TABLES[order] = table
    return table


_WEIGHT_TABLES: dict[int, np.ndarray] = {}


def _fast_weights(frac: np.ndarray, order: int) -> np.ndarray:
    """`lanczos_weights` by linear interpolation in a table (error < 1e-6); float32."""
    table = _weight_table(order)
    t = np.asarray(frac, np.float32) * np.float32(_TABLE_STEPS)
    i = np.minimum(t.astype(np.intp), _TABLE_STEPS - 1)
    a = t - i
    lo = np.take(table, i, axis=1)
    hi = np.take(table, i + 1, axis=1)
    hi -= lo
    hi *= a
    lo += hi
    return lo


def _lanczos_order(kernel: str) -> int:
    match = re.fullmatch(r"lanczos([1-9])", str(kernel).lower())
    if match is None:
        raise ValueError(f"Unknown warping kernel {kernel!r}; use 'lanczos<n>' (n = 1..9), e.g. 'lanczos3'")
    return int(match.group(1))


def lanczos_weights(
    frac: np.ndarray, order: int = 3, dtype=np.float32, linear_exact: bool = True
) -> np.ndarray:
    """Normalised 1-d Lanczos weights, shape ``(2 * order, *frac.shape)``.

    Weight ``k`` (k = 0 .. 2n-1) is for the source pixel at offset ``k - n + 1``
    from ``floor(u)``, with ``frac = u - floor(u)`` in [0, 1). Uses
    ``sin(pi (f - m)) = (-1)^m sin(pi f)`` so only three trig calls per position.
    With ``linear_exact`` (default) the weights get a small correction so that
    they reproduce linear functions exactly (unbiased centroids; see the code).

    >>> w = lanczos_weights(np.array([0.0, 0.5]))
    >>> w[:, 0].round(6).tolist() == [0, 0, 1, 0, 0, 0]
    True
    >>> round(float(w[:, 1].sum()), 6)
    1.0
    """
    frac = np.asarray(frac, dtype=np.float64)
    n = int(order)
    s_pi = np.sin(np.pi * frac)
    a = np.pi * frac / n
    s_a, c_a = np.sin(a), np.cos(a)
    out = np.empty((2 * n,) + frac.shape, dtype=np.float64)
    for k in range(2 * n):
        m = k - n + 1  # tap offset
        x = frac - m
        sign = -1.0 if m % 2 else 1.0
        # sin(pi x / n) = sin(a - pi m / n)
        s_xn = s_a * math.cos(np.pi * m / n) - c_a * math.sin(np.pi * m / n)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = n * sign * s_pi * s_xn / (np.pi**2 * x * x)
        out[k] = np.where(np.abs(x) < 1e-12, 1.0, w)
    out /= out.sum(axis=0)
    if linear_exact:
        # Plain normalised Lanczos-3 moves a point by up to ~0.02 px depending on the
        # sub-pixel phase (its first moment is not exactly the position). Add a small
        # tapered linear term so that sum(w) = 1 and sum(w * d) = 0 hold exactly
        # (d = tap offset - frac): linear functions, hence centroids, are reproduced.
        d = (np.arange(2 * n) - n + 1).reshape((-1,) + (1,) * frac.ndim) - frac
        h = np.abs(out)
        mu = (h * d).sum(axis=0) / h.sum(axis=0)
        err = (out * d).sum(axis=0)
        spread = (h * (d - mu) ** 2).sum(axis=0)
        coef = np.divide(err, spread, out=np.zeros_like(err), where=spread > 1e-12)
        out -= coef * (d - mu) * h
    return out.astype(dtype, copy=False)


def pixel_mapping(src_wcs, dst_wcs, dst_shape, dst_xy0=(0, 0), src_xy0=(0, 0), grid_step: int = 32):
    """Spline model of destination array pixel -> source array pixel.

    Returns two `scipy.interpolate.RectBivariateSpline` objects ``(u_of, v_of)``
    taking ``(y, x)`` destination *array* coordinates and returning source array
    coordinates (``x - src_xy0[0]``, ``y - src_xy0[1]``). Exact at the grid
    nodes; sky positions that do not project are sent far outside the source.
    """
    ny, nx = int(dst_shape[0]), int(dst_shape[1])
    step = max(int(grid_step), 2)
    xs = np.unique(np.r_[np.arange(0, nx, step), nx - 1]).astype(float)
    ys = np.unique(np.r_[np.arange(0, ny, step), ny - 1]).astype(float)
    gx, gy = np.meshgrid(xs + dst_xy0[0], ys + dst_xy0[1])
    ra, dec = dst_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    if _is_sip(src_wcs):
        u, v = src_wcs.all_world2pix(ra, dec, 0, quiet=True)
    else:
        u, v = src_wcs.wcs_world2pix(ra, dec, 0)
    u = np.asarray(u, float).reshape(gx.shape) - src_xy0[0]
    v = np.asarray(v, float).reshape(gx.shape) - src_xy0[1]
    bad = ~(np.isfinite(u) & np.isfinite(v))
    u[bad] = -1e9
    v[bad] = -1e9
    kx, ky = min(3, len(xs) - 1), min(3, len(ys) - 1)
    if kx < 1 or ky < 1:
        raise ValueError(f"dst_shape {dst_shape} is too small to warp onto (need >= 2 x 2 pixels)")
    from scipy.interpolate import RectBivariateSpline  # lazy: import time of the task modules

    return (
        RectBivariateSpline(ys, xs, u, kx=ky, ky=kx, s=0),
        RectBivariateSpline(ys, xs, v, kx=ky, ky=kx, s=0),
    )


def _jacobian(u_of, v_of, ys: np.ndarray, xs: np.ndarray, sub: int = 16) -> np.ndarray:
    """|det d(u, v)/d(x, y)| on the (ys, xs) grid, evaluated every ``sub`` pixels and
    repeated (it varies by < 1e-6 over that distance for sky projections)."""
    ys_c, xs_c = ys[::sub], xs[::sub]
    # the splines take (y, x): their "dx" derivative is along y, "dy" along x
    det = np.abs(
        u_of(ys_c, xs_c, dx=0, dy=1) * v_of(ys_c, xs_c, dx=1, dy=0)
        - u_of(ys_c, xs_c, dx=1, dy=0) * v_of(ys_c, xs_c, dx=0, dy=1)
    )
    det = np.repeat(np.repeat(det, sub, axis=0)[: len(ys)], sub, axis=1)[:, : len(xs)]
    return det


def _is_sip(wcs) -> bool:
    return getattr(wcs, "sip", None) is not None


def _separable_or(flag: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """out[y, x] = OR of flag[y + dy, x + dx] for dy, dx in [lo, hi] (False beyond the edges)."""
    out = np.zeros_like(flag)
    ny, nx = flag.shape
    tmp = np.zeros_like(flag)
    for d in range(lo, hi + 1):
        a0, a1 = max(0, -d), min(nx, nx - d)
        if a1 > a0:
            tmp[:, a0:a1] |= flag[:, a0 + d : a1 + d]
    for d in range(lo, hi + 1):
        a0, a1 = max(0, -d), min(ny, ny - d)
        if a1 > a0:
            out[a0:a1, :] |= tmp[a0 + d : a1 + d, :]
    return out


def warp_image(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    src_wcs,
    dst_wcs,
    dst_shape,
    dst_xy0=(0, 0),
    src_xy0=(0, 0),
    kernel: str = "lanczos3",
    *,
    grid_step: int = 32,
    mask_weight_threshold: float = 0.05,
    full_footprint_planes=("NO_DATA",),
    block_rows: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample (image, variance, mask) from ``src_wcs`` onto the ``dst_wcs`` pixel grid.

    Parameters
    ----------
    image, variance : `numpy.ndarray`, shape (ny_src, nx_src)
        Source image (flux per pixel, e.g. nJy) and its variance.
    mask : `numpy.ndarray` of int32, same shape
        Source mask (`diapipe.exposure.masks` planes).
    src_wcs, dst_wcs : `astropy.wcs.WCS`
        WCSs of the source and destination *parent* pixel frames (0-based).
    dst_shape : `tuple` (ny, nx)
        Shape of the output arrays.
    dst_xy0, src_xy0 : `tuple` (x0, y0)
        Parent coordinates of array pixel [0, 0] of the output / input (e.g. a
        patch's outer-box origin in tract pixels).
    kernel : `str`
        ``"lanczos3"`` (default) or another ``"lanczos<n>"``.
    grid_step : `int`
        Spacing in pixels of the exact WCS evaluations of the pixel mapping.
    mask_weight_threshold : `float`
        A source pixel's mask bits reach a destination pixel when its bilinear
        weight exceeds this (0.05: the nearest source pixel always counts).
    full_footprint_planes : sequence of `str`
        Planes OR-ed over the full Lanczos footprint (and that make the
        destination pixel NO_DATA).
    block_rows : `int`
        Output rows processed at once (bounds memory: ~60 bytes per pixel per row block).

    Returns
    -------
    image, variance : `numpy.ndarray` float32, shape ``dst_shape``
        Resampled image (times the pixel-area Jacobian) and variance; NaN / +inf
        where NO_DATA.
    mask : `numpy.ndarray` int32
        Resampled mask.

    Notes
    -----
    Covariance between output pixels is neglected (see the module docstring).
    Cost: ~(2n)² gathers per pixel, a few seconds for 4k x 4k on one core.
    """
    n = _lanczos_order(kernel)
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if image.shape != variance.shape or image.shape != mask.shape or image.ndim != 2:
        raise ValueError(
            f"image {image.shape}, variance {variance.shape} and mask {mask.shape} must be equal 2-d shapes"
        )
    ny_s, nx_s = image.shape
    ny, nx = int(dst_shape[0]), int(dst_shape[1])

    # Source planes, packed so one 8-byte gather fetches (image, variance).
    full_bits = bits(list(full_footprint_planes)) if full_footprint_planes else 0
    no_data = bit("NO_DATA")
    src_bad = ~(np.isfinite(image) & np.isfinite(variance))
    if full_bits:
        src_bad |= (mask & full_bits) != 0
    packed = np.empty((ny_s, nx_s, 2), dtype=np.float32)
    packed[..., 0] = np.where(src_bad, 0.0, image)
    packed[..., 1] = np.where(src_bad, 0.0, variance)
    flat_pair = packed.reshape(-1).view(np.float64)
    # Full-footprint flags (NO_DATA and friends) pre-dilated over the Lanczos window.
    footprint_bits = (mask & full_bits) | np.where(src_bad, no_data, 0).astype(MASK_DTYPE)
    dilated_bad = _separable_or(footprint_bits != 0, -n + 1, n)
    dilated_bits = np.zeros_like(mask, dtype=MASK_DTYPE)
    for b in range(31):
        if (full_bits | no_data) & (1 << b):
            plane = _separable_or((footprint_bits & (1 << b)) != 0, -n + 1, n)
            dilated_bits[plane] |= MASK_DTYPE(1 << b)
    # the largest of the four bilinear weights is >= 0.25, so the nearest pixel always counts
    thresh = float(mask_weight_threshold)
    mask_flat = mask.astype(MASK_DTYPE, copy=False).ravel()

    u_of, v_of = pixel_mapping(src_wcs, dst_wcs, (ny, nx), dst_xy0, src_xy0, grid_step)
    xs = np.arange(nx, dtype=float)
    out_img = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty((ny, nx), dtype=np.float32)
    out_mask = np.zeros((ny, nx), dtype=MASK_DTYPE)
    taps = range(2 * n)

    for r0 in range(0, ny, block_rows):
        ys = np.arange(r0, min(ny, r0 + block_rows), dtype=float)
        u = u_of(ys, xs)
        v = v_of(ys, xs)
        jac = _jacobian(u_of, v_of, ys, xs)
        iu = np.floor(u)
        iv = np.floor(v)
        valid = (iu - n + 1 >= 0) & (iu + n <= nx_s - 1) & (iv - n + 1 >= 0) & (iv + n <= ny_s - 1)
        iu = np.where(valid, iu, n - 1).astype(np.intp).ravel()
        iv = np.where(valid, iv, n - 1).astype(np.intp).ravel()
        fu = np.where(valid, u - np.floor(u), 0.0).ravel()
        fv = np.where(valid, v - np.floor(v), 0.0).ravel()
        wx = _fast_weights(fu, n)
        wy = _fast_weights(fv, n)
        wx2 = wx * wx
        wy2 = wy * wy
        base = (iv - n + 1) * nx_s + (iu - n + 1)
        npix = base.size
        acc_i = np.zeros(npix, np.float32)
        acc_v = np.zeros(npix, np.float32)
        row_i = np.empty(npix, np.float32)
        row_v = np.empty(npix, np.float32)
        tmp = np.empty(npix, np.float32)
        gathered = np.empty(npix, np.float64)
        pair = gathered.view(np.float32).reshape(npix, 2)
        g_img, g_var = pair[:, 0], pair[:, 1]
        for ell in taps:
            row_i[:] = 0.0
            row_v[:] = 0.0
            for k in taps:
                np.take(flat_pair[ell * nx_s + k :], base, out=gathered)
                np.multiply(wx[k], g_img, out=tmp)
                row_i += tmp
                np.multiply(wx2[k], g_var, out=tmp)
                row_v += tmp
            row_i *= wy[ell]
            acc_i += row_i
            row_v *= wy2[ell]
            acc_v += row_v

        # mask: bilinear footprint, plus the pre-dilated full-footprint planes
        centre = iv * nx_s + iu
        m = np.zeros(npix, MASK_DTYPE)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            wgt = (fu if dx else 1.0 - fu) * (fv if dy else 1.0 - fv)
            vals = mask_flat[centre + (dy * nx_s + dx)]
            m |= np.where((wgt > thresh) | (wgt >= 0.25), vals, 0).astype(MASK_DTYPE)
        m |= dilated_bits.ravel()[centre]
        bad = ~valid.ravel() | dilated_bad.ravel()[centre]
        m[bad] |= MASK_DTYPE(no_data)

        rows = slice(int(ys[0]), int(ys[-1]) + 1)
        jr = jac.ravel().astype(np.float32)
        img = acc_i * jr
        var = acc_v * jr * jr
        img[bad] = np.nan
        var[bad] = np.inf
        out_img[rows] = img.reshape(len(ys), nx)
        out_var[rows] = var.reshape(len(ys), nx)
        out_mask[rows] = m.reshape(len(ys), nx)
    return out_img, out_var, out_mask


def local_affine(src_wcs, dst_wcs, x: float, y: float, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Source position and Jacobian ``A = d(src pixel) / d(dst pixel)`` at dst parent (x, y).

    Returns ``(s, A)`` with ``s`` the source parent position (2,) and ``A`` (2, 2)
    such that ``src ≈ s + A @ (dst - (x, y))`` (central differences of ``step`` px).
    """
    px = np.array([x, x + step, x - step, x, x], float)
    py = np.array([y, y, y, y + step, y - step], float)
    ra, dec = dst_wcs.all_pix2world(px, py, 0)
    u, v = src_wcs.all_world2pix(ra, dec, 0)
    a = np.array(
        [
            [(u[1] - u[2]) / (2 * step), (u[3] - u[4]) / (2 * step)],
            [(v[1] - v[2]) / (2 * step), (v[3] - v[4]) / (2 * step)],
        ]
    )
    return np.array([u[0], v[0]]), a


def _lanczos_sample(arr: np.ndarray, u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Lanczos-n interpolation of ``arr`` at array positions (u, v); zero outside."""
    pad = n + 1
    padded = np.pad(arr, pad)
    iu = np.floor(u)
    iv = np.floor(v)
    wx = lanczos_weights(u - iu, n, np.float64)
    wy = lanczos_weights(v - iv, n, np.float64)
    iu = np.clip(iu.astype(np.intp) + pad, n - 1, padded.shape[1] - n - 1)
    iv = np.clip(iv.astype(np.intp) + pad, n - 1, padded.shape[0] - n - 1)
    out = np.zeros(u.shape, float)
    for ell in range(2 * n):
        for k in range(2 * n):
            out += wy[ell] * wx[k] * padded[iv + ell - n + 1, iu + k - n + 1]
    return out


def _warped_kernel(kernel: np.ndarray, a: np.ndarray, size: int, n: int, n_phase: int) -> np.ndarray:
    """Mean (over sub-pixel phases of the source) of a PSF kernel after Lanczos resampling by A."""
    half = size // 2
    qy, qx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    c = kernel.shape[0] // 2
    total = np.zeros((size, size))
    phases = (np.arange(n_phase) + 0.5) / n_phase
    for dy in phases:
        for dx in phases:
            shifted = fractional_shift(kernel, dx, dy)
            u = c + dx + a[0, 0] * qx + a[0, 1] * qy
            v = c + dy + a[1, 0] * qx + a[1, 1] * qy
            total += _lanczos_sample(shifted, u, v, n)
    return total / total.sum()


def warp_psf(
    psf: PixelPsf,
    src_wcs,
    dst_wcs,
    dst_bbox,
    kernel: str = "lanczos3",
    *,
    order: int | None = None,
    kernel_size: int | None = None,
    n_phase: int = 4,
) -> PixelPsf:
    """The PSF of a warped image, as a `PixelPsf` over the destination box.

    At each of a grid of destination positions the source PSF (at the matching
    source position) is mapped through the local affine part ``A`` of the pixel
    mapping and resampled with the same Lanczos kernel as the image; the result
    is averaged over ``n_phase``² sub-pixel phases of the source star, which is
    the mean smoothing that interpolation adds to the PSF. The kernel pixels are
    then fit with polynomials of ``order`` (default: the input PSF's order, at
    least 1 if the input varies) over ``dst_bbox``.

    Parameters
    ----------
    psf : `PixelPsf`
        PSF of the source image, in source parent pixel coordinates.
    src_wcs, dst_wcs : `astropy.wcs.WCS`
        WCSs of the source and destination parent pixel frames.
    dst_bbox : `tuple` (x_min, y_min, x_max, y_max)
        Destination region (inclusive parent coordinates), e.g. a patch outer box.
    kernel : `str`
        Warping kernel used for the image (``"lanczos3"``).
    order : `int`, optional
        Spatial polynomial order of the result.
    kernel_size : `int`, optional
        Odd size of the output kernel (default: the input's).
    n_phase : `int`
        Sub-pixel phases per axis averaged over.
    """
    n = _lanczos_order(kernel)
    order = psf.order if order is None else int(order)
    size = psf.kernel_size if kernel_size is None else int(kernel_size)
    if size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {size}")
    x0, y0, x1, y1 = (float(b) for b in dst_bbox)
    n_grid = 1 if order == 0 else order + 2
    if n_grid == 1:
        gx = np.array([0.5 * (x0 + x1)])
        gy = np.array([0.5 * (y0 + y1)])
    else:
        gx = np.linspace(x0, x1, n_grid)
        gy = np.linspace(y0, y1, n_grid)
    positions = [(x, y) for y in gy for x in gx]
    kernels = []
    for x, y in positions:
        s, a = local_affine(src_wcs, dst_wcs, x, y)
        kernels.append(_warped_kernel(psf.compute_kernel_image(s[0], s[1]), a, size, n, n_phase))
    kernels = np.array(kernels)
    bbox = (x0, y0, x1, y1)
    if order == 0:
        return PixelPsf(kernels[0][None], 0, bbox)
    result = PixelPsf(np.zeros(((order + 1) * (order + 2) // 2, size, size)), order, bbox)
    uu, vv = result._normalised(np.array([p[0] for p in positions]), np.array([p[1] for p in positions]))
    design = polynomial_terms(uu, vv, order).T  # (n_pos, n_terms)
    coeffs, *_ = np.linalg.lstsq(design, kernels.reshape(len(positions), -1), rcond=None)
    return PixelPsf(coeffs.reshape(-1, size, size), order, bbox)


def warp_aperture_correction(correction, src_wcs, dst_wcs, dst_bbox, *, n_grid: int = 5):
    """A calexp's aperture correction carried to a warp's pixel frame.

    The correction is a property of the sky position (the PSF model's missing wing
    light there), so it is sampled at a grid of ``n_grid``² destination positions
    mapped to the source frame and refit with the same polynomial order over
    ``dst_bbox`` (x_min, y_min, x_max, y_max; inclusive parent coordinates).

    Parameters
    ----------
    correction : `diapipe.calibrate.ApertureCorrection`
        Correction in the source (calexp) parent pixel frame.
    src_wcs, dst_wcs : `astropy.wcs.WCS`
        WCSs of the calexp and of the warp.

    Returns
    -------
    `diapipe.calibrate.ApertureCorrection`
    """
    from diapipe.calibrate.aperture_correction import ApertureCorrection

    x0, y0, x1, y1 = (float(b) for b in dst_bbox)
    n = 1 if correction.order == 0 else max(int(n_grid), correction.order + 1)
    gx, gy = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    if n == 1:
        gx, gy = np.array([[0.5 * (x0 + x1)]]), np.array([[0.5 * (y0 + y1)]])
    ra, dec = dst_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    u, v = src_wcs.all_world2pix(ra, dec, 0, quiet=True)
    return ApertureCorrection.fit_values(gx, gy, correction.evaluate(u, v), correction.order, (x0, y0, x1, y1),
                                         rms=correction.rms, err=correction.err)
