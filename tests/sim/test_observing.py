"""Visits and conditions against SMTN-002 numbers."""

import numpy as np
import pytest

from diapipe.sim.observing import (
    BAND_PARAMS,
    fwhm_geom_arcsec,
    m5_point_source,
    make_visits,
    njy_to_electrons,
    psf_ellipticity_at,
    psf_fwhm_at,
    sky_e_per_px,
    visits_table,
)
from diapipe.sim.sky import mag_to_njy


def test_m5_matches_smtn002():
    # Our detector (one 30 s snap, 4.9 e- read noise): within 0.2 mag of the table.
    assert abs(m5_point_source("g") - 24.97) < 0.2
    # SMTN-002's own assumptions (2 x 15 s snaps, 8.8 e- each) reproduce g, r, i, z closely.
    for band in "griz":
        m5 = m5_point_source(band, read_noise_e=8.8, n_snaps=2)
        assert abs(m5 - BAND_PARAMS[band]["m5"]) < 0.05, band


@pytest.fixture(scope="module")
def visits():
    return make_visits(300, "gri", 61.9, -35.8, np.random.default_rng(11), start_mjd=60000, cadence_days=1.0)


def test_visit_records(visits):
    t = visits_table(visits)
    assert t["visit"].is_unique and t["visit"].between(100000, 9999999).all()
    assert set(t["physical_filter"]) == {"g_sim_1.4", "r_sim_1.4", "i_sim_1.4"}
    assert (t["exposure_time_s"] == 30.0).all()
    assert np.all(np.diff(t["mjd"]) > 0) and np.all(np.diff(t["visit"]) > 0)
    assert t["airmass"].between(1.0, 2.0).all()
    assert np.allclose(1 / np.sin(np.radians(t["altitude_deg"])), t["airmass"], rtol=0.01)
    # Hour angle within the drawn window, dithers within 0.2 deg.
    assert t["hour_angle_deg"].abs().max() < 40
    sep = np.hypot((t["boresight_ra"] - 61.9) * np.cos(np.radians(-35.8)), t["boresight_dec"] + 35.8)
    assert sep.max() < 0.201
    assert t["rot_sky_pos_deg"].between(0, 360).all() and t["rot_sky_pos_deg"].std() > 50


def test_fwhm_range_and_formula(visits):
    t = visits_table(visits)
    lo, med, hi = np.percentile(t["psf_fwhm_arcsec"], [5, 50, 95])
    assert 0.5 < lo < 0.7 and 0.7 < med < 0.95 and 1.0 < hi < 1.35
    v = visits[0]
    assert v.psf_fwhm_arcsec == pytest.approx(float(fwhm_geom_arcsec(v.band, v.seeing_500nm_arcsec, v.airmass)))
    # Zenith r band at 0.62" seeing reproduces the table's FWHMeff of 0.83".
    assert (fwhm_geom_arcsec("r", 0.62, 1.0) - 0.052) / 0.822 == pytest.approx(0.83, abs=0.01)


def test_zero_point_and_calibration(visits):
    for v in visits[:30]:
        p = BAND_PARAMS[v.band]
        assert v.zp_1e_per_s == pytest.approx(p["zp"] - p["k"] * (v.airmass - 1) - v.cloud_mag)
        # A source of magnitude zp_exposure gives exactly one electron.
        assert mag_to_njy(v.zp_exposure) * njy_to_electrons(v) == pytest.approx(1.0, rel=1e-12)
    clouds = np.array([v.cloud_mag for v in visits])
    assert 0.75 < (clouds <= 0.05).mean() < 0.95 and clouds.max() > 0.1


def test_sky_level_r_band():
    v = make_visits(1, "r", 61.9, -35.8, np.random.default_rng(0))[0]
    # 21.2 mag/arcsec² with zp 28.36: ~730 e-/s/arcsec², 0.04 arcsec²/px, 30 s.
    assert sky_e_per_px(v) == pytest.approx(30 * 0.04 * 10 ** (0.4 * (28.36 - 21.2)), rel=1e-9)
    assert 850 < sky_e_per_px(v) < 900


def test_psf_variation_across_focal_plane(visits):
    v = visits[0]
    centre = psf_fwhm_at(v, 0.0, 0.0)
    edge = psf_fwhm_at(v, 300.0, 0.0)
    assert centre == pytest.approx(v.psf_fwhm_arcsec)
    assert 1.015 < edge / centre < 1.06
    e1, e2 = psf_ellipticity_at(v, np.array([0.0, 300.0]), np.array([0.0, 0.0]))
    assert np.all(np.hypot(e1, e2) < 0.1)
    assert e1[1] > e1[0]  # radial pattern at the edge


def test_deterministic_and_errors():
    a = make_visits(5, "g,r", 61.9, -35.8, np.random.default_rng(5))
    b = make_visits(5, ["g", "r"], 61.9, -35.8, np.random.default_rng(5))
    assert a == b
    with pytest.raises(ValueError, match="unknown band"):
        make_visits(2, "q", 61.9, -35.8, np.random.default_rng(5))
