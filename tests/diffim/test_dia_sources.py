"""DiaSource cleaning on synthetic difference images: one DiaSource per footprint,
Rubin's bad-centre removal, the detection-scale noise calibration, and the
post-fit photometric scaling of `subtract_images` (small images, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.ndimage import gaussian_filter

from diapipe.diffim.dia_sources import (
    centre_all_bits,
    detect_and_measure_dia_sources,
    detection_noise_scale,
)
from diapipe.diffim.subtract import photometric_scale_correction
from diapipe.exposure import masks
from diapipe.exposure.exposure import Exposure, PhotoCalib
from diapipe.exposure.psf import PixelPsf

SIGMA = 2.0


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [61.86, -35.8]
    wcs.wcs.crpix = [100.0, 100.0]
    wcs.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    wcs.wcs.set()
    return wcs


def _add(image, psf, x, y, flux):
    stamp = psf.compute_image(x, y)
    half = stamp.shape[0] // 2
    ix, iy = int(round(x)), int(round(y))
    image[iy - half : iy + half + 1, ix - half : ix + half + 1] += flux * stamp


def _difference(image, mask=None):
    psf = PixelPsf.gaussian(SIGMA, 21)
    return Exposure(image=image.astype(np.float32), mask=np.zeros(image.shape, np.int32) if mask is None else mask,
                    variance=np.ones(image.shape, np.float32), wcs=_wcs(), psf=psf, photo_calib=PhotoCalib(1.0))


def _star_template(x, y, flux, shape=(200, 200)):
    """A matched template holding one star (unit variance, the test PSF)."""
    psf = PixelPsf.gaussian(SIGMA, 21)
    template = np.zeros(shape)
    _add(template, psf, x, y, flux)
    return Exposure(image=template.astype(np.float32), mask=np.zeros(shape, np.int32),
                    variance=np.ones(shape, np.float32), psf=psf, photo_calib=PhotoCalib(1.0))


def _run(diff, matched_template=None, **kwargs):
    return detect_and_measure_dia_sources(diff, science=None, matched_template=matched_template, visit=1, detector=2,
                                          n_sky_sources=0, rng=np.random.default_rng(0), **kwargs)


def test_centre_all_needs_every_centre_pixel():
    mask = np.zeros((20, 20), np.int32)
    intrp = masks.bit("INTRP")
    mask[5:8, 5:8] = intrp  # full 3x3 block around (6, 6)
    mask[12, 12] = intrp  # a single pixel around (12, 12)
    out = centre_all_bits(mask, [6.0, 12.0, 0.0], [6.0, 12.0, 0.0])
    assert (out[0] & intrp) and not (out[1] & intrp)
    # off-image pixels count as flagged, the on-image corner pixels are clean
    assert not (out[2] & intrp)


def test_one_dia_source_per_footprint_unless_deblending():
    rng = np.random.default_rng(1)
    psf = PixelPsf.gaussian(SIGMA, 21)
    image = rng.normal(0.0, 1.0, (160, 160))
    # two blended peaks 9 px apart (one footprint) and an isolated source
    _add(image, psf, 60.0, 60.0, 3000.0)
    _add(image, psf, 69.0, 60.0, 1500.0)
    _add(image, psf, 120.0, 120.0, 800.0)
    merged = _run(_difference(image), background_bin_pix=None)
    split = _run(_difference(image), background_bin_pix=None, deblend_peaks=True)
    assert len(merged.catalog) == 2
    assert len(split.catalog) == 3
    # the footprint's DiaSource is its most significant peak
    brightest = merged.catalog[np.argmax(merged.catalog["snr"])]
    assert abs(brightest["x"] - 60.0) < 1.0 and abs(brightest["y"] - 60.0) < 1.0


def test_bad_centre_sources_removed_and_counted():
    rng = np.random.default_rng(2)
    psf = PixelPsf.gaussian(SIGMA, 21)
    image = rng.normal(0.0, 1.0, (160, 160))
    mask = np.zeros(image.shape, np.int32)
    _add(image, psf, 50.0, 50.0, 1000.0)
    _add(image, psf, 110.0, 110.0, 1000.0)
    mask[108:113, 108:113] = masks.bit("INTRP")  # an interpolated core: no real pixel at the centre
    kept = _run(_difference(image, mask.copy()), background_bin_pix=None)
    assert len(kept.catalog) == 1 and kept.stats["n_removed_bad_center"] == 1
    assert abs(kept.catalog["x"][0] - 50.0) < 1.0
    everything = _run(_difference(image, mask.copy()), background_bin_pix=None, bad_center_planes=())
    assert len(everything.catalog) == 2


def test_detection_noise_scale_white_and_correlated():
    rng = np.random.default_rng(4)
    # (~2000 independent PSF-filtered samples per 300 px square: the width is known to ~2.5 %)
    white = rng.normal(0.0, 1.0, (600, 600)).astype(np.float32)
    mask = np.zeros(white.shape, np.int32)
    assert detection_noise_scale(white, np.ones_like(white), mask, SIGMA) == pytest.approx(1.0, abs=0.03)
    # noise correlated on ~1 px with the right per-pixel variance: the PSF-filtered noise is larger
    corr = gaussian_filter(rng.normal(0.0, 1.0, (300, 300)), 0.8)
    corr = (corr / corr.std()).astype(np.float32)
    scale = detection_noise_scale(corr, np.ones_like(corr), np.zeros(corr.shape, np.int32), SIGMA)
    assert scale > 1.3
    # masked detections are excluded from the measurement
    bright = white.copy()
    bright[200:240, 200:240] += 50.0
    mask[195:245, 195:245] = masks.bit("DETECTED")
    assert detection_noise_scale(bright, np.ones_like(bright), mask, SIGMA) == pytest.approx(1.0, abs=0.03)


def test_noise_calibration_makes_sky_errors_honest():
    rng = np.random.default_rng(5)
    corr = gaussian_filter(rng.normal(0.0, 1.0, (256, 256)), 0.8)
    corr /= corr.std()
    plain = _run(_difference(corr), background_bin_pix=64, scale_variance=False)
    scaled = _run(_difference(corr), background_bin_pix=64)
    assert scaled.stats["detection_noise_scale"] > 1.3
    # correlated noise gives spurious 5-sigma detections unless the threshold is in real noise units
    assert len(plain.catalog) >= 3
    assert len(scaled.catalog) <= 1


def test_photometric_scale_correction_recovers_scale_and_ignores_a_variable():
    rng = np.random.default_rng(6)
    psf = PixelPsf.gaussian(SIGMA, 21)
    clean = np.zeros((200, 200))
    xs, ys = np.meshgrid(np.arange(25.0, 200.0, 30.0), np.arange(25.0, 200.0, 30.0))
    xs, ys = xs.ravel(), ys.ravel()
    for x, y in zip(xs, ys):
        _add(clean, psf, x, y, 2e4)
    target = clean + rng.normal(0.0, 1.0, clean.shape)
    _add(target, psf, xs[0], ys[0], 1e4)  # a variable among the stars: +50 %
    matched = 0.97 * clean + rng.normal(0.0, 1.0, clean.shape)
    ones = np.ones(clean.shape)
    f, err, n = photometric_scale_correction(target, ones, matched, ones, np.zeros(clean.shape, np.int32),
                                             psf, xs, ys)
    assert f == pytest.approx(1 / 0.97, abs=0.002)
    assert n == len(xs) - 1
    assert 0 < err < 0.002
    # too few stars: no correction
    assert photometric_scale_correction(target, ones, matched, ones, np.zeros(clean.shape, np.int32),
                                        psf, xs[:3], ys[:3])[0] == 1.0


def test_template_residual_term_suppresses_ring_keeps_transient():
    """A PSF-mismatch ring at a bright template star is detected without the
    template-residual term and not with it; a faint transient on blank sky is kept,
    with the same flux error."""
    rng = np.random.default_rng(7)
    psf = PixelPsf.gaussian(SIGMA, 21)
    shape = (200, 200)
    star_flux = 2.0e6  # template PSF-flux S/N ~ 1.4e5 in unit noise
    matched = _star_template(60.0, 60.0, star_flux, shape)
    # difference: unit noise + a PSF-width mismatch residual of the star (a ring, 0.3 % of its flux)
    # + a transient of PSF-flux S/N ~ 14 on blank sky
    wider = PixelPsf.gaussian(SIGMA * 1.01, 21)
    ring = np.zeros(shape)
    _add(ring, psf, 60.0, 60.0, star_flux)
    _add(ring, wider, 60.0, 60.0, -star_flux)
    image = rng.normal(0.0, 1.0, shape) + ring
    _add(image, psf, 150.0, 140.0, 100.0)
    plain = _run(_difference(image), background_bin_pix=None)
    guarded = _run(_difference(image), background_bin_pix=None, template_residual_fraction=0.01,
                   matched_template=matched)
    near_star = lambda cat: np.hypot(np.asarray(cat["x"]) - 60.0, np.asarray(cat["y"]) - 60.0) < 15
    at_transient = lambda cat: np.hypot(np.asarray(cat["x"]) - 150.0, np.asarray(cat["y"]) - 140.0) < 2
    assert near_star(plain.catalog).sum() >= 1  # the ring is detected without the term
    assert near_star(guarded.catalog).sum() == 0
    assert at_transient(guarded.catalog).sum() == 1
    # measurement keeps the plain variance: the transient's flux error is unchanged
    i = np.flatnonzero(at_transient(plain.catalog))[0]
    j = np.flatnonzero(at_transient(guarded.catalog))[0]
    assert guarded.catalog["psfFluxErr"][j] == pytest.approx(plain.catalog["psfFluxErr"][i], rel=1e-6)


def test_neighbourhood_term_suppresses_an_arc_beside_a_bright_star():
    """A residual arc 10 px from a bright template star (where the star itself is faint,
    so the pixel-level term leaves it) is detected without the neighbourhood term and not
    with it; a transient on blank sky is kept."""
    rng = np.random.default_rng(8)
    psf = PixelPsf.gaussian(SIGMA, 21)
    star_flux = 2.0e4  # template PSF-flux S/N ~ 2800 in unit noise
    matched = _star_template(60.0, 60.0, star_flux)
    image = rng.normal(0.0, 1.0, (200, 200))
    _add(image, psf, 70.0, 60.0, 0.003 * star_flux)  # the arc: S/N ~ 8.5, 10 px off the star
    _add(image, psf, 150.0, 140.0, 100.0)  # a transient, S/N ~ 14
    pixel_only = _run(_difference(image), background_bin_pix=None, template_residual_fraction=0.01,
                      matched_template=matched)
    both = _run(_difference(image), background_bin_pix=None, template_residual_fraction=0.01,
                template_residual_neighbourhood_fraction=0.005, matched_template=matched)
    at = lambda cat, x, y: np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y) < 2
    assert at(pixel_only.catalog, 70.0, 60.0).sum() == 1
    assert at(both.catalog, 70.0, 60.0).sum() == 0
    assert at(both.catalog, 150.0, 140.0).sum() == 1


def test_local_noise_scale_follows_a_noisier_corner():
    """A corner whose noise is 15 % above its variance plane gets a local factor of
    ~1.15 and the rest ~1.0 (the whole-image factor, ~1.04, fits neither)."""
    from diapipe.diffim.dia_sources import detection_noise_scale_map

    rng = np.random.default_rng(11)
    image = rng.normal(0.0, 1.0, (1024, 1024))
    image[:512, 512:] *= 1.15
    variance = np.ones(image.shape, np.float32)
    overall, scale_map = detection_noise_scale_map(image.astype(np.float32), variance,
                                                   np.zeros(image.shape, np.int32), SIGMA, cell_pix=256)
    assert 1.01 < overall < 1.08
    assert np.median(scale_map[:256, 768:]) == pytest.approx(1.15, abs=0.04)
    assert np.median(scale_map[768:, :256]) == pytest.approx(1.0, abs=0.03)
    assert scale_map.shape == image.shape and scale_map.dtype == np.float32
    # cell_pix = 0: one factor everywhere, the same as detection_noise_scale
    same, flat = detection_noise_scale_map(image.astype(np.float32), variance, np.zeros(image.shape, np.int32),
                                           SIGMA, cell_pix=0)
    assert same == pytest.approx(overall) and np.all(flat == np.float32(overall))


def test_low_coverage_scale_suppresses_a_star_residual_where_the_template_is_shallow():
    """A star residual of 6 % of its flux (S/N ~ 18, at template S/N 300: like the 20 mag
    stars where the 4patch_4431 template has one or two inputs) is detected with the
    ordinary template-residual terms. Where the matched template's variance says it is
    shallow (6x the median: a sixth of the inputs) the scaled terms drop it; a transient
    on blank sky there is kept."""
    rng = np.random.default_rng(9)
    psf = PixelPsf.gaussian(SIGMA, 21)
    shape = (256, 256)
    star_flux = 300.0 * np.sqrt(4 * np.pi * SIGMA**2)  # template PSF-flux S/N 300 in unit noise
    matched = _star_template(200.0, 190.0, star_flux, shape)
    matched.variance[:, 160:] = 6.0  # the right 3/8 has a sixth of the inputs
    image = rng.normal(0.0, 1.0, shape)
    _add(image, psf, 200.0, 190.0, 0.06 * star_flux)  # the residual, S/N ~ 18
    _add(image, psf, 180.0, 60.0, 100.0)  # a transient in the shallow part, S/N ~ 14
    kwargs = dict(background_bin_pix=None, template_residual_fraction=0.01,
                  template_residual_neighbourhood_fraction=0.005, matched_template=matched)
    plain = _run(_difference(image), **kwargs)
    scaled = _run(_difference(image), low_coverage_variance_ratio=2.0, low_coverage_residual_scale=10.0, **kwargs)
    at = lambda cat, x, y: np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y) < 3
    assert at(plain.catalog, 200.0, 190.0).sum() == 1
    assert at(scaled.catalog, 200.0, 190.0).sum() == 0
    assert at(scaled.catalog, 180.0, 60.0).sum() == 1
    assert scaled.stats["low_coverage_fraction"] == pytest.approx(0.375, abs=0.01)


def test_noise_scale_region_follows_a_noisier_strip():
    """A 60 px strip whose noise is 1.2x its variance plane (a template edge with one input):
    the 512 px cells average it away; with the strip as ``region`` it gets its own factor."""
    from diapipe.diffim.dia_sources import detection_noise_scale_map

    rng = np.random.default_rng(12)
    shape = (512, 512)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    strip = np.zeros(shape, bool)
    strip[:, 452:] = True
    image[strip] *= 1.2
    variance = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.int32)
    _, cells = detection_noise_scale_map(image, variance, mask, SIGMA, cell_pix=512)
    _, with_region = detection_noise_scale_map(image, variance, mask, SIGMA, cell_pix=512, region=strip)
    assert cells[256, 480] < 1.1
    assert with_region[256, 480] == pytest.approx(1.2, abs=0.04)
    assert with_region[256, 100] == pytest.approx(cells[256, 100])
