"""Sky catalogue: counts, colours, light curves, determinism, refcat."""

import numpy as np
import pandas as pd
import pytest

from diapipe.sim.sky import (
    STAR_DENSITY_R24_PER_DEG2,
    flux_njy,
    mag_to_njy,
    make_sky_catalog,
    make_sky_catalog_cone,
    reference_catalog,
    transient_flux_ratio,
)

BOX = (61.5, 62.1, -36.1, -35.6)  # ~0.24 deg²


def _area(ra0, ra1, d0, d1):
    return np.degrees(np.radians(ra1 - ra0)) * np.degrees(np.sin(np.radians(d1)) - np.sin(np.radians(d0)))


@pytest.fixture(scope="module")
def sky():
    return make_sky_catalog(*BOX, np.random.default_rng(42), galaxy_mag_limit=23.0, transients_per_deg2=400)


def test_star_counts_and_slope(sky):
    t = sky.table
    stars = t[t["type"].isin(["star", "variable"])]
    area = _area(*BOX)
    n24 = (stars["mag_r"] < 24).sum() / area
    assert abs(n24 / STAR_DENSITY_R24_PER_DEG2 - 1) < 0.1
    slope = np.log10((stars["mag_r"] < 23).sum() / (stars["mag_r"] < 20).sum()) / 3.0
    assert 0.15 < slope < 0.3
    assert stars["mag_r"].min() < 16.5  # saturating stars exist at this area
    frac_var = (stars["type"] == "variable").mean()
    assert 0.07 < frac_var < 0.13


def test_star_colours_follow_locus(sky):
    t = sky.table
    s = t[t["type"] == "star"]
    gr = s["mag_g"] - s["mag_r"]
    ri = s["mag_r"] - s["mag_i"]
    assert gr.between(-0.2, 1.8).all()
    assert 0.25 < np.median(gr) < 1.4
    assert np.corrcoef(gr, ri)[0, 1] > 0.7
    red = gr > 1.3
    assert (ri[red] > 0.5).mean() > 0.8  # M dwarfs are red in r-i too


def test_galaxy_counts_sizes():
    box = (61.8, 62.0, -35.9, -35.75)
    sky = make_sky_catalog(*box, np.random.default_rng(1), galaxy_mag_limit=25.0)
    g = sky.table[sky.table["type"] == "galaxy"]
    per_arcmin2 = len(g) / (_area(*box) * 3600)
    assert 25 < per_arcmin2 < 45  # LSST Science Book eq. 3.7 through r-i ~ 0.3
    assert g["mag_r"].max() < 25.0
    bright = g["hlr_disk_arcsec"][g["mag_r"] < 22].median()
    faint = g["hlr_disk_arcsec"][g["mag_r"] > 24].median()
    assert bright > 1.5 * faint
    assert 0.15 < g["ellip_g"].mean() < 0.35


def test_deterministic_and_subregion_consistent():
    a = make_sky_catalog(*BOX, np.random.default_rng(7), galaxy_mag_limit=22)
    b = make_sky_catalog(*BOX, np.random.default_rng(7), galaxy_mag_limit=22)
    pd.testing.assert_frame_equal(a.table, b.table)
    sub = make_sky_catalog(61.7, 61.9, -36.0, -35.8, np.random.default_rng(7), galaxy_mag_limit=22)
    t = a.table
    cut = t[(t.ra >= 61.7) & (t.ra < 61.9) & (t.dec >= -36.0) & (t.dec < -35.8)].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub.table, cut)
    assert a.table["id"].is_unique
    c = make_sky_catalog(*BOX, np.random.default_rng(8), galaxy_mag_limit=22)
    assert len(c) != len(a) or not np.array_equal(c.table["ra"], a.table["ra"])


