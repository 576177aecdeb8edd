"""Preconvolution ("score image") subtraction for a science image sharper than its template.

When the science PSF is narrower than the template's, matching the template to
the science image needs a *deconvolving* kernel, which the Gaussian AL basis
represents poorly: on ci_imsim the four visits with science sigma 1.98-2.23 px
against a 2.34 px template carried ~80 % of the spurious DiaSources (point-like
residuals at galaxies and on blank sky, dipoles at stars). ip_diffim's
``AlardLuptonPreconvolveSubtractTask`` avoids the deconvolution:

1. the science image ``S`` is convolved with its own PSF ``P`` (the matched
   filter): ``S' = P * S`` has PSF ``P * P``, always wider than the template's;
2. an ordinary (broadening) AL kernel ``κ`` maps the template onto ``S'``;
3. ``D' = S' - κ * T`` is a score-like image: a point source of flux ``f``
   there is ``f (P * P)`` and its noise spectrum is ``σ_s² |P̂|² + σ_t² |κ̂|²``;
4. the score correction (ip_diffim ``DecorrelateALKernelTask.computeScoreCorrection``)

   .. math::

       \\phi(k) = \\sqrt{\\frac{\\sigma_s^2 + \\sigma_t^2 (\\sum\\kappa)^2}
                             {\\sigma_s^2 + \\sigma_t^2 |\\hat\\kappa(k)|^2 / |\\hat P(k)|^2}}

   turns that noise into ``(σ_s² + σ_t² (Σκ)²) |P̂|²``: white noise filtered by
   ``P``, i.e. the matched-filter image of a white-noise difference, whose pixel
   value divided by its pixel noise is the detection significance directly (no
   further smoothing). ``φ(0) = 1`` keeps the flux scale.

Detection then runs on this score (no smoothing) and measurement on the
ordinary difference image (ip_diffim ``DetectAndMeasureScoreTask``);
`score_from_difference` makes the equivalent score of an ordinary difference so
that a pipeline can treat every visit alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import fftconvolve

from ..exposure import masks
from ..exposure.psf import PixelPsf
from .convolve import fft_convolve_same
from .decorrelate import _pad_centred
from .subtract import STATS_BAD_PLANES, _clean, subtract_images, variance_rescale_factor

__all__ = [
    "ScoreResult",
    "convolve_psf",
    "preconvolved_score",
    "score_correction_kernel",
    "score_exposure",
    "score_from_difference",
    "should_preconvolve",
]


@dataclass
class ScoreResult:
    """A score image: pixel / sqrt(variance) is the point-source detection significance.

    Attributes
    ----------
    image, variance, mask : `numpy.ndarray`
        Score, its per-pixel variance, mask (NO_DATA pixels hold NaN).
    psf : `PixelPsf`
        Profile of a unit-flux point source in the score (``P * P * φ``).
    matched_image, matched_variance, matched_mask : `numpy.ndarray`
        ``κ * T`` (template matched to the preconvolved science), or None.
    metadata : `dict`
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    psf: PixelPsf
    matched_image: np.ndarray | None = None
    matched_variance: np.ndarray | None = None
    matched_mask: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)


def convolve_psf(psf: PixelPsf, kernel: np.ndarray) -> PixelPsf:
    """``psf`` convolved with a centred odd ``kernel`` (every spatial term), same stamp size."""
    basis = np.array([fftconvolve(term, kernel, mode="same") for term in psf.basis])
    return PixelPsf(basis, psf.order, psf.bbox)


def _psf_centre_image(psf: PixelPsf) -> np.ndarray:
    x0, y0, x1, y1 = psf.bbox
    img = np.asarray(psf.compute_kernel_image(0.5 * (x0 + x1), 0.5 * (y0 + y1)), float)
    return img / img.sum()


def score_correction_kernel(matching_kernel: np.ndarray, preconvolution_kernel: np.ndarray,
                            variance_science: float, variance_template: float,
                            *, half_size: int | None = None, floor: float = 1e-12) -> np.ndarray:
    """Real-space score correction ``φ`` (module docstring), centred, odd, summing to 1.

    ``|P̂|²`` is floored at ``floor`` where the PSF transform vanishes (there
    ``φ → 0``: the score has no power at those frequencies anyway).

    >>> import numpy as np
    >>> y, x = np.mgrid[-10:11, -10:11]
    >>> g = lambda s: np.exp(-0.5 * (x**2 + y**2) / s**2) / (2 * np.pi * s**2)
    >>> phi = score_correction_kernel(g(1.5), g(2.0), 1.0, 0.0)  # noiseless template: no correction
    >>> c = phi.shape[0] // 2
    >>> round(float(phi[c, c]), 3), round(float(phi.sum()), 3)
    (1.0, 1.0)
    """
    kappa = np.asarray(matching_kernel, float)
    pre = np.asarray(preconvolution_kernel, float)
    if not (variance_science > 0 and variance_template >= 0):
        raise ValueError(f"variances must be positive: science {variance_science}, template {variance_template}")
    half = kappa.shape[0] if half_size is None else int(half_size)
    n = 4 * max(half, kappa.shape[0], pre.shape[0]) + 2
    kft = np.fft.fft2(_pad_centred(kappa, (n, n)))
    pft = np.fft.fft2(_pad_centred(pre / pre.sum(), (n, n)))
    p2 = np.maximum(np.abs(pft) ** 2, floor)
    phi_ft = np.sqrt((variance_science + variance_template * kappa.sum() ** 2)
                     / (variance_science + variance_template * np.abs(kft) ** 2 / p2))
    phi = np.real(np.fft.ifft2(phi_ft))
    phi = np.roll(phi, (half, half), axis=(0, 1))[: 2 * half + 1, : 2 * half + 1]
    return phi / phi.sum()


