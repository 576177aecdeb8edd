"""Source detection: matched filter, threshold, footprints, peaks.

The image is correlated with a Gaussian of the PSF's width — for a point
source in white noise this is (close to) the matched filter, so the smoothed
value divided by its own noise is the point-source detection S/N. Pixels above
``threshold`` in those units are grouped into connected footprints
(`scipy.ndimage.label`), footprints smaller than ``min_pixels`` are dropped,
the rest are grown by ``grow_pix`` (a disk) so that they hold the sources'
wings, and the local maxima of the smoothed image inside each footprint are
its peaks. Positive and negative detections (difference images) are found
separately and set the DETECTED / DETECTED_NEGATIVE mask planes.

Why our own rather than ``sep.extract`` (measured in tests/measure/test_detection.py on the
same 1024² image, 5 sigma): ours 98.8% complete at S/N >= 6 vs sep's 84% (sep's matched
filter thresholds differently), no spurious peaks for either, 0.14 s vs 0.25 s CPU — and
sep has no negative polarity, no per-pixel smoothed-variance threshold and no mask planes.

Pixel convention: arrays ``[y, x]``, centre of the first pixel at (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table, vstack
from scipy import ndimage

from diapipe.exposure.masks import bits, set_plane

__all__ = ["Footprints", "detect_sources", "dilate_rows", "gaussian_kernel_1d", "good_pixels", "smoothed_significance"]

_THRESHOLD_TYPES = ("pixel_stdev", "stdev", "variance")
_POLARITIES = ("positive", "negative", "both")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Footprints:
    """Result of `detect_sources`.

    Attributes
    ----------
    labels : `numpy.ndarray` of int32
        Positive footprints: 0 outside, footprint id ``1..n_pos`` inside.
    labels_negative : `numpy.ndarray` of int32 or `None`
        Negative footprints, ids ``n_pos+1..`` (ids are unique over both).
        `None` when polarity is "positive".
    peaks : `astropy.table.Table`
        One row per peak: ``id`` (unique), ``footprint`` (footprint id),
        ``x``, ``y`` (int pixel of the peak), ``significance`` (smoothed S/N
        at the peak, positive for both polarities), ``is_negative``,
        ``footprint_area`` (pixels, after growing), ``n_peaks`` (peaks in the
        footprint), ``rank`` (0 for the brightest peak of a footprint).
        Sorted by footprint, then by decreasing significance.
    threshold : `float`
        The threshold used, in units of the smoothed noise.
    """

    labels: np.ndarray
    labels_negative: np.ndarray | None
    peaks: Table
    threshold: float

    def __len__(self) -> int:
        return len(self.peaks)

    @property
    def n_footprints(self) -> int:
        return len(np.unique(np.asarray(self.peaks["footprint"]))) if len(self.peaks) else 0

    def footprint_labels(self) -> np.ndarray:
        """One label image with both polarities (negative ids overwrite overlaps)."""
        if self.labels_negative is None:
            return self.labels
        return np.where(self.labels_negative > 0, self.labels_negative, self.labels)


def gaussian_kernel_1d(sigma_pix: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-d Gaussian sampled at integer offsets, half-width ``truncate*sigma``."""
    if not np.isfinite(sigma_pix) or sigma_pix <= 0:
        raise ValueError(f"smoothing sigma must be a positive number of pixels, got {sigma_pix!r}")
    half = max(1, int(np.ceil(truncate * sigma_pix)))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_pix) ** 2)
    return kernel / kernel.sum()


