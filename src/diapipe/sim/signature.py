"""Forward model of an LSSTCam-imSim detector: electrons on the sky -> raw ADU.

Each step is a function (stochastic ones take a ``numpy.random.Generator``);
:func:`apply_detector_signature` chains them. The *true* detector (flat response, bias
structure, dark current, defects) is deterministic per detector id, so the simulator and the
calibration products agree; the calibration generators (``make_*``) return that truth plus the
noise of a finite number of calibration frames.

Conventions shared with :mod:`diapipe.isr.algorithms` (the inverse):

- Input ``electrons_image``: expected photo-electrons per pixel that a perfect detector
  (flat = 1 everywhere) would collect, assembled detector layout ``(ny, nx)``.
- Flat (``make_flat``): relative response, *not* normalised per detector: 1.0 at the focal-plane
  centre, including vignetting, so that ISR output is in electrons of the ideal detector and the
  zero point does not vary over the focal plane. Dimensionless, assembled layout.
- Master bias (``make_master_bias``): electrons (after overscan subtraction and gain), assembled.
- Master dark (``make_master_dark``): electrons per second, assembled; ISR scales it by the
  exposure time.
- Defects (``make_defects``): list of ``(x0, y0, width, height)`` boxes in assembled pixels.
- Full well of a pixel = ``amp.saturation_adu * amp.gain`` electrons (1e5 e- at nominal gain);
  charge above it bleeds along the column, conserving charge except off the detector edge.
- Raw output: float32 ADU rounded to integers, raw layout of
  :class:`diapipe.instrument.camera.Detector` (prescan, serial and parallel overscan included).

Memory: a full 4072 x 4000 detector is 16 M pixels, 65 MB per float32 frame. The chain works in
float32 (electron counts up to 2^24 are exact; full well is 1e5 e-) and in place, draws Poisson
deviates by row blocks and never builds full-frame per-amplifier images (gain, bias pattern), so a
detector-visit peaks at a few float32 frames instead of a dozen float64 ones.
"""

from __future__ import annotations

import numpy as np

from diapipe.instrument.camera import Detector, box_slices

__all__ = [
    "COSMIC_RAY_RATE_PER_S_PER_CCD",
    "DARK_CURRENT_E_PER_S",
    "add_cosmic_rays",
    "apply_detector_signature",
    "bias_pattern_adu",
    "bleed_saturation",
    "electrons_to_raw",
    "make_defects",
    "make_flat",
    "make_master_bias",
    "make_master_dark",
    "poisson_inplace",
    "true_dark_rate",
    "true_flat",
]

DARK_CURRENT_E_PER_S = 0.02
COSMIC_RAY_RATE_PER_S_PER_CCD = 0.2
FULL_CCD_AREA_PX = 4072 * 4000
HOT_COLUMN_E_PER_S = 3.0
DEAD_COLUMN_RESPONSE = 0.02
VIGNETTING_START_MM = 200.0
VIGNETTING_EDGE_MM = 330.0
VIGNETTING_DEPTH = 0.12


def _truth_rng(detector: Detector, stream: int) -> np.random.Generator:
    """Deterministic generator for one kind of fixed detector structure."""
    return np.random.default_rng([31337, detector.id, stream])


def _focal_plane_radius(detector: Detector, rows_per_block: int = 128) -> np.ndarray:
    """Focal-plane radius (mm, float32, assembled) of every pixel.

    Computed by blocks of rows: the float64 focal-plane coordinates of a whole frame would be
    four full float64 frames; float32 is ample for the result (radius to ~1e-5 mm).
    """
    out = np.empty(detector.shape, dtype=np.float32)
    x = np.arange(detector.nx)[None, :]
    for y0 in range(0, detector.ny, rows_per_block):
        y = np.arange(y0, min(y0 + rows_per_block, detector.ny))[:, None]
        xmm, ymm = detector.pixel_to_focal_plane(x, y)
        out[y0 : y0 + rows_per_block] = np.hypot(xmm, ymm)
    return out


