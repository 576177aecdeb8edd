"""Stacking warps on a common patch grid into a coadd (the core of assembleCoadd).

Steps (`assemble_coadd`):

1. **Usable pixels** of each input: finite, positive finite variance, and none
   of ``bad_mask_planes`` set (default NO_DATA, BAD, SAT, CLIPPED).
2. **Weights**: one per input, :math:`w_i = 1 / \\langle V_i \\rangle` (mean
   variance over its usable pixels), unless given.
3. **Outlier rejection**, one of

   - ``"compare_warp"`` (default; the idea of Rubin's CompareWarpAssembleCoadd):
     each input is compared with a robust reference (the per-pixel median of
     all inputs). To keep PSF differences from looking like outliers, every
     input is first convolved to one common PSF, the widest input's broadened
     by a 1 px Gaussian (`psf_matching_kernels`: Fourier-ratio kernels from
     the PSF models; a Gaussian approximation leaves 6-17 % of the peak at
     star cores for real PSFs). Pixels deviating by more than ``nsigma`` times the robust
     rms of the difference (plus ``ref_fraction`` of the reference, for
     imperfect PSF matching on bright stars) are outliers; they are grouped
     into connected footprints per input. A footprint is an *artifact*
     (transient, satellite trail, cosmic ray, ghost) when at least
     ``spatial_threshold`` of its pixels are outliers in no more than
     ``max_epochs`` inputs; Rubin's rule ``min(0.4 N, 2 + 0.03 N)`` is the
     default. Artifact footprints, grown by ``grow_pix``, are masked CLIPPED in
     that input only. Things present in most epochs (stars, galaxies,
     persistent variables) are kept.
   - ``"sigma_clip"``: per-pixel iterative clipping of inputs deviating from
     the weighted mean by more than ``nsigma`` of their own noise.
   - ``"none"``.

4. **Weighted mean** over the remaining inputs,
   :math:`C = \\sum w_i I_i / \\sum w_i`, variance
   :math:`\\sum w_i^2 V_i / (\\sum w_i)^2`; ``n_image`` counts the inputs used;
   pixels with none are NO_DATA (image NaN, variance +inf).
5. **Mask**: a plane is set where the inputs carrying it hold more than its
   threshold of the weight at the pixel (Rubin's maskPropagationThresholds):
   ``mask_propagation_thresholds`` for the rejected planes (default SAT 0.1,
   BAD and CR 0.5), ``mask_propagation_threshold`` (0.5) of the used weight for
   the others. A plain OR of the input masks would turn every input's bad
   columns and cosmic rays, warped, into diagonal bands over the template that
   spread into every difference image and flag DiaSources, although the coadd
   pixels there are fine (the other inputs cover them). CR pixels of an input
   are left out of the mean (interpolated values do not enter the template).
   CLIPPED where any input was clipped.
6. **PSF**: the weight-averaged input PSFs (Rubin's CoaddPsf idea) as a
   `PixelPsf`: with constant inputs, the weighted mean kernel (weights times
   each input's usable-area fraction); otherwise fit over the patch on a grid,
   each grid point averaging only the inputs that cover it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from diapipe.exposure.masks import MASK_DTYPE, MASK_PLANES, bit, bits
from diapipe.exposure.psf import PixelPsf, polynomial_terms

__all__ = ["assemble_coadd", "CoaddResult", "find_artifacts", "input_weights", "coadd_psf", "coadd_aperture_correction",
           "max_artifact_epochs"]

DEFAULT_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "CLIPPED")
#: Weight fraction above which a rejected plane is set in the coadd (Rubin: SAT 0.1).
DEFAULT_MASK_PROPAGATION_THRESHOLDS = {"SAT": 0.1, "BAD": 0.5, "CR": 0.5}


class CoaddResult(NamedTuple):
    """What `assemble_coadd` returns (unpacks as a tuple)."""

    coadd: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    n_image: np.ndarray
    psf: PixelPsf | None
    aperture_correction: object | None


def _usable(image, variance, mask, bad_planes) -> np.ndarray:
    return (
        np.isfinite(image)
        & np.isfinite(variance)
        & (variance > 0)
        & ((mask & bits(list(bad_planes))) == 0 if bad_planes else True)
    )


def input_weights(variances, usable) -> np.ndarray:
    """Per-input weights ``1 / mean(variance)`` over usable pixels (0 for an input with none)."""
    out = np.zeros(len(variances))
    for i, (var, good) in enumerate(zip(variances, usable, strict=True)):
        if good.any():
            out[i] = 1.0 / float(np.mean(var[good], dtype=np.float64))
    return out


def max_artifact_epochs(
    n_inputs: int, low_fraction: float = 0.4, max_num: int = 2, high_fraction: float = 0.03
) -> int:
    """Most epochs an outlier may appear in and still be called an artifact (Rubin's rule).

    ``int(min(low_fraction * N, max_num + high_fraction * N))``, at least 1.
    """
    return max(1, int(min(low_fraction * n_inputs, max_num + high_fraction * n_inputs)))


def psf_matching_kernels(psf_kernels, *, broaden_sigma: float = 1.0, regularization: float = 1e-4):
    """Kernels that bring every input PSF to one common, slightly wider PSF.

    The target is the widest input PSF (by second moments) convolved with a Gaussian of
    ``broaden_sigma`` pixels, so that every ratio of Fourier transforms ``T / P_i`` is
    well behaved; each kernel is that ratio, Tikhonov-regularised (``regularization``
    times the peak power of ``P_i``), cropped to the input kernel size and normalised
    to sum 1. Real PSFs are not Gaussian: Gaussian smoothing to the widest width left
    6-17 % of the peak at bright star cores on ci_imsim, which flagged the cores of
    the sharper epochs as artifacts and clipped them; these kernels leave <= 1.2 %.

    Parameters
    ----------
    psf_kernels : sequence of 2-D arrays
        Input PSF images (odd sizes, centred), e.g. ``PixelPsf.compute_kernel_image`` at
        the middle of the patch.

    Returns
    -------
    kernels : `list` of 2-D arrays
        Matching kernels (input PSF convolved with its kernel ≈ target).
    residuals : `numpy.ndarray`
        ``max |P_i * K_i - T| / max T`` of each input: how well its stars can match.
    """
    from scipy import fft
    from scipy.signal import fftconvolve

    size = max(np.shape(k)[0] for k in psf_kernels)
    size += 1 - size % 2
    big = 2 * size + 1
    padded = []
    for k in psf_kernels:
        k = np.asarray(k, float)
        pad = (big - k.shape[0]) // 2
        padded.append(np.pad(k / k.sum(), pad))
    widths = [_second_moment_size(p) for p in padded]
    target = ndimage.gaussian_filter(padded[int(np.argmax(widths))], broaden_sigma, mode="constant")
    target_ft = fft.rfft2(fft.ifftshift(target))
    c, h = big // 2, size // 2
    kernels, residuals = [], []
    for p in padded:
        p_ft = fft.rfft2(fft.ifftshift(p))
        power = np.abs(p_ft) ** 2
        k = fft.fftshift(fft.irfft2(target_ft * np.conj(p_ft) / (power + regularization * power.max()), s=(big, big)))
        k = k[c - h : c + h + 1, c - h : c + h + 1]
        k /= k.sum()
        kernels.append(k)
        residuals.append(float(np.abs(fftconvolve(p, k, mode="same") - target).max() / target.max()))
    return kernels, np.array(residuals)


def _second_moment_size(kernel: np.ndarray) -> float:
    """Trace of the second-moment matrix of a centred kernel (pixels²)."""
    n = kernel.shape[0]
    y, x = np.mgrid[:n, :n] - n // 2
    return float(((x**2 + y**2) * kernel).sum() / kernel.sum())


def _psf_match(image, usable, kernel):
    """Convolve with a matching kernel; unusable pixels are filled (normalised convolution)."""
    from scipy.signal import oaconvolve

    filled = np.where(usable, image, 0.0)
    num = oaconvolve(filled, kernel, mode="same")
    den = oaconvolve(usable.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0.5, num / den, 0.0), den


def find_artifacts(
    images,
    usable,
    psf_kernels,
    *,
    nsigma: float = 5.0,
    ref_fraction: float = 0.05,
    max_epochs: int | None = None,
    spatial_threshold: float = 0.5,
    grow_pix: int = 2,
) -> list[np.ndarray]:
    """CompareWarp-style artifact detection; returns one boolean "clip" map per input.

    Parameters
    ----------
    images : sequence of (ny, nx) arrays
        Inputs on the common grid.
    usable : sequence of boolean arrays
        Pixels of each input that may be used.
    psf_kernels : sequence of 2-D arrays
        PSF image of each input (at the middle of the grid), for matching
        (`psf_matching_kernels`).
    nsigma : `float`
        Outlier threshold in units of the robust rms of (input - reference).
    ref_fraction : `float`
        Extra tolerance, a fraction of |reference|, for bright-star PSF mismatch
        (PSF variation over the grid, imperfect models); each input's own matching
        residual (`psf_matching_kernels`) is added to it.
    max_epochs : `int`, optional
        Outliers seen in at most this many inputs are artifacts (default
        `max_artifact_epochs`).
    spatial_threshold : `float`
        Fraction of a footprint's pixels that must be such rare outliers.
    grow_pix : `int`
        Clipped footprints are grown by this many pixels.
    """
    n = len(images)
    if max_epochs is None:
        max_epochs = max_artifact_epochs(n)
    kernels, residuals = psf_matching_kernels(psf_kernels)
    matched, cover = [], []
    for img, good, kernel in zip(images, usable, kernels, strict=True):
        m, c = _psf_match(np.asarray(img, float), good, kernel)
        matched.append(m)
        cover.append(c > 0.5)
    matched = np.array(matched)
    cover = np.array(cover)
    # pixels no input covers (outside every warp) are expected: their median is NaN, then 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(np.where(cover, matched, np.nan), axis=0)
    ref = np.where(np.isfinite(ref), ref, 0.0)
    outliers = np.zeros(matched.shape, bool)
    for i in range(n):
        diff = matched[i] - ref
        d = diff[cover[i]]
        if d.size < 10:
            continue
        rms = 1.4826 * np.median(np.abs(d - np.median(d)))
        outliers[i] = cover[i] & (np.abs(diff) > nsigma * rms + (ref_fraction + residuals[i]) * np.abs(ref))
    count = outliers.sum(axis=0)
    rare = (count >= 1) & (count <= max_epochs)
    structure = np.ones((3, 3), bool)
    clips = []
    for i in range(n):
        labels, n_fp = ndimage.label(outliers[i], structure=structure)
        clip = np.zeros(outliers[i].shape, bool)
        if n_fp:
            sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n_fp + 1))
            rare_sizes = ndimage.sum_labels(rare, labels, index=np.arange(1, n_fp + 1))
            keep = np.flatnonzero(rare_sizes >= spatial_threshold * sizes) + 1
            clip = np.isin(labels, keep)
            if grow_pix > 0 and clip.any():
                clip = ndimage.binary_dilation(clip, structure=structure, iterations=int(grow_pix))
        clips.append(clip & usable[i])
    return clips


def _sigma_clip(images, variances, usable, weights, nsigma: float, n_iter: int = 3) -> list[np.ndarray]:
    """Per-pixel clipping against a reference that starts as the median (robust to one
    bright outlier among few inputs) and then is the weighted mean of the kept inputs.
    Inputs are compared in units of their own noise. A pixel never loses all inputs.
    Note: with unmatched PSFs this also clips star cores of the sharpest/widest inputs."""
    usable = np.array(usable)
    imgs = np.array([np.where(u, im, np.nan) for im, u in zip(images, usable, strict=True)], float)
    sig = np.sqrt(np.array([np.where(u, v, np.inf) for v, u in zip(variances, usable, strict=True)], float))
    w = np.asarray(weights, float)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nanmedian(np.where(usable, imgs, np.nan), axis=0) if usable.any() else None
    keep = usable.copy()
    for _ in range(n_iter):
        with np.errstate(invalid="ignore", divide="ignore"):
            resid = np.abs(imgs - ref) / sig
        new_keep = usable & ~(resid > nsigma)
        lost = usable.any(axis=0) & ~new_keep.any(axis=0)
        new_keep[:, lost] = usable[:, lost]
        if (new_keep == keep).all():
            break
        keep = new_keep
        wk = w * keep
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = np.nansum(wk * np.where(keep, imgs, 0.0), axis=0) / wk.sum(axis=0)
    return [u & ~k for u, k in zip(usable, keep, strict=True)]


def _pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


def _covered_grid(weights, used, xy0, n_grid: int):
    """``(x, y, w)`` at an ``n_grid`` x ``n_grid`` grid over the coadd (parent coordinates):
    ``w`` the inputs' weights where they contributed there, 0 elsewhere; points no input
    covers are skipped."""
    ny, nx = used[0].shape
    for yy in np.linspace(0, ny - 1, n_grid):
        for xx in np.linspace(0, nx - 1, n_grid):
            iy, ix = int(round(yy)), int(round(xx))
            w = np.array([wi if u[iy, ix] else 0.0 for wi, u in zip(weights, used, strict=True)])
            if w.sum() > 0:
                yield xx + xy0[0], yy + xy0[1], w


def coadd_psf(psfs, weights, used, xy0=(0, 0), *, order: int | None = None, n_grid: int = 5) -> PixelPsf:
    """Weight-averaged PSF of a coadd as a `PixelPsf` over the coadd's pixel box.

    Parameters
    ----------
    psfs : sequence of `PixelPsf`
        Input (warp) PSFs in the coadd's parent pixel frame.
    weights : sequence of `float`
        Coadd weights of the inputs.
    used : sequence of boolean (ny, nx) arrays
        Where each input contributed to the coadd.
    xy0 : `tuple`
        Parent coordinate of coadd pixel [0, 0].
    order : `int`, optional
        Spatial order of the fit; default 0 if all inputs are constant, else the
        largest input order (at least 1).
    """
    ny, nx = used[0].shape
    bbox = (float(xy0[0]), float(xy0[1]), float(xy0[0] + nx - 1), float(xy0[1] + ny - 1))
    size = max(p.kernel_size for p in psfs)
    weights = np.asarray(weights, float)
    if order is None:
        order = 0 if all(p.order == 0 for p in psfs) else max(1, max(p.order for p in psfs))
    if order == 0:
        area = np.array([u.mean() for u in used])
        w = weights * area
        if w.sum() <= 0:
            raise ValueError("No input contributes to the coadd; cannot make its PSF")
        x_c, y_c = 0.5 * (bbox[0] + bbox[2]), 0.5 * (bbox[1] + bbox[3])
        kernel = sum(
            wi * _pad_kernel(p.compute_kernel_image(x_c, y_c), size) for wi, p in zip(w, psfs, strict=True)
        )
        return PixelPsf(kernel / kernel.sum(), 0, bbox)
    positions, kernels = [], []
    for px, py, w in _covered_grid(weights, used, xy0, n_grid):
        k = sum(
            wi * _pad_kernel(p.compute_kernel_image(px, py), size)
            for wi, p in zip(w, psfs, strict=True)
            if wi > 0
        )
        positions.append((px, py))
        kernels.append(k / k.sum())
    n_terms = (order + 1) * (order + 2) // 2
    if len(positions) < n_terms:
        raise ValueError(
            f"Only {len(positions)} covered grid points; need {n_terms} for a PSF of order {order}"
        )
    proto = PixelPsf(np.zeros((n_terms, size, size)), order, bbox)
    u, v = proto._normalised(np.array([p[0] for p in positions]), np.array([p[1] for p in positions]))
    design = polynomial_terms(u, v, order).T
    coeffs, *_ = np.linalg.lstsq(design, np.array(kernels).reshape(len(positions), -1), rcond=None)
    return PixelPsf(coeffs.reshape(n_terms, size, size), order, bbox)


def coadd_aperture_correction(corrections, weights, used, xy0=(0, 0), *, n_grid: int = 5):
    """Aperture correction of a coadd from its inputs' (Rubin's CoaddApCorrMap idea).

    A star's PSF flux on the coadd, measured with the weight-averaged PSF
    (`coadd_psf`), is about the weighted mean of its inputs' uncorrected PSF fluxes,
    ``F * sum(w_i / a_i) / sum(w_i)``; so the coadd's correction at a position is
    the weighted harmonic mean ``sum(w_i) / sum(w_i / a_i)`` over the inputs used
    there. It is evaluated on an ``n_grid``² grid and fit with the largest input
    order over the coadd's pixel box.

    Parameters
    ----------
    corrections : sequence of `diapipe.calibrate.ApertureCorrection`
        Each input's correction in the coadd's parent pixel frame.
    weights : sequence of `float`
        Coadd weights of the inputs.
    used : sequence of boolean (ny, nx) arrays
        Where each input contributed to the coadd.
    xy0 : `tuple`
        Parent coordinate of coadd pixel [0, 0].
    """
    from diapipe.calibrate.aperture_correction import ApertureCorrection

    ny, nx = used[0].shape
    bbox = (float(xy0[0]), float(xy0[1]), float(xy0[0] + nx - 1), float(xy0[1] + ny - 1))
    weights = np.asarray(weights, float)
    order = max(c.order for c in corrections)
    positions, values = [], []
    for px, py, w in _covered_grid(weights, used, xy0, max(int(n_grid), order + 1)):
        inverse = sum(wi / c.evaluate(px, py) for wi, c in zip(w, corrections, strict=True) if wi > 0)
        positions.append((px, py))
        values.append(w.sum() / inverse)
    n_terms = (order + 1) * (order + 2) // 2
    if len(positions) < n_terms:
        raise ValueError(f"Only {len(positions)} covered grid points; need {n_terms} for an aperture "
                         f"correction of order {order}")
    px, py = np.array(positions).T
    err = float(np.sqrt(np.sum((weights / weights.sum()) ** 2 * np.array([c.err for c in corrections]) ** 2)))
    return ApertureCorrection.fit_values(px, py, values, order, bbox, err=err)


def assemble_coadd(
    images,
    variances,
    masks,
    weights=None,
    psfs=None,
    *,
    rejection: str = "compare_warp",
    nsigma: float = 5.0,
    bad_mask_planes=DEFAULT_BAD_PLANES,
    mask_propagation_threshold: float = 0.5,
    mask_propagation_thresholds: dict | None = None,
    xy0=(0, 0),
    psf_order: int | None = None,
    artifact_kwargs: dict | None = None,
    aperture_corrections=None,
) -> CoaddResult:
    """Stack warps on a common grid into a coadd (see the module docstring).

    Parameters
    ----------
    images, variances : sequence of (ny, nx) arrays
        Warps (nJy per pixel) and variances on the same grid.
    masks : sequence of int32 (ny, nx) arrays
        Warp masks.
    weights : sequence of `float`, optional
        Input weights; default ``1 / mean variance`` of each input.
    psfs : sequence of `PixelPsf`, optional
        Warp PSFs (needed for ``compare_warp`` and for the coadd PSF).
    rejection : {"compare_warp", "sigma_clip", "none"}
        Outlier rejection method.
    nsigma : `float`
        Threshold of the rejection.
    bad_mask_planes : sequence of `str`
        Planes that exclude an input pixel.
    mask_propagation_threshold : `float`
        Fraction of the used weight above which a (not rejected) plane of the inputs
        is set in the coadd mask.
    mask_propagation_thresholds : `dict`, optional
        Plane name -> fraction of the covering weight above which a rejected plane is
        set (default `DEFAULT_MASK_PROPAGATION_THRESHOLDS`; rejected planes not listed
        are not propagated).
    xy0 : `tuple`
        Parent coordinate of pixel [0, 0] (for the PSF's bounding box).
    psf_order : `int`, optional
        Spatial order of the coadd PSF (see `coadd_psf`).
    artifact_kwargs : `dict`, optional
        Extra arguments of `find_artifacts`.
    aperture_corrections : sequence of `diapipe.calibrate.ApertureCorrection`, optional
        Each input's aperture correction in this parent frame (see
        `coadd_aperture_correction`).

    Returns
    -------
    `CoaddResult`, a named tuple of
    coadd, variance : `numpy.ndarray` float32
    mask : `numpy.ndarray` int32
    n_image : `numpy.ndarray` int32
        Number of inputs contributing per pixel.
    psf : `PixelPsf` or None
        Coadd PSF (None when ``psfs`` is None).
    aperture_correction : `diapipe.calibrate.ApertureCorrection` or None
        Coadd aperture correction (None when ``aperture_corrections`` is None).
    """
    n = len(images)
    if n == 0 or not (len(variances) == len(masks) == n):
        raise ValueError(
            f"Need equal, non-zero numbers of images ({n}), variances ({len(variances)}), "
            f"masks ({len(masks)})"
        )
    shape = np.shape(images[0])
    for i in range(n):
        if np.shape(images[i]) != shape or np.shape(variances[i]) != shape or np.shape(masks[i]) != shape:
            raise ValueError(
                f"Input {i} has shapes {np.shape(images[i])}/{np.shape(variances[i])}/"
                f"{np.shape(masks[i])}; expected {shape}"
            )
    if psfs is not None and len(psfs) != n:
        raise ValueError(f"Got {len(psfs)} PSFs for {n} inputs")
    usable = [
        _usable(np.asarray(im), np.asarray(v), np.asarray(m), bad_mask_planes)
        for im, v, m in zip(images, variances, masks, strict=True)
    ]
    if weights is None:
        weights = input_weights(variances, usable)
    weights = np.asarray(weights, float)
    if weights.shape != (n,) or (weights < 0).any():
        raise ValueError(f"weights must be {n} non-negative numbers, got {weights}")

    if rejection == "compare_warp":
        if psfs is None:
            raise ValueError("rejection='compare_warp' needs the input PSFs (psfs=...)")
        ny, nx = shape
        middle = (xy0[0] + 0.5 * (nx - 1), xy0[1] + 0.5 * (ny - 1))
        clips = find_artifacts(images, usable, [p.compute_kernel_image(*middle) for p in psfs], nsigma=nsigma,
                               **(artifact_kwargs or {}))
    elif rejection == "sigma_clip":
        clips = _sigma_clip(images, variances, usable, weights, nsigma)
    elif rejection == "none":
        clips = [np.zeros(shape, bool) for _ in range(n)]
    else:
        raise ValueError(f"Unknown rejection {rejection!r}; use 'compare_warp', 'sigma_clip' or 'none'")

    sum_w = np.zeros(shape)
    sum_wi = np.zeros(shape)
    sum_w2v = np.zeros(shape)
    n_image = np.zeros(shape, np.int32)
    out_mask = np.zeros(shape, MASK_DTYPE)
    covered_w = np.zeros(shape)
    thresholds = DEFAULT_MASK_PROPAGATION_THRESHOLDS if mask_propagation_thresholds is None else mask_propagation_thresholds
    rejected_w = {name: np.zeros(shape) for name in bad_mask_planes
                  if name not in ("NO_DATA", "CLIPPED") and name in thresholds}
    other_planes = [name for name in MASK_PLANES if name not in bad_mask_planes and name != "CLIPPED"]
    plane_w = {}
    any_clip = np.zeros(shape, bool)
    used = []
    for i in range(n):
        im, var, m = np.asarray(images[i]), np.asarray(variances[i]), np.asarray(masks[i])
        use = usable[i] & ~clips[i]
        used.append(use)
        any_clip |= clips[i]
        w = weights[i]
        sum_w += np.where(use, w, 0.0)
        sum_wi += np.where(use, w * np.where(use, im, 0.0), 0.0)
        sum_w2v += np.where(use, w * w * np.where(use, var, 0.0), 0.0)
        n_image += use
        for name in other_planes:
            has = use & ((m & bit(name)) != 0)
            if has.any():
                plane_w.setdefault(name, np.zeros(shape))[has] += w
        has_data = np.isfinite(im) & ((m & bit("NO_DATA")) == 0)
        covered_w += np.where(has_data, w, 0.0)
        for name, acc in rejected_w.items():
            acc += np.where(has_data & ((m & bit(name)) != 0), w, 0.0)

    with np.errstate(invalid="ignore", divide="ignore"):
        coadd = np.where(n_image > 0, sum_wi / sum_w, np.nan).astype(np.float32)
        variance = np.where(n_image > 0, sum_w2v / sum_w**2, np.inf).astype(np.float32)
        for name, acc in rejected_w.items():
            frac = np.where(covered_w > 0, acc / covered_w, 0.0)
            out_mask[frac > thresholds[name]] |= MASK_DTYPE(bit(name))
        for name, acc in plane_w.items():
            frac = np.where(sum_w > 0, acc / sum_w, 0.0)
            out_mask[frac > mask_propagation_threshold] |= MASK_DTYPE(bit(name))
    out_mask[any_clip] |= MASK_DTYPE(bit("CLIPPED"))
    out_mask[n_image == 0] |= MASK_DTYPE(bit("NO_DATA"))

    psf = None
    if psfs is not None:
        psf = coadd_psf(psfs, weights, used, xy0, order=psf_order)
    ap_corr = None
    if aperture_corrections is not None:
        if len(aperture_corrections) != n:
            raise ValueError(f"Got {len(aperture_corrections)} aperture corrections for {n} inputs")
        ap_corr = coadd_aperture_correction(aperture_corrections, weights, used, xy0)
    return CoaddResult(coadd, variance, out_mask, n_image, psf, ap_corr)