def smoothed_significance(
    image: np.ndarray,
    variance: np.ndarray,
    sigma_pix: float,
    threshold_type: str = "pixel_stdev",
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The image correlated with a Gaussian of ``sigma_pix``, in units of its noise.

    .. math::

        S = I \\star G, \\qquad \\mathrm{Var}(S) = V \\star G^2, \\qquad
        \\nu = S / \\sqrt{\\mathrm{Var}(S)}

    for uncorrelated pixel noise with variance ``V`` (``pixel_stdev``). With
    ``variance`` the denominator is the median of ``Var(S)`` (one number for
    the image); with ``stdev`` it is the clipped standard deviation of ``S``
    itself, which also accounts for correlated noise (warps, coadds).

    Returns a float32 array; pixels not ``valid`` are 0.
    """
    if threshold_type not in _THRESHOLD_TYPES:
        raise ValueError(f"threshold_type must be one of {_THRESHOLD_TYPES}, got {threshold_type!r}")
    g = gaussian_kernel_1d(sigma_pix)
    data = np.asarray(image)
    var = np.asarray(variance)
    if threshold_type == "pixel_stdev":
        # Row blocks: both smoothings and the ratio per block, so the working set stays in
        # cache and no full-frame float temporaries are made (same arithmetic, same bits).
        sig = np.empty(data.shape, np.float32)
        g2 = g**2
        for rows, inner in _row_blocks(data.shape[0], g.size // 2):
            block_valid = None if valid is None else valid[rows]
            smooth = _smooth_block(data[rows], block_valid, g)[inner]
            svar = _smooth_block(var[rows], block_valid, g2)[inner]
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(svar > 0, smooth / np.sqrt(svar), np.float32(0.0))
            if valid is not None:
                out = np.where(valid[rows][inner], out, np.float32(0.0))
            sig[rows][inner] = out
        return sig
    var = var.astype(np.float32, copy=False)
    smooth = np.empty(data.shape, np.float32)
    for rows, inner in _row_blocks(data.shape[0], g.size // 2):
        smooth[rows][inner] = _smooth_block(data[rows], None if valid is None else valid[rows], g)[inner]
    if threshold_type == "variance":
        good = var[np.isfinite(var) & (var > 0)] if valid is None else var[valid & (var > 0)]
        if good.size == 0:
            raise ValueError("variance plane has no positive finite pixel; cannot set a threshold")
        sig = smooth / np.sqrt(np.median(good) * np.sum(g**2) ** 2)
    else:
        sample = smooth[valid] if valid is not None else smooth.ravel()
        sample = sample[:: max(1, sample.size // 1_000_000)]
        med = np.median(sample)
        q25, q75 = np.percentile(sample, [25.0, 75.0])
        width = (q75 - q25) / 1.349
        clipped = sample[np.abs(sample - med) < 3 * width]
        sig = (smooth - med) / np.std(clipped)
    if valid is not None:
        sig = np.where(valid, sig, np.float32(0.0))
    return sig.astype(np.float32, copy=False)


def good_pixels(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, bad_bits: int) -> np.ndarray:
    """``isfinite(image) & isfinite(variance) & (mask & bad_bits == 0)``, by blocks of rows
    (no full-frame temporaries; ``mask`` None or ``bad_bits`` 0: no mask condition)."""
    out = np.empty(image.shape, bool)
    for y0 in range(0, image.shape[0], _BLOCK_ROWS):
        rows = slice(y0, y0 + _BLOCK_ROWS)
        block = np.isfinite(image[rows])
        block &= np.isfinite(variance[rows])
        if mask is not None and bad_bits:
            block &= (mask[rows] & bad_bits) == 0
        out[rows] = block
    return out


#: Output rows per block of the blocked smoothing (the input block adds the kernel's half-width
#: on each side); ~128 rows of a 4k-wide detector keep a block's planes in the L2 cache.
_BLOCK_ROWS = 128


def _row_blocks(ny: int, halo: int, block_rows: int = _BLOCK_ROWS):
    """``(rows, inner)`` slices: input rows of each block (with ``halo`` rows of context on each
    side, clipped to the image) and the block's own output rows relative to ``rows``."""
    for y0 in range(0, ny, block_rows):
        y1 = min(ny, y0 + block_rows)
        a, b = max(0, y0 - halo), min(ny, y1 + halo)
        yield slice(a, b), slice(y0 - a, y1 - a)


def _smooth_block(block: np.ndarray, valid: np.ndarray | None, g: np.ndarray) -> np.ndarray:
    """Separable correlation (float32, zero outside the image) of a block of whole rows.

    Rows of the result within ``len(g) // 2`` of a block edge that is not an image edge
    lack context and must be discarded (see `_row_blocks`).
    """
    block = block.astype(np.float32, copy=False)
    if valid is not None:
        block = np.where(valid, block, np.float32(0.0))
    return ndimage.correlate1d(ndimage.correlate1d(block, g, axis=0, mode="constant"), g, axis=1, mode="constant")


def _grow(binary: np.ndarray, radius: int) -> np.ndarray:
    """Dilate ``binary`` by a disk of ``radius`` pixels.

    The disk is a union of centred rows of half-width ``w(dy)``, so the
    dilation is a max over ``dy`` of shifted 1-d maximum filters — far
    cheaper than a 2-d structuring element on a full detector.
    """
    return dilate_rows(binary, {dy: int(np.floor(np.sqrt(radius**2 + 0.5 - dy**2))) for dy in range(-radius, radius + 1)})


def dilate_rows(binary: np.ndarray, half_widths: dict[int, int]) -> np.ndarray:
    """Binary dilation by a structuring element made of centred rows, ``{dy: half_width}``.

    Pixels outside the image count as unset (as `scipy.ndimage.binary_dilation`). Each
    distinct half-width costs one 1-d maximum filter along x; each row one shifted maximum.
    Any element symmetric in x whose rows are centred intervals (disks, octagons, squares)
    can be written this way.
    """
    src = binary.view(np.uint8) if binary.dtype == bool else binary.astype(bool).view(np.uint8)
    out = np.zeros_like(src)
    needed = {half for half in half_widths.values() if half >= 0}
    rows = {}
    # half-width w from w - 1: two shifted maxima (cheaper than a 1-d maximum filter per width)
    current = src
    for half in range(max(needed, default=-1) + 1):
        if half:
            current = current.copy()
            np.maximum(current[:, half:], src[:, :-half], out=current[:, half:])
            np.maximum(current[:, :-half], src[:, half:], out=current[:, :-half])
        if half in needed:
            rows[half] = current
    for dy, half in half_widths.items():
        if half < 0:
            continue
        row = rows[half]
        # output row y takes input row y - dy (the element's row dy reaches it)
        if dy > 0:
            np.maximum(out[dy:], row[:-dy], out=out[dy:])
        elif dy < 0:
            np.maximum(out[:dy], row[-dy:], out=out[:dy])
        else:
            np.maximum(out, row, out=out)
    return out.view(bool)


def _local_maxima(sig: np.ndarray, py: np.ndarray, px: np.ndarray, radius: int) -> np.ndarray:
    """True for candidates (py, px) that are the maximum of ``sig`` in a box of half-size ``radius``.

    Only the candidate pixels are tested, by gathering each neighbour offset.
    """
    ny, nx = sig.shape
    values = sig[py, px]
    near = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    far = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
           if max(abs(dy), abs(dx)) > 1]
    # The 8 nearest neighbours first: they reject almost every candidate, so the outer
    # offsets are gathered for the survivors only (an AND of the same comparisons).
    keep = np.arange(py.size)
    for group in (near, far):
        ky, kx, kv = py[keep], px[keep], values[keep]
        ok = np.ones(keep.size, bool)
        for dy, dx in group:
            neighbour = sig[np.clip(ky + dy, 0, ny - 1), np.clip(kx + dx, 0, nx - 1)]
            # Ties: the first pixel in raster order wins, so plateaus give one peak.
            later = (dy > 0) | ((dy == 0) & (dx > 0))
            ok &= (kv > neighbour) if not later else (kv >= neighbour)
        keep = keep[ok]
    is_max = np.zeros(py.size, bool)
    is_max[keep] = True
    return is_max


