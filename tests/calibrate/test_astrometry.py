"""Tests of diapipe.calibrate.astrometry against a known TAN-SIP WCS.

Stars are placed on a 4072 x 4000 detector whose true WCS is TAN (0.2"/px, rotated
30 deg, east toward -x) with a cubic radial SIP distortion of ~3" at the corners plus a
small quadratic term; centroids get Gaussian noise of 0.01-0.03 px depending on S/N
(20-500). The initial WCS is the true one shifted and rotated.
"""

import numpy as np
import pytest
from astropy.wcs import WCS, Sip

from diapipe.calibrate.astrometry import (
    AstrometryError,
    fit_tan_sip,
    fit_wcs,
    match_to_reference,
    wcs_pixel_scale_arcsec,
)

BBOX = (0, 0, 4071, 3999)


def make_true_wcs(rot_deg=30.0, k_radial=6.5e-10, quad=1e-7):
    """TAN-SIP WCS at 0.2"/px; radial distortion k r^3 (~15 px = 3" at the corner)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [61.9, -35.8]
    w.wcs.crpix = [2036.5, 2000.5]
    p, t = 0.2 / 3600, np.radians(rot_deg)
    w.wcs.cd = p * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[3, 0] = a[1, 2] = b[2, 1] = b[0, 3] = k_radial
    a[2, 0], b[1, 1] = quad, -0.5 * quad
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def perturb_wcs(w, shift_arcsec, rot_deg, keep_sip=True):
    """The true WCS with CRVAL moved by ``shift_arcsec`` (at 53 deg PA) and CD rotated."""
    out = w.deepcopy()
    dec = w.wcs.crval[1]
    out.wcs.crval = [w.wcs.crval[0] + 0.6 * shift_arcsec / 3600 / np.cos(np.radians(dec)),
                     dec + 0.8 * shift_arcsec / 3600]
    t = np.radians(rot_deg)
    out.wcs.cd = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ w.wcs.cd
    if not keep_sip:
        out.sip = None
        out.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    out.wcs.set()
    return out


def make_star_field(rng, n_stars=300, n_spurious=30, n_undetected=60, true_wcs=None):
    """Sources (noisy centroids) and a reference catalogue for one detector.

    The reference catalogue holds the ``n_stars`` detected stars plus ``n_undetected`` bright
    ones (saturated, not in the source list); the source list also holds ``n_spurious``
    detections with no reference (galaxies, artefacts).
    """
    true_wcs = make_true_wcs() if true_wcs is None else true_wcs
    n_ref = n_stars + n_undetected
    x = rng.uniform(BBOX[0], BBOX[2], n_ref)
    y = rng.uniform(BBOX[1], BBOX[3], n_ref)
    ra, dec = true_wcs.all_pix2world(x, y, 0)
    mag = np.concatenate([rng.uniform(17.0, 21.5, n_stars), rng.uniform(14.0, 16.0, n_undetected)])
    ref_flux = 10 ** ((31.4 - mag) / 2.5)
    snr = np.clip(500 * 10 ** (-0.4 * (mag[:n_stars] - 17.0)), 20, 500)
    sigma_pix = 0.01 + 0.02 * (np.log(500 / snr) / np.log(25))  # 0.01 px at S/N 500, 0.03 at 20
    sx = np.concatenate([x[:n_stars] + rng.normal(0, sigma_pix), rng.uniform(0, 4071, n_spurious)])
    sy = np.concatenate([y[:n_stars] + rng.normal(0, sigma_pix), rng.uniform(0, 3999, n_spurious)])
    sflux = np.concatenate([ref_flux[:n_stars] * rng.normal(1, 0.05, n_stars),
                            10 ** ((31.4 - rng.uniform(18, 22, n_spurious)) / 2.5)])
    sigma = np.concatenate([sigma_pix, np.full(n_spurious, 0.05)])
    return dict(true_wcs=true_wcs, src_x=sx, src_y=sy, src_flux=sflux, sigma_pix=sigma,
                ref_ra=ra, ref_dec=dec, ref_flux=ref_flux, n_stars=n_stars)


def wcs_errors_mas(true_wcs, fitted, n_grid=41):
    """Forward and inverse (astropy iterative and SIP AP/BP polynomial) errors over the detector."""
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(BBOX[0], BBOX[2], n_grid),
                                             np.linspace(BBOX[1], BBOX[3], n_grid)))
    ra_t, dec_t = true_wcs.all_pix2world(gx, gy, 0)
    ra_f, dec_f = fitted.all_pix2world(gx, gy, 0)
    forward = np.hypot((ra_f - ra_t) * np.cos(np.radians(dec_t)), dec_f - dec_t) * 3.6e6
    scale_mas = wcs_pixel_scale_arcsec(true_wcs) * 1e3
    px, py = fitted.all_world2pix(ra_t, dec_t, 0)
    inverse_iter = np.hypot(px - gx, py - gy) * scale_mas
    # The AP/BP polynomials on their own, as FITS readers without iteration use them.
    crpix = fitted.wcs.crpix
    u, v = (fitted.wcs_world2pix(ra_t, dec_t, 1) - crpix[:, None])
    ap, bp = fitted.sip.ap, fitted.sip.bp
    du = sum(ap[p, q] * u**p * v**q for p in range(ap.shape[0]) for q in range(ap.shape[1]))
    dv = sum(bp[p, q] * u**p * v**q for p in range(bp.shape[0]) for q in range(bp.shape[1]))
    inverse_poly = np.hypot(u + du + crpix[0] - 1 - gx, v + dv + crpix[1] - 1 - gy) * scale_mas
    rms = lambda e: float(np.sqrt(np.mean(e**2)))  # noqa: E731
    return rms(forward), rms(inverse_iter), rms(inverse_poly), float(forward.max())


@pytest.mark.parametrize("seed", [1, 2])
def test_fit_wcs_meets_10_mas_against_truth(seed):
    rng = np.random.default_rng(seed)
    field = make_star_field(rng)
    initial = perturb_wcs(field["true_wcs"], shift_arcsec=5.0, rot_deg=0.05)
    wcs, stats = fit_wcs(field["src_x"], field["src_y"], field["src_flux"], field["ref_ra"],
                         field["ref_dec"], field["ref_flux"], initial, bbox=BBOX, sip_order=3)
    fwd, inv_iter, inv_poly, fwd_max = wcs_errors_mas(field["true_wcs"], wcs)
    assert fwd < 10.0 and inv_iter < 10.0 and inv_poly < 10.0
    # Noise-limited: ~300 stars at 2-6 mas each leave ~1-2 mas; 5 mas would mean a model error.
    assert fwd < 5.0 and fwd_max < 15.0
    assert stats["n_matches"] >= 0.9 * field["n_stars"]
    assert np.all(stats["src_index"] < field["n_stars"])  # no spurious detection kept
    assert np.all(stats["src_index"] == stats["ref_index"])  # and every match is the right star
    assert 3.0 < stats["rms_mas"] < 12.0
    # Reported pointing correction: the initial WCS was off by (+3, +4) arcsec.
    assert stats["offset_ra_arcsec"] == pytest.approx(-3.0, abs=0.1)
    assert stats["offset_dec_arcsec"] == pytest.approx(-4.0, abs=0.1)
    assert stats["rotation_deg"] == pytest.approx(0.05, abs=0.03)


@pytest.mark.parametrize("keep_sip", [True, False])
def test_match_survives_10_arcsec_and_0p1_deg(keep_sip):
    """Large pointing and rotation errors; without SIP the corners start ~3" off too."""
    rng = np.random.default_rng(7)
    field = make_star_field(rng, n_stars=250)
    initial = perturb_wcs(field["true_wcs"], shift_arcsec=10.0, rot_deg=0.1, keep_sip=keep_sip)
    match = match_to_reference(field["src_x"], field["src_y"], field["src_flux"], field["ref_ra"],
                               field["ref_dec"], field["ref_flux"], initial, bbox=BBOX)
    correct = match.src_index == match.ref_index
    assert correct.mean() > 0.99
    assert correct.sum() > (0.9 if keep_sip else 0.6) * field["n_stars"]
    assert match.rotation_deg == pytest.approx(0.1, abs=0.05)
    wcs, stats = fit_wcs(field["src_x"], field["src_y"], field["src_flux"], field["ref_ra"],
                         field["ref_dec"], field["ref_flux"], initial, bbox=BBOX, sip_order=4,
                         sigma_pix=field["sigma_pix"])
    assert stats["sip_order"] == 4
    assert stats["n_matches"] >= 0.9 * field["n_stars"]
    assert wcs_errors_mas(field["true_wcs"], wcs)[0] < 5.0


