"""Fake-source injection (`diapipe.sim.inject`): flux and variance added as asked,
positions on blank pixels and apart, the S/N-to-flux relation, and a clear error for a
source that does not fit (small arrays, milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from diapipe.exposure.psf import PixelPsf
from diapipe.measure.measurement import forced_measure
from diapipe.sim.inject import blank_positions, flux_for_snr, inject_point_sources


def test_injected_flux_variance_and_pulls():
    rng = np.random.default_rng(5)
    psf = PixelPsf.gaussian(2.0, 21)
    shape = (400, 400)
    sky = rng.normal(0.0, 20.0, shape).astype(np.float32)
    variance = np.full(shape, 400.0, np.float32)
    grid = np.arange(30, 371, 34, dtype=float)
    x, y = [a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(grid, grid)]
    flux = np.full(x.size, 5.0e4)
    image, var = inject_point_sources(sky, variance, psf, x + 1000, y + 2000, flux, rng, xy0=(1000, 2000))
    assert image.dtype == np.float32 and var.dtype == np.float32
    assert var.sum() - variance.sum() == pytest.approx(flux.sum(), rel=1e-4)  # expected source electrons
    assert float(np.abs(sky).max()) < 200.0  # the input image is not modified
    meas = forced_measure(image, var, None, psf, x, y)
    pulls = (np.asarray(meas["psfFlux"]) - flux) / np.asarray(meas["psfFluxErr"])
    assert abs(np.median(np.asarray(meas["psfFlux"]) / flux) - 1.0) < 0.005
    assert 0.8 < np.std(pulls) < 1.2  # Poisson noise on the source, matching the variance added


def test_flux_for_snr_solves_the_noise_equation():
    f = flux_for_snr([5.0, 50.0], sky_sigma_e=30.0, psf_sigma_pix=2.0)
    area = 4 * np.pi * 4.0
    assert f / np.sqrt(f + area * 900.0) == pytest.approx([5.0, 50.0], rel=1e-9)


def test_blank_positions_avoid_busy_pixels_and_each_other():
    rng = np.random.default_rng(2)
    busy = np.zeros((300, 300), bool)
    busy[:, :150] = True
    x, y = blank_positions(busy, 30, rng, margin=20, min_separation=25.0, xy0=(500, 0))
    assert 0 < len(x) <= 30
    lx = x - 500
    assert np.all(lx >= 149.5) and np.all(lx <= 280.5) and np.all((y >= 19.5) & (y <= 280.5))
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(len(x)) * 1e9
    assert d.min() >= 25.0


def test_source_off_the_image_is_an_error():
    psf = PixelPsf.gaussian(2.0, 21)
    with pytest.raises(ValueError, match=r"does not fit"):
        inject_point_sources(np.zeros((50, 50)), np.ones((50, 50)), psf, [3.0], [25.0], [100.0],
                             np.random.default_rng(0))