def _one_polarity(sig, threshold, min_pixels, grow_pix, peak_radius, first_id):
    """Footprints and peaks of ``sig > threshold``; ids start at ``first_id``."""
    above = sig > threshold
    if min_pixels <= 1:
        # every connected region is large enough: no need to label them
        ay, ax = np.nonzero(above)
        seed = above
    else:
        labels, n = ndimage.label(above, structure=_EIGHT_CONNECTED)
        ay, ax = np.nonzero(labels)
        alab = labels[ay, ax]
        del labels
        big = np.bincount(alab, minlength=n + 1) >= min_pixels
        keep_pix = big[alab]
        ay, ax = ay[keep_pix], ax[keep_pix]
        seed = np.zeros(sig.shape, bool)
        seed[ay, ax] = True
    if ay.size == 0:
        return np.zeros(sig.shape, np.int32), _empty_peaks()
    if grow_pix > 0:
        seed = _grow(seed, int(grow_pix))
    labels, n = ndimage.label(seed, structure=_EIGHT_CONNECTED)
    labels = labels.astype(np.int32, copy=False)
    # Peaks: above-threshold pixels that are local maxima of the significance.
    is_peak = _local_maxima(sig, ay, ax, int(peak_radius))
    py, px = ay[is_peak], ax[is_peak]
    values = sig[py, px]
    fp = labels[py, px]
    order = np.lexsort((-values, fp))
    py, px, values, fp = py[order], px[order], values[order], fp[order]
    counts = np.bincount(fp, minlength=n + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(fp)) - starts[fp]
    # Renumber footprints that hold peaks to consecutive ids from first_id; drop the others.
    has_peak = counts > 0
    has_peak[0] = False
    new_id = np.zeros(n + 1, np.int32)
    new_id[has_peak] = np.arange(first_id, first_id + has_peak.sum(), dtype=np.int32)
    # footprint areas: count the labels of the footprint pixels only (int32 -> no full-frame cast)
    areas = np.bincount(labels.reshape(-1)[np.flatnonzero(seed)], minlength=n + 1)
    out = new_id[labels]
    peaks = Table(
        {
            "footprint": new_id[fp].astype(np.int64),
            "x": px.astype(np.int64),
            "y": py.astype(np.int64),
            "significance": np.abs(values).astype(np.float64),
            "footprint_area": areas[fp].astype(np.int64),
            "n_peaks": counts[fp].astype(np.int64),
            "rank": rank.astype(np.int64),
        }
    )
    return out, peaks


