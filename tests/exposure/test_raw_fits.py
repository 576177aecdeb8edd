"""Lean raw files (`write_raw`): what a raw holds, exact round trip, compression, fallbacks."""

import numpy as np
import pytest
from astropy.io import fits

from diapipe.exposure.exposure import Exposure
from diapipe.exposure.fits import RAW_LAYOUT, ExposureFileError, read_exposure, write_exposure, write_raw
from testing_helpers import make_test_exposure


def _raw_like(shape=(300, 260), seed=3):
    """An integer ADU image like a raw: bias ~20000, sky noise sigma ~25 ADU, a few saturated pixels."""
    rng = np.random.default_rng(seed)
    image = np.rint(20000.0 + 25.0 * rng.standard_normal(shape)).astype(np.float32)
    image[10, 10:15] = 2**18 - 1
    base = make_test_exposure()
    return Exposure(
        image=image,
        wcs=base.wcs,
        visit_info=base.visit_info,
        metadata={"OBSID": "4321", "DETNAME": "R22_S11", "AMPSHAPE": [100, 50], "note": "lower-case key"},
    )


def test_lean_raw_round_trip_is_exact_and_holds_only_image_and_header(tmp_path):
    raw = _raw_like()
    path = tmp_path / "raw.fits"
    write_raw(raw, path)
    back = read_exposure(path)
    np.testing.assert_array_equal(back.image, raw.image)
    assert back.image.dtype == np.float32
    assert not back.mask.any() and not back.variance.any()
    assert back.visit_info == raw.visit_info and back.metadata == raw.metadata
    np.testing.assert_array_equal(back.wcs.wcs.crval, raw.wcs.wcs.crval)
    np.testing.assert_array_equal(back.wcs.wcs.cd, raw.wcs.wcs.cd)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "ARCHIVE"]
        assert isinstance(hdul["IMAGE"], fits.CompImageHDU)
        assert hdul["IMAGE"].compression_type == "RICE_1"
        assert hdul["IMAGE"].data.dtype.kind == "i"
        header = hdul[0].header
        assert header["DPLAYOUT"] == RAW_LAYOUT
        assert header["INSTRUME"] == raw.visit_info.instrument
        assert header["EXPTIME"] == raw.visit_info.exposure_time_s
        assert header["FILTER"] == raw.visit_info.physical_filter
        assert header["OBSID"] == "4321" and header["DETNAME"] == "R22_S11"


def test_lean_raw_is_several_times_smaller_than_three_planes(tmp_path):
    raw = _raw_like(shape=(512, 512))
    write_raw(raw, tmp_path / "lean.fits")
    write_exposure(raw, tmp_path / "full.fits")
    lean = (tmp_path / "lean.fits").stat().st_size
    full = (tmp_path / "full.fits").stat().st_size
    # sigma 25 ADU needs ~6-7 bits per pixel with RICE: ~1 byte/px against 12 for three planes
    assert lean < 1.3 * raw.image.size
    assert full / lean > 8


def test_components_and_bbox_of_a_lean_raw(tmp_path):
    raw = _raw_like()
    path = tmp_path / "raw.fits"
    write_raw(raw, path)
    box = (20, 30, 40, 50)
    np.testing.assert_array_equal(read_exposure(path, "image"), raw.image)
    assert read_exposure(path, "mask").shape == raw.image.shape
    assert read_exposure(path, "variance", bbox=box).shape == (50, 40)
    assert read_exposure(path, "bbox") == raw.bbox
    assert read_exposure(path, "visitInfo") == raw.visit_info
    cut = read_exposure(path, bbox=box)
    np.testing.assert_array_equal(cut.image, raw.image[30:80, 20:60])
    assert cut.xy0 == (20, 30)
    with pytest.raises(ExposureFileError, match="outside the stored image"):
        read_exposure(path, "mask", bbox=(250, 0, 20, 10))


def test_non_integer_raw_is_stored_as_float32_exactly(tmp_path):
    raw = _raw_like()
    raw.image[5, :7] = np.nan  # e.g. a hand-made bad raw
    raw.image[6, 3] = 1.5
    path = tmp_path / "raw.fits"
    write_raw(raw, path)
    back = read_exposure(path)
    np.testing.assert_array_equal(back.image, raw.image)  # NaN == NaN here
    with fits.open(path) as hdul:
        assert not isinstance(hdul["IMAGE"], fits.CompImageHDU)
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")


def test_old_three_plane_raw_still_reads(tmp_path):
    raw = _raw_like()
    write_exposure(raw, tmp_path / "old.fits")
    write_raw(raw, tmp_path / "lean.fits")
    old, lean = read_exposure(tmp_path / "old.fits"), read_exposure(tmp_path / "lean.fits")
    np.testing.assert_array_equal(old.image, lean.image)
    assert old.visit_info == lean.visit_info and old.metadata == lean.metadata


def test_truncated_lean_raw_is_a_clear_error(tmp_path):
    path = tmp_path / "raw.fits"
    write_raw(_raw_like(), path)
    data = path.read_bytes()
    for fraction in (0.3, 0.9):
        bad = tmp_path / f"truncated_{fraction}.fits"
        bad.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ExposureFileError, match=f"truncated_{fraction}.fits"):
            read_exposure(bad)


def test_raw_with_a_psf_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no PSF"):
        write_raw(make_test_exposure(), tmp_path / "raw.fits")
