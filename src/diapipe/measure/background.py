"""Smooth sky-background models from binned, clipped statistics.

The image is cut into ``bin_size`` x ``bin_size`` cells. In each cell the sky
level is estimated from the pixels that are not masked (bad, saturated, no
data, already detected...) with an iteratively sigma-clipped statistic, which
rejects the undetected wings of sources and cosmic rays that a plain mean
would absorb. The grid of cell values is median-filtered (as SExtractor does, but only
where it stands out from its neighbours, to kill cells spoiled by a bright star and then interpolated to full
resolution with a natural cubic spline through the cell centres (or
bilinearly). The model is kept as its grid so that it can be written to disk
(``to_arrays``) and re-evaluated later, as Rubin's ``icExpBackground`` /
``calexpBackground`` datasets are.

Pixel convention: arrays ``[y, x]``, centre of the first pixel at (0, 0).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from diapipe.exposure.masks import bits

__all__ = ["DEFAULT_BACKGROUND_BAD_PLANES", "Background", "estimate_background", "subtract_background"]

#: Mask planes whose pixels never enter the background statistics.
DEFAULT_BACKGROUND_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "DETECTED", "DETECTED_NEGATIVE", "CR", "EDGE")

_STATISTICS = ("meanclip", "median", "mode")

#: Rows per block of `Background.evaluate`'s second matrix product and of the pixel masking.
_EVALUATE_ROWS = 128


class Background:
    """A background model: cell values on a grid, interpolated on demand.

    Parameters
    ----------
    values : `numpy.ndarray`, shape (n_cells_y, n_cells_x)
        Sky level at each cell centre (image units per pixel).
    x_centers, y_centers : `numpy.ndarray`
        Pixel coordinates of the cell centres along x and y (increasing).
    shape : `tuple` of `int`
        Shape ``(ny, nx)`` of the image the model describes.
    rms : `numpy.ndarray`, optional
        Clipped standard deviation of the pixels in each cell (same shape as
        ``values``); a cheap noise map for QA and thresholds.
    interpolation : {"spline", "bilinear"}
        How cell values are interpolated to pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> image = 100.0 + rng.normal(0.0, 5.0, (256, 256))
    >>> bkg = estimate_background(image, bin_size=64)
    >>> abs(float(bkg().mean()) - 100.0) < 0.5
    True
    """

    def __init__(self, values, x_centers, y_centers, shape, rms=None, interpolation: str = "spline"):
        self.values = np.asarray(values, dtype=np.float64)
        self.x_centers = np.asarray(x_centers, dtype=np.float64)
        self.y_centers = np.asarray(y_centers, dtype=np.float64)
        self.shape = (int(shape[0]), int(shape[1]))
        self.rms = None if rms is None else np.asarray(rms, dtype=np.float64)
        if self.values.shape != (self.y_centers.size, self.x_centers.size):
            raise ValueError(
                f"Background values have shape {self.values.shape}; the cell centres imply "
                f"{(self.y_centers.size, self.x_centers.size)}"
            )
        if interpolation not in ("spline", "bilinear"):
            raise ValueError(f"interpolation must be 'spline' or 'bilinear', got {interpolation!r}")
        self.interpolation = interpolation

    def evaluate(self, shape=None, dtype=np.float32) -> np.ndarray:
        """The model at every pixel of an image of ``shape`` (default: the fitted image)."""
        ny, nx = self.shape if shape is None else (int(shape[0]), int(shape[1]))
        # Interpolation is linear in the cell values, so the separable 2-d
        # interpolant is Wy @ values @ Wx.T with Wy, Wx the 1-d interpolation
        # weights of each pixel row/column: two small matrix products.
        wy = _interp1d(
            self.y_centers,
            np.eye(self.y_centers.size),
            np.arange(ny, dtype=float),
            self.interpolation,
            axis=0,
        )  # (ny, ncy)
        wx = _interp1d(
            self.x_centers,
            np.eye(self.x_centers.size),
            np.arange(nx, dtype=float),
            self.interpolation,
            axis=0,
        )  # (nx, ncx)
        rows = wy @ self.values  # (ny, ncx)
        out = np.empty((ny, nx), dtype=dtype)
        wxt = np.ascontiguousarray(wx.T)
        # by blocks of rows: no full-frame float64 temporary (each row's product is the same)
        for y0 in range(0, ny, _EVALUATE_ROWS):
            out[y0 : y0 + _EVALUATE_ROWS] = rows[y0 : y0 + _EVALUATE_ROWS] @ wxt
        return out

    __call__ = evaluate

    def mean(self) -> float:
        """Mean sky level over the cells (a scalar summary for visit summaries)."""
        return float(np.mean(self.values))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays that `from_arrays` turns back into an identical model."""
        out = {
            "values": self.values.copy(),
            "x_centers": self.x_centers.copy(),
            "y_centers": self.y_centers.copy(),
            "shape": np.array(self.shape, dtype=np.int64),
            "interpolation": np.array(self.interpolation),
        }
        if self.rms is not None:
            out["rms"] = self.rms.copy()
        return out

    @classmethod
    def from_arrays(cls, arrays) -> Background:
        """Rebuild a model written by `to_arrays` (e.g. read back from an npz/FITS file)."""
        try:
            return cls(
                arrays["values"],
                arrays["x_centers"],
                arrays["y_centers"],
                tuple(int(s) for s in np.asarray(arrays["shape"])),
                rms=arrays.get("rms"),
                interpolation=str(np.asarray(arrays.get("interpolation", "spline"))),
            )
        except KeyError as err:
            raise KeyError(f"Background arrays lack the entry {err}; got {sorted(arrays)}") from err

    def __add__(self, other: Background) -> Background:
        """Sum of two models on the same grid (a re-estimate after a first subtraction)."""
        if not (
            np.array_equal(self.x_centers, other.x_centers)
            and np.array_equal(self.y_centers, other.y_centers)
            and self.shape == other.shape
        ):
            raise ValueError("Backgrounds can only be added when they share the same cell grid")
        return Background(
            self.values + other.values,
            self.x_centers,
            self.y_centers,
            self.shape,
            rms=other.rms,
            interpolation=self.interpolation,
        )

    def __repr__(self) -> str:
        return (
            f"Background(shape={self.shape}, cells={self.values.shape}, "
            f"mean={self.mean():.4g}, interpolation={self.interpolation!r})"
        )


