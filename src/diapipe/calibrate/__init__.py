"""Calibrate: astrometric (TAN-SIP vs the refcat) and photometric calibration, aperture correction."""

from .aperture_correction import (
    ApertureCorrection,
    ApertureCorrectionError,
    apply_aperture_correction,
    fit_aperture_correction,
)
from .astrometry import (
    AstrometryError,
    ReferenceMatch,
    fit_tan_sip,
    fit_wcs,
    match_to_reference,
    wcs_pixel_scale_arcsec,
)
from .photometry import (
    DEFAULT_FILTER_MAP_TEMPLATE,
    PhotoCalib,
    PhotometryError,
    fit_zero_point,
    mag_to_njy,
    njy_to_mag,
    reference_flux_column,
    reference_flux_err_column,
)

__all__ = [
    "ApertureCorrection",
    "ApertureCorrectionError",
    "apply_aperture_correction",
    "fit_aperture_correction",
    "AstrometryError",
    "ReferenceMatch",
    "fit_tan_sip",
    "fit_wcs",
    "match_to_reference",
    "wcs_pixel_scale_arcsec",
    "DEFAULT_FILTER_MAP_TEMPLATE",
    "PhotoCalib",
    "PhotometryError",
    "fit_zero_point",
    "mag_to_njy",
    "njy_to_mag",
    "reference_flux_column",
    "reference_flux_err_column",
]
