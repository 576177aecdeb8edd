"""Instrument signature removal (ISR) as pure functions on arrays: raw ADU -> electrons + mask + variance.

The inverse of :mod:`diapipe.sim.signature`, with the same calibration conventions:
master bias in electrons (after overscan and gain), master dark in electrons per second,
flat dimensionless (not normalised per detector), defects as ``(x0, y0, width, height)`` boxes,
all in assembled detector pixels. Order of operations (as ip_isr): serial-overscan subtraction per
amplifier, saturation/suspect detection in ADU, trim + assemble (flips), gain -> electrons, bias,
variance, dark, flat, masks (BAD/SAT/SUSPECT/NO_DATA/EDGE), interpolation (INTRP).

Variance: before flat division the pixel holds ``N + d`` detected electrons (signal N, dark d,
both Poisson) plus read noise, so ``var_pre = max(image_pre_dark, 0) + read_noise_e**2``.
Dividing the image by the flat F divides the variance by F**2:
``var = (F S + d + rn^2) / F^2 = S / F + (d + rn^2) / F^2``, with S the flat-fielded signal.
(``S / F + rn^2`` would be wrong for the read-noise term wherever F != 1, e.g. vignetted corners.)
Noise of the calibration products themselves is not propagated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diapipe.exposure.masks import MASK_DTYPE, any_set, bit
from diapipe.instrument.camera import Amplifier, Detector, box_slices

__all__ = [
    "assemble_amplifiers",
    "interpolate_over_columns",
    "mask_defects",
    "overscan_correct",
    "overscan_per_row",
    "run_isr",
    "saturation_masks",
]


def overscan_per_row(
    overscan_adu: np.ndarray,
    leading_skip: int = 2,
    clip_sigma: float = 3.0,
    fit: str = "poly",
    poly_order: int = 3,
    smooth_rows: int = 9,
) -> np.ndarray:
    """Robust bias level of every row from a serial-overscan block (rows x columns), in ADU.

    Per row: mean of the overscan columns (skipping ``leading_skip`` columns next to the data,
    which carry deferred charge in real devices) after clipping at ``clip_sigma`` robust sigmas
    about the row median — a mean, not a median, because raw values are integers and the
    median of 30 integers is quantised. A single row's estimate is noisy (~rn/sqrt(30) = 1.3 ADU)
    and that error is shared by the whole row, so the per-row values are then modelled:

    - ``fit="poly"`` (default): a least-squares polynomial of ``poly_order`` in row number, right
      for the slow drifts of the simulated (and real) electronics; noise ~1.3 ADU x
      sqrt((order + 1) / n_rows), 0.06 ADU for a full 2000-row amplifier.
    - ``fit="row"``: per-row values smoothed by a running median of ``smooth_rows`` rows (ip_isr's
      MEDIAN_PER_ROW plus smoothing); follows faster bias jumps at the cost of more noise.

    NaN overscan pixels are ignored; rows with no valid overscan take the model (poly) or the value
    of the nearest valid rows (row).
    """
    block = np.asarray(overscan_adu, dtype=float)[:, leading_skip:]
    if block.size == 0 or not np.isfinite(block).any():
        raise ValueError("Serial overscan has no finite pixels")
    finite = np.isfinite(block)
    row_ok = finite.any(axis=1)
    med = np.zeros((block.shape[0], 1))
    med[row_ok, 0] = np.nanmedian(block[row_ok], axis=1)
    resid = np.where(finite, block - med, np.nan)
    # robust sigma from the whole block (noise is the same on every row)
    mad = np.nanmedian(np.abs(resid))
    sigma = 1.4826 * mad if mad > 0 else 1.0
    keep = finite & (np.abs(np.where(finite, resid, 0.0)) <= clip_sigma * sigma)
    counts = keep.sum(axis=1)
    sums = np.where(keep, block, 0.0).sum(axis=1)
    valid = counts > 0
    level = np.empty(block.shape[0])
    level[valid] = sums[valid] / counts[valid]
    rows = np.arange(block.shape[0])
    if fit == "poly":
        t = 2.0 * rows / max(rows.size - 1, 1) - 1.0  # [-1, 1] for conditioning
        order = min(poly_order, int(valid.sum()) - 1)
        coeffs = np.polynomial.legendre.legfit(t[valid], level[valid], order, w=np.sqrt(counts[valid]))
        return np.polynomial.legendre.legval(t, coeffs)
    if fit != "row":
        raise ValueError(f"Unknown overscan fit {fit!r}; use 'poly' or 'row'")
    if not valid.all():
        level[~valid] = np.interp(rows[~valid], rows[valid], level[valid])
    if smooth_rows > 1 and level.size >= smooth_rows:
        level = ndimage.median_filter(level, size=smooth_rows, mode="nearest")
    return level


def overscan_correct(raw: np.ndarray, detector: Detector, amp: Amplifier, **kwargs) -> np.ndarray:
    """Data region of ``amp`` (readout orientation) minus its per-row serial-overscan level, in ADU."""
    overscan = detector.raw_segment(raw, amp, "overscan")
    try:
        level = overscan_per_row(overscan, **kwargs)
    except ValueError as err:
        raise ValueError(f"Amplifier {amp.name} of detector {detector.name}: {err}") from err
    return detector.raw_segment(raw, amp, "data").astype(float) - level[:, None]


def assemble_amplifiers(per_amp: dict[str, np.ndarray], detector: Detector, dtype=float) -> np.ndarray:
    """Place per-amp arrays (readout orientation, data-region shape) into the assembled image."""
    out = np.empty(detector.shape, dtype=dtype)
    for amp in detector.amplifiers:
        out[box_slices(amp.bbox)] = detector.raw_to_assembled(per_amp[amp.name], amp)
    return out


def saturation_masks(
    corrected_adu: np.ndarray, amp: Amplifier, margin_read_noise: float = 5.0, suspect_fraction: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """(saturated, suspect) boolean arrays for one amp's overscan-corrected data.

    Saturated: ``>= saturation_adu - margin_read_noise * read_noise_adu`` — pixels held at the full
    well sit at ``saturation_adu`` plus read noise, so an exact threshold would miss half of a bleed
    trail. Suspect: ``>= suspect_fraction * saturation_adu`` (near full well, nonlinear) and not
    saturated.
    """
    with np.errstate(invalid="ignore"):
        sat = corrected_adu >= amp.saturation_adu - margin_read_noise * amp.read_noise_adu
        suspect = (corrected_adu >= suspect_fraction * amp.saturation_adu) & ~sat
    return sat, suspect


def mask_defects(mask: np.ndarray, defects) -> None:
    """Set BAD (in place) in every ``(x0, y0, width, height)`` defect box (clipped to the image)."""
    ny, nx = mask.shape
    for x0, y0, w, h in defects:
        xa, xb = max(int(x0), 0), min(int(x0 + w), nx)
        ya, yb = max(int(y0), 0), min(int(y0 + h), ny)
        if xa < xb and ya < yb:
            mask[ya:yb, xa:xb] |= MASK_DTYPE(bit("BAD"))


def interpolate_over_columns(image: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate ``bad`` pixels along each row from the nearest good pixels left and right.

    Row-wise interpolation is right for bad columns and vertical bleed trails (the good neighbours
    are on the same row). Pixels beyond the last good pixel of a row take its value. Returns
    ``(new_image, filled)`` where ``filled`` marks pixels that could be interpolated (rows with no
    good pixel at all are left unchanged and not marked).
    """
    out = np.array(image, dtype=float, copy=True)
    bad = np.asarray(bad, dtype=bool)
    filled = np.zeros(bad.shape, dtype=bool)
    rows = np.flatnonzero(bad.any(axis=1))
    for start in range(0, rows.size, _INTERP_ROWS):
        chunk = rows[start : start + _INTERP_ROWS]
        values = out[chunk]
        filled[chunk] = _interpolate_rows(values, bad[chunk])
        out[chunk] = values
    return out, filled


