"""Cosmic rays: injected tracks and hits are found, stars (even saturating-bright) are not,
repair removes them and sets CR|INTRP."""

import galsim
import numpy as np
import pytest

from diapipe.exposure.masks import MASK_DTYPE, any_set, set_plane
from diapipe.measure.cosmic_rays import find_cosmic_rays, psf_neighbour_ratios, repair_cosmic_rays

SKY_VAR = 100.0


def _stars(rng, shape, n, sigma, flux_range):
    img = galsim.ImageD(shape[1], shape[0], scale=1.0)
    pos = rng.uniform(20, np.array(shape[::-1]) - 20, (n, 2))
    flux = 10 ** rng.uniform(*np.log10(flux_range), n)
    for (x, y), f in zip(pos, flux):
        b = galsim.BoundsI(int(x) - 14, int(x) + 16, int(y) - 14, int(y) + 16) & img.bounds
        galsim.Moffat(beta=3.5, fwhm=2.3548 * sigma, flux=f).drawImage(
            image=img[b], center=galsim.PositionD(x + 1, y + 1), add_to_image=True
        )
    return img.array, pos


def _add_cosmic_rays(rng, image, n, avoid, min_dist=10.0):
    """Single hits and straight tracks (length 1-15 px, charge shared with the side pixel)."""
    ny, nx = image.shape
    crs = []
    while len(crs) < n:
        x0, y0 = rng.uniform(5, nx - 5), rng.uniform(5, ny - 5)
        length = rng.integers(0, 15)
        angle = rng.uniform(0, np.pi)
        steps = np.linspace(0, length, 2 * length + 1) if length else np.zeros(1)
        xs = np.clip(np.round(x0 + steps * np.cos(angle)).astype(int), 0, nx - 1)
        ys = np.clip(np.round(y0 + steps * np.sin(angle)).astype(int), 0, ny - 1)
        # Keep whole tracks away from the stars, so "flagged near a star" means a false CR.
        if np.min(np.hypot(avoid[None, :, 0] - xs[:, None], avoid[None, :, 1] - ys[:, None])) < min_dist:
            continue
        pix = np.unique(np.c_[ys, xs], axis=0)
        amplitude = rng.uniform(15, 300) * np.sqrt(SKY_VAR)  # 15 - 300 sigma per pixel
        image[pix[:, 0], pix[:, 1]] += amplitude * rng.uniform(0.6, 1.0, len(pix))
        crs.append(pix)
    return crs


@pytest.mark.parametrize("sigma", [1.2, 2.0])
def test_injected_cosmic_rays_found_and_stars_untouched(sigma):
    rng = np.random.default_rng(31 + int(10 * sigma))
    shape = (512, 512)
    stars, pos = _stars(rng, shape, 120, sigma, (1e3, 3e6))  # up to ~1e5 e- peaks
    image = stars + rng.normal(size=shape) * np.sqrt(SKY_VAR + stars)
    crs = _add_cosmic_rays(rng, image, 100, pos)
    var = SKY_VAR + stars
    mask = np.zeros(shape, MASK_DTYPE)
    found = find_cosmic_rays(image, var, mask, psf_sigma_pix=sigma)
    hit = np.array([found[cr[:, 0], cr[:, 1]].any() for cr in crs])
    pixel_fraction = np.mean(np.concatenate([found[cr[:, 0], cr[:, 1]] for cr in crs]))
    assert hit.mean() >= 0.95, hit.mean()
    assert pixel_fraction >= 0.9, pixel_fraction
    # No pixel near any star (incl. the brightest) is flagged.
    yy, xx = np.nonzero(found)
    near_star = np.min(np.hypot(xx[:, None] - pos[None, :, 0], yy[:, None] - pos[None, :, 1]), axis=1) < 6
    assert not near_star.any(), np.c_[xx, yy][near_star]
    # Everything flagged belongs to an injected CR (or touches one).
    truth = np.zeros(shape, bool)
    for cr in crs:
        truth[cr[:, 0], cr[:, 1]] = True
    from scipy import ndimage

    assert not (found & ~ndimage.binary_dilation(truth, structure=np.ones((3, 3), bool))).any()

    repaired = image.copy()
    n = repair_cosmic_rays(repaired, mask, found)
    assert n == found.sum()
    assert np.all(any_set(mask, "CR") == found) and np.all(any_set(mask, "INTRP") == found)
    residual = (repaired - stars)[truth] / np.sqrt(SKY_VAR)
    assert np.percentile(np.abs(residual), 95) < 5.0  # back to the sky level within the noise


def test_saturated_pixels_are_not_flagged():
    image = np.random.default_rng(41).normal(0, 10.0, (64, 64))
    image[30:34, 20:22] = 5e4  # a flat-topped saturated core with sharp edges
    mask = np.zeros(image.shape, MASK_DTYPE)
    sat = np.zeros(image.shape, bool)
    sat[30:34, 20:22] = True
    set_plane(mask, sat, "SAT")
    assert not find_cosmic_rays(image, np.full(image.shape, 100.0), mask, psf_sigma_pix=1.5).any()


def test_neighbour_ratios_and_bad_psf_width():
    ratios = psf_neighbour_ratios(1.5)
    assert np.all((ratios > 0.5) & (ratios < 1.0)) and ratios[2] < ratios[0]  # diagonals fall faster
    kernel = galsim.Gaussian(sigma=1.5).drawImage(nx=7, ny=7, scale=1.0).array
    assert np.allclose(psf_neighbour_ratios(kernel=kernel), ratios, atol=0.01)
    with pytest.raises(ValueError, match="psf_sigma_pix"):
        psf_neighbour_ratios(None)
    # With no safety margin, a PSF claimed far wider than the real one makes stars look like CRs:
    # refuse rather than flag (and later interpolate) every star core.
    rng = np.random.default_rng(42)
    stars, _ = _stars(rng, (128, 128), 200, 1.0, (1e5, 1e6))
    with pytest.raises(ValueError, match="too large"):
        find_cosmic_rays(
            stars + rng.normal(0, 10, stars.shape),
            SKY_VAR + stars,
            None,
            psf_sigma_pix=6.0,
            contrast_factor=1.0,
            max_fraction=0.002,
        )
    # The default margin (Rubin's cond3_fac 2.5) tolerates that misestimate without flagging stars.
    assert not find_cosmic_rays(
        stars + rng.normal(0, 10, stars.shape), SKY_VAR + stars, None, psf_sigma_pix=6.0
    ).any()
