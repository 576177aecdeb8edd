"""Rendering: photometry, astrometry and PSF of drawn objects against truth and galsim."""

import galsim
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from testing_helpers import make_tan_sip_wcs

from diapipe.sim.observing import make_visits, njy_to_electrons
from diapipe.sim.render import (
    MOFFAT_BETA,
    DetectorPsfModel,
    affine_pix_to_fp,
    local_jacobian,
    psf_for_detector,
    render_detector,
)
from diapipe.sim.sky import SkyCatalog, mag_to_njy, make_sky_catalog
from diapipe.sim.truth import TRUTH_COLUMNS, visit_truth

SHAPE = (256, 256)


@pytest.fixture(scope="module")
def visit():
    return make_visits(1, "r", 61.9, -35.8, np.random.default_rng(4), start_mjd=60010)[0]


@pytest.fixture(scope="module")
def wcs(visit):
    return make_tan_sip_wcs(visit.boresight_ra, visit.boresight_dec, crpix=(128.0, 120.0), rotation_deg=30.0, sip=False)


def _catalog(wcs, xy, mags, kind="star", **shape):
    ra, dec = wcs.all_pix2world(np.array([p[0] for p in xy]), np.array([p[1] for p in xy]), 0)
    n = len(xy)
    cols = {"id": np.arange(1, n + 1, dtype=np.int64), "type": [kind] * n, "ra": ra, "dec": dec, "mag_r": mags,
                "host_id": np.full(n, -1, np.int64)}
    for name in ("hlr_disk_arcsec", "hlr_bulge_arcsec", "bulge_frac", "ellip_g", "pa_deg", "epoch_mjd"):
        cols[name] = np.full(n, shape.get(name, np.nan))
    return SkyCatalog(pd.DataFrame(cols), bands=("r",))


STARS = [(40.3, 50.7), (200.6, 60.1), (128.25, 128.9), (60.9, 210.4), (210.0, 200.5)]


@pytest.fixture(scope="module")
def psf_model(visit):
    # A detector far out in the focal plane so the PSF grows and is elliptical.
    return DetectorPsfModel(visit, affine_pix_to_fp((250.0, 120.0), SHAPE))


def test_star_photometry_and_centroids(visit, wcs, psf_model):
    sky = _catalog(wcs, STARS, np.full(len(STARS), 18.0))
    res = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(0), sky_level_e=0.0,
                          include_noise=False)
    assert res.image.dtype == np.float32
    expected = mag_to_njy(18.0) * njy_to_electrons(visit)
    assert np.allclose(res.truth["flux_e"], expected)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for x, y in STARS:
        r = np.hypot(xx - x, yy - y)
        ap = r < 25
        flux = res.image[ap].sum()
        assert flux == pytest.approx(expected, rel=0.005)
        w = res.image * ap
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02
    assert np.allclose(res.truth[["x", "y"]].to_numpy(), np.array(STARS), atol=1e-6)
    assert list(res.truth.columns) == list(TRUTH_COLUMNS)


def _galsim_star(q, x, y, flux, shape=SHAPE):
    """galsim's pixel-convolved Moffat with shape matrix q (px²) — an outside reference."""
    alpha_det = np.linalg.det(q) ** 0.25
    fwhm = 2 * alpha_det * np.sqrt(2 ** (1 / MOFFAT_BETA) - 1)
    a = np.linalg.cholesky(q) / alpha_det  # unit-determinant map
    prof = galsim.Moffat(beta=MOFFAT_BETA, fwhm=fwhm).transform(a[0, 0], a[0, 1], a[1, 0], a[1, 1]).withFlux(flux)
    img = galsim.ImageD(galsim.BoundsI(0, shape[1] - 1, 0, shape[0] - 1), scale=1.0)
    prof.drawImage(image=img, center=(x, y))
    return img.array


def test_star_matches_galsim_and_fwhm(visit, wcs, psf_model):
    x, y = STARS[2]
    sky = _catalog(wcs, [STARS[2]], [18.0])
    res = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(0), sky_level_e=0.0,
                          include_noise=False)
    q = psf_model.shape_matrix(x, y)[0]
    flux = res.truth["flux_e"].iloc[0]
    ref = _galsim_star(q, x, y, flux)
    assert np.abs(res.image - ref).max() < 0.005 * ref.max()
    # Fit the FWHM of the drawn star with galsim's model: matches the visit's PSF FWHM here.
    fwhm_px = float(psf_model.fwhm_px(x, y)[0])

    def cost(f):
        return np.sum((_galsim_star(q * (f / fwhm_px) ** 2, x, y, flux) - res.image) ** 2)

    fit = minimize_scalar(cost, bounds=(0.7 * fwhm_px, 1.3 * fwhm_px), method="bounded").x
    assert fit == pytest.approx(fwhm_px, rel=0.02)
    fwhm_arcsec = float(psf_model.fwhm_arcsec(x, y))
    assert fwhm_arcsec / visit.psf_fwhm_arcsec - 1 == pytest.approx(visit.psf_radial_growth * (276 / 320) ** 2,
                                                                    rel=0.05)


