"""LSSTCam-imSim geometry: ids, layout, raw <-> assembled, focal plane <-> sky, SIP accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from diapipe.instrument.camera import (
    PLATE_SCALE_ARCSEC_PER_MM,
    Camera,
    detector_corners_sky,
    detector_wcs,
    field_angle_arcsec,
    focal_plane_radius_mm,
    focal_plane_to_sky,
    sky_to_focal_plane,
)

BORESIGHT = (61.9, -35.8)


@pytest.fixture(scope="module")
def full_camera():
    return Camera.lsstcam_imsim()


@pytest.fixture(scope="module")
def small_camera():
    return Camera.lsstcam_imsim(amp_data_shape=(128, 64))


def _sep_mas(ra1, dec1, ra2, dec2):
    """Great-circle separation (haversine) in milliarcseconds."""
    ra1, dec1, ra2, dec2 = (np.deg2rad(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec1 - dec2) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra1 - ra2) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(h))) * 3.6e6


def test_ids_and_names(full_camera):
    assert len(full_camera) == 189
    assert full_camera.detector_ids == list(range(189))
    assert full_camera[42].name == "R11_S20"
    assert full_camera["R22_S11"].id == 94
    assert full_camera[188].name == "R43_S22"
    assert full_camera[0].name == "R01_S00"
    assert [d.id for d in full_camera][:3] == [0, 1, 2]
    with pytest.raises(KeyError, match="R99_S00"):
        full_camera["R99_S00"]


def test_full_geometry(full_camera):
    det = full_camera[94]
    assert (det.nx, det.ny) == (4072, 4000)
    assert (det.raw_nx, det.raw_ny) == (8 * 544, 2 * 2048)
    assert det.physical_type == "ITL" and det.pixel_size_mm == 0.010
    assert [a.name for a in det.amplifiers] == [f"C1{i}" for i in range(8)] + [
        f"C0{i}" for i in range(7, -1, -1)
    ]
    c10 = det.amplifier("C10")
    assert c10.raw_bbox == (0, 0, 544, 2048)
    assert c10.raw_data_bbox == (3, 0, 509, 2000)
    assert c10.raw_serial_prescan_bbox == (0, 0, 3, 2000)
    assert c10.raw_serial_overscan_bbox == (512, 0, 32, 2000)
    assert c10.raw_parallel_overscan_bbox == (3, 2000, 509, 48)
    assert c10.bbox == (0, 0, 509, 2000) and c10.flip_x and not c10.flip_y
    c07 = det.amplifier("C07")  # top-left, above C10
    assert c07.bbox == (0, 2000, 509, 2000) and c07.flip_x and c07.flip_y
    assert det.amplifier("C00").bbox == (7 * 509, 2000, 509, 2000)
    gains = np.array([a.gain for a in det.amplifiers])
    assert np.all(np.abs(gains / 0.7 - 1) <= 0.03) and gains.std() > 0.001
    assert all(a.saturation_adu == 142857 for a in det.amplifiers)
    assert all(6.5 < a.read_noise_adu < 7.5 and 970 < a.bias_level_adu < 1030 for a in det.amplifiers)
    # deterministic electronics
    assert Camera.lsstcam_imsim()[94].amplifiers == det.amplifiers


def test_focal_plane_layout(full_camera):
    det = full_camera["R22_S11"]
    assert (det.focal_plane_x_mm, det.focal_plane_y_mm) == (0.0, 0.0)
    r11_s20 = full_camera[42]
    assert r11_s20.focal_plane_x_mm == pytest.approx(-127.3 - 42.25)
    assert r11_s20.focal_plane_y_mm == pytest.approx(-126.8 + 42.25)
    boxes = []
    for d in full_camera:
        x, y = d.pixel_to_focal_plane(np.array([-0.5, d.nx - 0.5]), np.array([-0.5, d.ny - 0.5]))
        boxes.append((x.min(), x.max(), y.min(), y.max()))
    boxes = np.array(boxes)
    assert np.all(boxes[:, 1] - boxes[:, 0] == pytest.approx(40.72))
    assert np.all(boxes[:, 3] - boxes[:, 2] == pytest.approx(40.00))
    # outermost science pixel: corner of R43_S22 etc. at r ~ 369 mm (~2.05 deg)
    assert 368 < np.hypot(np.abs(boxes[:, :2]).max(axis=1), np.abs(boxes[:, 2:]).max(axis=1)).max() < 370
    x0, x1, y0, y1 = (boxes[:, i] for i in range(4))
    overlap = (
        (x0[:, None] < x1[None, :])
        & (x0[None, :] < x1[:, None])
        & (y0[:, None] < y1[None, :])
        & (y0[None, :] < y1[:, None])
    )
    np.fill_diagonal(overlap, False)
    assert not overlap.any()


def test_pixel_focal_plane_round_trip(full_camera, small_camera):
    det = full_camera[188]
    x, y = np.array([0.0, 4071.0, 1234.5]), np.array([0.0, 3999.0, 17.25])
    xb, yb = det.focal_plane_to_pixel(*det.pixel_to_focal_plane(x, y))
    np.testing.assert_allclose(xb, x, atol=1e-9)
    np.testing.assert_allclose(yb, y, atol=1e-9)
    # one pixel step is 10 um along focal-plane x (yaw 0)
    (fx0, fx1), _ = det.pixel_to_focal_plane(np.array([10.0, 11.0]), np.array([5.0, 5.0]))
    assert fx1 - fx0 == pytest.approx(0.010)
    # a cropped detector covers the centre of the real one
    small = small_camera[188]
    assert (small.nx, small.ny) == (512, 256)
    assert small.pixel_to_focal_plane((small.nx - 1) / 2, (small.ny - 1) / 2) == pytest.approx(
        (det.focal_plane_x_mm, det.focal_plane_y_mm)
    )
    assert small.amplifier("C10").raw_serial_overscan_bbox == (67, 0, 32, 128)


def test_raw_assembled_round_trip(small_camera):
    det = small_camera[94]
    image = np.arange(det.nx * det.ny, dtype=float).reshape(det.shape)
    raw = det.disassemble(image, fill=np.nan)
    np.testing.assert_array_equal(det.assemble(raw), image)
    # every assembled pixel comes from exactly one amp's data region
    assert np.isfinite(raw).sum() == image.size
    # readout order: the first data pixel read by C10 (x flipped) is the lower-RIGHT corner of its bbox
    c10 = det.amplifier("C10")
    x0, y0, _, _ = c10.raw_data_bbox
    assert raw[y0, x0] == image[0, c10.bbox[0] + c10.bbox[2] - 1]
    # C07 (x and y flipped): first pixel read is the top-right corner of its bbox (top edge of the CCD)
    c07 = det.amplifier("C07")
    x0, y0, _w, _h = c07.raw_data_bbox
    assert raw[y0, x0] == image[det.ny - 1, c07.bbox[0] + c07.bbox[2] - 1]
    # overscan/prescan regions are not data
    assert np.isnan(det.raw_segment(raw, c07, "overscan")).all()
    assert np.isnan(det.raw_segment(raw, c07, "parallel")).all()
    assert np.isnan(det.raw_segment(raw, c07, "prescan")).all()


def test_focal_plane_sky_round_trip_and_distortion():
    x = np.array([0.0, 10.0, -250.0, 300.0, 127.6])
    y = np.array([0.0, -5.0, 200.0, 0.0, 253.9])
    ra, dec = focal_plane_to_sky(x, y, *BORESIGHT, 37.0)
    xb, yb = sky_to_focal_plane(ra, dec, *BORESIGHT, 37.0)
    np.testing.assert_allclose(xb, x, atol=1e-7)
    np.testing.assert_allclose(yb, y, atol=1e-7)
    # radial distortion: a few arcsec at the field edge, none at the centre
    assert field_angle_arcsec(300.0) - PLATE_SCALE_ARCSEC_PER_MM * 300.0 == pytest.approx(2.7)
    assert focal_plane_radius_mm(field_angle_arcsec(321.0)) == pytest.approx(321.0, abs=1e-9)
    sep_arcsec = _sep_mas(ra[3], dec[3], *BORESIGHT) / 1e3
    assert sep_arcsec == pytest.approx(field_angle_arcsec(300.0), abs=1e-4)


def test_rotation_convention():
    # rotSkyPos = 0: focal-plane +y points north, +x points west (ra decreases)
    ra, dec = focal_plane_to_sky(np.array([0.0, 10.0]), np.array([10.0, 0.0]), *BORESIGHT, 0.0)
    assert dec[0] > BORESIGHT[1] and ra[0] == pytest.approx(BORESIGHT[0], abs=1e-12)
    assert ra[1] < BORESIGHT[0] and dec[1] == pytest.approx(BORESIGHT[1], abs=1e-4)
    # rotSkyPos = 90: +y points east (ra increases)
    ra, dec = focal_plane_to_sky(0.0, 10.0, *BORESIGHT, 90.0)
    assert ra > BORESIGHT[0] and dec == pytest.approx(BORESIGHT[1], abs=1e-4)


@pytest.mark.parametrize("name,rot", [("R43_S22", 23.0), ("R22_S11", 0.0), ("R10_S10", 141.0)])
def test_sip_wcs_accuracy(full_camera, name, rot):
    det = full_camera[name]
    wcs = detector_wcs(det, *BORESIGHT, rot)
    x, y = np.meshgrid(np.linspace(-0.5, det.nx - 0.5, 41), np.linspace(-0.5, det.ny - 0.5, 41))
    x, y = x.ravel() + 0.37, y.ravel() - 0.21  # off the fit grid
    ra, dec = focal_plane_to_sky(*det.pixel_to_focal_plane(x, y), *BORESIGHT, rot)
    ra_w, dec_w = wcs.all_pix2world(x, y, 0)
    assert _sep_mas(ra_w, dec_w, ra, dec).max() < 1.0
    xw, yw = wcs.all_world2pix(ra, dec, 0)
    assert np.abs(xw - x).max() < 1e-3 and np.abs(yw - y).max() < 1e-3
    assert wcs.sip.ap is not None and wcs.sip.bp is not None  # inverse polynomials written for FITS readers
    scale = np.sqrt(abs(np.linalg.det(wcs.wcs.cd))) * 3600
    assert 0.199 < scale < 0.2008


def test_corners(small_camera):
    det = small_camera["R03_S02"]
    corners = detector_corners_sky(det, *BORESIGHT, 10.0)
    assert corners.shape == (4, 2)
    wcs = detector_wcs(det, *BORESIGHT, 10.0)
    ra_w, dec_w = wcs.all_pix2world(
        [-0.5, det.nx - 0.5, det.nx - 0.5, -0.5], [-0.5, -0.5, det.ny - 0.5, det.ny - 0.5], 0
    )
    assert _sep_mas(ra_w, dec_w, corners[:, 0], corners[:, 1]).max() < 1.0
    # width of the cropped detector on the sky: 512 px x ~0.2"
    width = _sep_mas(corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1]) / 1e3
    assert width == pytest.approx(512 * 0.2, rel=0.002)
