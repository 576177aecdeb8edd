"""`diapipe.sim.pair`: a rendered template/science pair has the photometric scale, noise and
kernel-candidate flags the difference-imaging tasks expect."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.wcs import WCS


@pytest.fixture(scope="module")
def pair():
    from diapipe.sim.observing import make_visits
    from diapipe.sim.pair import render_difference_pair
    from diapipe.sim.sky import make_sky_catalog

    rng = np.random.default_rng(4)
    size, scale = 500, 0.2 / 3600
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [61.0, -36.0]
    wcs.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    wcs.wcs.set()
    half = 0.6 * size * scale
    sky = make_sky_catalog(61.0 - half / 0.81, 61.0 + half / 0.81, -36.0 - half, -36.0 + half, rng, bands="g",
                           transients_per_deg2=0.0, variable_fraction=0.0, star_density_scale=30.0)
    template_visit, science_visit = make_visits(2, "g", 61.0, -36.0, rng, dither_radius_deg=0.0)
    template_visit = dataclasses.replace(template_visit, psf_fwhm_arcsec=0.65)
    science_visit = dataclasses.replace(science_visit, psf_fwhm_arcsec=0.9)
    return render_difference_pair(sky, template_visit, science_visit, wcs, (size, size), rng, n_coadd=4), \
        science_visit


def test_fluxes_on_each_exposures_scale(pair):
    """Aperture sums of isolated, unsaturated stars: the template in nJy, the science in
    electrons that its PhotoCalib turns into the same nJy."""
    p, _ = pair
    t = p.truth
    stars = t[(t["type"] == "star") & (t["mag"] > 17.0) & (t["mag"] < 21.5)
              & (t["x"] > 20) & (t["x"] < 480) & (t["y"] > 20) & (t["y"] < 480)]
    others = t.loc[t["mag"] < 23.0, ["x", "y"]].to_numpy()
    ratios_t, ratios_s = [], []
    yy, xx = np.mgrid[-15:16, -15:16]
    aperture = np.hypot(xx, yy) <= 15
    for _, s in stars.iterrows():
        d = np.hypot(others[:, 0] - s["x"], others[:, 1] - s["y"])
        if np.sum(d < 20) > 1:
            continue
        xi, yi = int(round(s["x"])), int(round(s["y"]))
        cut = (slice(yi - 15, yi + 16), slice(xi - 15, xi + 16))
        ratios_t.append(p.template.image[cut][aperture].sum() / s["flux_njy"])
        science_njy = p.science.image[cut][aperture].sum() * p.science.photo_calib.calibration_mean
        ratios_s.append(science_njy / s["flux_njy"])
    print(f"{len(ratios_t)} stars: template {np.median(ratios_t):.4f}, science {np.median(ratios_s):.4f}")
    assert len(ratios_t) >= 5
    assert np.median(ratios_t) == pytest.approx(1.0, abs=0.02)
    assert np.median(ratios_s) == pytest.approx(1.0, abs=0.02)


def test_noise_matches_the_variance_planes(pair):
    """Template noise is that of n_coadd visits; both variance planes describe their pixels
    (blank sky: more than 12 px from every drawn object)."""
    from scipy.spatial import cKDTree

    p, _ = pair
    yy, xx = np.mgrid[: p.science.image.shape[0], : p.science.image.shape[1]]
    distance, _ = cKDTree(p.truth[["x", "y"]].to_numpy()).query(np.column_stack([xx.ravel(), yy.ravel()]))
    blank = (distance > 12).reshape(xx.shape)
    assert blank.sum() > 1000
    for exposure in (p.template, p.science):
        z = (exposure.image / np.sqrt(exposure.variance))[blank]
        q25, q75 = np.percentile(z, [25, 75])
        assert (q75 - q25) / 1.349 == pytest.approx(1.0, abs=0.05)
    sky_ratio = np.median(p.template.variance[blank]) / np.median(p.science.variance[blank])
    calib = p.science.photo_calib.calibration_mean
    assert sky_ratio / calib**2 == pytest.approx(1.0 / 4, rel=0.1)  # n_coadd = 4, same sky


def test_kernel_candidates_are_unsaturated_stars(pair):
    p, _ = pair
    src = p.sources
    is_star = (p.truth["type"] == "star").to_numpy()
    assert np.array_equal(np.asarray(src["flag_shape"]), ~is_star)
    assert (np.asarray(src["psfFlux"]) / np.asarray(src["psfFluxErr"]))[is_star].max() > 100
    assert p.template.psf.sigma() < p.science.psf.sigma()