def _interp1d(knots, values, at, method, axis):
    """Interpolate ``values`` (knots along ``axis``) at positions ``at``; extrapolate at the ends."""
    if knots.size == 1:
        shape = list(values.shape)
        shape[axis] = at.size
        return np.broadcast_to(np.take(values, [0], axis=axis), shape).copy()
    if method == "spline" and knots.size >= 3:
        # Natural end conditions keep the extrapolation over the outer half-cell nearly linear.
        return CubicSpline(knots, values, axis=axis, bc_type="natural", extrapolate=True)(at)
    # Bilinear (or too few knots for a spline): linear, extrapolated with the end slopes.
    idx = np.clip(np.searchsorted(knots, at) - 1, 0, knots.size - 2)
    t = (at - knots[idx]) / (knots[idx + 1] - knots[idx])
    lo = np.take(values, idx, axis=axis)
    hi = np.take(values, idx + 1, axis=axis)
    tshape = [1] * values.ndim
    tshape[axis] = at.size
    t = t.reshape(tshape)
    return lo + t * (hi - lo)


def _count_sorted(ordered: np.ndarray, limits: np.ndarray, side: str) -> np.ndarray:
    """Per row of ``ordered`` (sorted, NaNs last): how many values are ``< limit`` (side "left")
    or ``<= limit`` ("right"), compared in float64; 0 for a NaN limit (as an elementwise count)."""
    out = np.zeros(len(limits), dtype=np.int64)
    for i, limit in enumerate(np.asarray(limits, dtype=np.float64)):
        if not np.isnan(limit):
            out[i] = np.searchsorted(ordered[i].astype(np.float64), limit, side=side)
    return out


