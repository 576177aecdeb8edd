"""Tests of diapipe.calibrate.aperture_correction: recover an injected spatial trend."""

import numpy as np
import pytest

from diapipe.calibrate.aperture_correction import (
    ApertureCorrection,
    ApertureCorrectionError,
    apply_aperture_correction,
    fit_aperture_correction,
)

BBOX = (0, 0, 4071, 3999)


def true_ratio(x, y):
    """Aperture/PSF flux ratio: 2% mean, 1% gradient in x, -0.8% in y, a little curvature."""
    u = 2 * x / BBOX[2] - 1
    v = 2 * y / BBOX[3] - 1
    return 1.02 + 0.01 * u - 0.008 * v + 0.004 * u * v - 0.003 * u**2


def make_stars(rng, n=200, frac_outliers=0.05):
    """PSF stars with S/N 50-1000; a few blends/cosmic rays with aperture flux 10-40% high."""
    x, y = rng.uniform(0, BBOX[2], n), rng.uniform(0, BBOX[3], n)
    flux = 10 ** rng.uniform(3.5, 5.5, n)
    snr = np.clip(flux / 50, 50, 1000)
    psf_err = flux / snr
    ap_err = 1.3 * psf_err  # the larger aperture is noisier
    psf = flux + rng.normal(0, psf_err)
    ap = flux * true_ratio(x, y) + rng.normal(0, ap_err)
    outlier = rng.random(n) < frac_outliers
    ap[outlier] *= rng.uniform(1.1, 1.4, outlier.sum())
    return x, y, ap, ap_err, psf, psf_err, outlier


def test_recovers_injected_trend_and_rejects_outliers():
    rng = np.random.default_rng(11)
    x, y, ap, ap_err, psf, psf_err, outlier = make_stars(rng)
    corr, stats = fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX, order=2)
    gx, gy = np.meshgrid(np.linspace(0, BBOX[2], 21), np.linspace(0, BBOX[3], 21))
    err = corr.evaluate(gx, gy) - true_ratio(gx, gy)
    assert np.max(np.abs(err)) < 0.004  # 4 mmag anywhere on the detector (30 seeds: max 3.2)
    assert np.sqrt(np.mean(err**2)) < 0.0012
    assert not stats["used"][outlier].any()
    assert stats["n_stars"] >= 0.9 * (~outlier).sum()
    assert stats["order"] == 2
    # A constant fit could not follow the trend: the test would catch a regression to order 0.
    const, _ = fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX, order=0)
    assert np.max(np.abs(const.evaluate(gx, gy) - true_ratio(gx, gy))) > 0.01


def test_apply_corrects_psf_fluxes():
    rng = np.random.default_rng(12)
    x, y, ap, ap_err, psf, psf_err, outlier = make_stars(rng, n=300)
    corr, _ = fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX)
    flux, err = apply_aperture_correction(psf, psf_err, x, y, corr)
    truth = psf * true_ratio(x, y)  # what the PSF flux should have been
    np.testing.assert_allclose(flux / truth, 1.0, atol=0.004)
    np.testing.assert_allclose(err / psf_err, corr.evaluate(x, y))


def test_few_stars_lower_the_order_or_raise():
    rng = np.random.default_rng(13)
    x, y, ap, ap_err, psf, psf_err, _ = make_stars(rng, n=4, frac_outliers=0.0)
    corr, stats = fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX, order=2)
    assert stats["order"] == 1 and corr.order == 1
    assert float(np.mean(corr.evaluate(x, y))) == pytest.approx(1.02, abs=0.02)
    with pytest.raises(ApertureCorrectionError, match="only 1 usable") as info:
        fit_aperture_correction(x[:1], y[:1], ap[:1], ap_err[:1], psf[:1], psf_err[:1], bbox=BBOX)
    assert info.value.n_stars == 1
    ap[1:] = np.nan
    with pytest.raises(ApertureCorrectionError):
        fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX)


def test_serialisation_and_validation():
    corr = ApertureCorrection([1.02, 0.01, -0.008, 0.0, 0.004, 0.0], 2, BBOX, rms=0.003)
    again = ApertureCorrection.from_dict(corr.to_dict())
    assert again == corr and again.rms == pytest.approx(0.003)
    assert corr.evaluate(BBOX[2], BBOX[1]) == pytest.approx(1.02 + 0.01 + 0.008 - 0.004)
    assert ApertureCorrection.constant(0.98, BBOX).evaluate(np.zeros(3), np.zeros(3)).tolist() == [0.98] * 3
    with pytest.raises(ValueError, match="needs 6 coefficients"):
        ApertureCorrection([1.0, 0.0], 2, BBOX)
    with pytest.raises(ValueError, match="bbox"):
        ApertureCorrection([1.0], 0, (0, 0, 0, 10))
    with pytest.raises(ValueError, match="lacks"):
        ApertureCorrection.from_dict({"coeffs": [1.0]})
    with pytest.raises(ValueError):
        corr.coeffs[0] = 2.0  # immutable


# -- curve of growth to total flux ---------------------------------------------
MOFFAT_BETA = 4.765  # the simulator's (a Kolmogorov-like profile)


