"""Preconvolution (score image) for a science image sharper than the template, and the
errors-in-variables correction of the kernel fit, on small synthetic images with known truth."""

import numpy as np
import pytest
from diffim.test_subtract import make_pair

from diapipe.diffim.noise_bias import debiased_solve, source_noise_normal
from diapipe.diffim.preconvolve import preconvolved_score, score_correction_kernel, score_from_difference
from diapipe.diffim.subtract import subtract_images
from diapipe.exposure import masks
from diapipe.exposure.psf import PixelPsf

SIGMA_SCI, SIGMA_TMP, SCALE = 1.7, 2.3, 1.03


@pytest.fixture(scope="module")
def sharp_pair():
    # science PSF 1.7 px (±0.1 across the image), template 2.3 px: matching the template needs deconvolution
    return make_pair(seed=7, n=384, n_stars=200, n_transients=20, scale=SCALE, sigma_t=SIGMA_TMP, sigma_s=SIGMA_SCI,
                     dsigma=0.1, sky_var_s=100.0, sky_var_t=10.0, transient_sn=(8, 30))


def _args(d):
    return (d["science"] - d["bg"], d["science_var"], d["science_mask"], d["science_psf"],
            d["template"], d["template_var"], d["template_mask"], d["template_psf"], d["sources"])


def _significance_at(score, xs, ys, r=2):
    sig = score.image / np.sqrt(score.variance)
    out = []
    for x, y in zip(xs, ys):
        xi, yi = round(x), round(y)
        box = sig[yi - r:yi + r + 1, xi - r:xi + r + 1]
        out.append(box.flat[np.nanargmax(np.abs(box))])
    return np.array(out)


def _blank_width(d, score):
    """Robust width of pixel / sqrt(variance) away from every star and transient."""
    sig = score.image / np.sqrt(score.variance)
    xs, ys, _ = d["stars"]
    tx, ty, _ = d["transients"]
    blank = np.isfinite(sig) & ~masks.any_set(score.mask, ("NO_DATA", "EDGE"))
    for x, y in zip(np.r_[xs, tx], np.r_[ys, ty]):
        blank[max(int(y) - 12, 0):int(y) + 13, max(int(x) - 12, 0):int(x) + 13] = False
    q25, q75 = np.percentile(sig[blank], [25, 75])
    return (q75 - q25) / 1.349


@pytest.fixture(scope="module")
def score(sharp_pair):
    return preconvolved_score(*_args(sharp_pair), background_order=0)


def test_preconvolved_score_noise_and_scale(sharp_pair, score):
    # broadening kernel (template 2.3 px -> science*PSF 1.7*sqrt(2) = 2.4 px) with the true flux ratio
    assert score.metadata["kernel_sum"] == pytest.approx(SCALE, abs=0.01)
    # pixel / sqrt(variance) is the significance: 0.978 measured
    assert _blank_width(sharp_pair, score) == pytest.approx(1.0, abs=0.05)


def test_preconvolved_score_finds_transients_and_not_stars(sharp_pair, score):
    tx, ty, tflux = sharp_pair["transients"]
    # optimal S/N of a point source in the difference of the two noisy images:
    # (S/N / f)^2 = sum_k |P|^2 / (var_s + var_t K^2 |P/T|^2) (template noise grows where it is deconvolved)
    k = 2 * np.pi * np.fft.fftfreq(256)
    k2 = np.add.outer(k**2, k**2)
    p2 = np.exp(-k2 * SIGMA_SCI**2)
    ratio2 = np.exp(-k2 * (SIGMA_SCI**2 - SIGMA_TMP**2))
    per_flux = np.sqrt(np.mean(p2 / (100.0 + 10.0 * SCALE**2 * ratio2)))
    expected = tflux * per_flux
    got = _significance_at(score, tx, ty)
    # below 1 by the transients' own Poisson noise (in the variance plane, not in the sky-only
    # expectation): 0.82 measured
    assert 0.75 < np.median(got / expected) < 0.95
    xs, ys, _ = sharp_pair["stars"]
    inside = (xs > 40) & (xs < 344) & (ys > 40) & (ys < 344)
    star_sig = np.abs(_significance_at(score, xs[inside], ys[inside]))
    # stars up to S/N ~1500 leave residuals below the 5 sigma threshold in the score
    assert np.mean(star_sig > 5.0) <= 0.03, np.sort(star_sig)[-5:]


