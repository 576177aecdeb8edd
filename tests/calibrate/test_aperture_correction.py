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