def moffat_field(rng, fwhm_pix, n_side=6, spacing=70, sky_sigma=10.0, neighbour_every=4):
    """Pixel-integrated Moffat stars on a grid, fluxes 2e4-2e6 e-, Gaussian sky noise;
    every ``neighbour_every``-th star has a 10 % neighbour 14 px away (inside the big aperture,
    outside the 12 px one). Each star is drawn on a stamp of +-34 px (all but <1e-4 of its
    light for FWHM <= 8 px); its true flux is the stamp's sum.
    Returns noiseless and noisy images, variance, positions and true fluxes."""
    import galsim

    size = spacing * (n_side + 1)
    image = galsim.ImageF(size, size, scale=1.0)
    xs, ys, fluxes = [], [], []
    for k in range(n_side * n_side):
        x = spacing * (1 + k % n_side) + rng.uniform(-0.5, 0.5)
        y = spacing * (1 + k // n_side) + rng.uniform(-0.5, 0.5)
        flux = 10 ** rng.uniform(4.3, 6.3)
        # galsim's pixel i (1-based) has its centre at i; ours (0-based) at i - 1
        for dx, f in [(0, flux)] + ([(14, 0.1 * flux)] if k % neighbour_every == 0 else []):
            cx, cy = int(round(x)) + dx + 1, int(round(y)) + 1
            stamp = galsim.ImageF(galsim.BoundsI(cx - 34, cx + 34, cy - 34, cy + 34), scale=1.0)
            galsim.Moffat(beta=MOFFAT_BETA, fwhm=fwhm_pix, flux=f).drawImage(
                stamp, center=galsim.PositionD(x + dx + 1, y + 1))
            image[stamp.bounds] += stamp
            if dx == 0:
                fluxes.append(float(stamp.array.sum()))
        xs.append(x)
        ys.append(y)
    clean = image.array.astype(np.float64)
    variance = sky_sigma**2 + np.clip(clean, 0, None)
    noisy = clean + rng.normal(0.0, 1.0, clean.shape) * np.sqrt(variance)
    return clean, noisy.astype(np.float32), variance.astype(np.float32), np.array(xs), np.array(ys), np.array(fluxes)


@pytest.mark.parametrize("fwhm_pix", [4.0, 8.0])
def test_total_flux_correction_recovers_the_light_outside_12_px(fwhm_pix):
    from diapipe.calibrate.aperture_correction import measure_total_flux_correction
    from diapipe.measure.measurement import aperture_flux

    rng = np.random.default_rng(21)
    clean, image, variance, x, y, flux = moffat_field(rng, fwhm_pix)
    # what the factor must be: total / 12 px aperture flux of a lone star (noiseless, no neighbour)
    lone = np.arange(x.size) % 4 != 0
    expected = np.median(flux[lone] / aperture_flux(clean, variance, x[lone], y[lone], (12.0,))[12.0][0])
    assert expected - 1 > (0.02 if fwhm_pix == 8.0 else 0.0005)  # 8 px (1.6"): 2.4 % outside 12 px
    factor, factor_err, stats = measure_total_flux_correction(image, variance, None, x, y, fwhm_pix)
    assert abs(factor / expected - 1) < 0.0015  # 1.6 mmag
    assert 0 < factor_err < 0.002
    assert stats["total_radius_pix"] == pytest.approx(max(12.0, 3.5 * fwhm_pix))
    # the 10 % neighbours sit inside the big aperture of a quarter of the stars: the
    # brighter of them are clipped, and they do not drag the median up
    assert stats["n_stars"] >= 0.7 * x.size
    assert not stats["used"][~lone & (flux > 2e5)].any()


def test_total_flux_correction_needs_stars_and_a_fwhm():
    from diapipe.calibrate.aperture_correction import measure_total_flux_correction

    rng = np.random.default_rng(22)
    _, image, variance, x, y, _ = moffat_field(rng, 5.0, n_side=2)
    with pytest.raises(ApertureCorrectionError, match="usable curve of growth"):
        measure_total_flux_correction(image, variance, None, x[:2], y[:2], 5.0)
    with pytest.raises(ApertureCorrectionError):
        # stars within the big aperture of the image edge are not usable
        measure_total_flux_correction(image, variance, None, np.array([3.0, 5.0, 8.0]), y[:3], 5.0)
    with pytest.raises(ValueError, match="fwhm_pix"):
        measure_total_flux_correction(image, variance, None, x, y, float("nan"))


def test_to_total_flux_scales_the_correction():
    from diapipe.calibrate.aperture_correction import to_total_flux

    corr = ApertureCorrection([1.02, 0.01, -0.005], 1, BBOX, rms=0.004)
    total = to_total_flux(corr, 1.025)
    gx, gy = np.meshgrid(np.linspace(0, BBOX[2], 5), np.linspace(0, BBOX[3], 5))
    np.testing.assert_allclose(total.evaluate(gx, gy), 1.025 * corr.evaluate(gx, gy))
    assert total.order == 1 and total.bbox == corr.bbox
    with pytest.raises(ValueError, match="positive"):
        to_total_flux(corr, 0.0)


def test_correction_error_is_the_fit_surface_error_and_serialises():
    from diapipe.calibrate.aperture_correction import to_total_flux

    rng = np.random.default_rng(31)
    x, y, ap, ap_err, psf, psf_err, _ = make_stars(rng, n=200, frac_outliers=0.0)
    corr, stats = fit_aperture_correction(x, y, ap, ap_err, psf, psf_err, bbox=BBOX, order=0)
    # a constant from ~200 stars: scatter / sqrt(n) relative to the ratio
    assert corr.err == pytest.approx(stats["rms"] / np.sqrt(stats["n_stars"]) / corr.coeffs[0], rel=0.05)
    assert 0 < corr.err < 0.001
    total = to_total_flux(corr, 1.02, 0.002)
    assert total.err == pytest.approx(np.hypot(corr.err, 0.002 / 1.02))
    assert ApertureCorrection.from_dict(total.to_dict()).err == total.err
