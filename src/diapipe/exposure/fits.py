"""Multi-extension FITS persistence of `Exposure`.

Layout (readable by astropy, ds9 and fitsio):

====  ==========  ===============================================================
HDU   EXTNAME     content
====  ==========  ===============================================================
0     PRIMARY     no data; visit info (VI_*), photometric calibration (PHOTCALB),
                  LTV1/LTV2 = -xy0 (as afw), DIAPIPE format version
1     IMAGE       float32 image; WCS of the local pixel grid (for ds9)
2     MASK        int32 mask; MP_<PLANE> keywords; WCS
3     VARIANCE    float32 variance; WCS
4     ARCHIVE     binary table, one row: full-precision WCS (parent frame),
                  PSF order/bbox, metadata as JSON
5     PSF         float64 PSF basis cube (n_terms, K, K), when there is a PSF
====  ==========  ===============================================================

The FITS WCS keywords are written by wcslib with ~12 significant digits;
the ARCHIVE copy keeps every bit so that a round trip is exact.

Raws (`write_raw`) are lean, like the camera's own files: PRIMARY (with
``DPLAYOUT = 'RAW'`` and the observation cards a raw carries: INSTRUME,
DETNAME, EXPTIME, FILTER, MJD-OBS, ...), IMAGE and ARCHIVE only. The image is
int32 ADU, tile-compressed losslessly with RICE_1 (what Rubin's raws use):
~17 MB for a full 4352 x 4096 raw instead of 214 MB for float32 image, mask
and variance planes. A raw whose pixels are not all integers within int32
(e.g. a hand-made raw with NaN) is stored as an uncompressed float32 IMAGE.
`read_exposure` reads both layouts (and the older three-plane raws); the mask
and variance of a lean raw read as zeros, as a raw has none.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, Sip

from .exposure import Exposure, PhotoCalib, VisitInfo
from .masks import MASK_DTYPE, plane_header, planes_from_header
from .psf import PixelPsf

__all__ = [
    "COMPONENTS",
    "RAW_LAYOUT",
    "ExposureFileError",
    "read_exposure",
    "wcs_from_dict",
    "wcs_to_dict",
    "write_exposure",
    "write_raw",
]

FORMAT_VERSION = 1
#: value of the primary ``DPLAYOUT`` card of a lean raw (`write_raw`)
RAW_LAYOUT = "RAW"
COMPONENTS = ("image", "mask", "variance", "wcs", "psf", "photoCalib", "visitInfo", "metadata", "bbox")


class ExposureFileError(OSError):
    """A file that is not a readable diapipe exposure (corrupt, truncated, foreign)."""


# -- WCS <-> plain dict (exact) ---------------------------------------------
def wcs_to_dict(wcs: WCS) -> dict:
    """Every number of a TAN or TAN-SIP celestial WCS, at full precision."""
    data = {
        "ctype": list(wcs.wcs.ctype),
        "crval": [float(v) for v in wcs.wcs.crval],
        "crpix": [float(v) for v in wcs.wcs.crpix],
        "cd": wcs.wcs.get_pc().dot(np.diag(wcs.wcs.get_cdelt())).tolist()
        if not wcs.wcs.has_cd()
        else wcs.wcs.cd.tolist(),
    }
    if wcs.sip is not None:
        for name in ("a", "b", "ap", "bp"):
            value = getattr(wcs.sip, name)
            data[f"sip_{name}"] = None if value is None else np.asarray(value).tolist()
    return data


def wcs_from_dict(data: dict) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = data["ctype"]
    wcs.wcs.crval = data["crval"]
    wcs.wcs.crpix = data["crpix"]
    wcs.wcs.cd = np.array(data["cd"])
    if "sip_a" in data:
        arrays = {k: (None if data[f"sip_{k}"] is None else np.array(data[f"sip_{k}"])) for k in ("a", "b", "ap", "bp")}
        wcs.sip = Sip(arrays["a"], arrays["b"], arrays["ap"], arrays["bp"], wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def _shift_wcs(wcs: WCS, dx: float, dy: float) -> WCS:
    """The same sky mapping for pixel coordinates shifted by (dx, dy): new = old - (dx, dy)."""
    data = wcs_to_dict(wcs)
    data["crpix"] = [data["crpix"][0] - dx, data["crpix"][1] - dy]
    return wcs_from_dict(data)


def _local_wcs_header(exposure: Exposure) -> fits.Header:
    if exposure.wcs is None:
        return fits.Header()
    local = _shift_wcs(exposure.wcs, *exposure.xy0)
    return local.to_header(relax=True)


# -- write -------------------------------------------------------------------
def _primary_hdu(exposure: Exposure) -> fits.PrimaryHDU:
    primary = fits.PrimaryHDU()
    header = primary.header
    header["DIAPIPE"] = (FORMAT_VERSION, "diapipe exposure format version")
    header["LTV1"] = -exposure.xy0[0]
    header["LTV2"] = -exposure.xy0[1]
    if exposure.photo_calib is not None:
        header["PHOTCALB"] = (exposure.photo_calib.calibration_mean, "nJy per count")
        header["PHOTCERR"] = (exposure.photo_calib.calibration_err, "error of PHOTCALB")
    if exposure.visit_info is not None:
        for key, value in exposure.visit_info.to_dict().items():
            # human-readable copy; NaN (unknown) is not allowed in FITS cards, the ARCHIVE keeps it
            if value is not None and not (isinstance(value, float) and np.isnan(value)):
                header[f"HIERARCH VI_{key.upper()}"] = value
    return primary


def _archive_hdu(exposure: Exposure) -> fits.BinTableHDU:
    archive = {
        "wcs": None if exposure.wcs is None else wcs_to_dict(exposure.wcs),
        "psf": None if exposure.psf is None else {"order": exposure.psf.order, "bbox": list(exposure.psf.bbox)},
        "metadata": exposure.metadata,
        "visit_info": None if exposure.visit_info is None else exposure.visit_info.to_dict(),
        "photo_calib": None if exposure.photo_calib is None else exposure.photo_calib.to_dict(),
        "xy0": list(exposure.xy0),
    }
    text = json.dumps(archive, allow_nan=True)
    return fits.BinTableHDU.from_columns(
        [fits.Column(name="JSON", format=f"{max(len(text), 1)}A", array=np.array([text]))], name="ARCHIVE"
    )


def _mask_hdu(mask: np.ndarray, header) -> fits.ImageHDU | fits.CompImageHDU:
    """The MASK extension, losslessly PLIO_1-compressed (IRAF's pixel-list codec, made for
    masks: runs of equal values) when its values fit PLIO's 24 bits. A 4k x 4k mask is 65 MB
    raw and ~0.1-1 MB compressed, a third of each exposure file; it costs ~0.2 s of CPU per
    full-size write or read."""
    if mask.size and 0 <= int(mask.min()) and int(mask.max()) < (1 << 24):
        return fits.CompImageHDU(mask, header=header, name="MASK", compression_type="PLIO_1")
    return fits.ImageHDU(mask, header=header, name="MASK")


def write_exposure(exposure: Exposure, path: str | os.PathLike) -> None:
    """Write ``exposure`` to a multi-extension FITS file at ``path``."""
    primary = _primary_hdu(exposure)
    wcs_header = _local_wcs_header(exposure)
    image_hdu = fits.ImageHDU(exposure.image.astype(np.float32, copy=False), header=wcs_header, name="IMAGE")
    mask_header = wcs_header.copy()
    for key, number in plane_header().items():
        # afw writes these long names as HIERARCH cards too
        mask_header[key if len(key) <= 8 else f"HIERARCH {key}"] = number
    mask_hdu = _mask_hdu(exposure.mask.astype(MASK_DTYPE, copy=False), mask_header)
    var_hdu = fits.ImageHDU(exposure.variance.astype(np.float32, copy=False), header=wcs_header, name="VARIANCE")
    hdus = [primary, image_hdu, mask_hdu, var_hdu, _archive_hdu(exposure)]
    if exposure.psf is not None:
        hdus.append(fits.ImageHDU(exposure.psf.basis, name="PSF"))
    fits.HDUList(hdus).writeto(path, overwrite=True)


#: (FITS card, VisitInfo attribute, comment): the observation cards of a raw's primary header
_RAW_CARDS = (
    ("INSTRUME", "instrument", "instrument"),
    ("EXPTIME", "exposure_time_s", "[s] exposure time"),
    ("DARKTIME", "dark_time_s", "[s] dark time"),
    ("FILTER", "physical_filter", "physical filter"),
    ("MJD-OBS", "mjd_tai", "[d] TAI MJD of mid-exposure"),
    ("RA", "boresight_ra_deg", "[deg] reported boresight RA"),
    ("DEC", "boresight_dec_deg", "[deg] reported boresight Dec"),
    ("ROTPA", "rot_sky_pos_deg", "[deg] rotator sky position angle"),
    ("AIRMASS", "airmass", "airmass at mid-exposure"),
    ("IMGTYPE", "observation_type", "observation type"),
)


def _integer_valued_int32(image: np.ndarray) -> np.ndarray | None:
    """``image`` as int32 when every pixel is a finite integer within int32, else None."""
    info = np.iinfo(np.int32)
    if image.size and not (np.isfinite(image.min()) and np.isfinite(image.max())):
        return None
    if image.size and (image.min() < info.min or image.max() > info.max):
        return None
    as_int = image.astype(np.int32)
    if not np.array_equal(as_int, image):
        return None
    return as_int


def write_raw(exposure: Exposure, path: str | os.PathLike) -> None:
    """Write a raw exposure at ``path``: image and header only (no mask, variance, PSF).

    The image (ADU, camera raw layout) is stored as int32 with lossless RICE_1 tile
    compression when its pixels are integers, else as uncompressed float32. Mask and
    variance are not written (a raw has none; ISR makes them); ``read_exposure`` returns
    them as zeros. Observation cards (``_RAW_CARDS``) and the string/number metadata go to
    the primary header for people and tools reading the file; the ARCHIVE holds the exact
    values.
    """
    if exposure.psf is not None:
        raise ValueError(f"{path}: a raw has no PSF; write it with write_exposure")
    primary = _primary_hdu(exposure)
    header = primary.header
    header["DPLAYOUT"] = (RAW_LAYOUT, "lean raw: IMAGE + ARCHIVE, no mask/variance")
    info = exposure.visit_info
    if info is not None:
        for card, attribute, comment in _RAW_CARDS:
            value = getattr(info, attribute, None)
            if value is not None and not (isinstance(value, float) and np.isnan(value)):
                header[card] = (value, comment)
        if info.detector is not None:
            header["DETECTOR"] = (int(info.detector), "detector id")
    for key, value in exposure.metadata.items():
        if (isinstance(key, str) and len(key) <= 8 and key.isupper() and key not in header
                and isinstance(value, (str, int, float)) and not isinstance(value, bool)):  # fmt: skip
            header[key] = value
    wcs_header = _local_wcs_header(exposure)
    as_int = _integer_valued_int32(exposure.image)
    if as_int is not None:
        image_hdu = fits.CompImageHDU(as_int, header=wcs_header, name="IMAGE", compression_type="RICE_1")
    else:
        image_hdu = fits.ImageHDU(exposure.image.astype(np.float32, copy=False), header=wcs_header, name="IMAGE")
    fits.HDUList([primary, image_hdu, _archive_hdu(exposure)]).writeto(path, overwrite=True)


# -- read --------------------------------------------------------------------
def _archive(hdul, path) -> dict:
    try:
        return json.loads(hdul["ARCHIVE"].data["JSON"][0])
    except (KeyError, IndexError, ValueError) as err:
        raise ExposureFileError(f"{path}: no readable ARCHIVE extension ({err})") from err


def _section(hdul, name, bbox, xy0, path):
    """Pixels of extension ``name`` (all, or the parent-frame ``bbox``); int images (lean raws) as float32."""
    if bbox is None and name == "IMAGE" and isinstance(hdul[name], fits.CompImageHDU):
        # decompressed into memory already: convert once, no extra copy
        return hdul[name].data.astype(np.float32)
    data = _section_raw(hdul, name, bbox, xy0, path)
    return data.astype(np.float32) if name == "IMAGE" and data.dtype.kind in "iu" else data


def _check_bbox(bbox, xy0, shape):
    x0, y0, width, height = (int(v) for v in bbox)
    ix, iy = x0 - xy0[0], y0 - xy0[1]
    if ix < 0 or iy < 0 or ix + width > shape[1] or iy + height > shape[0]:
        raise ValueError(f"bbox {bbox} is outside the stored image (xy0 {xy0}, shape {shape})")
    return ix, iy, width, height


def _zeros_like_image(hdul, bbox, xy0, dtype):
    """Mask/variance of a lean raw (none stored): zeros of the image's (or ``bbox``'s) shape."""
    shape = hdul["IMAGE"].shape
    if bbox is not None:
        _, _, width, height = _check_bbox(bbox, xy0, shape)
        shape = (height, width)
    return np.zeros(shape, dtype=dtype)


def _section_raw(hdul, name, bbox, xy0, path):
    try:
        data = hdul[name].section if bbox is not None else hdul[name].data
        if bbox is None:
            return np.array(data)
        ix, iy, width, height = _check_bbox(bbox, xy0, hdul[name].shape)
        return np.array(data[iy : iy + height, ix : ix + width])
    except KeyError as err:
        raise ExposureFileError(f"{path}: missing {name} extension") from err


def read_exposure(path: str | os.PathLike, component: str | None = None, bbox=None):
    """Read an exposure, or one component of it, from ``path``.

    Parameters
    ----------
    component : `str`, optional
        One of `COMPONENTS`; reads only what that component needs.
    bbox : (x0, y0, width, height), optional
        Parent-coordinate box: read only those pixels (image planes and the
        whole exposure).
    """
    # astropy only *warns* when a file is shorter than its headers say; make that the error it is
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="File may have been truncated", category=AstropyUserWarning)
        try:
            return _read_exposure(path, component, bbox)
        except AstropyUserWarning as err:
            raise ExposureFileError(f"{path}: truncated exposure file ({err})") from err


def _read_exposure(path, component, bbox):
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"Unknown exposure component {component!r}; known: {COMPONENTS}")
    try:
        hdul = fits.open(path, memmap=True, lazy_load_hdus=True)
    except (OSError, ValueError) as err:
        raise ExposureFileError(f"{path}: not a readable FITS file ({err})") from err
    try:
        with hdul:
            if hdul[0].header.get("DIAPIPE") is None:
                raise ExposureFileError(f"{path}: not a diapipe exposure (no DIAPIPE keyword in the primary header)")
            archive = _archive(hdul, path)
            xy0 = tuple(archive.get("xy0", (0, 0)))
            lean = hdul[0].header.get("DPLAYOUT") == RAW_LAYOUT
            if component == "bbox":
                shape = hdul["IMAGE"].shape
                return (xy0[0], xy0[1], shape[1], shape[0])
            if component == "wcs":
                return None if archive["wcs"] is None else wcs_from_dict(archive["wcs"])
            if component == "photoCalib":
                return None if archive["photo_calib"] is None else PhotoCalib.from_dict(archive["photo_calib"])
            if component == "visitInfo":
                return None if archive["visit_info"] is None else VisitInfo.from_dict(archive["visit_info"])
            if component == "metadata":
                return archive["metadata"]
            if component == "psf":
                return _read_psf(hdul, archive, path)
            if component == "image":
                return _section(hdul, "IMAGE", bbox, xy0, path)
            if component == "mask":
                if lean:
                    return _zeros_like_image(hdul, bbox, xy0, MASK_DTYPE)
                planes_from_header(hdul["MASK"].header)
                return _section(hdul, "MASK", bbox, xy0, path)
            if component == "variance":
                if lean:
                    return _zeros_like_image(hdul, bbox, xy0, np.float32)
                return _section(hdul, "VARIANCE", bbox, xy0, path)
            if not lean:
                planes_from_header(hdul["MASK"].header)
            exposure = Exposure(
                image=_section(hdul, "IMAGE", bbox, xy0, path),
                mask=None if lean else _section(hdul, "MASK", bbox, xy0, path),
                variance=None if lean else _section(hdul, "VARIANCE", bbox, xy0, path),
                wcs=None if archive["wcs"] is None else wcs_from_dict(archive["wcs"]),
                psf=_read_psf(hdul, archive, path),
                photo_calib=None if archive["photo_calib"] is None else PhotoCalib.from_dict(archive["photo_calib"]),
                visit_info=None if archive["visit_info"] is None else VisitInfo.from_dict(archive["visit_info"]),
                metadata=archive["metadata"],
                xy0=xy0 if bbox is None else (int(bbox[0]), int(bbox[1])),
            )
            return exposure
    except ExposureFileError:
        raise
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise ExposureFileError(f"{path}: corrupt or truncated exposure file ({err})") from err


def _read_psf(hdul, archive, path):
    if archive["psf"] is None:
        return None
    try:
        basis = np.array(hdul["PSF"].data)
    except KeyError as err:
        raise ExposureFileError(f"{path}: ARCHIVE names a PSF but there is no PSF extension") from err
    return PixelPsf(basis, archive["psf"]["order"], tuple(archive["psf"]["bbox"]))
