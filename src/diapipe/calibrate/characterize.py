"""characterizeImage's science: background, bright sources, cosmic rays, PSF,
aperture correction — as one function on arrays.

The loop follows Rubin's CharacterizeImageTask: start from a Gaussian PSF
guess, subtract a background, repair cosmic rays, detect bright sources,
measure them, pick PSF stars, fit the PSF; then once more with the fitted PSF
(better CR rejection, better centroids, a background estimated without the
sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..errors import TooFewSourcesError
from ..exposure.masks import any_set
from ..exposure.psf import PixelPsf

__all__ = ["CharacterizeResult", "characterize_image", "GAUSSIAN_FWHM_PER_SIGMA"]

GAUSSIAN_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass
class CharacterizeResult:
    """Background-subtracted, CR-repaired image planes with their PSF and bright-source catalogue."""

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    background: object
    psf: PixelPsf
    catalog: Table
    aperture_correction: object | None
    stats: dict = field(default_factory=dict)


def characterize_image(
    image: np.ndarray,
    mask: np.ndarray,
    variance: np.ndarray,
    *,
    initial_fwhm_pix: float = 4.0,
    detection_threshold: float = 10.0,
    background_bin_size: int = 128,
    psf_kernel_size: int = 25,
    psf_order: int = 2,
    min_psf_stars: int = 8,
    n_iterations: int = 2,
    ap_corr_radius_pix: float = 12.0,
) -> CharacterizeResult:
    """Characterize one ISR-corrected image (electrons).

    Parameters
    ----------
    initial_fwhm_pix : `float`
        FWHM of the Gaussian PSF guess for the first pass (pixels).
    detection_threshold : `float`
        Bright-source threshold, in units of the PSF-smoothed noise.
    min_psf_stars : `int`
        Fewer usable stars raise `TooFewSourcesError`.

    Returns
    -------
    `CharacterizeResult`
    """
    from ..measure.background import estimate_background
    from ..measure.cosmic_rays import find_cosmic_rays, repair_cosmic_rays
    from ..measure.detection import detect_sources
    from ..measure.measurement import aperture_column, measure_sources
    from .aperture_correction import fit_aperture_correction
    from .psf_model import fit_psf, select_psf_stars

    image = np.array(image, dtype=np.float32)
    mask = np.array(mask, dtype=np.int32)
    variance = np.array(variance, dtype=np.float32)
    ny, nx = image.shape
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    raw = image.copy()
    psf = PixelPsf.gaussian(initial_fwhm_pix / GAUSSIAN_FWHM_PER_SIGMA, size=psf_kernel_size, bbox=bbox)
    n_cr = 0
    catalog = None
    for iteration in range(n_iterations):
        background = estimate_background(raw, mask, bin_size=background_bin_size)
        image = (raw - background.evaluate(raw.shape)).astype(np.float32)
        sigma = psf.sigma()
        cr = find_cosmic_rays(image, variance, mask, psf_kernel=psf.compute_kernel_image(nx / 2, ny / 2))
        n_cr = int(repair_cosmic_rays(image, mask, cr))
        # keep the repaired pixels in the un-subtracted copy too, for the next background pass
        raw = np.where(cr, image + background.evaluate(raw.shape), raw).astype(np.float32)
        footprints = detect_sources(image, variance, mask, sigma, detection_threshold, polarity="positive")
        catalog = measure_sources(image, variance, mask, psf, footprints)
        psf_stars = np.flatnonzero(select_psf_stars(catalog))
        if len(psf_stars) < min_psf_stars:
            raise TooFewSourcesError(
                f"only {len(psf_stars)} usable PSF stars (need {min_psf_stars}) among {len(catalog)} "
                f"detections above {detection_threshold} sigma",
                measured=len(psf_stars),
                threshold=min_psf_stars,
            )
        stars_xy = np.column_stack([catalog["centroid_x"][psf_stars], catalog["centroid_y"][psf_stars]])
        order = psf_order if len(psf_stars) >= 4 * (psf_order + 1) * (psf_order + 2) else 0
        psf = fit_psf(image, variance, mask, stars_xy, bbox, kernel_size=psf_kernel_size, order=order)
    # final measurement with the final PSF
    catalog = measure_sources(image, variance, mask, psf, footprints)
    used = np.asarray(select_psf_stars(catalog), dtype=bool)
    catalog["calib_psf_used"] = used
    ap_corr, ap_stats = None, {}
    ap_col = aperture_column(ap_corr_radius_pix)
    if ap_col in catalog.colnames and used.sum() >= 3:
        # a polynomial needs many stars per term to beat a constant
        n_used = int(used.sum())
        ap_order = 0 if n_used < 15 else (1 if n_used < 40 else 2)
        ap_corr, ap_stats = fit_aperture_correction(
            catalog["centroid_x"][used],
            catalog["centroid_y"][used],
            catalog[ap_col][used],
            catalog[aperture_column(ap_corr_radius_pix, err=True)][used],
            catalog["psfFlux"][used],
            catalog["psfFluxErr"][used],
            bbox=bbox,
            order=ap_order,
        )
    blank = ~any_set(mask, ["DETECTED", "BAD", "SAT", "NO_DATA", "EDGE"])
    stats = {
        "n_detections": int(len(catalog)),
        "n_psf_stars": int(used.sum()),
        "n_cosmic_ray_pixels": n_cr,
        "psf_sigma_pix": float(psf.sigma()),
        "psf_fwhm_pix": float(psf.fwhm()),
        "sky_level_e": float(np.median(background.evaluate(raw.shape))),
        "sky_noise_e": float(np.std(image[blank])) if blank.any() else float("nan"),
        "ap_corr_stats": {k: v for k, v in ap_stats.items() if np.isscalar(v)},
    }
    return CharacterizeResult(image, mask, variance, background, psf, catalog, ap_corr, stats)