def test_match_when_brightest_references_are_saturated():
    """1500 bright references absent from the sources: the vote window slides down the ranking."""
    rng = np.random.default_rng(9)
    field = make_star_field(rng, n_stars=200, n_undetected=1500)
    initial = perturb_wcs(field["true_wcs"], 8.0, -0.08)
    match = match_to_reference(field["src_x"], field["src_y"], field["src_flux"], field["ref_ra"],
                               field["ref_dec"], field["ref_flux"], initial, bbox=BBOX)
    assert match.chance_probability < 1e-10
    real = match.src_index < 200  # spurious sources may land within 1" of a reference by chance
    assert real.sum() > 0.95 * 200
    assert np.all(match.src_index[real] == match.ref_index[real])


def test_fit_tan_sip_exact_and_clips_outliers():
    rng = np.random.default_rng(3)
    true = make_true_wcs(rot_deg=-12.0)
    x, y = rng.uniform(0, 4071, 400), rng.uniform(0, 3999, 400)
    ra, dec = true.all_pix2world(x, y, 0)
    bad = rng.choice(400, 20, replace=False)
    ra_bad = ra.copy()
    ra_bad[bad] += 1.0 / 3600  # 1" mismatches
    wcs = fit_tan_sip(x, y, ra_bad, dec, sip_order=3, bbox=BBOX, crval=(61.0, -35.0))
    fwd, inv_iter, inv_poly, _ = wcs_errors_mas(true, wcs)
    assert fwd < 0.01 and inv_iter < 0.01 and inv_poly < 0.5
    np.testing.assert_allclose(wcs.wcs.crval, true.wcs.crval, atol=1e-9)
    np.testing.assert_allclose(wcs.wcs.cd, true.wcs.cd, rtol=1e-7, atol=1e-13)
    np.testing.assert_allclose(wcs.sip.a[3, 0], true.sip.a[3, 0], rtol=1e-5)
    assert wcs.pixel_shape == (4072, 4000)
    # Standard FITS: the header round trip gives the same mapping.
    again = WCS(wcs.to_header(relax=True))
    np.testing.assert_allclose(again.all_pix2world(x, y, 0), wcs.all_pix2world(x, y, 0), atol=1e-10)