def test_score_beats_deconvolving_difference_at_stars(sharp_pair, score):
    d = sharp_pair
    ct = subtract_images(*_args(d), "convolveTemplate", background_order=0)
    filt = score_from_difference(ct.difference_image, ct.difference_variance, ct.difference_mask, ct.difference_psf)
    xs, ys, _ = d["stars"]
    inside = (xs > 40) & (xs < 344) & (ys > 40) & (ys < 344)
    pre = np.abs(_significance_at(score, xs[inside], ys[inside]))
    dec = np.abs(_significance_at(filt, xs[inside], ys[inside]))
    print("stars above 5 sigma: score", np.sum(pre > 5), "filtered difference", np.sum(dec > 5))
    assert np.sum(pre > 5) < np.sum(dec > 5) or np.sum(dec > 5) == 0
    assert np.median(pre) <= np.median(dec) + 0.2
    # ... at no cost in transient significance
    tx, ty, _ = d["transients"]
    # significance in units of each image's measured blank-sky noise (the deconvolved difference's
    # variance is 5 % low): the score is 2 % better
    ratio = (_significance_at(score, tx, ty) / _blank_width(d, score)) / (_significance_at(filt, tx, ty)
                                                                        / _blank_width(d, filt))
    assert np.median(ratio) > 0.99, ratio


