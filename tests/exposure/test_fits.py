"""Exposure FITS persistence: exact round trip, components, bad files."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diapipe.exposure.fits import ExposureFileError, read_exposure, write_exposure
from testing_helpers import make_test_exposure


def assert_exposures_equal(a, b):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.variance, b.variance)
    assert a.xy0 == b.xy0
    assert a.psf == b.psf
    assert a.photo_calib == b.photo_calib
    assert a.visit_info == b.visit_info
    assert a.metadata == b.metadata
    if a.wcs is None:
        assert b.wcs is None
    else:
        np.testing.assert_array_equal(a.wcs.wcs.crval, b.wcs.wcs.crval)
        np.testing.assert_array_equal(a.wcs.wcs.crpix, b.wcs.wcs.crpix)
        np.testing.assert_array_equal(a.wcs.wcs.cd, b.wcs.wcs.cd)
        np.testing.assert_array_equal(a.wcs.sip.a, b.wcs.sip.a)
        np.testing.assert_array_equal(a.wcs.sip.b, b.wcs.sip.b)


def test_round_trip_is_exact(tmp_path):
    exposure = make_test_exposure()
    path = tmp_path / "exp.fits"
    write_exposure(exposure, path)
    assert_exposures_equal(exposure, read_exposure(path))


def test_components_alone(tmp_path):
    exposure = make_test_exposure()
    path = tmp_path / "exp.fits"
    write_exposure(exposure, path)
    np.testing.assert_array_equal(read_exposure(path, "image"), exposure.image)
    np.testing.assert_array_equal(read_exposure(path, "mask"), exposure.mask)
    assert read_exposure(path, "psf") == exposure.psf
    assert read_exposure(path, "visitInfo") == exposure.visit_info
    assert read_exposure(path, "bbox") == exposure.bbox
    assert read_exposure(path, "photoCalib") == exposure.photo_calib


def test_bbox_read_matches_subimage(tmp_path):
    exposure = make_test_exposure()
    path = tmp_path / "exp.fits"
    write_exposure(exposure, path)
    box = (1010, 2005, 20, 30)
    assert_exposures_equal(exposure.subimage(box), read_exposure(path, bbox=box))
    with pytest.raises(ExposureFileError, match="outside"):
        read_exposure(path, bbox=(0, 0, 10, 10))


def test_ds9_view_wcs_matches_parent_wcs(tmp_path):
    """The IMAGE HDU's own FITS WCS (what ds9 uses, 1-based local pixels) agrees
    with the parent-frame WCS to < 1 mas."""
    exposure = make_test_exposure()
    path = tmp_path / "exp.fits"
    write_exposure(exposure, path)
    with fits.open(path) as hdul:
        local = WCS(hdul["IMAGE"].header)
        assert hdul["MASK"].header["MP_DETECTED"] == 5
    x, y = np.meshgrid(np.arange(0, 80, 13), np.arange(0, 60, 11))
    ra1, dec1 = local.all_pix2world(x.ravel(), y.ravel(), 0)
    ra2, dec2 = exposure.wcs.all_pix2world(x.ravel() + 1000, y.ravel() + 2000, 0)
    sep_mas = np.hypot((ra1 - ra2) * np.cos(np.deg2rad(dec1)), dec1 - dec2) * 3.6e6
    assert sep_mas.max() < 1.0


def test_minimal_exposure(tmp_path):
    exposure = make_test_exposure(with_everything=False)
    path = tmp_path / "min.fits"
    write_exposure(exposure, path)
    assert_exposures_equal(exposure, read_exposure(path))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "exp.fits"
    write_exposure(make_test_exposure(), path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ExposureFileError, match="truncated.fits"):
        read_exposure(bad)


def test_foreign_fits_is_a_clear_error(tmp_path):
    path = tmp_path / "foreign.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(path)
    with pytest.raises(ExposureFileError, match="not a diapipe exposure"):
        read_exposure(path)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not fits at all" * 200)
    with pytest.raises(ExposureFileError, match="garbage.fits"):
        read_exposure(garbage)


def test_unknown_visit_info_values_round_trip(tmp_path):
    """A calibration frame's VisitInfo has NaN (unknown) times and pointings."""
    from diapipe.exposure.exposure import Exposure, VisitInfo

    exposure = Exposure(np.ones((4, 5)), visit_info=VisitInfo(instrument="LSSTCam-imSim", detector=3))
    path = tmp_path / "calib.fits"
    write_exposure(exposure, path)
    back = read_exposure(path)
    assert back.visit_info.detector == 3 and np.isnan(back.visit_info.mjd_tai)