def _cell_statistics(cells: np.ndarray, statistic: str, nsigma: float, n_iter: int):
    """Clipped level, rms and pixel count of each row of ``cells`` (NaN = excluded pixel).

    Each row is sorted once; clipping then only moves the window ``[lo, hi)``
    of kept values, so the iterations cost no further sorts.
    """
    ordered = np.sort(cells, axis=1)  # NaNs sort to the end
    rows = np.arange(ordered.shape[0])
    lo = np.zeros(ordered.shape[0], dtype=np.int64)
    hi = np.sum(np.isfinite(ordered), axis=1).astype(np.int64)
    last = max(ordered.shape[1] - 1, 0)

    def quantile(q):
        k = np.maximum(hi - lo, 1)
        return ordered[rows, np.clip(lo + ((k - 1) * q).astype(np.int64), 0, last)].astype(np.float64)

    for _ in range(n_iter):
        center = quantile(0.5)
        # Robust width from the interquartile range (a few bright pixels do not inflate it).
        width = (quantile(0.75) - quantile(0.25)) / 1.349
        # counts of values below / up to the clip limits: binary searches in the sorted rows
        lo = _count_sorted(ordered, center - nsigma * width, "left")
        hi = _count_sorted(ordered, center + nsigma * width, "right")
    # prefix sums only as far as the last kept value (the masked NaNs sort after it)
    cut = int(hi.max()) if hi.size else 0
    filled = np.nan_to_num(ordered[:, :cut].astype(np.float64), nan=0.0)
    csum = np.cumsum(filled, axis=1)
    csum2 = np.cumsum(filled**2, axis=1)

    def prefix(sums, k):
        """Sum of the first ``k`` values of each row (0 for k = 0)."""
        if not cut:
            return np.zeros(k.size)
        return np.where(k > 0, sums[rows, np.maximum(k - 1, 0)], 0.0)

    count = hi - lo
    n = np.maximum(count, 1)
    mean = (prefix(csum, hi) - prefix(csum, lo)) / n
    rms = np.sqrt(np.maximum((prefix(csum2, hi) - prefix(csum2, lo)) / n - mean**2, 0.0))
    median = quantile(0.5)
    if statistic == "meanclip":
        level = mean
    elif statistic == "median":
        level = median
    else:
        # SExtractor's mode estimator, falling back to the median in crowded cells.
        crowded = np.abs(mean - median) > 0.3 * rms
        level = np.where(crowded, median, 2.5 * median - 1.5 * mean)
    return level, rms, count


