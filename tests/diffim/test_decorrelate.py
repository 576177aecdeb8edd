"""Decorrelation afterburner: whitened noise, flux preservation, matched variance plane."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from diapipe.diffim.decorrelate import decorrelate_difference, decorrelation_kernel
from diapipe.exposure.psf import PixelPsf


def _gauss(sigma, half=10, total=1.0):
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    k = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return total * k / k.sum()


def test_kernel_properties():
    kappa = _gauss(1.5, total=1.03)
    dk = decorrelation_kernel(kappa, 100.0, 25.0)
    assert dk.kernel.sum() == pytest.approx(1.0, abs=1e-12)  # flux preserved
    # blank-sky variance after whitening: s2 + t2 * (sum kappa)^2
    assert 100 * dk.weight_unconvolved + 25 * dk.weight_convolved == pytest.approx(100 + 25 * 1.03**2, rel=2e-3)
    # no template noise -> nothing to decorrelate
    assert np.abs(decorrelation_kernel(kappa, 100.0, 0.0).kernel - np.pad([[1.0]], 21)).max() < 1e-10


def _noise_difference(seed, shape=(512, 512), s_var=100.0, t_var=60.0):
    rng = np.random.default_rng(seed)
    kappa = _gauss(1.5, total=1.03)
    science = rng.normal(0, np.sqrt(s_var), shape)
    template = rng.normal(0, np.sqrt(t_var), shape)
    diff = science - fftconvolve(template, kappa, mode="same")
    return diff, np.full(shape, s_var), np.full(shape, t_var), kappa


def _filtered_sn(image, variance, psf_kernel):
    """PSF-filtered S/N image computed as detection does (assuming white noise)."""
    filt = fftconvolve(image, psf_kernel[::-1, ::-1], mode="same")
    sigma = np.sqrt(fftconvolve(variance, psf_kernel**2, mode="same"))
    return (filt / sigma)[30:-30, 30:-30]


def test_pure_noise_is_white_after_decorrelation():
    diff, s_var, t_var, kappa = _noise_difference(0, t_var=400.0)
    psf = PixelPsf.gaussian(2.2, size=25)
    res = decorrelate_difference(diff, s_var, t_var, kappa, psf=psf)
    z = (res.image / np.sqrt(res.variance))[30:-30, 30:-30]
    assert np.std(z) == pytest.approx(1.0, abs=0.02)
    # neighbouring pixels no longer correlated (before: strongly)
    raw = diff[30:-30, 30:-30]
    assert np.corrcoef(raw[:, 1:].ravel(), raw[:, :-1].ravel())[0, 1] > 0.05
    assert abs(np.corrcoef(z[:, 1:].ravel(), z[:, :-1].ravel())[0, 1]) < 0.02
    # detection on the PSF-filtered image: a k-sigma threshold means k sigma
    sn = _filtered_sn(res.image, res.variance, res.psf.compute_kernel_image(256, 256))
    assert np.std(sn) == pytest.approx(1.0, abs=0.05)
    frac3 = np.mean(sn > 3.0)
    assert frac3 == pytest.approx(1.35e-3, rel=0.35)
    assert np.sum(sn > 5.0) <= 10  # Gaussian expectation ~0.05 pixels
    # without decorrelation the same recipe under-estimates the noise
    sn_raw = _filtered_sn(diff, s_var + t_var * (kappa**2).sum(), psf.compute_kernel_image(0, 0))
    assert np.std(sn_raw) > 1.1


def test_flux_and_psf_preserved():
    diff, s_var, t_var, kappa = _noise_difference(1)
    psf = PixelPsf.gaussian(2.2, size=25)
    point = np.zeros_like(diff)
    point[256 - 12 : 256 + 13, 256 - 12 : 256 + 13] = 5000.0 * psf.compute_kernel_image(0, 0)
    res = decorrelate_difference(point, s_var, t_var, kappa, psf=psf)
    assert res.image.sum() == pytest.approx(5000.0, rel=1e-6)
    # the corrected PSF is the image of a point source after decorrelation
    stamp = res.image[256 - 12 : 256 + 13, 256 - 12 : 256 + 13] / 5000.0
    assert np.abs(stamp - res.psf.compute_kernel_image(0, 0)).max() < 2e-3 * stamp.max()