def score_from_difference(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, psf: PixelPsf) -> ScoreResult:
    """The matched-filter score of an ordinary (white-noise) difference image.

    ``image`` is convolved with its PSF ``Ψ`` (unit sum) and the variance with
    ``Ψ²``; NaN (NO_DATA) pixels count as 0 and stay NaN. The score's PSF is
    ``Ψ * Ψ``. Equivalent to the Gaussian-filtered detection of
    `diapipe.measure.detection.detect_sources` with the true PSF profile.

    >>> import numpy as np
    >>> psf = PixelPsf.gaussian(2.0, 21)
    >>> img = np.zeros((64, 64), np.float32); img[22:43, 22:43] = 100.0 * psf.compute_kernel_image(0, 0)
    >>> s = score_from_difference(img, np.ones_like(img), np.zeros(img.shape, np.int32), psf)
    >>> round(float(s.image[32, 32] / np.sqrt(s.variance[32, 32])), 1)  # = 100 sqrt(sum psf^2)
    14.1
    """
    kern = _psf_centre_image(psf)
    bad = ~np.isfinite(image) | ~np.isfinite(variance)
    img = np.where(bad, 0.0, image).astype(np.float32)
    # unusable pixels: the median variance, so that the variance next to them is not biased low
    var = np.where(bad, np.nanmedian(np.where(bad, np.nan, variance)), variance).astype(np.float32)
    score, = fft_convolve_same(img, [kern])
    svar, = fft_convolve_same(var, [kern**2])
    score[bad] = np.nan
    svar[bad] = np.nan
    return ScoreResult(image=score, variance=np.maximum(svar, 0.0), mask=mask.copy(),
                       psf=convolve_psf(psf, kern), metadata={"score_kind": "filtered_difference"})


def preconvolved_score(
    science_image: np.ndarray,
    science_variance: np.ndarray,
    science_mask: np.ndarray,
    science_psf: PixelPsf,
    template_image: np.ndarray,
    template_variance: np.ndarray,
    template_mask: np.ndarray,
    template_psf: PixelPsf,
    sources,
    *,
    rescale_variance: bool = True,
    **fit_kwargs,
) -> ScoreResult:
    """Score image by preconvolution (module docstring); inputs as `subtract_images`.

    ``fit_kwargs`` pass to `subtract_images` (kernel orders, source selection,
    ``max_median_chi2``...). The science PSF at the image centre is the
    preconvolution kernel (ip_diffim's choice too; the PSF's spatial variation is
    kept in the score's PSF model). The kernel-source positions are the
    science catalogue's (preconvolution does not move centroids).
    """
    sci, sci_var, sci_mask = _clean(science_image, science_variance, science_mask, "science")
    tmp, tmp_var, tmp_mask = _clean(template_image, template_variance, template_mask, "template")
    meta: dict = {}
    if rescale_variance:
        for name, img, var, msk in (("science", sci, sci_var, sci_mask), ("template", tmp, tmp_var, tmp_mask)):
            factor = variance_rescale_factor(img, var, msk)
            if not 0.1 < factor < 10.0:
                raise ValueError(f"{name}: variance rescale factor {factor:.3g} outside (0.1, 10); bad variance plane")
            var *= factor
            meta[f"{name}_variance_scale"] = factor
    pre = _psf_centre_image(science_psf)
    half_p = pre.shape[0] // 2
    pre_sci, = fft_convolve_same(sci, [pre.astype(np.float32)])
    # per-pixel variance of the preconvolved science (fit weights and its own rescaling)
    pre_var, = fft_convolve_same(sci_var, [(pre**2).astype(np.float32)])
    pre_var = np.maximum(pre_var, np.float32(np.median(sci_var) * (pre**2).sum() * 1e-3))
    # a bad science pixel spreads over the preconvolution kernel
    from scipy.ndimage import binary_dilation

    spread = binary_dilation(masks.any_set(sci_mask, ("NO_DATA", "BAD", "SAT")), iterations=half_p)
    pre_mask = sci_mask.copy()
    masks.set_plane(pre_mask, spread & ~masks.any_set(sci_mask, "NO_DATA"), "SUSPECT")
    pre_psf = convolve_psf(science_psf, pre)
    result = subtract_images(pre_sci, pre_var, pre_mask, pre_psf, tmp, tmp_var, tmp_mask, template_psf, sources,
                             "convolveTemplate", rescale_variance=False, decorrelate=False, **fit_kwargs)
    kappa = result.kernel_solution.kernel_image()
    diff_mask = result.difference_mask
    good = ~masks.any_set(diff_mask, STATS_BAD_PLANES)
    if not good.any():
        good = ~masks.any_set(diff_mask, "NO_DATA")
    var_s = float(np.mean(sci_var[good]))
    var_t = float(np.mean(tmp_var[good]))
    phi = score_correction_kernel(kappa, pre, var_s, var_t)
    raw = np.where(np.isfinite(result.difference_image), result.difference_image, 0.0).astype(np.float32)
    score, = fft_convolve_same(raw, [phi.astype(np.float32)])
    # variance: V_s * (P*phi)^2 + V_t * (kappa*phi)^2, each plane convolved with its squared
    # effective kernel (not the pixel's own variance times the kernel's sum of squares): near a
    # bright star the score spreads the star's Poisson noise over the kernel, and a pixelwise
    # variance underestimates it there (spurious detections in the wings of bright variables).
    eff_s = fftconvolve(pre, phi)
    eff_t = fftconvolve(kappa, phi)
    w_s = float((eff_s**2).sum())
    w_t = float((eff_t**2).sum())
    v_s, = fft_convolve_same(sci_var, [(eff_s**2).astype(np.float32)])
    v_t, = fft_convolve_same(tmp_var, [(eff_t**2).astype(np.float32)])
    floor = np.float32(1e-3 * (np.median(sci_var) * w_s + np.median(tmp_var) * w_t))
    variance = np.maximum(v_s + v_t, floor).astype(np.float32)
    no_data = masks.any_set(diff_mask, "NO_DATA")
    score[no_data] = np.nan
    variance[no_data] = np.nan
    meta.update({k: v for k, v in result.metadata.items() if k not in ("science_variance_scale",
                                                                       "template_variance_scale")})
    meta.update({"mode": "preconvolve", "score_kind": "preconvolved", "preconvolution_sigma_pix": science_psf.sigma(),
                 "science_psf_sigma_pix": science_psf.sigma(), "score_weight_science": w_s,
                 "score_weight_template": w_t})
    return ScoreResult(image=score, variance=variance, mask=diff_mask, psf=convolve_psf(pre_psf, phi),
                       matched_image=result.matched_image, matched_variance=result.matched_variance,
                       matched_mask=result.matched_mask, metadata=meta)


