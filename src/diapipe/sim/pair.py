"""A template and a science image on one pixel grid, rendered from a sky catalogue:
difference imaging without a butler.

The AP quality figures come from whole simulated repositories (ISR, calibration,
warps, CompareWarp coadds), which cost minutes per 0.01 deg²; a spurious-DiaSource
density of 100 per deg² needs tenths of a square degree to be measured at all. This
renders just the two exposures the difference-imaging tasks take, directly on one
grid: a deep template (one PSF, the noise of ``n_coadd`` visits, in nJy like a
coadd) and one science visit (Poisson noise, in electrons with its `PhotoCalib`
like a calexp), each with its true PSF, plus a ``src``-like table of kernel
candidates. What it leaves out — ISR, astrometric and PSF-model errors, warping,
outlier rejection — is what the repository presets measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.table import Table

from ..exposure import masks
from ..exposure.exposure import Exposure, PhotoCalib
from .observing import Visit, njy_to_electrons
from .render import DetectorPsfModel, affine_pix_to_fp, psf_for_detector, render_detector
from .simulate import visit_info_for
from .sky import SkyCatalog

__all__ = ["DifferencePair", "render_difference_pair"]


@dataclass
class DifferencePair:
    """``template`` (nJy), ``science`` (electrons), ``sources`` (kernel candidates, a
    ``src``-like table) and ``truth`` (what the science visit drew)."""

    template: Exposure
    science: Exposure
    sources: Table
    truth: pd.DataFrame


def render_difference_pair(
    sky: SkyCatalog,
    template_visit: Visit,
    science_visit: Visit,
    wcs,
    shape,
    rng: np.random.Generator,
    *,
    n_coadd: int = 6,
    center_mm=(0.0, 0.0),
    detector: int = 0,
) -> DifferencePair:
    """Render ``sky`` through both visits' conditions onto the grid of ``wcs``.

    Parameters
    ----------
    sky : `SkyCatalog`
    template_visit, science_visit : `Visit`
        Conditions (PSF, sky, zero point) of the template and of the science image.
    wcs : `astropy.wcs.WCS`
        The common pixel grid (parent frame, 0-based; ``xy0`` is (0, 0)).
    shape : `tuple`
        (ny, nx).
    rng : `numpy.random.Generator`
        Noise.
    n_coadd : `int`
        The template's noise is that of the mean of this many template visits.
    center_mm : `tuple`
        Focal-plane position of the grid's centre: the PSF varies across it as on a
        detector there.
    detector : `int`
        Detector id written into both visit infos.
    """
    from ..instrument.camera import NOMINAL_GAIN, SATURATION_ADU

    full_well_e = SATURATION_ADU * NOMINAL_GAIN
    ny, nx = int(shape[0]), int(shape[1])
    pix_to_fp = affine_pix_to_fp(center_mm=center_mm, shape=(ny, nx))
    exposures = {}
    for name, visit in (("template", template_visit), ("science", science_visit)):
        psf_model = DetectorPsfModel(visit, pix_to_fp)
        rendered = render_detector(sky, visit, wcs, (ny, nx), psf_model, rng, include_noise=False)
        expected = rendered.image.astype(np.float64)
        mask = np.zeros((ny, nx), masks.MASK_DTYPE)
        masks.set_plane(mask, expected > full_well_e, "SAT")
        e_per_njy = njy_to_electrons(visit)
        if name == "template":
            # a mean of n_coadd visits: Gaussian noise of the expected counts / n_coadd, in nJy
            noise_var = expected / n_coadd
            image = (expected + rng.normal(size=expected.shape) * np.sqrt(noise_var) - rendered.sky_level_e) / e_per_njy
            variance = noise_var / e_per_njy**2
            calib = PhotoCalib(1.0)
        else:
            image = rng.poisson(expected).astype(np.float64) - rendered.sky_level_e
            variance = expected
            calib = PhotoCalib(1.0 / e_per_njy)
            truth = rendered.truth
        exposures[name] = Exposure(
            image.astype(np.float32), mask, variance.astype(np.float32), wcs=wcs,
            psf=psf_for_detector(psf_model, (ny, nx)), photo_calib=calib, visit_info=visit_info_for(visit, detector),
        )

    science = exposures["science"]
    drawn = truth[truth["drawn"].astype(bool)].reset_index(drop=True)
    flux_e = drawn["flux_e"].to_numpy(float)
    # PSF-flux error with the Gaussian noise-equivalent area 4 pi sigma²
    sigma = science.psf.sigma()
    flux_err_e = np.sqrt(flux_e + 4.0 * np.pi * sigma**2 * float(np.median(science.variance)))
    sources = Table({
        "centroid_x": drawn["x"].to_numpy(float),
        "centroid_y": drawn["y"].to_numpy(float),
        "psfFlux": drawn["flux_njy"].to_numpy(float),
        "psfFluxErr": flux_err_e / njy_to_electrons(science_visit),
        # galaxies are resolved: never kernel sources
        "flag_shape": (drawn["type"] != "star").to_numpy(),
        "flag_saturated": flux_e / (2.0 * np.pi * sigma**2) > full_well_e,  # peak above full well
    })
    return DifferencePair(exposures["template"], science, sources, drawn)
