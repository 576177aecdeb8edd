"""Tests of diapipe.calibrate.characterize: grown detection masks for the background, and
aperture-corrected PSF fluxes that add up to total flux in bad seeing."""

import numpy as np
import pytest

from diapipe.exposure.masks import MASK_DTYPE, any_set, bit

MOFFAT_BETA = 4.765  # the simulator's (a Kolmogorov-like profile)
SKY_E = 400.0


def moffat_sky(rng, *, fwhm_pix=7.0, size=400, n_stars=25):
    """Sky + bright Moffat stars on a jittered grid (true fluxes returned: the sums of their
    +-40 px stamps), Poisson-like Gaussian noise."""
    import galsim

    image = galsim.ImageF(size, size, scale=1.0)

    def draw(x, y, flux, half):
        cx, cy = int(round(x)) + 1, int(round(y)) + 1
        bounds = galsim.BoundsI(cx - half, cx + half, cy - half, cy + half) & image.bounds
        stamp = galsim.ImageF(bounds, scale=1.0)
        galsim.Moffat(beta=MOFFAT_BETA, fwhm=fwhm_pix, flux=flux).drawImage(stamp, center=galsim.PositionD(x + 1, y + 1))
        image[bounds] += stamp
        return float(stamp.array.sum())

    n_side = int(np.ceil(np.sqrt(n_stars)))
    step = (size - 120) / (n_side - 1)
    xs, ys, fluxes = [], [], []
    for k in range(n_stars):
        x = 60 + step * (k % n_side) + rng.uniform(-3, 3)
        y = 60 + step * (k // n_side) + rng.uniform(-3, 3)
        fluxes.append(draw(x, y, 10 ** rng.uniform(4.6, 6.0), 40))
        xs.append(x)
        ys.append(y)
    clean = image.array.astype(np.float64) + SKY_E
    variance = clean.copy()
    noisy = clean + rng.normal(0.0, 1.0, clean.shape) * np.sqrt(variance)
    mask = np.zeros(clean.shape, MASK_DTYPE)
    return noisy.astype(np.float32), mask, variance.astype(np.float32), np.array(xs), np.array(ys), np.array(fluxes)


@pytest.fixture(scope="module")
def field():
    return moffat_sky(np.random.default_rng(5))


def _match(catalog, xs, ys):
    cx = np.asarray(catalog["centroid_x"], float)
    cy = np.asarray(catalog["centroid_y"], float)
    d2 = (cx[:, None] - xs[None, :]) ** 2 + (cy[:, None] - ys[None, :]) ** 2
    j = np.argmin(d2, axis=0)
    ok = d2[j, np.arange(xs.size)] < 1.0
    return j[ok], np.flatnonzero(ok)


def test_background_mask_grows_detections_only_in_a_copy():
    from diapipe.calibrate.characterize import background_mask

    mask = np.zeros((41, 41), MASK_DTYPE)
    mask[20, 20] = bit("DETECTED")
    mask[0, 0] = bit("BAD")
    grown = background_mask(mask, 4)
    detected = any_set(grown, ["DETECTED"])
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(xx - 20, yy - 20)
    assert detected[r <= 3.0].all()  # a disk of ~4 px radius (an octagon)
    assert not detected[r > 4.0 * np.sqrt(2) + 1e-9].any()
    assert 30 < detected.sum() < 81
    assert grown[0, 0] & bit("BAD")
    assert any_set(mask, ["DETECTED"]).sum() == 1  # the input is untouched
    assert np.array_equal(background_mask(mask, 0), mask)


def test_characterize_background_and_total_flux_in_bad_seeing(field):
    from diapipe.calibrate.characterize import characterize_image

    image, mask, variance, xs, ys, flux = field
    result = characterize_image(image, mask, variance, initial_fwhm_pix=6.0, psf_kernel_size=25)
    bias = float(np.mean(result.background.evaluate(image.shape)) - SKY_E)
    stats = result.stats["ap_corr_stats"]
    i_cat, i_true = _match(result.catalog, xs, ys)
    assert i_true.size >= 20
    psf_flux = np.asarray(result.catalog["psfFlux"], float)[i_cat]
    corrected = psf_flux * result.aperture_correction.evaluate(xs[i_true], ys[i_true])
    ratio = np.median(corrected / flux[i_true])
    # FWHM 7 px: a 12 px aperture misses 2.1 % of a Moffat star; the factor restores it
    # (without it the median ratio would be 0.979: Rubin's 12 px scale)
    assert stats["total_flux_factor"] == pytest.approx(1.021, abs=0.005)
    assert stats["total_flux_radius_pix"] > 20.0
    assert abs(ratio - 1.0) < 0.005
    assert abs(bias) < 0.1  # e-/px, of a 400 e- sky with bright stars' wings
