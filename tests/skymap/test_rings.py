"""Tests of the DC2 rings sky map against published DC2 / DP0.2 facts.

External facts used (each named where it is used):

* lsst/ci_imsim ``configs/skymap.py``: "center of tract 3828 patch 3,3=24" is
  (RA, Dec) = (56.64971166122064, -36.4462532139527947602893) deg.
* LSSTDESC/skyCatalogs (tests / scripts, comment "For tract 3828"):
  55.73604 < ra < 57.563452, -37.19001 < dec < -35.702481 — the tract's nominal
  RA/Dec cell (centre ± half the RA spacing of its ring, ± half a ring in Dec).
* Rubin DP0.2 tutorials (e.g. "03a Image Display", and the lsst ``cst``
  tutorial-tools test ``test_nearest_patch_from_ra_dec``): the galaxy cluster at
  (55.745834, -32.269167) is in DC2 tract 4431, patch 17.
* Rubin/DESC DC2 docs (pipelines_check / ap notes): DC2 tracts run ~2553–5074,
  tracts 3828/3829 are neighbours used for the test-med-1 collection; patches 0–48.
"""

import math

import numpy as np
import pytest

from diapipe.skymap import PatchInfo, RingsSkyMap, RingsSkyMapConfig, TractInfo

ARCSEC = 1.0 / 3600.0


@pytest.fixture(scope="module")
def skymap():
    return RingsSkyMap()


def sep_arcsec(ra1, dec1, ra2, dec2):
    dra = (ra1 - ra2) * math.cos(math.radians(0.5 * (dec1 + dec2)))
    return math.hypot(dra, dec1 - dec2) * 3600.0


def test_ring_structure(skymap):
    counts = skymap.ring_counts
    assert len(counts) == 120
    # Rubin's formula with s = pi/121 gives 18936 ring tracts + 2 polar caps.
    assert len(skymap) == 18938 == counts.sum() + 2
    # symmetric about the equator, fullest rings at the equator
    np.testing.assert_array_equal(counts, counts[::-1])
    assert counts.max() == counts[59] == 243
    assert skymap.ring_indices(0) == (-1, 0)
    assert skymap.ring_indices(len(skymap) - 1) == (120, 0)
    assert skymap.ring_indices(1) == (0, 0)
    assert math.isclose(skymap.ring_size_deg, 180.0 / 121.0)


def test_tract_3828_against_dc2_facts(skymap):
    tract = skymap[3828]
    assert isinstance(tract, TractInfo)
    assert skymap.ring_indices(3828) == (35, 31)
    # skyCatalogs' tract-3828 cell is centred on the tract centre
    ra_mid = 0.5 * (55.73604 + 57.563452)
    dec_mid = 0.5 * (-37.19001 + -35.702481)
    assert sep_arcsec(tract.ctr_ra_deg, tract.ctr_dec_deg, ra_mid, dec_mid) < 1.0
    # ...and its RA width is the ring's tract spacing, its Dec height one ring
    n_ring = skymap.ring_counts[35]
    assert abs((57.563452 - 55.73604) - 360.0 / n_ring) < 1e-5
    assert abs((-35.702481 + 37.19001) - skymap.ring_size_deg) < 1e-4
    # ci_imsim: centre of patch 24 (inner box centre, pixel 13999.5)
    ra24, dec24 = tract[24].inner_center_radec
    assert sep_arcsec(ra24, dec24, 56.64971166122064, -36.4462532139527947602893) < 1e-3
    # tract box: 7x7 patches of 4000 px, the tract centre at pixel (13999, 13999)
    assert tract.bbox == (0, 0, 28000, 28000)
    assert tract.num_patches == (7, 7)
    x, y = tract.wcs.wcs_world2pix([tract.ctr_ra_deg], [tract.ctr_dec_deg], 0)
    np.testing.assert_allclose([x[0], y[0]], [13999.0, 13999.0], atol=1e-6)
    np.testing.assert_allclose(tract.wcs.wcs.crpix, [14000.0, 14000.0])


def test_tract_3829_is_3828s_eastern_neighbour(skymap):
    t28, t29 = skymap[3828], skymap[3829]
    assert t29.ctr_dec_deg == t28.ctr_dec_deg
    assert math.isclose(t29.ctr_ra_deg - t28.ctr_ra_deg, 360.0 / skymap.ring_counts[35])
    assert sep_arcsec(t29.ctr_ra_deg, t29.ctr_dec_deg, 58.477157360406, -36.446280991736) < 1.0
    # neighbours overlap: a point midway between the centres is in both
    mid_ra = 0.5 * (t28.ctr_ra_deg + t29.ctr_ra_deg)
    assert t28.contains(mid_ra, t28.ctr_dec_deg) and t29.contains(mid_ra, t28.ctr_dec_deg)
    ids = [t.tract_id for t in skymap.find_all_tracts(mid_ra, t28.ctr_dec_deg)]
    assert 3828 in ids and 3829 in ids


def test_tract_4431_patch_17_dp02(skymap):
    ra, dec = 55.745834, -32.269167  # DP0.2 tutorial galaxy cluster
    tract = skymap.find_tract(ra, dec)
    assert tract.tract_id == 4431
    patch = tract.find_patch(ra, dec)
    assert patch.index == 17 and patch.index_xy == (3, 2)
    assert skymap.ring_indices(4431) == (38, 32)
    assert sep_arcsec(tract.ctr_ra_deg, tract.ctr_dec_deg, 360.0 * 32 / 207, 39 * 180.0 / 121 - 90.0) < 1e-6


