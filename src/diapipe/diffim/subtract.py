"""Alard–Lupton image subtraction on arrays: the entry point `subtract_images`.

Steps (ip_diffim ``AlardLuptonSubtractTask`` as the reference):

1. Non-finite pixels of either input are set NO_DATA and filled (0 in the image,
   the median in the variance) so they cannot leak NaN into convolutions; they are
   excluded from kernel stamps and statistics.
2. Variance rescaling of both inputs: the variance plane is multiplied by the ratio
   of the measured pixel noise (robust, on unmasked source-free background) to the
   predicted one.
3. Mode: ``convolveTemplate`` (default), ``convolveScience``, or ``auto`` (convolve
   the template unless it is wider than the science PSF in both x and y). On real
   single-visit noise ``convolveScience`` fits a kernel broadened by the science
   image's own noise (errors in variables): on ci_imsim visit 1547789 the matched
   science stars came out 8 % wider than the template's (star residual 7.7 % rms
   of the flux, against 1.8 % for ``convolveTemplate`` and 0.6 % with
   ``debias_kernel_fit``), which is why diapipe keeps ``convolveTemplate`` and
   detects on a preconvolved score when the science is the sharper image.
4. Basis from the two PSF widths (`diapipe.diffim.basis`), kernel sources selected
   from the source table, spatially varying kernel + background fitted
   (`diapipe.diffim.kernel_fit`), convolution of the whole image
   (`diapipe.diffim.convolve`).
5. Difference ``science - template * κ - bg`` (convolveTemplate) or
   ``(science * κ + bg - template) / Σκ`` (convolveScience), always on the
   science photometric scale, then decorrelation (`diapipe.diffim.decorrelate`).

This module has no preconvolution (score-image) path; for a science image sharper
than the template, `diapipe.diffim.preconvolve` builds the score detection runs on
while this difference is still the one measured.

Output conventions: pixels flagged NO_DATA (unusable input, or within half a
kernel of the border, which is also EDGE) hold NaN in the difference image and
variance — flagged, never silent — and every other pixel is finite. Template SAT
becomes SAT_TEMPLATE on the difference.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter, zoom

from ..exposure import masks
from ..exposure.psf import PixelPsf
from .basis import basis_for_psfs
from .convolve import convolve_with_solution
from .decorrelate import decorrelate_difference
from .kernel_fit import STAMP_BAD_PLANES, KernelSolution, fit_psf_matching_kernel, select_kernel_sources

__all__ = [
    "SubtractionResult",
    "choose_convolve_template",
    "photometric_scale_correction",
    "subtract_images",
    "variance_rescale_factor",
]

#: Planes excluded from noise statistics.
STATS_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP", "SUSPECT", "DETECTED", "SAT_TEMPLATE")
#: Template planes carried to the difference (SAT is renamed SAT_TEMPLATE).
TEMPLATE_PLANES = ("BAD", "INTRP", "CR", "EDGE", "SUSPECT", "NO_DATA", "STREAK")


@dataclass
class SubtractionResult:
    """Output of `subtract_images`.

    Attributes
    ----------
    difference_image, difference_variance, difference_mask : `numpy.ndarray`
        Decorrelated difference on the science photometric scale.
    difference_psf : `PixelPsf`
        PSF of the difference (the target image's PSF, decorrelated).
    matched_image, matched_variance, matched_mask : `numpy.ndarray`
        The convolved input: matched template (convolveTemplate) or matched science
        (convolveScience, divided by the kernel sum to keep the science scale).
    kernel_solution : `KernelSolution`
        Kernel and background, mapping the convolved input onto the other one.
    kernel_fit : `KernelFitResult`
        Per-stamp diagnostics.
    metadata : `dict`
        ``mode``, ``kernel_size``, ``n_stamps_used``, ``n_stamps_rejected``,
        ``scale_factor`` (science/template flux ratio), ``kernel_sum``,
        ``science_variance_scale``, ``template_variance_scale``, PSF sigmas, timing
        (``time_fit_s``, ``time_total_s``, and ``time_steps_s``: a dict of wall seconds per
        step, which task metadata skips as it is not a scalar).
    """

    difference_image: np.ndarray
    difference_variance: np.ndarray
    difference_mask: np.ndarray
    difference_psf: PixelPsf
    matched_image: np.ndarray
    matched_variance: np.ndarray
    matched_mask: np.ndarray
    kernel_solution: KernelSolution
    kernel_fit: object
    metadata: dict = field(default_factory=dict)


def _robust_std(values: np.ndarray) -> float:
    q25, q75 = np.percentile(values, [25.0, 75.0])
    return float((q75 - q25) / 1.3489795)


def _tile_slices(shape, tile: int, n_max: int = 3):
    ny, nx = shape
    if ny <= 2 * tile and nx <= 2 * tile:
        return [(slice(0, ny), slice(0, nx))]
    ys = np.linspace(0, max(ny - tile, 0), min(n_max, max(1, ny // tile))).astype(int)
    xs = np.linspace(0, max(nx - tile, 0), min(n_max, max(1, nx // tile))).astype(int)
    return [(slice(y, y + tile), slice(x, x + tile)) for y in ys for x in xs]


def variance_rescale_factor(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    *,
    bad_planes=STATS_BAD_PLANES,
    background_cell: int = 64,
    detect_sigma: float = 4.0,
    grow_pix: int = 4,
    tile: int = 256,
) -> float:
    """Ratio of the measured to the predicted pixel variance on source-free background.

    The image is normalised by ``sqrt(variance)``, a coarse background (medians in
    ``background_cell`` cells) is removed, sources are found on a lightly smoothed
    copy at ``detect_sigma`` and masked with a ``grow_pix`` margin, and the robust
    (inter-quartile) variance of the remaining pixels is the factor. Large images
    are sampled in up to 3x3 tiles of ``tile`` px (~0.6 Mpx: the variance ratio to
    ~0.3%, at a fraction of the cost of the whole image).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(0.0, 2.0, (256, 256))
    >>> round(variance_rescale_factor(img, np.ones_like(img), np.zeros(img.shape, np.int32)), 1)
    4.0
    """
    values = []
    bad_bits = masks.bits(bad_planes)
    for sy, sx in _tile_slices(image.shape, tile):
        img = image[sy, sx]
        var = variance[sy, sx]
        good = ((mask[sy, sx] & bad_bits) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
        if good.sum() < 100:
            continue
        norm = np.where(good, img / np.sqrt(np.where(good, var, 1.0)), 0.0).astype(np.float64)
        ny, nx = norm.shape
        cy, cx = max(1, ny // background_cell), max(1, nx // background_cell)
        cells = np.full((cy, cx), np.nan)
        for i in range(cy):
            for j in range(cx):
                block = norm[i * ny // cy : (i + 1) * ny // cy, j * nx // cx : (j + 1) * nx // cx]
                gblock = good[i * ny // cy : (i + 1) * ny // cy, j * nx // cx : (j + 1) * nx // cx]
                if gblock.sum() > 10:
                    cells[i, j] = np.median(block[gblock])
        if np.all(np.isnan(cells)):
            continue
        cells = np.where(np.isnan(cells), np.nanmedian(cells), cells)
        bg = zoom(cells, (ny / cy, nx / cx), order=1, mode="nearest", grid_mode=True)[:ny, :nx]
        resid = np.where(good, norm - bg, 0.0)
        smooth = gaussian_filter(resid, 1.0)
        noise = _robust_std(smooth[good])
        sources = binary_dilation(np.abs(smooth) > detect_sigma * noise, iterations=grow_pix)
        keep = good & ~sources
        if keep.sum() >= 100:
            values.append(resid[keep])
    if not values:
        raise ValueError("variance_rescale_factor: too few unmasked background pixels to measure the noise")
    return _robust_std(np.concatenate(values)) ** 2


def _moments_sigma_xy(psf: PixelPsf) -> tuple[float, float]:
    ixx, iyy, _ = psf.moments()
    return float(np.sqrt(ixx)), float(np.sqrt(iyy))


def choose_convolve_template(science_psf: PixelPsf, template_psf: PixelPsf) -> bool:
    """`auto` mode: convolve the template unless it is wider than the science PSF in both x and y.

    (ip_diffim today: "template not wider than science in x or y → convolve template".)
    """
    sx, sy = _moments_sigma_xy(science_psf)
    tx, ty = _moments_sigma_xy(template_psf)
    return bool(tx <= sx or ty <= sy)


def photometric_scale_correction(
    target: np.ndarray,
    target_variance: np.ndarray,
    matched: np.ndarray,
    matched_variance: np.ndarray,
    mask: np.ndarray,
    psf: PixelPsf,
    x,
    y,
    *,
    min_snr: float = 20.0,
    clip_sigma: float = 3.0,
    min_stars: int = 5,
    bad_planes=STAMP_BAD_PLANES,
) -> tuple[float, float, int]:
    """Factor ``f`` by which the PSF-matched image must be multiplied to match the target's flux scale.

    Both images now share the target PSF, so the ratio of their PSF fluxes at
    the same stars, measured with the same PSF model on the same pixels, is
    the photometric scaling left over by the kernel fit, free of PSF-model
    errors. ``f`` is the inverse-variance weighted mean of the per-star ratios
    (stars with target S/N >= ``min_snr``), iteratively clipped at
    ``clip_sigma`` (variables, residual neighbours). Why: the fitted kernel
    sum, a free parameter of a ~30-term kernel on a few dozen stamps, scatters
    by 11-18 % per stamp and missed the true science/template ratio by up to
    3.6 % on the test preset, leaving residuals at every bright star and
    biasing the difference flux of variables by that fraction of their mean
    flux. Its formal error is 0.3-0.8 %, but it is biased where the kernel left
    the PSF shapes unmatched (science PSF narrower than the template's), which is
    why `subtract_images` only applies it on request.

    Returns ``(f, f_err, n_used)``; ``(1.0, nan, n)`` when fewer than ``min_stars``
    stars qualify (the kernel sum is then kept).

    >>> psf = PixelPsf.gaussian(2.0, 21)
    >>> rng = np.random.default_rng(1)
    >>> img = np.zeros((120, 120)); xs = [30.0, 60.0, 90.0] * 3; ys = [30.0] * 3 + [60.0] * 3 + [90.0] * 3
    >>> for x, y in zip(xs, ys): img[int(y) - 10:int(y) + 11, int(x) - 10:int(x) + 11] += 5e4 * psf.compute_image(x, y)
    >>> f, err, n = photometric_scale_correction(img + rng.normal(0, 1, img.shape), np.ones(img.shape),
    ...     0.97 * img, np.ones(img.shape), np.zeros(img.shape, np.int32), psf, xs, ys)
    >>> round(f, 3), n
    (1.031, 9)
    """
    from ..measure.measurement import psf_flux

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size == 0:
        return 1.0, float("nan"), 0
    ft, et, _, _, trunc_t = psf_flux(target, target_variance, mask, psf, x, y, bad_planes=bad_planes)
    fm, em, _, _, trunc_m = psf_flux(matched, matched_variance, mask, psf, x, y, bad_planes=bad_planes)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ft / fm
        err = np.sqrt(et**2 + (ratio * em) ** 2) / np.abs(fm)
        ok = (np.isfinite(ratio) & np.isfinite(err) & (err > 0) & ~trunc_t & ~trunc_m
              & (ft / et >= min_snr) & (fm > 0))
    ratio, err = ratio[ok], err[ok]
    if ratio.size < min_stars:
        return 1.0, float("nan"), int(ratio.size)
    centre = float(np.median(ratio))
    mad = 1.4826 * float(np.median(np.abs(ratio - centre)))
    use = np.abs(ratio - centre) <= clip_sigma * np.sqrt(err**2 + mad**2)
    if use.sum() < min_stars:
        use = np.ones(ratio.size, bool)
    extra = 0.0
    for _ in range(5):
        # per-star scatter beyond the formal errors (matching residuals): an extra
        # variance term, so that a few very bright stars cannot set the scale alone
        extra = float(max(np.median((ratio[use] - centre) ** 2 - err[use] ** 2), 0.0))
        w = 1.0 / (err[use] ** 2 + extra)
        centre = float(np.sum(w * ratio[use]) / np.sum(w))
        new = np.abs(ratio - centre) <= clip_sigma * np.sqrt(err**2 + extra)
        if new.sum() < min_stars or np.array_equal(new, use):
            break
        use = new
    w = 1.0 / (err[use] ** 2 + extra)
    return centre, float(1.0 / np.sqrt(np.sum(w))), int(use.sum())


def _clean(image, variance, mask, name, *, copy: bool = True):
    """Working float32/int32 copies of one exposure's planes, unusable pixels set NO_DATA and filled.

    The variance is always a fresh array (callers rescale it in place). With
    ``copy=False`` the image and mask are the caller's own arrays when they already
    have the working dtype and need no filling: the caller must then only read them
    (`subtract_images` does; it saves two full-frame copies per exposure).
    """
    # float32 throughout (the inputs' precision): halves memory traffic and FFT cost
    image = np.array(image, dtype=np.float32, copy=True) if copy else np.asarray(image, dtype=np.float32)
    variance = np.array(variance, dtype=np.float32, copy=True)
    mask = np.array(mask, dtype=masks.MASK_DTYPE, copy=True) if copy else np.asarray(mask, dtype=masks.MASK_DTYPE)
    if not (image.shape == variance.shape == mask.shape):
        raise ValueError(f"{name}: image {image.shape}, variance {variance.shape}, mask {mask.shape} differ")
    # Three reductions prove the common case clean (a NaN or inf anywhere makes a sum
    # non-finite); only then are the per-pixel maps built.
    if np.isfinite(image.sum()) and np.isfinite(variance.sum()) and variance.size and variance.min() > 0:
        return image, variance, mask
    bad = ~np.isfinite(image) | ~np.isfinite(variance) | (variance <= 0)
    if bad.all():
        raise ValueError(f"{name}: no finite pixels with positive variance")
    if bad.any():
        if not copy:
            image, mask = image.copy(), mask.copy()
        masks.set_plane(mask, bad, "NO_DATA")
        image[bad] = 0.0
        variance[bad] = np.median(variance[~bad])
    return image, variance, mask


def subtract_images(
    science_image: np.ndarray,
    science_variance: np.ndarray,
    science_mask: np.ndarray,
    science_psf: PixelPsf,
    template_image: np.ndarray,
    template_variance: np.ndarray,
    template_mask: np.ndarray,
    template_psf: PixelPsf,
    sources,
    mode: str = "convolveTemplate",
    *,
    rescale_variance: bool = True,
    decorrelate: bool = True,
    spatial_kernel_order: int = 1,
    background_order: int = 2,
    max_kernel_sources: int = 250,
    min_kernel_sources: int = 3,
    kernel_sn_range=(10.0, 500.0),
    max_median_chi2: float = 4.0,
    exact_variance: bool = False,
    kernel_isolation_fwhm: float = 1.0,
    isolation_radius_pix: float | None = None,
    rescale_photometry: bool = False,
    max_photometric_correction: float = 0.1,
    debias_kernel_fit: bool = False,
) -> SubtractionResult:
    """Alard–Lupton PSF-matched difference of two registered images.

    Parameters
    ----------
    science_image, science_variance, science_mask : `numpy.ndarray`
        Science exposure planes (image units, e.g. electrons or nJy; int32 mask).
    science_psf : `PixelPsf`
    template_image, template_variance, template_mask : `numpy.ndarray`
        Template already resampled onto the science pixel grid (same shape).
    template_psf : `PixelPsf`
    sources : `astropy.table.Table`
        Sources on the science image: ``x``, ``y``, ``psfFlux``, ``psfFluxErr``, ``flags``.
    mode : {'convolveTemplate', 'convolveScience', 'auto'}
    rescale_variance : `bool`
        Rescale both variance planes to the measured noise first.
    decorrelate : `bool`
        Apply the afterburner (recommended: makes a 5 sigma threshold mean 5 sigma).
    spatial_kernel_order, background_order : `int`
        Polynomial orders (ip_diffim AL: 1 and 2).
    max_kernel_sources, min_kernel_sources, kernel_sn_range
        Kernel source selection (ip_diffim: 1000, 3, S/N 10–500). diapipe caps the
        stamps at 250, spread over the image (`select_kernel_sources`): the fit
        cost is linear in the stamp count and 250 stamps constrain the ~80
        spatial coefficients of an order-1 kernel with a wide margin.
    max_median_chi2 : `float`
        Raise `BadPsfMatchError` when the median stamp chi²/dof exceeds it.
    kernel_isolation_fwhm : `float`
        Kernel sources need no other catalogue source within this many target-PSF FWHM.
    isolation_radius_pix : `float`, optional
        Override of that radius in pixels.
    rescale_photometry : `bool`
        Off by default (see below). (convolveTemplate mode) After the fit, correct the kernel's photometric scaling with the PSF-flux
        ratio of the kernel-source candidates on the matched pair
        (`photometric_scale_correction`); metadata ``kernel_sum_fitted``,
        ``photometric_correction``.
    debias_kernel_fit : `bool`
        Remove the convolved image's own noise from the kernel fit's normal equations
        (`diapipe.diffim.kernel_fit.debiased_solve`): least squares shrinks the kernel
        sum when the convolved image is noisy (errors in variables). Matters in
        convolveScience mode: on ci_imsim visit 914587 the science/template scale
        came out 1.034 without and 0.985 with it (convolveTemplate: 0.984).
    exact_variance : `bool`
        Propagate the matched image's variance through the exact spatially varying
        squared kernel (6 convolutions for order 1) or (default) the squared centre
        kernel rescaled by the local ``sum(kernel²)`` (1 convolution). This only sets
        ``matched_variance`` and, without decorrelation, the difference variance;
        the decorrelated variance comes from the unconvolved input planes.

    Returns
    -------
    SubtractionResult

    Raises
    ------
    TooFewKernelSourcesError
        Fewer than ``min_kernel_sources`` usable stamps (attributes ``n_found``, ``n_needed``).
    BadPsfMatchError
        The kernel cannot match the PSFs.
    ValueError
        Inconsistent shapes, an unknown mode, or inputs without usable pixels.
    """
    t0 = time.perf_counter()
    # Images and masks are only read below (every output is a new array): no copies
    # of inputs that are already float32 / int32 and clean.
    sci, sci_var, sci_mask = _clean(science_image, science_variance, science_mask, "science", copy=False)
    tmp, tmp_var, tmp_mask = _clean(template_image, template_variance, template_mask, "template", copy=False)
    t_clean = time.perf_counter()
    if sci.shape != tmp.shape:
        raise ValueError(f"science {sci.shape} and template {tmp.shape} must be on the same pixel grid")
    meta: dict = {}
    if rescale_variance:
        for name, img, var, msk in (("science", sci, sci_var, sci_mask), ("template", tmp, tmp_var, tmp_mask)):
            factor = variance_rescale_factor(img, var, msk)
            if not 0.1 < factor < 10.0:
                raise ValueError(f"{name}: variance rescale factor {factor:.3g} outside (0.1, 10); bad variance plane")
            var *= factor
            meta[f"{name}_variance_scale"] = factor
    t_rescale = time.perf_counter()
    if mode == "auto":
        convolve_template = choose_convolve_template(science_psf, template_psf)
    elif mode in ("convolveTemplate", "convolveScience"):
        convolve_template = mode == "convolveTemplate"
    else:
        raise ValueError(f"Unknown subtraction mode {mode!r}; use 'convolveTemplate', 'convolveScience' or 'auto'")
    meta["mode"] = "convolveTemplate" if convolve_template else "convolveScience"
    sigma_sci = science_psf.sigma()
    sigma_tmp = template_psf.sigma()
    meta["science_psf_sigma_pix"] = sigma_sci
    meta["template_psf_sigma_pix"] = sigma_tmp
    if convolve_template:
        src, src_var, src_mask = tmp, tmp_var, tmp_mask
        tgt, tgt_var, tgt_psf = sci, sci_var, science_psf
        sig_src, sig_tgt = sigma_tmp, sigma_sci
    else:
        src, src_var, src_mask = sci, sci_var, sci_mask
        tgt, tgt_var, tgt_psf = tmp, tmp_var, template_psf
        sig_src, sig_tgt = sigma_sci, sigma_tmp
    basis = basis_for_psfs(sig_src, sig_tgt)
    half_k = basis.size // 2
    meta["kernel_size"] = basis.size
    meta["basis_sigmas_pix"] = list(basis.sigmas_pix)
    # Fit box: kernel half-width plus 2 target-PSF sigmas, so that the wide zero-sum
    # basis images cannot trade flux with the box edge (this sets the precision of the
    # photometric scaling); the source stamp adds another kernel half-width.
    half_fit = half_k + int(np.ceil(2.0 * sig_tgt))
    combined_mask = sci_mask | tmp_mask
    # Kernel stamps: only the stamp's core must be unmasked and only its own PSF core
    # must be free of other sources; masked pixels and neighbours elsewhere in the
    # stamp get zero weight in the fit. (A whole-stamp isolation and mask requirement
    # keeps a handful of the ~200 sources of a dense field: a kernel fitted on 5-9
    # stamps mis-scales the template by up to 15%.)
    fwhm_tgt = 2.3548 * sig_tgt
    isolation = kernel_isolation_fwhm * fwhm_tgt if isolation_radius_pix is None else isolation_radius_pix
    indices = select_kernel_sources(
        sources,
        combined_mask,
        half_fit + half_k,
        sn_min=kernel_sn_range[0],
        sn_max=kernel_sn_range[1],
        isolation_radius_pix=isolation,
        max_sources=max_kernel_sources,
        min_sources=min_kernel_sources,
        mask_half_size=int(np.ceil(fwhm_tgt)),
    )
    if not (rescale_photometry and convolve_template):
        del combined_mask  # 64 MB at 4k x 4k: not held through the convolution
    width = np.sqrt(max(sig_tgt**2 - sig_src**2, 0.5**2))
    bad_bits = masks.bits(STAMP_BAD_PLANES)
    fit = fit_psf_matching_kernel(
        src,
        src_var,
        tgt,
        tgt_var,
        np.asarray(sources["x"], float)[indices],
        np.asarray(sources["y"], float)[indices],
        basis,
        fit_half_size=half_fit,
        neighbour_xy=np.column_stack([np.asarray(sources["x"], float), np.asarray(sources["y"], float)]),
        neighbour_radius_pix=max(3.0, 3.0 * sig_tgt),
        spatial_order=spatial_kernel_order,
        background_order=background_order,
        min_stamps=min_kernel_sources,
        max_median_chi2=max_median_chi2,
        expected_kernel_sq_sum=1.0 / (4.0 * np.pi * width**2),
        source_bad=src_mask,
        target_bad=sci_mask if convolve_template else tmp_mask,
        bad_bits=bad_bits,
        debias_source_noise=debias_kernel_fit,
    )
    solution = fit.solution
    meta.update({k: fit.metadata[k] for k in ("n_stamps_used", "n_stamps_rejected", "median_chi2_per_dof")})
    meta["n_kernel_candidates"] = len(indices)
    t_fit = time.perf_counter()

    matched, matched_var, matched_mask = convolve_with_solution(
        src, src_var, src_mask, solution, exact_variance=exact_variance
    )
    t_convolve = time.perf_counter()
    meta["kernel_sum_fitted"] = float(solution.kernel_sum())
    if rescale_photometry and convolve_template:
        # (convolveScience is left alone: there the target is the template, whose coadd PSF
        # model is the less accurate one; on the synthetic pair of tests/diffim the correction
        # moved an exact kernel sum by 0.3 %.)
        # Photometric scaling from PSF fluxes on the matched pair (see photometric_scale_correction).
        xs = np.asarray(sources["x"], float)[indices]
        ys = np.asarray(sources["y"], float)[indices]
        factor, factor_err, n_phot = photometric_scale_correction(
            tgt, tgt_var, matched, matched_var, combined_mask | matched_mask, tgt_psf, xs, ys)
        # A large ratio is not a scale error but a PSF-shape mismatch the kernel could not
        # remove (a failed deconvolution: the matched template broader than the science
        # PSF model used for both fluxes, seen at +33 % on one test-preset visit, while true
        # kernel-sum errors were within 4 %): then the fitted kernel sum is kept.
        meta["photometric_correction_applied"] = bool(abs(factor - 1.0) <= max_photometric_correction)
        if not meta["photometric_correction_applied"]:
            factor = 1.0
        meta["photometric_correction"] = factor
        meta["photometric_correction_err"] = factor_err
        meta["n_photometric_stars"] = n_phot
        if factor != 1.0:
            matched *= np.float32(factor)
            matched_var *= np.float32(factor**2)
            solution = dataclasses.replace(solution, kernel_coeffs=solution.kernel_coeffs * factor,
                                           background_coeffs=solution.background_coeffs * factor)
    kernel_centre = solution.kernel_image()
    ksum = float(kernel_centre.sum())
    meta["kernel_sum"] = ksum
    # Template planes that travel to the difference: SAT -> SAT_TEMPLATE. (Whole-frame
    # integer operations only: boolean fancy indexing of a 4k x 4k frame costs ~50 ms a time.)
    if convolve_template:
        tmpl_planes, diff_mask = matched_mask, sci_mask.copy()
        raw_difference = np.subtract(sci, matched)
    else:
        tmpl_planes, diff_mask = tmp_mask, matched_mask.copy()
        raw_difference = np.subtract(matched, tmp)
    carry = tmpl_planes & masks.MASK_DTYPE(masks.bits(TEMPLATE_PLANES))
    diff_mask |= carry
    np.bitwise_and(tmpl_planes, masks.MASK_DTYPE(masks.bit("SAT")), out=carry)
    np.left_shift(carry, masks.MASK_PLANES["SAT_TEMPLATE"] - masks.MASK_PLANES["SAT"], out=carry)
    diff_mask |= carry
    del carry
    # The convolution border (EDGE on the matched image) saw zero padding: no data there.
    border_bits = masks.MASK_DTYPE(masks.bits(("NO_DATA", "EDGE")))
    for edge in (np.s_[:half_k], np.s_[-half_k:], np.s_[half_k:-half_k, :half_k], np.s_[half_k:-half_k, -half_k:]):
        diff_mask[edge] |= border_bits
    no_data = masks.any_set(diff_mask, "NO_DATA")
    np.copyto(raw_difference, 0.0, where=no_data)
    stats_good = (diff_mask & masks.MASK_DTYPE(masks.bits(STATS_BAD_PLANES))) == 0
    t_difference = time.perf_counter()
    if decorrelate:
        dec = decorrelate_difference(
            raw_difference,
            tgt_var,
            src_var,
            kernel_centre,
            psf=tgt_psf,
            good=stats_good if stats_good.any() else None,
        )
        difference, diff_var, diff_psf = dec.image, dec.variance, dec.psf
        meta["decorrelation_weight_unconvolved"] = dec.correction.weight_unconvolved
        meta["decorrelation_weight_convolved"] = dec.correction.weight_convolved
    else:
        difference, diff_var, diff_psf = raw_difference, tgt_var + matched_var, tgt_psf
    t_decorrelate = time.perf_counter()
    if convolve_template:
        meta["scale_factor"] = ksum
    else:
        # every one of these is a fresh array of this call: scaled in place
        difference /= ksum
        diff_var /= ksum**2
        matched /= ksum
        matched_var /= ksum**2
        meta["scale_factor"] = 1.0 / ksum
    np.copyto(difference, np.nan, where=no_data)
    np.copyto(diff_var, np.nan, where=no_data)
    meta["time_fit_s"] = t_fit - t0
    meta["time_steps_s"] = {"clean": t_clean - t0, "rescale_variance": t_rescale - t_clean, "fit": t_fit - t_rescale,
                            "convolve": t_convolve - t_fit, "difference_mask": t_difference - t_convolve,
                            "decorrelate": t_decorrelate - t_difference}
    meta["time_total_s"] = time.perf_counter() - t0
    return SubtractionResult(
        difference_image=difference,
        difference_variance=diff_var,
        difference_mask=diff_mask,
        difference_psf=diff_psf,
        matched_image=matched,
        matched_variance=matched_var,
        matched_mask=matched_mask,
        kernel_solution=solution,
        kernel_fit=fit,
        metadata=meta,
    )