def _empty_peaks() -> Table:
    return Table(
        {name: np.zeros(0, np.int64) for name in ("footprint", "x", "y")}
        | {"significance": np.zeros(0)}
        | {name: np.zeros(0, np.int64) for name in ("footprint_area", "n_peaks", "rank")}
    )


def detect_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf_sigma_pix: float,
    threshold: float = 5.0,
    *,
    polarity: str = "positive",
    threshold_type: str = "pixel_stdev",
    grow_pix: int = 2,
    min_pixels: int = 1,
    deblend: bool = True,
    peak_radius_pix: float | None = None,
    ignore_planes=("NO_DATA",),
    set_mask: bool = True,
    clear_mask: bool = True,
) -> Footprints:
    """Detect sources above ``threshold`` times the matched-filter noise.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Background-subtracted image and its variance (same units², ``[y, x]``).
    mask : `numpy.ndarray` of int32 or `None`
        Mask planes; modified in place when ``set_mask`` (DETECTED,
        DETECTED_NEGATIVE). Pixels with ``ignore_planes`` are zeroed before
        smoothing and cannot be detected.
    psf_sigma_pix : `float`
        Gaussian sigma of the smoothing kernel — the PSF's sigma for a matched
        filter (Rubin smooths with a Gaussian of the PSF's width too).
    threshold : `float`
        Detection threshold in units of the smoothed noise (Rubin: 5.0).
    polarity : {"positive", "negative", "both"}
    threshold_type : {"pixel_stdev", "stdev", "variance"}
        See `smoothed_significance`.
    grow_pix : `int`
        Radius (pixels) by which footprints are grown (Rubin: 2). Footprints
        that touch after growing are merged.
    min_pixels : `int`
        Minimum number of above-threshold pixels for a footprint (before growing).
    deblend : `bool`
        If True every significant peak is kept (children to be measured
        separately); otherwise only the brightest peak of each footprint.
    peak_radius_pix : `float`, optional
        Half-size of the box in which a peak must be the maximum
        (default: ``max(1, round(psf_sigma_pix))``).
    set_mask, clear_mask : `bool`
        Set the detection planes in ``mask`` (after clearing them).

    Returns
    -------
    footprints : `Footprints`

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    >>> image[30:33, 30:33] += 40.0
    >>> fp = detect_sources(image, np.ones_like(image), None, psf_sigma_pix=1.5)
    >>> len(fp), int(fp.peaks["x"][0]), int(fp.peaks["y"][0])
    (1, 31, 31)
    """
    if polarity not in _POLARITIES:
        raise ValueError(f"polarity must be one of {_POLARITIES}, got {polarity!r}")
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.shape != variance.shape or (mask is not None and mask.shape != image.shape):
        raise ValueError(
            f"image {image.shape}, variance {variance.shape} and mask "
            f"{None if mask is None else mask.shape} must have the same shape"
        )
    valid = good_pixels(image, variance, mask if ignore_planes else None, bits(ignore_planes) if ignore_planes else 0)
    sig = smoothed_significance(image, variance, psf_sigma_pix, threshold_type, valid=valid)
    peak_radius = max(1, round(psf_sigma_pix)) if peak_radius_pix is None else int(peak_radius_pix)
    labels = np.zeros(image.shape, np.int32)
    labels_neg = None
    tables = []
    next_id = 1
    if polarity in ("positive", "both"):
        labels, peaks = _one_polarity(sig, threshold, min_pixels, grow_pix, peak_radius, next_id)
        peaks["is_negative"] = np.zeros(len(peaks), bool)
        tables.append(peaks)
        next_id = int(labels.max()) + 1 if len(peaks) else next_id
    if polarity in ("negative", "both"):
        labels_neg, peaks = _one_polarity(-sig, threshold, min_pixels, grow_pix, peak_radius, next_id)
        peaks["is_negative"] = np.ones(len(peaks), bool)
        tables.append(peaks)
    peaks = vstack(tables) if len(tables) > 1 else tables[0]
    if not deblend and len(peaks):
        peaks = peaks[peaks["rank"] == 0]
        peaks["n_peaks"] = 1
    peaks.add_column(np.arange(1, len(peaks) + 1, dtype=np.int64), name="id", index=0)
    if mask is not None and set_mask:
        if clear_mask:
            mask &= np.int32(~bits(("DETECTED", "DETECTED_NEGATIVE")))
        set_plane(mask, labels > 0, "DETECTED")
        if labels_neg is not None:
            set_plane(mask, labels_neg > 0, "DETECTED_NEGATIVE")
    return Footprints(labels=labels, labels_negative=labels_neg, peaks=peaks, threshold=float(threshold))