def should_preconvolve(science_psf: PixelPsf, template_psf: PixelPsf, preconvolution: str,
                       min_width_pix: float) -> bool:
    """subtractImages' ``preconvolution`` choice for one visit.

    "always", "never", or "sharperScience": the science PSF is narrower than the
    template's in x and y (second moments) and the deconvolution the template
    would need, ``sqrt((tx² + ty² - sx² - sy²) / 2)``, is at least
    ``min_width_pix`` wide.
    """
    from .subtract import _moments_sigma_xy

    if preconvolution in ("always", "never"):
        return preconvolution == "always"
    if preconvolution != "sharperScience":
        raise ValueError(f"preconvolution must be never, sharperScience or always, got {preconvolution!r}")
    sx, sy = _moments_sigma_xy(science_psf)
    tx, ty = _moments_sigma_xy(template_psf)
    width = np.sqrt(max(tx**2 + ty**2 - sx**2 - sy**2, 0.0) / 2.0)
    return bool(sx < tx and sy < ty and width >= min_width_pix)


def score_exposure(science, template, to_e: float, sources, result, header: dict, preconvolution: str,
                   min_width_pix: float, *, rescale_variance: bool = True, **fit_kwargs):
    """The score as an `~diapipe.exposure.exposure.Exposure` (subtractImages' goodSeeingDiff_scoreExp).

    ``science`` and ``template`` are the subtraction's inputs (template times
    ``to_e`` is in science electrons), ``sources`` its kernel-source table,
    ``result`` its `diapipe.diffim.subtract.SubtractionResult` and ``header``
    its scalar metadata. Preconvolved (`preconvolved_score`) when
    `should_preconvolve`, else the PSF-filtered difference
    (`score_from_difference`); metadata ``SCORE`` holds the score's scalar
    metadata (``score_kind``) and ``DIFFIM`` the subtraction's.
    """
    from ..exposure.exposure import Exposure

    if should_preconvolve(science.psf, template.psf, preconvolution, min_width_pix):
        score = preconvolved_score(
            science.image, science.variance, science.mask, science.psf,
            template.image * to_e, template.variance * to_e**2, template.mask, template.psf, sources,
            rescale_variance=rescale_variance, **fit_kwargs,
        )
    else:
        score = score_from_difference(result.difference_image, result.difference_variance,
                                      result.difference_mask, result.difference_psf)
    meta = {k: v for k, v in score.metadata.items() if np.isscalar(v)}
    return Exposure(image=score.image, mask=score.mask, variance=score.variance, wcs=science.wcs,
                    psf=score.psf, photo_calib=science.photo_calib, visit_info=science.visit_info,
                    metadata={**science.metadata, "DIFFIM": header, "SCORE": meta}, xy0=science.xy0)
