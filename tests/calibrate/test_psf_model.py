"""PSF model: star selection, a spatially varying Moffat PSF recovered to < 2% in FWHM,
star residuals consistent with noise, clear failure with too few stars."""

import galsim
import numpy as np
import pytest

from diapipe.calibrate.psf_model import PsfFitError, adaptive_fwhm, fit_psf, psf_residuals, select_psf_stars
from diapipe.exposure.masks import MASK_DTYPE
from diapipe.exposure.psf import PixelPsf
from diapipe.measure.detection import detect_sources
from diapipe.measure.measurement import measure_sources

N = 512
SKY = 200.0


def _fwhm_pix(x, y):
    """True FWHM (px): order-2 variation of ~±8% across the image."""
    u, v = x / N - 0.5, y / N - 0.5
    return 3.5 * (1 + 0.16 * u + 0.12 * v + 0.2 * u**2)


def _psf_at(x, y):
    u = x / N - 0.5
    return galsim.Moffat(beta=3.5, fwhm=_fwhm_pix(x, y)).shear(g1=0.06 * u, g2=0.02)


def _true_kernel(x, y, size=25):
    return _psf_at(x, y).drawImage(nx=size, ny=size, scale=1.0).array


def _scene(seed, n_stars=160, n_galaxies=25):
    rng = np.random.default_rng(seed)
    img = galsim.ImageD(N, N, scale=1.0)
    xs, ys = rng.uniform(15, N - 15, n_stars), rng.uniform(15, N - 15, n_stars)
    flux = 10 ** rng.uniform(3.8, 5.5, n_stars)
    for x, y, f in zip(xs, ys, flux):
        b = galsim.BoundsI(int(x) - 15, int(x) + 17, int(y) - 15, int(y) + 17) & img.bounds
        _psf_at(x, y).withFlux(f).drawImage(
            image=img[b], center=galsim.PositionD(x + 1, y + 1), add_to_image=True
        )
    gx, gy = rng.uniform(15, N - 15, n_galaxies), rng.uniform(15, N - 15, n_galaxies)
    for x, y in zip(gx, gy):
        gal = galsim.Convolve(
            galsim.Exponential(half_light_radius=2.5, flux=10 ** rng.uniform(4.5, 5.2)), _psf_at(x, y)
        )
        b = galsim.BoundsI(int(x) - 15, int(x) + 17, int(y) - 15, int(y) + 17) & img.bounds
        gal.drawImage(image=img[b], center=galsim.PositionD(x + 1, y + 1), add_to_image=True)
    model = img.array
    var = SKY + model
    image = model + rng.normal(size=model.shape) * np.sqrt(var)
    return image, var, np.c_[xs, ys], np.c_[gx, gy]


@pytest.fixture(scope="module")
def scene():
    image, var, stars, galaxies = _scene(51)
    mask = np.zeros(image.shape, MASK_DTYPE)
    fp = detect_sources(image, var, mask, psf_sigma_pix=1.5)
    cat = measure_sources(image, var, mask, PixelPsf.gaussian(1.5, size=25), fp)
    return image, var, mask, stars, galaxies, cat


def test_star_selection_rejects_galaxies_and_blends(scene):
    image, var, mask, stars, galaxies, cat = scene
    sel = select_psf_stars(cat, min_snr=50)
    xy = np.c_[cat["centroid_x"], cat["centroid_y"]][sel]
    to_gal = np.min(
        np.hypot(xy[:, None, 0] - galaxies[None, :, 0], xy[:, None, 1] - galaxies[None, :, 1]), axis=1
    )
    to_star = np.min(np.hypot(xy[:, None, 0] - stars[None, :, 0], xy[:, None, 1] - stars[None, :, 1]), axis=1)
    assert sel.sum() >= 40
    assert np.all(to_star < 1.0)  # every selected source is a star ...
    assert np.all(to_gal > 5.0)  # ... and no galaxy got in
    # isolation: no other detection within 10 px
    all_xy = np.c_[cat["centroid_x"], cat["centroid_y"]]
    d = np.hypot(xy[:, None, 0] - all_xy[None, :, 0], xy[:, None, 1] - all_xy[None, :, 1])
    assert np.all(np.sort(d, axis=1)[:, 1] >= 10.0)


def test_spatially_varying_psf_recovered(scene):
    image, var, mask, stars, galaxies, cat = scene
    sel = select_psf_stars(cat, min_snr=50)
    xy = np.c_[cat["centroid_x"], cat["centroid_y"]][sel]
    psf, used = fit_psf(image, var, mask, xy, order=2, return_used=True)
    assert psf.order == 2 and used.sum() >= 0.8 * sel.sum()
    errors = []
    for x, y in [(40, 40), (256, 256), (470, 60), (60, 470), (470, 470), (256, 100)]:
        truth = _true_kernel(x, y)
        errors.append(adaptive_fwhm(psf.compute_kernel_image(x, y)) / adaptive_fwhm(truth) - 1)
        # Pixel-level agreement of the normalised kernels.
        diff = psf.compute_kernel_image(x, y) - truth / truth.sum()
        assert np.abs(diff).max() < 0.05 * truth.max() / truth.sum()
    errors = np.array(errors)
    print("PSF FWHM fractional errors:", np.round(errors, 4))
    assert np.all(np.abs(errors) < 0.02)
    assert abs(np.median(errors)) < 0.01
    # The model follows the variation: FWHM grows by ~15% from the left edge to the right.
    assert adaptive_fwhm(psf.compute_kernel_image(470, 256)) > 1.1 * adaptive_fwhm(
        psf.compute_kernel_image(40, 256)
    )
    # Residuals of the stars against the model are consistent with the noise.
    res = psf_residuals(image, var, mask, psf, xy[used])
    assert abs(np.median(res["chi2_dof"]) - 1) < 0.15, np.median(res["chi2_dof"])
    bright = res["psfFlux"] / res["psfFluxErr"] > 200
    assert bright.sum() >= 5 and np.median(res["chi2_dof"][bright]) < 1.3
    # A constant Gaussian of the same mean size fails that check for the bright stars.
    wrong = psf_residuals(image, var, mask, PixelPsf.gaussian(psf.sigma(), size=25), xy[used])
    assert np.median(wrong["chi2_dof"][bright]) > 2.0


def test_too_few_stars_and_order_reduction(scene):
    image, var, mask, stars, galaxies, cat = scene
    sel = select_psf_stars(cat, min_snr=50)
    xy = np.c_[cat["centroid_x"], cat["centroid_y"]][sel]
    with pytest.raises(PsfFitError, match="needs at least 3") as info:
        fit_psf(image, var, mask, xy[:2])
    assert info.value.n_stars == 2 and info.value.n_required == 3
    few = fit_psf(image, var, mask, xy[:8], order=2)
    assert few.order == 0  # 8 stars cannot constrain 6 terms per pixel (3 stars per term needed)
    with pytest.raises(ValueError, match="odd"):
        fit_psf(image, var, mask, xy, kernel_size=24)