def test_pure_tan_fit():
    rng = np.random.default_rng(4)
    true = make_true_wcs(k_radial=0.0, quad=0.0)
    x, y = rng.uniform(0, 4071, 50), rng.uniform(0, 3999, 50)
    wcs = fit_tan_sip(x, y, *true.all_pix2world(x, y, 0), sip_order=1)
    assert wcs.sip is None and wcs.wcs.ctype[0] == "RA---TAN"
    gx = np.array([0.0, 2000.0, 4071.0])
    np.testing.assert_allclose(wcs.all_pix2world(gx, gx, 0), true.all_pix2world(gx, gx, 0), atol=1e-9)


def test_references_elsewhere_on_sky_raise():
    rng = np.random.default_rng(5)
    field = make_star_field(rng)
    initial = perturb_wcs(field["true_wcs"], 5.0, 0.05)
    with pytest.raises(AstrometryError, match="fall on the detector") as info:
        fit_wcs(field["src_x"], field["src_y"], field["src_flux"], field["ref_ra"] + 20.0,
                field["ref_dec"], field["ref_flux"], initial, bbox=BBOX)
    assert info.value.n_matches == 0


def test_unrelated_references_on_detector_raise():
    """A catalogue covering the detector but of other stars: no significant offset peak."""
    rng = np.random.default_rng(6)
    field = make_star_field(rng)
    other = make_star_field(np.random.default_rng(60))
    initial = perturb_wcs(field["true_wcs"], 5.0, 0.05)
    with pytest.raises(AstrometryError, match="no significant") as info:
        fit_wcs(field["src_x"], field["src_y"], field["src_flux"], other["ref_ra"], other["ref_dec"],
                other["ref_flux"], initial, bbox=BBOX)
    assert info.value.n_matches < 10


def test_large_rms_and_few_sources_raise():
    rng = np.random.default_rng(8)
    field = make_star_field(rng)
    initial = perturb_wcs(field["true_wcs"], 5.0, 0.05)
    noisy_x = field["src_x"] + rng.normal(0, 0.5, len(field["src_x"]))  # 100 mas centroids
    with pytest.raises(AstrometryError, match="RMS") as info:
        fit_wcs(noisy_x, field["src_y"], field["src_flux"], field["ref_ra"], field["ref_dec"],
                field["ref_flux"], initial, bbox=BBOX, max_rms_mas=50.0)
    assert info.value.rms_mas > 50.0 and info.value.n_matches > 200
    with pytest.raises(AstrometryError, match="sources with finite centroids"):
        fit_wcs(field["src_x"][:5], field["src_y"][:5], field["src_flux"][:5], field["ref_ra"],
                field["ref_dec"], field["ref_flux"], initial, bbox=BBOX)