def _defect_columns(detector: Detector) -> list[tuple[int, str]]:
    """Deterministic bad columns: (x, 'dead' | 'hot'), 2-4 per detector, away from the edges."""
    rng = _truth_rng(detector, 4)
    n = int(rng.integers(2, 5))
    margin = min(8, detector.nx // 4)
    xs = rng.choice(np.arange(margin, detector.nx - margin), size=n, replace=False)
    kinds = ["dead" if k < 0.5 else "hot" for k in rng.random(n)]
    return sorted(zip((int(x) for x in xs), kinds))


def true_flat(detector: Detector) -> np.ndarray:
    """True relative response (float32, assembled): vignetting x per-amp gain/QE steps x pixel response.

    Vignetting: 1 inside r = 200 mm, then ``1 - 0.12 ((r - 200) / 130)^2``. Per-amp factor: normal
    with sigma 0.5%. Per-pixel: normal with sigma 1%. Dead columns respond at 2%.
    Built in place in one float32 frame (plus the random frame) for memory.
    """
    flat = _focal_plane_radius(detector)
    flat -= VIGNETTING_START_MM
    np.clip(flat, 0.0, None, out=flat)
    flat *= 1.0 / (VIGNETTING_EDGE_MM - VIGNETTING_START_MM)
    np.square(flat, out=flat)
    flat *= -VIGNETTING_DEPTH
    flat += 1.0
    rng = _truth_rng(detector, 1)
    amp_factor = 1.0 + 0.005 * rng.standard_normal(len(detector.amplifiers))
    pixel = rng.standard_normal(detector.shape, dtype=np.float32)
    pixel *= 0.01
    pixel += 1.0
    flat *= pixel
    del pixel
    for amp in detector.amplifiers:
        flat[box_slices(amp.bbox)] *= np.float32(amp_factor[amp.index])
    for x, kind in _defect_columns(detector):
        if kind == "dead":
            flat[:, x] = DEAD_COLUMN_RESPONSE
    return flat


def true_dark_rate(detector: Detector) -> np.ndarray:
    """True dark current (e-/s, float32, assembled): 0.02 e-/s/px, a few hot pixels, hot columns at 3 e-/s."""
    rng = _truth_rng(detector, 2)
    dark = np.full(detector.shape, DARK_CURRENT_E_PER_S, dtype=np.float32)
    n_hot = rng.poisson(20 * dark.size / FULL_CCD_AREA_PX)
    ys, xs = rng.integers(0, detector.ny, n_hot), rng.integers(0, detector.nx, n_hot)
    dark[ys, xs] += rng.uniform(0.5, 20.0, n_hot)
    for x, kind in _defect_columns(detector):
        if kind == "hot":
            dark[:, x] += HOT_COLUMN_E_PER_S
    return dark


def _bias_profiles_adu(detector: Detector) -> list[np.ndarray]:
    """Per amplifier (in ``detector.amplifiers`` order): the column profile (ADU) of the fixed bias
    structure, in assembled orientation over the amp's ``bbox`` columns."""
    rng = _truth_rng(detector, 3)
    profiles = []
    for amp in detector.amplifiers:
        w = amp.bbox[2]
        raw_cols = np.arange(w)
        profile = 0.5 * rng.standard_normal(w) + 3.0 * np.exp(-raw_cols / 4.0)
        profiles.append(profile[::-1] if amp.flip_x else profile)
    return profiles


def bias_pattern_adu(detector: Detector) -> np.ndarray:
    """Fixed 2-D bias structure (ADU, assembled) that the overscan does not see.

    Per-column offsets (sigma 0.5 ADU) plus a 3 ADU excess decaying over the first ~10 columns
    read by each amplifier (the readout side), as seen in real ITL biases.
    """
    out = np.zeros(detector.shape)
    for amp, profile in zip(detector.amplifiers, _bias_profiles_adu(detector)):
        x0, y0, w, h = amp.bbox
        out[y0 : y0 + h, x0 : x0 + w] = profile[None, :]
    return out


def _amp_value_image32(detector: Detector, attribute: str) -> np.ndarray:
    """`Detector.amp_value_image` in float32 (half the memory of the float64 one)."""
    out = np.empty(detector.shape, dtype=np.float32)
    for amp in detector.amplifiers:
        out[box_slices(amp.bbox)] = float(getattr(amp, attribute))
    return out


def poisson_inplace(image: np.ndarray, rng: np.random.Generator, rows_per_block: int = 256) -> np.ndarray:
    """Replace every pixel of the float ``image`` by a Poisson deviate of that mean, in place.

    Drawn by blocks of rows so that the int64 deviates never take a full frame; the generator is
    consumed pixel by pixel in C order, so the result equals ``rng.poisson(image)`` drawn at once.
    Returns ``image``.
    """
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"poisson_inplace needs a float image, got {image.dtype}")
    for y0 in range(0, image.shape[0], rows_per_block):
        block = image[y0 : y0 + rows_per_block]
        block[...] = rng.poisson(block)
    return image