def test_patches_tile_the_tract(skymap):
    tract = skymap[3828]
    assert len(tract) == 49
    cover = np.zeros((7, 7), int)
    for index, patch in enumerate(tract):
        assert isinstance(patch, PatchInfo)
        assert patch.index == index
        x, y = patch.index_xy
        assert index == 7 * y + x
        assert patch.inner_bbox == (4000 * x, 4000 * y, 4000, 4000)
        ox0, oy0, ow, oh = patch.outer_bbox
        assert ox0 == max(4000 * x - 100, 0) and oy0 == max(4000 * y - 100, 0)
        assert ox0 + ow == min(4000 * (x + 1) + 100, 28000)
        assert oy0 + oh == min(4000 * (y + 1) + 100, 28000)
        cover[y, x] += 1
    assert (cover == 1).all()
    assert tract[(3, 3)] is tract[24]
    assert tract[48].outer_bbox == (23900, 23900, 4100, 4100)
    assert tract[0].outer_bbox == (0, 0, 4100, 4100)


def test_unknown_ids_raise_lookup_error(skymap):
    with pytest.raises(LookupError, match="18938"):
        skymap[18938]
    with pytest.raises(LookupError, match="-1"):
        skymap[-1]
    with pytest.raises(LookupError, match="0..48"):
        skymap[3828][49]
    with pytest.raises(LookupError, match=r"x 0..6"):
        skymap[3828][(7, 0)]
    with pytest.raises(LookupError, match="not in tract 3828"):
        skymap[3828].find_patch(70.0, -36.4)


def test_round_trip_and_wcs_consistency(skymap):
    rng = np.random.default_rng(42)
    ra = rng.uniform(50.0, 74.0, 40)
    dec = rng.uniform(-44.0, -27.0, 40)
    ids = skymap.find_tract_ids(ra, dec)
    for r, d, tract_id in zip(ra, dec, ids, strict=True):
        tract = skymap.find_tract(r, d)
        assert tract.tract_id == tract_id
        assert 2553 <= tract_id <= 5074  # the DC2 tract range
        assert tract.contains(r, d)
        patch = tract.find_patch(r, d)
        x, y = patch.wcs.wcs_world2pix([r], [d], 0)
        x0, y0, w, h = patch.inner_bbox
        assert x0 - 0.5 <= x[0] < x0 + w - 0.5 and y0 - 0.5 <= y[0] < y0 + h - 0.5
        # the found tract has the nearest centre among its ring neighbours
        dists = [
            sep_arcsec(r, d, *skymap.tract_center(t.tract_id)) for t in skymap.find_all_tracts(r, d)
        ]
        assert sep_arcsec(r, d, tract.ctr_ra_deg, tract.ctr_dec_deg) <= min(dists) + 1e-6
    # patch and tract WCS are the same mapping; pixel scale 0.2"/px at the centre
    tract = skymap[3828]
    patch = tract[10]
    px = np.array([patch.inner_bbox[0] + 10.0, 20000.0])
    py = np.array([patch.inner_bbox[1] + 10.0, 3000.0])
    np.testing.assert_allclose(patch.wcs.wcs_pix2world(px, py, 0), tract.wcs.wcs_pix2world(px, py, 0))
    r0, d0 = tract.wcs.wcs_pix2world([13999.0, 14000.0], [13999.0, 13999.0], 0)
    assert abs(sep_arcsec(r0[0], d0[0], r0[1], d0[1]) - 0.2) < 1e-6
    assert r0[1] < r0[0]  # +x is west


def test_vertices_and_find_patch_list(skymap):
    tract = skymap[3828]
    verts = tract.vertices_radec
    assert verts.shape == (4, 2)
    # the inner region reaches at least s/2 + overlap north and south of the centre
    half = 0.5 * skymap.ring_size_deg + 1.0 / 60.0
    assert verts[:, 1].min() < tract.ctr_dec_deg - half and verts[:, 1].max() > tract.ctr_dec_deg + half
    for r, d in verts:
        assert tract.contains(r, d)
    # a detector-sized square around the corner of patches 16/17/23/24
    ra_c, dec_c = tract.wcs.wcs_pix2world([11999.5], [11999.5], 0)
    dra = 0.05 / math.cos(math.radians(dec_c[0]))
    corners_ra = ra_c[0] + np.array([-dra, dra, dra, -dra])
    corners_dec = dec_c[0] + np.array([-0.05, -0.05, 0.05, 0.05])
    result = skymap.find_tract_patch_list(corners_ra, corners_dec)
    assert [t.tract_id for t, _ in result] == [3828]
    assert [p.index for p in result[0][1]] == [16, 17, 23, 24]
    # a region straddling the 3828/3829 boundary is reported in both
    t29 = skymap[3829]
    mid = 0.5 * (tract.ctr_ra_deg + t29.ctr_ra_deg)
    result = skymap.find_tract_patch_list([mid - 0.01, mid + 0.01], [tract.ctr_dec_deg] * 2)
    assert [t.tract_id for t, _ in result] == [3828, 3829]
    assert tract.find_patch_list([120.0], [10.0]) == []


def test_config_round_trip_and_hash():
    config = RingsSkyMapConfig()
    assert RingsSkyMapConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["patch_inner_dimensions"] == [4000, 4000]
    with pytest.raises(ValueError, match="num_ring"):
        RingsSkyMapConfig.from_dict({"num_ring": 3})
    a = RingsSkyMap().skymap_hash()
    assert len(a) == 20 and a == RingsSkyMap(RingsSkyMapConfig.from_dict(config.to_dict())).skymap_hash()
    assert RingsSkyMap(RingsSkyMapConfig(patch_border=50)).skymap_hash() != a
    assert RingsSkyMap(RingsSkyMapConfig(num_rings=119)).skymap_hash() != a
    assert RingsSkyMap().name == "DC2"