#: Rows per chunk of the vectorised row interpolation (bounds its index temporaries).
_INTERP_ROWS = 256


def _interpolate_rows(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Interpolate ``bad`` pixels of each row of ``values`` (float64, in place) from the nearest
    good pixels on either side, with `numpy.interp`'s arithmetic; returns the filled pixels.

    The nearest good pixel to the left (right) of every pixel is a running maximum (minimum) of
    the good pixels' column numbers, so a whole block of rows is done without a Python loop.
    """
    nx = values.shape[1]
    cols = np.arange(nx)
    left = np.maximum.accumulate(np.where(bad, -1, cols), axis=1)
    right = np.minimum.accumulate(np.where(bad, nx, cols)[:, ::-1], axis=1)[:, ::-1]
    fill = bad & ((left >= 0) | (right < nx))  # rows with no good pixel stay as they are
    yy, xx = np.nonzero(fill)
    lo, hi = left[yy, xx], right[yy, xx]
    inner = (lo >= 0) & (hi < nx)
    new = np.empty(yy.size)
    # beyond the first / last good pixel of a row: that pixel's value (numpy.interp's ends)
    new[lo < 0] = values[yy[lo < 0], hi[lo < 0]]
    new[hi >= nx] = values[yy[hi >= nx], lo[hi >= nx]]
    y_in, x_in, l_in, h_in = yy[inner], xx[inner].astype(float), lo[inner], hi[inner]
    f_lo, f_hi = values[y_in, l_in], values[y_in, h_in]
    with np.errstate(invalid="ignore"):
        slope = (f_hi - f_lo) / (h_in.astype(float) - l_in.astype(float))
        val = slope * (x_in - l_in) + f_lo
        nan = np.isnan(val)
        if nan.any():  # numpy.interp's fallbacks (infinite neighbours)
            val[nan] = slope[nan] * (x_in[nan] - h_in[nan]) + f_hi[nan]
            same = np.isnan(val) & (f_lo == f_hi)
            val[same] = f_lo[same]
    new[inner] = val
    values[yy, xx] = new
    return fill


def run_isr(
    raw_adu: np.ndarray,
    detector: Detector,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    defects=(),
    exposure_time_s: float = 0.0,
    edge_px: int = 4,
    saturation_grow_px: int = 1,
    min_flat: float = 0.1,
    overscan_fit: str = "poly",
    overscan_order: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ISR of one raw detector image.

    Parameters
    ----------
    raw_adu : (raw_ny, raw_nx) array
        Raw image in the camera's raw layout (see :mod:`diapipe.instrument.camera`).
    detector : Detector
    bias : array, optional
        Master bias, electrons, assembled.
    dark : array, optional
        Master dark, electrons per second, assembled; scaled by ``exposure_time_s``.
    flat : array, optional
        Master flat, dimensionless, assembled. Pixels with ``flat < min_flat`` are marked BAD.
    defects : iterable of (x0, y0, width, height)
        Known bad regions, marked BAD and interpolated.
    exposure_time_s : float
    edge_px : int
        Width of the EDGE border.
    saturation_grow_px : int
        SAT footprints are grown by this many pixels (bleed-trail wings).
    overscan_fit, overscan_order
        Serial-overscan model, see :func:`overscan_per_row` ('poly' of this order, or 'row').

    Returns
    -------
    image_e : float32 (ny, nx)
        Electrons (of a detector with unit response). Masked pixels are interpolated (INTRP).
    mask : int32 (ny, nx)
        Planes BAD, SAT, SUSPECT, INTRP, NO_DATA, EDGE.
    variance : float32 (ny, nx)
        Electrons squared (see module docstring).

    Raises
    ------
    ValueError
        Wrong raw shape, or an amplifier whose data or overscan pixels are all NaN (named).

    Examples
    --------
    >>> import numpy as np
    >>> from diapipe.instrument.camera import Camera
    >>> from diapipe.sim.signature import apply_detector_signature
    >>> det = Camera.lsstcam_imsim(amp_data_shape=(32, 16))[94]
    >>> raw = apply_detector_signature(np.full(det.shape, 500.0), det, 30.0, np.random.default_rng(1),
    ...                                flat=np.ones(det.shape), cosmic_ray_rate_per_s=0)
    >>> image, mask, var = run_isr(raw, det, exposure_time_s=30.0)
    >>> bool(abs(np.median(image) - 500.0) < 10)
    True
    """
    raw = np.asarray(raw_adu)
    if raw.shape != detector.raw_shape:
        raise ValueError(f"Raw image for detector {detector.name} has shape {raw.shape}, "
                         f"expected {detector.raw_shape}")  # fmt: skip
    for name, calib in (("bias", bias), ("dark", dark), ("flat", flat)):
        if calib is not None and np.shape(calib) != detector.shape:
            raise ValueError(f"Master {name} for detector {detector.name} has shape {np.shape(calib)}, "
                             f"expected {detector.shape}")  # fmt: skip

    ny = detector.shape[0]
    image = np.empty(detector.shape, dtype=float)  # ADU, then electrons (float64 throughout)
    sat = np.empty(detector.shape, dtype=bool)
    suspect = np.empty(detector.shape, dtype=bool)
    for amp in detector.amplifiers:
        if not np.isfinite(detector.raw_segment(raw, amp, "data")).any():
            raise ValueError(f"Amplifier {amp.name} of detector {detector.name} has no finite data pixels")
        corrected = overscan_correct(raw, detector, amp, fit=overscan_fit, poly_order=overscan_order)
        box = box_slices(amp.bbox)
        amp_sat, amp_suspect = saturation_masks(corrected, amp)
        sat[box] = detector.raw_to_assembled(amp_sat, amp)
        suspect[box] = detector.raw_to_assembled(amp_suspect, amp)
        corrected *= amp.gain  # -> electrons (the same product as with a full-frame gain image)
        image[box] = detector.raw_to_assembled(corrected, amp)
        del corrected
    nan = ~np.isfinite(image)
    image[nan] = 0.0

    mask = np.zeros(detector.shape, dtype=MASK_DTYPE)
    low = None
    if flat is not None:
        flat = np.asarray(flat)
        low = ~(flat >= np.float64(min_flat))  # also catches NaN
        _set(mask, low, "BAD")
    mask_defects(mask, defects)
    if saturation_grow_px > 0 and sat.any():
        # iterated 4-connected dilations = one dilation by a diamond (cheap row-wise maxima)
        from diapipe.measure.detection import dilate_rows

        reach = int(saturation_grow_px)
        sat = dilate_rows(sat, {dy: reach - abs(dy) for dy in range(-reach, reach + 1)})
    _set(mask, sat, "SAT")
    _set(mask, suspect & ~sat, "SUSPECT")
    del sat, suspect
    _set(mask, nan, "NO_DATA")
    _set(mask, nan, "BAD")
    del nan
    to_fix = any_set(mask, ["BAD", "SAT", "NO_DATA"])
    filled = np.zeros(detector.shape, dtype=bool)
    unfixable_rows = np.flatnonzero(to_fix.all(axis=1))
    good_variance = []  # float64 variances of the unmasked pixels, only when a row is lost

    # Bias, variance, dark, flat and the interpolation over masked pixels by blocks of rows:
    # each pixel goes through the same float64 operations as on full frames, but the working set
    # stays in cache and the only full-frame arrays are the float64 image and the outputs.
    read_noise2 = [(box_slices(amp.bbox), float(amp.read_noise_e) * float(amp.read_noise_e))
                   for amp in detector.amplifiers]
    bias = None if bias is None else np.asarray(bias)
    dark = None if dark is None else np.asarray(dark)
    image_out = np.empty(detector.shape, dtype=np.float32)
    variance_out = np.empty(detector.shape, dtype=np.float32)
    for y0 in range(0, ny, _ISR_ROWS):
        rows = slice(y0, min(ny, y0 + _ISR_ROWS))
        block = image[rows]
        if bias is not None:
            block -= bias[rows]
        variance = np.maximum(block, 0.0)
        for (ys, xs), rn2 in read_noise2:
            a, b = max(ys.start, rows.start), min(ys.stop, rows.stop)
            if a < b:
                variance[a - y0 : b - y0, xs] += rn2
        if dark is not None:
            block -= np.asarray(dark[rows], dtype=float) * exposure_time_s
        if flat is not None:
            safe = np.where(low[rows], 1.0, np.asarray(flat[rows], dtype=float))
            block /= safe
            variance /= safe**2
        fix = to_fix[rows]
        if unfixable_rows.size:
            good_variance.append(variance[~fix])
        if fix.any():
            filled[rows] = _interpolate_rows(block, fix)
            _interpolate_rows(variance, fix)
        image_out[rows] = block
        variance_out[rows] = variance
    del image
    _set(mask, filled, "INTRP")
    if unfixable_rows.size:
        unfixable = to_fix & ~filled  # whole rows lost: no data to interpolate from
        good_variance = np.concatenate(good_variance)
        image_out[unfixable] = 0.0
        variance_out[unfixable] = np.median(good_variance) if good_variance.size else 1.0

    if edge_px > 0:
        edge = np.zeros(detector.shape, dtype=bool)
        edge[:edge_px, :] = edge[-edge_px:, :] = True
        edge[:, :edge_px] = edge[:, -edge_px:] = True
        _set(mask, edge, "EDGE")

    return image_out, mask, variance_out


def _set(mask: np.ndarray, where: np.ndarray, name: str) -> None:
    """`diapipe.exposure.masks.set_plane` without the boolean-index gather/scatter."""
    np.bitwise_or(mask, MASK_DTYPE(bit(name)), out=mask, where=where)


#: Rows per block of run_isr's arithmetic.
_ISR_ROWS = 64
