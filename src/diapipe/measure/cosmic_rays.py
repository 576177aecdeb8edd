"""Cosmic-ray detection and repair on single exposures.

Rubin's criterion (meas_algorithms' findCosmicRays), re-derived: light that
came through the telescope is blurred by the PSF, so a pixel can only exceed
the mean of its two opposite neighbours by as much as the PSF's own centre
exceeds its neighbours. For a PSF kernel ``P`` centred on a pixel, and each of
the four directions (horizontal, vertical, two diagonals), the sharpest
allowed ratio is

.. math::

    r_d = \\frac{P(+d) + P(-d)}{2 P(0)}

A pixel is a cosmic-ray candidate when it is significant (``> min_sigma``
sigma above the background) and, in at least one direction, even after
giving both itself and its neighbours ``noise_sigma`` sigma of slack

.. math::

    \\frac{n_+ + n_-}{2} + k\\,\\sigma_n < \\frac{r_d}{c} \\, (I_c - k\\,\\sigma_c),

with ``c = contrast_factor`` (Rubin's cond3_fac, 2.5) a safety margin for
PSF misestimates. Point sources never satisfy this (their neighbours are at
least ``r_d`` of their peak), however bright, while cosmic rays — sharp
single- or few-pixel tracks — do. The process repeats on the image with
the found pixels interpolated (so the shoulders of a track, hidden by its
brightest pixel, are found in the next pass); finally the CRs are grown by one
pixel into neighbours that are also significant.

Repair replaces flagged pixels by a Gaussian-weighted mean of the good
pixels around them (normalised convolution), sets CR and INTRP.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diapipe.exposure.masks import any_set, bits, set_plane

__all__ = ["find_cosmic_rays", "psf_neighbour_ratios", "repair_cosmic_rays"]

_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx): horizontal, vertical, two diagonals
_BLOCK_ROWS = 128


def psf_neighbour_ratios(psf_sigma_pix: float | None = None, kernel: np.ndarray | None = None) -> np.ndarray:
    """Ratios ``(P(+d) + P(-d)) / (2 P(0))`` for the four directions, for a centred PSF.

    From a PSF kernel image (odd size, centred) when given, otherwise for a
    pixel-integrated circular Gaussian of ``psf_sigma_pix``.
    """
    if kernel is None:
        if psf_sigma_pix is None or not psf_sigma_pix > 0:
            raise ValueError(f"need a positive psf_sigma_pix or a kernel, got {psf_sigma_pix!r}")
        half = 3
        # Integrate the Gaussian over each pixel (a sampled value overstates the peak).
        fine = 11
        sub = (np.arange(fine) + 0.5) / fine - 0.5
        offs = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
        g = np.exp(-0.5 * (offs / psf_sigma_pix) ** 2).reshape(2 * half + 1, fine).sum(axis=1)
        kernel = np.outer(g, g)
    kernel = np.asarray(kernel, float)
    c = kernel.shape[0] // 2
    peak = kernel[c, c]
    return np.array(
        [(kernel[c + dy, c + dx] + kernel[c - dy, c - dx]) / (2 * peak) for dy, dx in _DIRECTIONS]
    )


def _sharp(image, sigma, py, px, ratios, noise_sigma, contrast_factor):
    """For pixels (py, px) (not on the image border): True where sharper than the PSF allows."""
    centre = image[py, px] - noise_sigma * sigma[py, px]
    hit = np.zeros(py.size, bool)
    for (dy, dx), ratio in zip(_DIRECTIONS, ratios):
        a = image[py + dy, px + dx]
        b = image[py - dy, px - dx]
        s_n = 0.5 * np.sqrt(sigma[py + dy, px + dx] ** 2 + sigma[py - dy, px - dx] ** 2)
        hit |= 0.5 * (a + b) + noise_sigma * s_n < (ratio / contrast_factor) * centre
    return hit


def find_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf_sigma_pix: float | None = None,
    *,
    psf_kernel: np.ndarray | None = None,
    min_sigma: float = 6.0,
    min_value: float = 0.0,
    noise_sigma: float = 0.6,
    contrast_factor: float = 2.5,
    grow_sigma: float = 3.0,
    n_iter: int = 3,
    ignore_planes=("SAT", "NO_DATA", "BAD"),
    max_fraction: float = 0.05,
) -> np.ndarray:
    """Find cosmic-ray pixels: pixels sharper than the PSF allows.

    Parameters
    ----------
    image : `numpy.ndarray`
        Background-subtracted image (the test compares pixel values with
        their neighbours, so a sky level would dilute the contrast).
    variance : `numpy.ndarray`
        Per-pixel variance (same units²).
    mask : `numpy.ndarray` of int32 or `None`
        Pixels with ``ignore_planes`` are never flagged nor used to grow
        (saturated stars and bleed trails have sharp edges of their own).
    psf_sigma_pix : `float`, optional
        Gaussian sigma of the PSF; or give ``psf_kernel``, an odd-sized
        centred PSF image (better for non-Gaussian PSFs).
    min_sigma : `float`
        Significance a CR pixel must have above the background (Rubin: 6).
    min_value : `float`
        Minimum pixel value (image units; Rubin's min_DN).
    noise_sigma : `float`
        Slack, in sigma, given to the centre and to its neighbours
        (Rubin's cond3_fac2, 0.6).
    contrast_factor : `float`
        Safety factor dividing the PSF ratio (Rubin's cond3_fac, 2.5);
        larger is more conservative.
    grow_sigma : `float` or `None`
        After the passes, neighbours of CR pixels above this significance
        join the CR (None: no growing).
    n_iter : `int`
        Passes of find-interpolate-find.
    max_fraction : `float`
        If more than this fraction of the image is flagged, raise: the PSF
        width is almost certainly wrong (too wide) for this image.

    Returns
    -------
    cr_mask : `numpy.ndarray` of bool

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> image = rng.normal(0.0, 1.0, (32, 32))
    >>> image[10, 12] += 200.0
    >>> crs = find_cosmic_rays(image, np.ones_like(image), None, psf_sigma_pix=1.5)
    >>> [tuple(map(int, p)) for p in np.argwhere(crs)]
    [(10, 12)]
    """
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    if image.shape != variance.shape or (mask is not None and mask.shape != image.shape):
        raise ValueError("image, variance and mask must have the same shape")
    ratios = psf_neighbour_ratios(psf_sigma_pix, psf_kernel)
    ny, nx = image.shape
    bad_bits = bits(ignore_planes) if mask is not None and ignore_planes else 0
    sigma = np.empty(image.shape, np.float32)
    usable = np.empty(image.shape, bool)
    work = np.empty(image.shape, np.float32)
    # Only significant pixels can be cosmic rays: test them sparsely (a few % of a detector).
    significant = np.empty(image.shape, bool)
    for y0 in range(0, ny, _BLOCK_ROWS):  # by blocks of rows: no full-frame temporaries
        rows = slice(y0, y0 + _BLOCK_ROWS)
        block, block_sigma = image[rows], np.sqrt(np.maximum(variance[rows], np.float32(0.0)))
        ok = np.isfinite(block) & np.isfinite(block_sigma)
        if bad_bits:
            ok &= (mask[rows] & bad_bits) == 0
        block_work = np.where(ok, block, np.float32(0.0))
        sigma[rows], usable[rows], work[rows] = block_sigma, ok, block_work
        significant[rows] = ok & (block_work > min_sigma * block_sigma) & (block_work > min_value)
    significant[[0, -1], :] = False
    significant[:, [0, -1]] = False
    py, px = np.nonzero(significant)
    cr = np.zeros(image.shape, bool)
    n_cr = 0
    for _ in range(n_iter):
        if py.size == 0:
            break
        hit = _sharp(work, sigma, py, px, ratios, noise_sigma, contrast_factor)
        if not hit.any():
            break
        hy, hx = py[hit], px[hit]
        cr[hy, hx] = True
        n_cr += hy.size  # candidates are never already CRs, so these are new pixels
        if n_cr > max_fraction * cr.size:
            raise ValueError(
                f"find_cosmic_rays flagged {n_cr / cr.size:.1%} of the pixels (limit {max_fraction:.0%}): "
                f"psf_sigma_pix={psf_sigma_pix} is probably too large for this image"
            )
        # the new CR pixels are not good (cr is set): interpolating in place is safe
        _interpolate_sparse(work, work, ~cr & usable, hy, hx)
        # Next pass: only the significant neighbours of what was just found can change.
        ny_, nx_ = _neighbours(hy, hx, (ny, nx), _EIGHT)
        near = significant[ny_, nx_] & ~cr[ny_, nx_]
        py, px = ny_[near], nx_[near]
    if grow_sigma is not None and n_cr:
        # Grow once, at the end, into significant neighbours (the faint wings of a track).
        # Growing inside the loop would let a CR next to a star eat into it: each
        # interpolated star pixel makes its neighbour look sharp in the next pass.
        cy, cx = np.nonzero(cr)
        gy, gx = _neighbours(cy, cx, (ny, nx), _EIGHT)
        grow = usable[gy, gx] & (image[gy, gx] > grow_sigma * sigma[gy, gx])
        cr[gy[grow], gx[grow]] = True
    return cr


#: (dy, dx) offsets of a 3x3 neighbourhood (8-connected dilation) and of a cross (4-connected).
_EIGHT = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_CROSS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def _neighbours(py: np.ndarray, px: np.ndarray, shape, offsets):
    """Pixels within ``offsets`` of any of (py, px), inside the image: unique, in raster order
    (the pixels a binary dilation of the points would set, as `numpy.nonzero` lists them)."""
    ny, nx = shape
    yy = (py[None, :] + np.array([o[0] for o in offsets])[:, None]).ravel()
    xx = (px[None, :] + np.array([o[1] for o in offsets])[:, None]).ravel()
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    flat = np.unique(yy[inside].astype(np.int64) * nx + xx[inside])
    return flat // nx, flat % nx


def _regions(py: np.ndarray, px: np.ndarray, shape) -> list[tuple[slice, slice]]:
    """Bounding boxes of the 4-connected regions of the points (py, px) dilated by a cross,
    in the order of `scipy.ndimage.label` + `find_objects` on that dilated image (raster order
    of each region's first pixel), computed from the points alone."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ny, nx = shape
    ry, rx = _neighbours(py, px, shape, _CROSS)
    flat = ry * nx + rx  # sorted
    n = flat.size
    edges_a, edges_b = [], []
    for step, ok in ((1, rx < nx - 1), (nx, ry < ny - 1)):  # right and lower neighbours
        target = flat + step
        pos = np.searchsorted(flat, target)
        found = ok & (pos < n)
        found[found] = flat[pos[found]] == target[found]
        edges_a.append(np.flatnonzero(found))
        edges_b.append(pos[found])
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # order regions by their first pixel in raster order (flat is sorted: first occurrence)
    _, first = np.unique(comp, return_index=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    comp = rank[comp]
    y0 = np.full(order.size, ny); y1 = np.full(order.size, -1)
    x0 = np.full(order.size, nx); x1 = np.full(order.size, -1)
    np.minimum.at(y0, comp, ry); np.maximum.at(y1, comp, ry)
    np.minimum.at(x0, comp, rx); np.maximum.at(x1, comp, rx)
    return [(slice(int(a0), int(a1) + 1), slice(int(b0), int(b1) + 1)) for a0, a1, b0, b1 in zip(y0, y1, x0, x1)]


def _interpolate(
    image: np.ndarray, good: np.ndarray, where: np.ndarray, sigma_pix: float = 1.5
) -> np.ndarray:
    """Replace ``where`` pixels by the Gaussian-weighted mean of ``good`` pixels around them.

    Works on the bounding boxes of the regions to repair, so the cost scales
    with the number of cosmic rays rather than the image size.
    """
    out = image.copy()
    wy, wx = np.nonzero(where)
    _interpolate_sparse(out, image, good, wy, wx, sigma_pix)
    return out


def _interpolate_sparse(out, image, good, wy, wx, sigma_pix: float = 1.5) -> None:
    """`_interpolate` of the pixels (wy, wx) (raster order), written into ``out``.

    ``out`` may be ``image`` itself when no pixel to repair is ``good`` (their values
    never enter the weighted means).
    """
    if wy.size == 0:
        return
    ny, nx = image.shape
    pad = int(np.ceil(4 * sigma_pix)) + 1
    flat_w = wy.astype(np.int64) * nx + wx
    for slc in _regions(wy, wx, (ny, nx)):
        y0, y1 = max(slc[0].start - pad, 0), min(slc[0].stop + pad, ny)
        x0, x1 = max(slc[1].start - pad, 0), min(slc[1].stop + pad, nx)
        box = (slice(y0, y1), slice(x0, x1))
        g = good[box].astype(np.float32)
        num = ndimage.gaussian_filter(
            np.where(good[box], image[box], 0.0).astype(np.float32), sigma_pix, mode="constant"
        )
        den = ndimage.gaussian_filter(g, sigma_pix, mode="constant")
        # every pixel to repair inside the box (also those of neighbouring regions), as a mask
        lo, hi = np.searchsorted(flat_w, [y0 * nx, (y1 - 1) * nx + nx])
        sel = (wx[lo:hi] >= x0) & (wx[lo:hi] < x1)
        fy, fx = wy[lo:hi][sel] - y0, wx[lo:hi][sel] - x0
        sub = out[box]
        with np.errstate(invalid="ignore", divide="ignore"):
            sub[fy, fx] = np.where(den[fy, fx] > 1e-3, num[fy, fx] / den[fy, fx], 0.0)


def repair_cosmic_rays(
    image: np.ndarray,
    mask: np.ndarray | None,
    cr_mask: np.ndarray,
    *,
    sigma_pix: float = 1.5,
    bad_planes=("BAD", "SAT", "NO_DATA"),
) -> int:
    """Interpolate over cosmic-ray pixels in place; set CR and INTRP in ``mask``.

    Each flagged pixel becomes the Gaussian-weighted (``sigma_pix``) mean of
    the surrounding pixels that are neither CRs nor ``bad_planes``.

    Returns the number of repaired pixels.
    """
    cr_mask = np.asarray(cr_mask, bool)
    if cr_mask.shape != image.shape:
        raise ValueError(f"cr_mask shape {cr_mask.shape} differs from image shape {image.shape}")
    if not cr_mask.any():
        return 0
    good = ~cr_mask & np.isfinite(image)
    if mask is not None and bad_planes:
        good &= ~any_set(mask, bad_planes)
    wy, wx = np.nonzero(cr_mask)
    _interpolate_sparse(image, image, good, wy, wx, sigma_pix)
    if mask is not None:
        set_plane(mask, cr_mask, "CR")
        set_plane(mask, cr_mask, "INTRP")
    return int(cr_mask.sum())