def test_galaxy_matches_galsim_and_orientation(visit, wcs, psf_model):
    x, y = 128.0, 128.0
    sky = _catalog(wcs, [(x, y)], [19.0], kind="galaxy", hlr_disk_arcsec=0.8, hlr_bulge_arcsec=0.3,
                   bulge_frac=0.0, ellip_g=0.4, pa_deg=0.0)  # elongated north-south
    res = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(0), sky_level_e=0.0,
                          include_noise=False)
    flux = res.truth["flux_e"].iloc[0]
    assert res.image.sum() == pytest.approx(flux, rel=0.01)
    # galsim reference: exponential in (east, north) arcsec, mapped to pixels, convolved with the PSF.
    m = np.linalg.inv(local_jacobian(wcs, [x], [y])[0])
    gal = galsim.Exponential(half_light_radius=0.8).shear(g=0.4, beta=90 * galsim.degrees)
    gal = gal.transform(m[0, 0], m[0, 1], m[1, 0], m[1, 1])
    q = psf_model.shape_matrix(x, y)[0]
    alpha_det = np.linalg.det(q) ** 0.25
    a = np.linalg.cholesky(q) / alpha_det
    psf = galsim.Moffat(beta=MOFFAT_BETA, fwhm=2 * alpha_det * np.sqrt(2 ** (1 / MOFFAT_BETA) - 1))
    psf = psf.transform(a[0, 0], a[0, 1], a[1, 0], a[1, 1])
    img = galsim.ImageD(galsim.BoundsI(0, SHAPE[1] - 1, 0, SHAPE[0] - 1), scale=1.0)
    galsim.Convolve(gal, psf).withFlux(flux).drawImage(image=img, center=(x, y))
    assert np.abs(res.image - img.array).max() < 0.02 * img.array.max()
    # The major axis points north: along the pixel direction of increasing dec.
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]] - np.array([y, x])[:, None, None]
    w = res.image
    ixx, iyy, ixy = (w * xx * xx).sum(), (w * yy * yy).sum(), (w * xx * yy).sum()
    _, evecs = np.linalg.eigh([[ixx, ixy], [ixy, iyy]])
    major = evecs[:, 1]
    north = m @ np.array([0.0, 1.0])
    assert abs(major @ north) / np.linalg.norm(north) > 0.98


def test_noise_determinism_and_truth(visit, wcs, psf_model):
    sky = make_sky_catalog(visit.boresight_ra - 0.03, visit.boresight_ra + 0.03, visit.boresight_dec - 0.03,
                           visit.boresight_dec + 0.03, np.random.default_rng(9), galaxy_mag_limit=24.0,
                           transients_per_deg2=3000, mjd_range=(60000, 60020), star_density_scale=10)
    a = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(1))
    b = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(1))
    c = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(2))
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    clean = render_detector(sky, visit, wcs, SHAPE, psf_model, np.random.default_rng(1), include_noise=False)
    resid = (a.image - clean.image) / np.sqrt(clean.image)
    assert abs(resid.std() - 1) < 0.03 and abs(resid.mean()) < 0.02
    assert 800 < a.sky_level_e < 950
    t = a.truth
    on = t[t["on_detector"]]
    assert on["x"].between(-0.5, 255.5).all() and on["y"].between(-0.5, 255.5).all()
    assert {"star", "galaxy"} <= set(on["type"])
    assert np.allclose(t["flux_e"], t["flux_njy"] * njy_to_electrons(visit))
    tr = t[t["type"] == "transient"]
    assert len(tr) > 0 and np.all(tr["ref_flux_njy"] == 0) and np.all(tr["drawn"] == (tr["flux_njy"] > 0))
    # The noiseless image holds the drawn flux of objects near the centre (wings leave through the edges).
    assert clean.image.sum() - clean.sky_level_e * clean.image.size == pytest.approx(
        t.loc[t["on_detector"], "flux_e"].sum(), rel=0.1)


def test_psf_for_detector_is_the_drawn_psf(visit, wcs, psf_model):
    psf = psf_for_detector(psf_model, SHAPE, xy0=(1000, 2000), order=2)
    assert psf.bbox == (1000.0, 2000.0, 1255.0, 2255.0)
    shifted = DetectorPsfModel(visit, affine_pix_to_fp((250.0, 120.0), SHAPE, xy0=(1000, 2000)))
    psf = psf_for_detector(shifted, SHAPE, xy0=(1000, 2000), order=2)
    x, y = 1128.0, 2128.0
    k = psf.compute_kernel_image(x, y)
    half = k.shape[0] // 2
    ref = _galsim_star(shifted.shape_matrix(x, y)[0], half, half, 1.0, shape=k.shape)
    assert np.abs(k - ref / ref.sum()).max() < 0.01 * ref.max()
    # Visit truth at the detector centre.
    vt = visit_truth(visit, shifted, SHAPE, xy0=(1000, 2000), sky_level_e=880.0)
    assert vt["psf_fwhm_px"] == pytest.approx(vt["psf_fwhm_arcsec"] / 0.20006, rel=1e-3)
    assert vt["njy_per_electron"] == pytest.approx(1 / njy_to_electrons(visit))
