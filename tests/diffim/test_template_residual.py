"""Detection noise from template brightness (`diapipe.diffim.template_residual`): the
template significance is the PSF-flux S/N and the factor is 1 on blank sky (its effect
on detection: ``test_dia_sources.test_template_residual_term_suppresses_ring_keeps_transient``)."""

from __future__ import annotations

import numpy as np
import pytest

from diapipe.diffim.template_residual import (
    template_residual_variance_factor,
    template_significance,
)
from diapipe.exposure.psf import PixelPsf

SIGMA = 2.0


def _add(image, psf, x, y, flux):
    stamp = psf.compute_image(x, y)
    half = stamp.shape[0] // 2
    image[int(y) - half:int(y) + half + 1, int(x) - half:int(x) + half + 1] += flux * stamp


def test_template_significance_is_the_psf_flux_snr():
    psf = PixelPsf.gaussian(SIGMA, 21)
    template = np.zeros((101, 101))
    _add(template, psf, 50.0, 50.0, 2000.0)
    variance = np.full(template.shape, 4.0)
    z = template_significance(template, variance, psf.compute_kernel_image(50.0, 50.0))
    # PSF-flux error of a Gaussian PSF in white noise: sigma_pix * sqrt(4 pi) * psf_sigma
    expected = 2000.0 / (2.0 * np.sqrt(4 * np.pi) * SIGMA)
    assert z[50, 50] == pytest.approx(expected, rel=0.01)
    assert abs(z[5, 5]) < 1e-3


def test_factor_is_one_on_blank_sky_and_rejects_bad_fraction():
    rng = np.random.default_rng(3)
    psf = PixelPsf.gaussian(SIGMA, 21)
    noise = rng.normal(0.0, 1.0, (120, 120))
    z = template_significance(noise, np.ones_like(noise), psf.compute_kernel_image(60, 60))
    factor = template_residual_variance_factor(z, 0.01)
    assert np.abs(factor - 1.0).max() < 2e-3
    assert np.all(template_residual_variance_factor(z, 0.0) == 1.0)
    with pytest.raises(ValueError, match="fraction"):
        template_residual_variance_factor(z, -0.1)


def test_significance_stays_honest_next_to_missing_variance():
    """Pixels beside a region without difference variance (its NO_DATA border, where the
    matched template still has pixels) keep unit-noise significance on blank sky and are 0
    deep inside it; the partly empty filtered variance used to make z explode there
    (to ~1e6 at a star on ci_imsim)."""
    rng = np.random.default_rng(9)
    psf = PixelPsf.gaussian(SIGMA, 21)
    noise = rng.normal(0.0, 1.0, (200, 200))
    var = np.ones_like(noise)
    var[:, :80] = np.nan  # no difference variance there; the template has data everywhere
    z = template_significance(noise, var, psf.compute_kernel_image(100, 100))
    edge = z[20:180, 72:90]  # within a filter half-width of the missing pixels
    assert np.abs(edge).max() < 6.0
    assert np.std(edge) < 1.2
    assert np.all(z[:, :70] == 0.0)
