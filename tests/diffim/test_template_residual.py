"""Detection noise from template brightness (`diapipe.diffim.template_residual`): the
template significance is the PSF-flux S/N and the factor is 1 on blank sky (its effect
on detection: ``test_dia_sources.test_template_residual_term_suppresses_ring_keeps_transient``)."""

from __future__ import annotations

import numpy as np
import pytest

from diapipe.diffim.template_residual import (
    bright_object_noise_factor,
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


def test_bright_object_noise_factor_raises_only_around_a_ringing_star():
    """A star whose neighbourhood carries a residual ring gets its measured noise; a clean
    star, blank sky and a faint object keep factor 1."""
    rng = np.random.default_rng(5)
    n = 240
    sig = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
    tz = np.zeros((n, n), np.float32)
    tz[60, 60] = tz[180, 180] = 800.0  # two bright stars
    tz[60, 180] = 50.0  # a faint one, below min_template_z
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(xx - 60, yy - 60)
    sig += (8.0 * np.cos(r) * (r < 12)).astype(np.float32)  # rings of +-8 sigma around the first star
    factor, n_raised = bright_object_noise_factor(sig, tz, np.ones((n, n), bool), radius_pix=12)
    assert n_raised == 1
    assert factor[60, 60] > 4.0
    assert (sig / factor)[r < 12].max() < 5.0  # no ring pixel stays above a 5 sigma threshold
    assert factor[180, 180] == 1.0 and factor[60, 180] == 1.0 and factor[120, 120] == 1.0
    # invalid pixels are not counted: a region with too few valid pixels keeps factor 1
    factor, n_raised = bright_object_noise_factor(sig, tz, r > 30, radius_pix=12)
    assert n_raised == 0
