"""Real DECam pair (i band, FWHM 5.2 px vs 3.9 px): subtract one epoch from the other.

Data: ../shared/data/real/decam_pair (cut-outs from thomasvrussell/sfft's test data,
already registered on a common grid, sky-subtracted, ADU). PSFs are estimated as
Gaussians from the second moments of bright stars found with sep, the source list
comes from sep, and the variance planes from GAIN/RDNOISE (+ the sky level: SKYBRITE
where the header has it, otherwise the measured sky noise) plus the source Poisson term.
"""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from diapipe.diffim.subtract import subtract_images
from diapipe.exposure import masks
from diapipe.exposure.psf import PixelPsf

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "decam_pair"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/real/decam_pair")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real DECam pair not found at {DATA}")


def _adaptive_sigma(image, x, y, half=12):
    """Gaussian-weighted (adaptive) second moments of one star -> Gaussian sigma in px."""
    xi, yi = int(round(x)), int(round(y))
    stamp = image[yi - half : yi + half + 1, xi - half : xi + half + 1]
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    dx, dy = xx - (x - xi), yy - (y - yi)
    sigma = 2.0
    for _ in range(20):
        w = stamp * np.exp(-0.5 * (dx**2 + dy**2) / sigma**2)
        m2 = (w * (dx**2 + dy**2)).sum() / (2.0 * w.sum())
        # a Gaussian of width s weighted by one of width sigma has moments s²σ²/(s²+σ²)
        sigma_new = np.sqrt(max(1.0 / max(1.0 / m2 - 1.0 / sigma**2, 1e-6), 0.25))
        if abs(sigma_new - sigma) < 1e-4:
            break
        sigma = sigma_new
    return sigma


def _load(name):
    import sep

    with fits.open(DATA / f"DEC-{name}.mini.fits") as hdul:
        image = np.ascontiguousarray(hdul[0].data, dtype=np.float64)
        header = hdul[0].header
    gain, rdnoise = float(header["GAIN"]), float(header["RDNOISE"])
    q25, q75 = np.percentile(image, [25, 75])
    if "SKYBRITE" in header:
        sky_var = float(header["SKYBRITE"]) / gain + (rdnoise / gain) ** 2
    else:
        sky_var = ((q75 - q25) / 1.349) ** 2
    variance = sky_var + np.maximum(image, 0.0) / gain
    mask = np.zeros(image.shape, np.int32)
    masks.set_plane(mask, image > 0.9 * float(header["SATURATE"]), "SAT")
    objects = sep.extract(image, 1.5, err=np.sqrt(sky_var), minarea=5)
    flux, flux_err, flag = sep.sum_circle(image, objects["x"], objects["y"], 6.0, err=np.sqrt(variance))
    flags = (objects["flag"] != 0) | (flag != 0)
    # Gaussian PSF from the second moments of bright, unflagged, round sources
    sn = flux / flux_err
    stars = (~flags) & (sn > 30) & (sn < 500)
    sigma = float(np.median([_adaptive_sigma(image, x, y) for x, y in zip(objects["x"][stars], objects["y"][stars])]))
    sources = Table({"x": objects["x"], "y": objects["y"], "psfFlux": flux, "psfFluxErr": flux_err,
                     "flags": flags})
    psf = PixelPsf.gaussian(sigma, size=31, bbox=(0, 0, image.shape[1] - 1, image.shape[0] - 1))
    return image, variance, mask, psf, sources, header


@pytest.fixture(scope="module")
def subtraction():
    sci = _load("OBS04a")
    tmp = _load("OBS18a")
    result = subtract_images(sci[0], sci[1], sci[2], sci[3], tmp[0], tmp[1], tmp[2], tmp[3], sci[4], mode="auto")
    return sci, tmp, result


def test_psfs_match_headers(subtraction):
    sci, tmp, _ = subtraction
    assert sci[3].fwhm() == pytest.approx(sci[5]["FWHM"], rel=0.15)
    assert tmp[3].fwhm() == pytest.approx(tmp[5]["FWHM"], rel=0.15)


def test_blank_sky_noise_matches_expectation(subtraction):
    sci, tmp, result = subtraction
    meta = result.metadata
    assert meta["mode"] == "convolveTemplate"  # template (3.9 px) is the sharper image
    assert meta["n_stamps_used"] >= 3
    # the header-based variance of the template is right to 10% before any rescaling
    assert meta["template_variance_scale"] == pytest.approx(1.0, abs=0.1)
    good = ~masks.any_set(result.difference_mask, ("NO_DATA", "SAT", "SAT_TEMPLATE"))
    sources = sci[4]
    yy, xx = np.mgrid[0 : good.shape[0], 0 : good.shape[1]]
    near = np.zeros(good.shape, bool)
    for x, y in zip(sources["x"], sources["y"]):
        near |= np.hypot(xx - x, yy - y) < 8
    blank = good & ~near
    z = result.difference_image[blank] / np.sqrt(result.difference_variance[blank])
    assert np.std(z) == pytest.approx(1.0, abs=0.1)
    # expected blank-sky variance from the (rescaled) inputs and the matching kernel
    kappa_sum = meta["kernel_sum"]
    s_var = np.median(sci[1][blank]) * meta["science_variance_scale"]
    t_var = np.median(tmp[1][blank]) * meta["template_variance_scale"]
    expected = np.sqrt(s_var + t_var * kappa_sum**2)
    assert np.std(result.difference_image[blank]) / expected == pytest.approx(1.0, abs=0.1)


def test_no_systematic_residuals_at_bright_stars(subtraction):
    sci, _, result = subtraction
    src = sci[4]
    sn = np.asarray(src["psfFlux"] / src["psfFluxErr"])
    bright = (sn > 50) & ~np.asarray(src["flags"])
    good = ~masks.any_set(result.difference_mask, ("NO_DATA", "SAT", "SAT_TEMPLATE"))
    z = result.difference_image / np.sqrt(result.difference_variance)
    sums, chis = [], []
    for x, y in zip(src["x"][bright], src["y"][bright]):
        xi, yi = int(round(x)), int(round(y))
        box = (slice(yi - 6, yi + 7), slice(xi - 6, xi + 7))
        if not good[box].all():
            continue
        chis.append(np.mean(z[box] ** 2))
        sums.append(z[box].sum() / np.sqrt(z[box].size))
    assert len(sums) >= 5
    # residual flux at stars consistent with noise on average (no scale error) ...
    assert abs(np.median(sums)) < 1.0
    # ... and the residual pattern small: median over stars of the mean chi2 per pixel in a 13x13 box
    assert np.median(chis) < 2.0