def make_flat(detector: Detector, rng: np.random.Generator, noise: float = 5e-4) -> np.ndarray:
    """Master flat (float32, assembled): the true response with combined-frame noise ``noise`` per pixel."""
    flat = true_flat(detector)
    return (flat * (1.0 + noise * rng.standard_normal(flat.shape))).astype(np.float32)


def make_defects(detector: Detector) -> list[tuple[int, int, int, int]]:
    """Known defects: one full-height box ``(x, 0, 1, ny)`` per bad (dead or hot) column."""
    return [(x, 0, 1, detector.ny) for x, _ in _defect_columns(detector)]


def make_master_bias(detector: Detector, rng: np.random.Generator, n_frames: int = 100) -> np.ndarray:
    """Master bias in electrons (float32, assembled): bias structure x gain + noise of ``n_frames``."""
    gain = detector.amp_value_image("gain")
    read_noise_e = detector.amp_value_image("read_noise_e")
    bias_e = bias_pattern_adu(detector) * gain
    return (bias_e + read_noise_e / np.sqrt(n_frames) * rng.standard_normal(detector.shape)).astype(
        np.float32
    )


def make_master_dark(
    detector: Detector, rng: np.random.Generator, n_frames: int = 20, frame_exposure_s: float = 300.0
) -> np.ndarray:
    """Master dark in e-/s (float32, assembled): true dark rate + shot and read noise of the combined frames."""
    rate = true_dark_rate(detector)
    read_noise_e = detector.amp_value_image("read_noise_e")
    sigma_e = np.sqrt(rate * frame_exposure_s + read_noise_e**2) / np.sqrt(n_frames)
    return (rate + sigma_e * rng.standard_normal(detector.shape) / frame_exposure_s).astype(np.float32)


def _work_image(electrons: np.ndarray, inplace: bool, caller: str) -> np.ndarray:
    """``electrons`` itself (must be float) when ``inplace``, else a float64 copy to modify."""
    if not inplace:
        return np.array(electrons, dtype=float, copy=True)
    if not np.issubdtype(electrons.dtype, np.floating):
        raise TypeError(f"{caller}(inplace=True) needs a float image, got {electrons.dtype}")
    return electrons


