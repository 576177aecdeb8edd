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

from diapipe.exposure.masks import MASK_DTYPE, any_set, bit, set_plane
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
    filled = np.zeros(bad.shape, dtype=bool)
    xs = np.arange(image.shape[1])
    for y in np.flatnonzero(bad.any(axis=1)):
        good = ~bad[y]
        if not good.any():
            continue
        out[y, bad[y]] = np.interp(xs[bad[y]], xs[good], out[y, good])
        filled[y, bad[y]] = True
    return out, filled


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

    corrected, sat_amp, suspect_amp = {}, {}, {}
    for amp in detector.amplifiers:
        if not np.isfinite(detector.raw_segment(raw, amp, "data")).any():
            raise ValueError(f"Amplifier {amp.name} of detector {detector.name} has no finite data pixels")
        corrected[amp.name] = overscan_correct(
            raw, detector, amp, fit=overscan_fit, poly_order=overscan_order
        )
        sat_amp[amp.name], suspect_amp[amp.name] = saturation_masks(corrected[amp.name], amp)

    image_adu = assemble_amplifiers(corrected, detector)
    sat = assemble_amplifiers(sat_amp, detector, dtype=bool)
    suspect = assemble_amplifiers(suspect_amp, detector, dtype=bool)
    nan = ~np.isfinite(image_adu)
    image_adu[nan] = 0.0

    image = image_adu * detector.amp_value_image("gain")
    if bias is not None:
        image -= bias
    variance = np.clip(image, 0.0, None) + detector.amp_value_image("read_noise_e") ** 2
    if dark is not None:
        image -= np.asarray(dark, dtype=float) * exposure_time_s

    mask = np.zeros(detector.shape, dtype=MASK_DTYPE)
    if flat is not None:
        flat = np.asarray(flat, dtype=float)
        low = ~(flat >= min_flat)  # also catches NaN
        safe = np.where(low, 1.0, flat)
        image /= safe
        variance /= safe**2
        set_plane(mask, low, "BAD")

    mask_defects(mask, defects)
    if saturation_grow_px > 0 and sat.any():
        sat = ndimage.binary_dilation(sat, iterations=saturation_grow_px)
    set_plane(mask, sat, "SAT")
    set_plane(mask, suspect & ~sat, "SUSPECT")
    set_plane(mask, nan, "NO_DATA")
    set_plane(mask, nan, "BAD")

    to_fix = any_set(mask, ["BAD", "SAT", "NO_DATA"])
    if to_fix.any():
        image, filled = interpolate_over_columns(image, to_fix)
        variance, _ = interpolate_over_columns(variance, to_fix)
        set_plane(mask, filled, "INTRP")
        unfixable = to_fix & ~filled  # whole rows lost: no data to interpolate from
        if unfixable.any():
            image[unfixable] = 0.0
            variance[unfixable] = np.median(variance[~to_fix]) if (~to_fix).any() else 1.0

    if edge_px > 0:
        edge = np.zeros(detector.shape, dtype=bool)
        edge[:edge_px, :] = edge[-edge_px:, :] = True
        edge[:, :edge_px] = edge[:, -edge_px:] = True
        set_plane(mask, edge, "EDGE")

    return image.astype(np.float32), mask, variance.astype(np.float32)