def estimate_background(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    bin_size: int = 128,
    *,
    bad_planes=DEFAULT_BACKGROUND_BAD_PLANES,
    statistic: str = "meanclip",
    nsigma: float = 3.0,
    n_iter: int = 3,
    min_fraction: float = 0.2,
    filter_size: int = 3,
    filter_threshold: float = 4.0,
    interpolation: str = "spline",
) -> Background:
    """Estimate a smooth background from sigma-clipped statistics in cells.

    Parameters
    ----------
    image : `numpy.ndarray`
        2-d image, ``[y, x]``.
    mask : `numpy.ndarray` of int, optional
        Mask plane array; pixels with any of ``bad_planes`` set are excluded.
    bin_size : `int`
        Cell size in pixels (Rubin's ``binSize``, 128 by default). Cells at
        the right/top edges absorb the remainder, so no cell is smaller than
        half a bin.
    bad_planes : sequence of `str`
        Mask planes to exclude (detections included: the second pass of
        characterizeImage re-estimates the sky without the sources it found).
    statistic : {"meanclip", "median", "mode"}
        Cell statistic after clipping: Rubin's clipped mean, the median, or
        SExtractor's ``2.5 median - 1.5 mean`` mode estimate.
    nsigma, n_iter : `float`, `int`
        Clipping threshold (in IQR-derived sigmas) and number of iterations.
    min_fraction : `float`
        Cells with fewer usable pixels than this fraction are replaced by
        the median of their valid neighbours.
    filter_size, filter_threshold : `int`, `float`
        Cells that differ from the median of their ``filter_size`` x
        ``filter_size`` neighbourhood by more than ``filter_threshold``
        robust sigmas of those differences (a cell spoiled by a bright star
        or a bleed trail) are replaced by that median. Unlike SExtractor's
        unconditional median filter, this leaves smooth gradients and the
        grid corners unbiased. ``filter_size=1`` disables it.
    interpolation : {"spline", "bilinear"}

    Returns
    -------
    background : `Background`

    Raises
    ------
    ValueError
        If the image is not 2-d, the mask shape differs, or no cell has
        enough usable pixels.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-d, got shape {image.shape}")
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    ny, nx = image.shape
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    bad_bits = bits(bad_planes) if mask is not None and bad_planes else 0
    bin_size = int(max(1, min(bin_size, ny, nx)))
    ncx = max(1, round(nx / bin_size))
    ncy = max(1, round(ny / bin_size))
    x_edges = np.linspace(0, nx, ncx + 1).round().astype(int)
    y_edges = np.linspace(0, ny, ncy + 1).round().astype(int)
    values = np.full((ncy, ncx), np.nan)
    rms = np.full((ncy, ncx), np.nan)
    # unusable pixels -> NaN, by blocks of rows (no full-frame temporaries)
    data = np.empty(image.shape, dtype=np.float32)
    for y0 in range(0, ny, _EVALUATE_ROWS):
        block = image[y0 : y0 + _EVALUATE_ROWS]
        usable = np.isfinite(block)
        if bad_bits:
            usable &= (mask[y0 : y0 + _EVALUATE_ROWS] & bad_bits) == 0
        data[y0 : y0 + _EVALUATE_ROWS] = np.where(usable, block, np.nan)
    # One row of cells at a time keeps memory at ~1 row of the image while
    # letting numpy vectorise over the cells of the row.
    for j in range(ncy):
        band = data[y_edges[j] : y_edges[j + 1]]
        widths = np.diff(x_edges)
        wmax = widths.max()
        cells = np.full((ncx, band.shape[0] * wmax), np.nan, dtype=np.float32)
        for i in range(ncx):
            chunk = band[:, x_edges[i] : x_edges[i + 1]].ravel()
            cells[i, : chunk.size] = chunk
        npix = band.shape[0] * widths
        level, sigma, count = _cell_statistics(cells, statistic, nsigma, n_iter)
        good = count >= min_fraction * npix
        values[j, good] = level[good]
        rms[j, good] = sigma[good]
    values = _fill_missing(values)
    rms = _fill_missing(rms)
    if filter_size > 1 and min(values.shape) >= filter_size:
        values = _replace_outlier_cells(values, filter_size, filter_threshold)
    x_centers = 0.5 * (x_edges[:-1] + x_edges[1:]) - 0.5
    y_centers = 0.5 * (y_edges[:-1] + y_edges[1:]) - 0.5
    return Background(values, x_centers, y_centers, (ny, nx), rms=rms, interpolation=interpolation)


def _replace_outlier_cells(values: np.ndarray, size: int, threshold: float) -> np.ndarray:
    filtered = ndimage.median_filter(values, size=size, mode="nearest")
    dev = values - filtered
    scale = 1.4826 * np.median(np.abs(dev - np.median(dev)))
    if not scale > 0:
        return values
    return np.where(np.abs(dev) > threshold * scale, filtered, values)


def _fill_missing(grid: np.ndarray) -> np.ndarray:
    """Replace NaN cells by the median of valid neighbours, growing outwards."""
    grid = grid.copy()
    if np.all(np.isnan(grid)):
        raise ValueError("No background cell has enough unmasked pixels; check the mask or bin_size")
    while np.isnan(grid).any():
        missing = np.argwhere(np.isnan(grid))
        filled = grid.copy()
        for j, i in missing:
            patch = grid[max(j - 1, 0) : j + 2, max(i - 1, 0) : i + 2]
            if np.isfinite(patch).any():
                filled[j, i] = np.nanmedian(patch)
        grid = filled
    return grid


def subtract_background(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    bin_size: int = 128,
    *,
    in_place: bool = False,
    **kwargs,
) -> tuple[np.ndarray, Background]:
    """Estimate the background (see `estimate_background`) and subtract it.

    Returns ``(image - model, model)``; with ``in_place=True`` the input
    array is modified and returned.
    """
    background = estimate_background(image, mask, bin_size, **kwargs)
    model = background.evaluate(image.shape, dtype=image.dtype if image.dtype.kind == "f" else np.float32)
    if in_place:
        image -= model
        return image, background
    return image - model, background