def add_cosmic_rays(
    electrons: np.ndarray,
    detector: Detector,
    exposure_time_s: float,
    rng: np.random.Generator,
    rate_per_s_per_ccd: float = COSMIC_RAY_RATE_PER_S_PER_CCD,
    mean_charge_e: float = 3000.0,
    inplace: bool = False,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Add cosmic-ray tracks; returns ``(image, [(x, y) of each track start])``.

    Count ~ Poisson(rate x exposure x detector area / full ITL area). Each track is a straight
    segment of 1-10 px at a random angle carrying exponential-distributed total charge
    (mean ``mean_charge_e``), deposited by bilinear splatting of sub-pixel samples.
    ``inplace=True`` adds to ``electrons`` itself (a float array), else to a float64 copy.
    """
    out = _work_image(electrons, inplace, "add_cosmic_rays")
    ny, nx = out.shape
    n = rng.poisson(rate_per_s_per_ccd * exposure_time_s * (nx * ny) / FULL_CCD_AREA_PX)
    starts = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        length = rng.uniform(1.0, 10.0)
        angle = rng.uniform(0, 2 * np.pi)
        charge = rng.exponential(mean_charge_e)
        t = np.linspace(0.0, length, int(4 * length) + 2)
        xs = np.clip(x0 + t * np.cos(angle), 0, nx - 1)
        ys = np.clip(y0 + t * np.sin(angle), 0, ny - 1)
        ix, iy = np.minimum(xs.astype(int), nx - 2), np.minimum(ys.astype(int), ny - 2)
        fx, fy = xs - ix, ys - iy
        q = charge / len(t)
        for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                            (1, 1, fx * fy)):  # fmt: skip
            np.add.at(out, (iy + dy, ix + dx), q * wgt)
        starts.append((float(x0), float(y0)))
    return out, starts


def bleed_saturation(electrons: np.ndarray, full_well_e: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Cap pixels at the full well and spread the excess along the column (half up, half down).

    Charge is conserved except what bleeds off the top or bottom edge of the detector.
    ``inplace=True`` works on ``electrons`` itself (a float array), else on a float64 copy.
    """
    out = _work_image(electrons, inplace, "bleed_saturation")
    cap = np.broadcast_to(full_well_e, out.shape)
    for x in np.flatnonzero((out > cap).any(axis=0)):
        col, ccap = out[:, x], cap[:, x]
        over = col > ccap
        # contiguous runs of over-full pixels
        edges = np.flatnonzero(np.diff(np.concatenate([[0], over.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):  # run is [a, b)
            excess = float(np.sum(col[a:b] - ccap[a:b], dtype=np.float64))
            col[a:b] = ccap[a:b]
            _spill(col, ccap, np.arange(b, col.size), excess / 2.0)
            _spill(col, ccap, np.arange(a - 1, -1, -1), excess / 2.0)
    return out


def _spill(col: np.ndarray, cap: np.ndarray, order: np.ndarray, charge: float) -> None:
    """Fill pixels of ``col`` in ``order`` up to ``cap`` with ``charge`` (in place)."""
    if order.size == 0 or charge <= 0:
        return
    room = np.clip(cap[order] - col[order], 0.0, None)
    filled = np.cumsum(room, dtype=np.float64)
    k = int(np.searchsorted(filled, charge))
    col[order[:k]] = cap[order[:k]]
    if k < order.size:
        col[order[k]] += charge - (filled[k - 1] if k > 0 else 0.0)


def electrons_to_raw(
    electrons: np.ndarray,
    detector: Detector,
    rng: np.random.Generator,
    bias_drift_adu: float = 3.0,
    include_bias_pattern: bool = True,
) -> np.ndarray:
    """Read out an electron image: per-amp split and flips, gain, bias + row drift, read noise, ADC.

    Every row of an amplifier (prescan, data, serial overscan; parallel overscan rows too) gets
    the amp's bias level, a per-exposure offset (sigma 1 ADU) and a slow drift along the readout
    (a random-phase sinusoid of amplitude ``bias_drift_adu`` and period 3000-10000 rows, plus a
    linear ramp of up to ``bias_drift_adu`` per 2048 rows), which the serial overscan sees.
    Output is float32 ADU rounded to integers and clipped to 18 bits. Works amplifier by
    amplifier into one float32 raw frame (no full-frame temporaries).
    """
    if electrons.shape != detector.shape:
        raise ValueError(f"Electron image for {detector.name} has shape {electrons.shape}, "
                         f"expected {detector.shape}")  # fmt: skip
    raw = np.zeros(detector.raw_shape, dtype=np.float32)
    profiles = _bias_profiles_adu(detector) if include_bias_pattern else None
    for k, amp in enumerate(detector.amplifiers):
        data = electrons[box_slices(amp.bbox)] / np.float32(amp.gain)
        if profiles is not None:
            data += profiles[k][None, :].astype(np.float32)
        raw[box_slices(amp.raw_data_bbox)] = detector.raw_to_assembled(data, amp)
        del data
        x0, y0, w, h = amp.raw_bbox
        rows = np.arange(h)
        period = rng.uniform(3000.0, 10000.0)  # rows: slow compared with an amplifier's 2048
        drift = (bias_drift_adu * np.sin(2 * np.pi * (rows / period + rng.uniform()))
                 + rng.uniform(-1, 1) * bias_drift_adu * rows / 2048.0)  # fmt: skip
        level = amp.bias_level_adu + rng.normal(0.0, 1.0) + drift
        noise = rng.standard_normal((h, w))
        noise *= amp.read_noise_adu
        noise += level[:, None]
        raw[y0 : y0 + h, x0 : x0 + w] += noise
        del noise
    np.rint(raw, out=raw)
    np.clip(raw, 0, 2**18 - 1, out=raw)
    return raw


def apply_detector_signature(
    electrons_image: np.ndarray,
    detector: Detector,
    exposure_time_s: float,
    rng: np.random.Generator,
    flat: np.ndarray | None = None,
    dark_rate: np.ndarray | None = None,
    poisson: bool = True,
    cosmic_ray_rate_per_s: float = COSMIC_RAY_RATE_PER_S_PER_CCD,
    bias_drift_adu: float = 3.0,
    overwrite_input: bool = False,
) -> np.ndarray:
    """Turn an ideal-detector electron image into a raw LSSTCam-imSim image (float32 ADU).

    Steps: x flat response (default :func:`true_flat`), + dark current x exposure time (default
    :func:`true_dark_rate`), Poisson noise (skip with ``poisson=False`` if the input is already a
    noisy realisation — the flat then scales the noise too), cosmic rays, full well + bleed
    trails, then :func:`electrons_to_raw` (amp split, flips, bias + drift, gain, read noise).
    The electron chain runs in one float32 frame, in place.

    Parameters
    ----------
    electrons_image : (ny, nx) array
        Expected electrons per pixel on a perfect detector (sky + sources), assembled layout.
    detector : Detector
    exposure_time_s : float
    rng : numpy.random.Generator
    flat, dark_rate : arrays, optional
        Override the true response (dimensionless) / dark current (e-/s).
    cosmic_ray_rate_per_s : float
        Per full-size CCD; scaled by area for cropped detectors. 0 disables cosmic rays.
    overwrite_input : bool
        If ``electrons_image`` is a float32 array, use it as the work frame (its content is
        destroyed): one full frame less for callers that no longer need it.

    Examples
    --------
    >>> import numpy as np
    >>> from diapipe.instrument.camera import Camera
    >>> det = Camera.lsstcam_imsim(amp_data_shape=(32, 16))[94]
    >>> raw = apply_detector_signature(np.full(det.shape, 500.0), det, 30.0, np.random.default_rng(1))
    >>> raw.shape == det.raw_shape
    True
    """
    image = np.asarray(electrons_image)
    if image.shape != detector.shape:
        raise ValueError(f"Electron image for {detector.name} has shape {image.shape}, "
                         f"expected {detector.shape}")  # fmt: skip
    if overwrite_input and image.dtype == np.float32 and image.flags.writeable:
        electrons = image
        np.clip(electrons, 0.0, None, out=electrons)
    else:
        electrons = np.empty(image.shape, dtype=np.float32)
        np.clip(image, 0.0, None, out=electrons)
    del image
    electrons *= true_flat(detector) if flat is None else flat
    dark_e = true_dark_rate(detector) if dark_rate is None else np.array(dark_rate, dtype=np.float32)
    dark_e *= np.float32(exposure_time_s)
    electrons += dark_e
    del dark_e
    if poisson:
        poisson_inplace(electrons, rng)
    if cosmic_ray_rate_per_s > 0:
        add_cosmic_rays(electrons, detector, exposure_time_s, rng, cosmic_ray_rate_per_s, inplace=True)
    full_well = _amp_value_image32(detector, "saturation_adu")
    full_well *= _amp_value_image32(detector, "gain")
    bleed_saturation(electrons, full_well, inplace=True)
    del full_well
    return electrons_to_raw(electrons, detector, rng, bias_drift_adu=bias_drift_adu)
