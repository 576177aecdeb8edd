"""The metric functions on synthetic cases with known answers: each must detect a
deliberately wrong input (a shifted WCS, a wider PSF, a biased zero point, ISR structure)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from diapipe.analysis.single_frame import (
    astrometry_metrics,
    isr_metrics,
    photometry_metrics,
    psf_metrics,
    zero_point_offset_mmag,
)
from diapipe.analysis.template import transient_leak_metrics
from diapipe.analysis.truth_match import blank_sky_mask, isolated, match_sky, match_xy
from diapipe.exposure.psf import PixelPsf


def _tan_wcs(ra=56.6, dec=-36.4, scale_arcsec=0.2, crpix=(400.5, 400.5)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = np.array([[-scale_arcsec / 3600, 0.0], [0.0, scale_arcsec / 3600]])
    wcs.wcs.set()
    return wcs


def test_match_xy_is_one_to_one_and_keeps_exact_matches():
    i1, i2, d = match_xy([0.0, 10.0, 10.5], [0.0, 0.0, 0.0], [0.0, 10.2], [0.0, 0.0], 1.0)
    assert sorted(zip(i1.tolist(), i2.tolist(), strict=True)) == [(0, 0), (1, 1)]
    assert d.min() == 0.0


def test_match_sky_radius_in_arcsec():
    dec = -36.0
    ra2 = 56.0 + 0.4 / 3600 / np.cos(np.radians(dec))
    assert len(match_sky([56.0], [dec], [ra2], [dec], 0.5)[0]) == 1
    assert len(match_sky([56.0], [dec], [ra2], [dec], 0.3)[0]) == 0


def test_isolated_and_blank_sky():
    iso = isolated([0, 5, 100], [0, 0, 0], [1000, 100, 1000], 10.0, flux_ratio=0.01)
    assert iso.tolist() == [False, False, True]
    blank = blank_sky_mask((50, 50), [25.0], [25.0], [1e6], 5.0, level_e=0.05)
    assert not blank[25, 25] and blank[0, 0]
    # brighter objects get larger masks
    small = blank_sky_mask((50, 50), [25.0], [25.0], [1e3], 5.0, level_e=0.05)
    assert small.sum() > blank.sum()


def test_astrometry_detects_a_20_mas_error():
    true = _tan_wcs()
    assert astrometry_metrics(true, true, (800, 800))["rms_mas"] < 1e-3
    shifted = _tan_wcs(dec=-36.4 + 0.020 / 3600)
    m = astrometry_metrics(shifted, true, (800, 800))
    assert m["rms_mas"] == pytest.approx(20.0, rel=1e-3)
    assert m["mean_ddec_mas"] == pytest.approx(20.0, rel=1e-3)
    assert m["rms_after_shift_mas"] < 0.1
    # a 1e-4 scale error: 0 at the centre, 0.2 px * 1e-4 * 400 px = 8 mas at the edges
    stretched = _tan_wcs(scale_arcsec=0.2 * (1 + 1e-4))
    m = astrometry_metrics(stretched, true, (800, 800))
    assert 3.0 < m["rms_mas"] < 10.0 and m["max_mas"] == pytest.approx(0.2e-4 * 1000 * np.hypot(400, 400), rel=0.01)


def test_psf_metrics_see_a_2_percent_wider_model():
    true = PixelPsf.gaussian(2.0, size=25)
    same = psf_metrics(true, true, (100, 100))
    assert same["fwhm_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert same["fwhm_true_pix"] == pytest.approx(2.3548 * 2.0, rel=0.01)
    wider = psf_metrics(PixelPsf.gaussian(2.04, size=31), true, (100, 100))
    assert wider["fwhm_ratio"] == pytest.approx(1.02, abs=0.002)


def test_zero_point_sign_and_size():
    assert zero_point_offset_mmag(1.0, 1.0) == 0.0
    assert zero_point_offset_mmag(1.01, 1.0) == pytest.approx(10.8, abs=0.1)


def _star_field(rng, n=30, shape=(200, 200)):
    x = rng.uniform(20, shape[1] - 20, n)
    y = rng.uniform(20, shape[0] - 20, n)
    flux = 10 ** rng.uniform(4, 6, n)
    truth = pd.DataFrame({"id": np.arange(n), "type": ["star"] * n, "x": x, "y": y, "flux_njy": flux,
                          "flux_e": 2 * flux})
    return truth


def test_photometry_metrics_detect_a_biased_flux_scale():
    rng = np.random.default_rng(3)
    truth = _star_field(rng)
    keep = isolated(truth.x, truth.y, truth.flux_e, 20.0)
    assert keep.sum() >= 5
    for scale in (1.0, 1.02):
        src = Table({"centroid_x": truth.x + 0.05, "centroid_y": truth.y - 0.05,
                     "psfFlux_nJy": scale * truth.flux_njy * rng.normal(1, 0.002, len(truth)),
                     "psfFluxErr_nJy": 0.002 * truth.flux_njy})
        m = photometry_metrics(0.5 * scale, 0.5, src, truth, shape=(200, 200), fwhm_pix=5.0)
        assert m["n_stars"] == keep.sum()
        assert m["flux_ratio_median"] == pytest.approx(scale, abs=0.002)
        assert m["zp_offset_mmag"] == pytest.approx(2500 * np.log10(scale), abs=0.01)


def test_isr_metrics_noise_and_structure():
    rng = np.random.default_rng(5)
    shape = (400, 400)
    sky = 400.0
    variance = np.full(shape, sky, np.float32)
    mask = np.zeros(shape, np.int32)
    blank = np.ones(shape, bool)
    flat = sky + rng.normal(0, np.sqrt(sky), shape)
    good = isr_metrics(flat, variance, mask, sky, blank)
    assert good["norm_residual_std"] == pytest.approx(1.0, abs=0.01)
    assert good["structure_frac"] < 0.0005
    # a 0.5% step between halves (an amplifier offset) and a 10% too small variance plane
    step = flat + np.where(np.arange(400)[None, :] < 200, 0.0, 0.005 * sky)
    bad = isr_metrics(step, 0.9 * variance, mask, sky, blank)
    assert bad["structure_frac"] == pytest.approx(0.0025, rel=0.15)
    assert bad["norm_residual_std"] > 1.05


def test_transient_leak_is_seen_and_host_removed():
    rng = np.random.default_rng(7)
    psf = PixelPsf.gaussian(2.0, size=21)
    shape = (120, 120)
    image = rng.normal(0, 1.0, shape)
    variance = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    # symmetric host at (60, 60), a leaked transient of 10 sigma at (64, 60)
    image += 400 * np.exp(-0.5 * ((xx - 60) ** 2 + (yy - 60) ** 2) / 16) / (2 * np.pi * 16)
    sigma_flux = np.sqrt(4 * np.pi) * 2.0  # PSF-flux error for unit pixel noise
    clean = transient_leak_metrics(image, variance, mask, psf, [64.0], [60.0], mirror_x=[56.0], mirror_y=[60.0])
    assert clean["n_above_3sigma"] == 0
    stamp = psf.compute_kernel_image(64, 60)
    image[50:71, 54:75] += 10 * np.sqrt(2) * sigma_flux * stamp
    leaked = transient_leak_metrics(image, variance, mask, psf, [64.0], [60.0], mirror_x=[56.0], mirror_y=[60.0])
    assert leaked["n_above_3sigma"] == 1 and leaked["max_snr"] > 7


def test_coadd_photometry_with_a_varying_psf_in_parent_pixels():
    """A patch coadd lives at a large ``xy0`` with a PSF in parent pixels that varies
    strongly (sigma 1.5 -> 2.5 px across it): PSF fluxes of its stars must come out right,
    i.e. the metric evaluates the PSF where the stars are, not at their array indices."""
    from diapipe.analysis.template import coadd_metrics, local_psf
    from diapipe.exposure.exposure import Exposure

    rng = np.random.default_rng(9)
    x0, y0 = 13441, 13418
    shape = (240, 240)
    size = 21
    narrow = PixelPsf.gaussian(1.5, size=size).compute_kernel_image(0, 0)
    wide = PixelPsf.gaussian(2.5, size=size).compute_kernel_image(0, 0)
    bbox = (x0, y0, x0 + shape[1] - 1, y0 + shape[0] - 1)
    # K(u) = mean + u * half-difference: narrow at the left edge (u = -1), wide at the right
    psf = PixelPsf(np.stack([(narrow + wide) / 2, (wide - narrow) / 2, np.zeros_like(wide)]), 1, bbox)
    loc = local_psf(psf, (x0, y0))
    np.testing.assert_allclose(loc.compute_kernel_image(30.0, 200.0), psf.compute_kernel_image(x0 + 30.0, y0 + 200.0))

    image = rng.normal(0.0, 1.0, shape)
    xs, ys = np.meshgrid(np.arange(30.0, 220.0, 40.0) + 0.3, np.arange(30.0, 220.0, 40.0) - 0.2)
    xs, ys = xs.ravel(), ys.ravel()
    flux = 5.0e4
    h = size // 2
    for x, y in zip(xs, ys, strict=True):
        ix, iy = int(round(x)), int(round(y))
        image[iy - h:iy + h + 1, ix - h:ix + h + 1] += flux * psf.compute_image(x + x0, y + y0)
    wcs = _tan_wcs(crpix=(x0 + 120.5, y0 + 120.5))
    coadd = Exposure(image=image.astype(np.float32), variance=np.ones(shape, np.float32), wcs=wcs, psf=psf,
                     xy0=(x0, y0))
    ra, dec = wcs.all_pix2world(xs + x0, ys + y0, 0)
    truth_sky = pd.DataFrame({"id": np.arange(xs.size), "type": "star", "ra": ra, "dec": dec,
                              "mag_g": np.full(xs.size, 31.4 - 2.5 * np.log10(flux)), "host_id": -1})
    out = coadd_metrics(coadd, truth_sky, "g")
    assert out["n_stars"] == xs.size
    assert abs(out["flux_ratio_median"] - 1.0) < 0.003
    assert abs(out["psf_size_ratio"] - 1.0) < 0.01
    assert out["position_rms_mas"] < 5.0