def test_score_correction_kernel_whitens_to_matched_filter():
    y, x = np.mgrid[-12:13, -12:13]
    g = lambda s: np.exp(-0.5 * (x**2 + y**2) / s**2) / (2 * np.pi * s**2)
    pre = g(1.7)
    kappa = g(np.sqrt(2 * 1.7**2 - 2.3**2 + 1e-9)) if 2 * 1.7**2 > 2.3**2 else g(0.8)
    phi = score_correction_kernel(kappa, pre, 1.0, 1.0)
    assert phi.sum() == pytest.approx(1.0, abs=1e-6)
    # noise spectrum after correction: |phi|^2 (|P|^2 + |kappa|^2) = 2 |P|^2 (flat ratio to |P|^2)
    n = 128
    pad = lambda k: np.fft.fft2(np.roll(np.pad(k, (0, n - k.shape[0])), (-(k.shape[0] // 2),) * 2, (0, 1)))
    ratio = np.abs(pad(phi)) ** 2 * (np.abs(pad(pre)) ** 2 + np.abs(pad(kappa)) ** 2) / np.abs(pad(pre)) ** 2
    k = np.fft.fftfreq(n)
    low = np.hypot(*np.meshgrid(k, k)) < 0.15  # where the PSF has power
    assert np.allclose(ratio[low], 2.0, rtol=0.02)


def test_score_from_difference_white_noise():
    rng = np.random.default_rng(5)
    img = rng.normal(0, 3.0, (200, 200)).astype(np.float32)
    s = score_from_difference(img, np.full(img.shape, 9.0, np.float32), np.zeros(img.shape, np.int32),
                              PixelPsf.gaussian(2.0, 21))
    sig = (s.image / np.sqrt(s.variance))[20:-20, 20:-20]
    assert np.std(sig) == pytest.approx(1.0, abs=0.05)


def test_source_noise_normal_matches_monte_carlo():
    rng = np.random.default_rng(2)
    k, f = 5, 9
    basis = rng.normal(size=(3, k, k))
    var = rng.uniform(0.5, 2.0, (1, f + k - 1, f + k - 1))
    w = rng.uniform(0.0, 1.0, (1, f, f))
    from scipy.signal import convolve2d
    acc = np.zeros((3, 3))
    n_mc = 2000
    for _ in range(n_mc):
        noise = rng.normal(size=var.shape[1:]) * np.sqrt(var[0])
        a = np.array([convolve2d(noise, b, mode="valid").ravel() for b in basis])
        acc += (a * w.ravel()) @ a.T
    expected = source_noise_normal(var, w, basis)[0]
    assert np.allclose(acc / n_mc, expected, rtol=0.08, atol=0.05 * np.abs(expected).max())


def test_debiased_solve_removes_errors_in_variables_bias():
    rng = np.random.default_rng(4)
    truth = np.array([1.0, -0.5])
    n = 20000
    x_true = rng.normal(size=(n, 2)) * [1.0, 3.0]
    noise_var = np.array([0.25, 0.0])
    x = x_true + rng.normal(size=(n, 2)) * np.sqrt(noise_var)
    yv = x_true @ truth + rng.normal(size=n) * 0.1
    m, r = x.T @ x, x.T @ yv
    plain = np.linalg.solve(m, r)
    fixed = debiased_solve(m, r, np.diag(noise_var) * n)
    assert plain[0] == pytest.approx(0.8, abs=0.03)  # classic attenuation 1 / (1 + 0.25)
    assert fixed == pytest.approx(truth, abs=0.02)


def test_detection_on_score_measures_on_difference():
    from diffim.test_dia_sources import _add, _difference, _run

    from diapipe.exposure.exposure import Exposure

    rng = np.random.default_rng(11)
    psf = PixelPsf.gaussian(2.0, 21)
    img = rng.normal(0.0, 1.0, (200, 200))
    _add(img, psf, 60.3, 70.6, 150.0)  # a real source, S/N ~ 21
    diff = _difference(img.copy())
    s = score_from_difference(img, np.ones(img.shape), np.zeros(img.shape, np.int32), psf)
    # a residual that only the difference shows (the score is what decides detection)
    _add(diff.image, psf, 140.0, 130.0, 120.0)
    score = Exposure(image=s.image, mask=s.mask, variance=s.variance, wcs=diff.wcs, psf=s.psf,
                     photo_calib=diff.photo_calib)
    res = _run(diff, score=score)
    cat = res.catalog[~res.catalog["sky_source"]]
    assert len(cat) == 1 and res.stats["detected_on_score"]
    assert abs(cat["x"][0] - 60.3) < 0.3 and abs(cat["y"][0] - 70.6) < 0.3
    plain = _run(diff)
    pc = plain.catalog[~plain.catalog["sky_source"]]
    print(pc["x", "y", "psfFlux", "psfFluxErr"], cat["psfFlux"][0])
    assert len(pc) == 2
    # measured on the same difference as without the score
    assert cat["psfFlux"][0] == pytest.approx(pc["psfFlux"][np.argmin(np.hypot(pc["x"] - 60.3, pc["y"] - 70.6))], rel=0.01)
    assert res.stats["score_noise_scale"] == pytest.approx(1.0, abs=0.05)


def test_score_holes_fall_back_to_difference_detection():
    from diffim.test_dia_sources import _add, _difference, _run

    from diapipe.exposure.exposure import Exposure

    rng = np.random.default_rng(12)
    psf = PixelPsf.gaussian(2.0, 21)
    img = rng.normal(0.0, 1.0, (200, 200))
    _add(img, psf, 100.0, 60.0, 150.0)
    _add(img, psf, 100.0, 140.0, 150.0)
    diff = _difference(img.copy())
    s = score_from_difference(img, np.ones(img.shape), np.zeros(img.shape, np.int32), psf)
    s.image[120:160, 80:120] = np.nan  # e.g. the preconvolved score's margin at a template gap
    s.variance[120:160, 80:120] = np.nan
    score = Exposure(image=s.image, mask=s.mask, variance=s.variance, wcs=diff.wcs, psf=s.psf,
                     photo_calib=diff.photo_calib)
    cat = _run(diff, score=score).catalog
    cat = cat[~cat["sky_source"]]
    assert len(cat) == 2
    assert np.sort(np.round(cat["y"]).astype(int)).tolist() == [60, 140]


def test_score_connections_follow_config():
    from diapipe.diffim import tasks

    sub = tasks.SubtractImagesConfig()
    det = tasks.DetectAndMeasureConfig()
    # on by default since the difference-image fallback at the score's border (measured on both presets)
    assert sub.preconvolution == "sharperScience" and det.doDetectOnScore and det.doRemoveScoreCentroidFailures
    sub.preconvolution = "never"
    det.doDetectOnScore = False
    assert "scoreExposure" not in tasks.SubtractImagesConnections(config=sub).outputs
    assert "scoreExposure" not in tasks.DetectAndMeasureConnections(config=det).inputs
    sub.preconvolution = "sharperScience"
    det.doDetectOnScore = True
    out = tasks.SubtractImagesConnections(config=sub)
    assert "scoreExposure" in out.outputs and out.scoreExposure.name == "goodSeeingDiff_scoreExp"
    assert "scoreExposure" in tasks.DetectAndMeasureConnections(config=det).inputs


def test_debiased_score_kernel_removes_star_residuals():
    """With a noisy template the least-squares kernel of the score comes out too broad
    (errors in variables) and bright stars leave a positive core in the score;
    subtractImages' doDebiasScoreKernelFit removes it (measured: median star
    significance 2.7 -> 0.9, stars above 5 sigma 6 -> 0)."""
    d = make_pair(seed=7, n=384, n_stars=200, n_transients=20, scale=SCALE, sigma_t=SIGMA_TMP, sigma_s=SIGMA_SCI,
                  dsigma=0.1, sky_var_s=100.0, sky_var_t=60.0, transient_sn=(8, 30))
    xs, ys, flux = d["stars"]
    bright = flux > np.percentile(flux, 75)
    z = {}
    for debias in (False, True):
        s = preconvolved_score(*_args(d), background_order=0, debias_kernel_fit=debias)
        z[debias] = _significance_at(s, xs, ys)
    assert np.median(z[False][bright]) > 2.0  # the bias this guards against
    assert abs(np.median(z[True][bright])) < 1.5
    assert (np.abs(z[True]) > 5).sum() == 0


def test_fallback_detection_discounts_residuals_beside_bright_stars():
    """In the score's no-data region the difference stands in; a residual beside a bright
    star there (a 30 sigma arc 8 px off a star of template S/N ~2800) is detected with the
    ordinary template-residual terms and not with scoreFallbackResidualScale = 10; a
    transient in the same region, away from the star, is kept."""
    from diffim.test_dia_sources import _add, _difference, _run, _star_template

    from diapipe.exposure.exposure import Exposure

    rng = np.random.default_rng(13)
    psf = PixelPsf.gaussian(2.0, 21)
    shape = (200, 200)
    matched = _star_template(100.0, 130.0, 2.0e4, shape)
    img = rng.normal(0.0, 1.0, shape)
    _add(img, psf, 108.0, 130.0, 210.0)  # the arc: S/N ~ 30
    _add(img, psf, 100.0, 60.0, 150.0)  # a transient, S/N ~ 21
    diff = _difference(img.copy())
    s = score_from_difference(img, np.ones(shape), np.zeros(shape, np.int32), psf)
    s.image[40:160, 80:120] = np.nan  # the score's margin at a template hole
    s.variance[40:160, 80:120] = np.nan
    score = Exposure(image=s.image, mask=s.mask, variance=s.variance, wcs=diff.wcs, psf=s.psf,
                     photo_calib=diff.photo_calib)
    # neighbourhood fraction 0.001: low enough that the arc passes without the fallback scale
    terms = {"matched_template": matched, "template_residual_fraction": 0.01,
             "template_residual_neighbourhood_fraction": 0.001}
    at = lambda cat, x, y: int((np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y) < 2).sum())
    plain = _run(diff, score=score, **terms).catalog
    scaled = _run(diff, score=score, fallback_residual_scale=10.0, **terms).catalog
    assert at(plain, 108.0, 130.0) == 1
    assert at(scaled, 108.0, 130.0) == 0
    assert at(scaled, 100.0, 60.0) == 1


@pytest.mark.parametrize("name, bad", [("templateResidualFraction", -0.01),
                                       ("templateResidualNeighbourhoodFraction", -0.005),
                                       ("templateResidualNeighbourhoodRadius", 0.0),
                                       ("scoreFallbackResidualScale", 0.5)])
def test_residual_options_reject_bad_values_by_name(name, bad):
    from lsst.pex.config import FieldValidationError

    from diapipe.diffim import tasks

    with pytest.raises(FieldValidationError, match=name):
        setattr(tasks.DetectAndMeasureConfig(), name, bad)