def test_cone():
    sky = make_sky_catalog_cone(61.9, -35.8, 0.1, np.random.default_rng(3), galaxy_mag_limit=21)
    sep = np.hypot((sky.table.ra - 61.9) * np.cos(np.radians(-35.8)), sky.table.dec + 35.8)
    assert sep.max() <= 0.1001 and len(sky) > 50


def test_transient_light_curve_shape():
    dt = np.array([-5.0, 0.0, 8.75, 17.5, 17.5 + 15, 17.5 + 60])
    f = transient_flux_ratio(dt, 17.5, 0.06)
    assert f[0] == 0 and f[1] == 0
    assert f[2] == pytest.approx(0.5)  # smooth-step midpoint
    assert f[3] == pytest.approx(1.0)
    assert 0.2 < f[4] < 0.6  # ~0.6 mag in 15 d
    assert f[5] < 0.1


def test_transients_hosts_and_peaks(sky):
    t = sky.table
    tr = t[t["type"] == "transient"]
    assert len(tr) > 50
    assert tr["mag_r"].between(19, 25).all()
    hosted = tr[tr["host_id"] >= 0]
    assert 0.5 < len(hosted) / len(tr) < 0.9
    hosts = t.set_index("id").loc[hosted["host_id"]]
    sep_arcsec = 3600 * np.hypot((hosted["ra"].to_numpy() - hosts["ra"].to_numpy()) * np.cos(np.radians(-35.8)),
                                 hosted["dec"].to_numpy() - hosts["dec"].to_numpy())
    assert np.median(sep_arcsec / hosts["hlr_disk_arcsec"].to_numpy()) < 2.0
    # Peak flux in r equals the catalogue peak magnitude.
    row = sky.select(t["id"] == tr["id"].iloc[0])
    t_peak = row.table["t_explosion_mjd"].iloc[0] + row.table["rise_days"].iloc[0]
    assert flux_njy(row, "r", t_peak)[0] == pytest.approx(mag_to_njy(row.table["mag_r"].iloc[0]))
    assert flux_njy(row, "r", row.table["t_explosion_mjd"].iloc[0] - 1)[0] == 0.0


def test_variable_amplitudes(sky):
    var = sky.select(sky.table["type"] == "variable")
    mjds = np.linspace(60000, 60030, 200)
    mags = np.array([-2.5 * np.log10(flux_njy(var, "r", m)) + 31.4 for m in mjds])
    ptp = mags.max(0) - mags.min(0)
    assert np.all(ptp <= var.table["var_amp_mag"].to_numpy() + 1e-9)
    assert np.median(ptp / var.table["var_amp_mag"].to_numpy()) > 0.9
    assert flux_njy(var, "g", 60000.0).shape == (len(var),)


def test_reference_catalog(sky):
    ref = reference_catalog(sky, np.random.default_rng(0), bands=("g", "r"))
    t = sky.table.set_index("id").loc[ref["id"]]
    assert set(t["type"]) <= {"star", "variable"}
    assert (t["mag_r"] <= 23).all()
    dpos_mas = 3.6e6 * np.hypot((ref["coord_ra"].to_numpy() - t["ra"].to_numpy()) * np.cos(np.radians(-35.8)),
                                ref["coord_dec"].to_numpy() - t["dec"].to_numpy())
    assert 0.05 < np.median(dpos_mas) < 0.3
    dmag = -2.5 * np.log10(ref["lsst_r_smeared_flux"] / ref["lsst_r_flux"])
    assert 0.0007 < dmag.std() < 0.0013
    assert np.allclose(ref["lsst_r_flux"], mag_to_njy(t["mag_r"]))
    assert np.allclose(ref["lsst_g_smeared_fluxErr"] / ref["lsst_g_smeared_flux"], 0.001 * np.log(10) / 2.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="band"):
        make_sky_catalog(*BOX, np.random.default_rng(0), bands=("g", "q"))
    with pytest.raises(ValueError, match="sky box"):
        make_sky_catalog(62, 61, -36, -35, np.random.default_rng(0))
