"""calibrate's science: deep detection and measurement, astrometry, photometry.

Input is characterizeImage's output (background-subtracted, CR-repaired,
with a PSF); output a source catalogue with sky coordinates and fluxes,
a TAN-SIP WCS fitted to the reference catalogue, and the zero point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..exposure.photo_calib import PhotoCalib
from ..exposure.psf import PixelPsf

__all__ = ["CalibrateResult", "calibrate_image", "reference_catalog_for_band"]


@dataclass
class CalibrateResult:
    catalog: Table
    wcs: object
    photo_calib: PhotoCalib
    matches: Table
    stats: dict = field(default_factory=dict)


def reference_catalog_for_band(refcat: Table, band: str, filter_map: dict[str, str]) -> tuple:
    """(ra, dec, flux_njy, flux_err_njy) of the reference catalogue in ``band`` via ``filter_map``."""
    from .photometry import reference_flux_column, reference_flux_err_column

    column = reference_flux_column(band, filter_map)
    if column not in refcat.colnames:
        raise KeyError(
            f"reference catalogue has no column {column!r} for band {band!r} (filterMap {filter_map}); "
            f"flux columns: {[c for c in refcat.colnames if c.endswith('_flux')]}"
        )
    err_column = reference_flux_err_column(band, filter_map)
    flux_err = np.asarray(refcat[err_column], float) if err_column in refcat.colnames else 0.01 * np.asarray(refcat[column], float)
    return (
        np.asarray(refcat["coord_ra"], float),
        np.asarray(refcat["coord_dec"], float),
        np.asarray(refcat[column], float),
        flux_err,
    )


def calibrate_image(
    image: np.ndarray,
    mask: np.ndarray,
    variance: np.ndarray,
    psf: PixelPsf,
    initial_wcs,
    refcat: Table,
    band: str,
    *,
    filter_map: dict[str, str],
    aperture_correction=None,
    detection_threshold: float = 5.0,
    sip_order: int = 3,
    astrometry_min_snr: float = 10.0,
    photometry_min_snr: float = 20.0,
    max_offset_arcsec: float = 20.0,
    centroid_floor_pix: float = 0.01,
) -> CalibrateResult:
    """Detect, measure and calibrate one characterized image (electrons).

    The WCS fit uses sources with S/N above ``astrometry_min_snr``; the zero
    point uses matched, unflagged, unresolved-looking sources with S/N above
    ``photometry_min_snr``, comparing aperture-corrected PSF fluxes with the
    reference fluxes of ``band`` (column chosen by ``filter_map``, Rubin's
    ``{band: 'lsst_{band}_smeared'}`` for ``cal_ref_cat_2_2``).
    The WCS fit weights each source by its centroid error, added in quadrature to
    ``centroid_floor_pix``.
    """
    from ..measure.detection import detect_sources
    from ..measure.measurement import measure_sources
    from .aperture_correction import apply_aperture_correction
    from .astrometry import fit_wcs
    from .photometry import fit_zero_point

    ny, nx = image.shape
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    footprints = detect_sources(image, variance, mask, psf.sigma(), detection_threshold, polarity="positive")
    catalog = measure_sources(image, variance, mask, psf, footprints)
    if aperture_correction is not None and len(catalog):
        flux, err = apply_aperture_correction(
            catalog["psfFlux"], catalog["psfFluxErr"], catalog["centroid_x"], catalog["centroid_y"], aperture_correction
        )
        catalog["psfFlux"], catalog["psfFluxErr"] = flux, err
    snr = np.asarray(catalog["psfFlux"], float) / np.asarray(catalog["psfFluxErr"], float)
    flagged = np.zeros(len(catalog), dtype=bool)
    for name in ("flag_edge", "flag_saturatedCenter", "flag_interpolatedCenter", "flag_bad", "flag_noData"):
        if name in catalog.colnames:
            flagged |= np.asarray(catalog[name], bool)
    good = np.isfinite(snr) & (snr > astrometry_min_snr) & ~flagged & np.isfinite(catalog["centroid_x"])

    ref_ra, ref_dec, ref_flux, ref_flux_err = reference_catalog_for_band(refcat, band, filter_map)
    index = np.flatnonzero(good)
    # Weight the WCS fit by the centroid errors: on a detector with few reference stars the
    # bright ones (centroids good to a few mas) must dominate the faint ones (tens of mas);
    # a floor keeps any single star from dominating (PSF-model centroid systematics).
    sigma_pix = None
    if "centroid_xErr" in catalog.colnames and "centroid_yErr" in catalog.colnames:
        err = np.hypot(np.asarray(catalog["centroid_xErr"], float), np.asarray(catalog["centroid_yErr"], float))
        err = np.sqrt(0.5 * err**2 + centroid_floor_pix**2)
        sigma_pix = np.where(np.isfinite(err), err, np.nanmax(err, initial=1.0))[index]
    wcs, astrometry = fit_wcs(
        np.asarray(catalog["centroid_x"], float)[index],
        np.asarray(catalog["centroid_y"], float)[index],
        np.asarray(catalog["psfFlux"], float)[index],
        ref_ra,
        ref_dec,
        ref_flux,
        initial_wcs,
        bbox=bbox,
        sip_order=sip_order,
        max_offset_arcsec=max_offset_arcsec,
        sigma_pix=sigma_pix,
    )
    src_index = index[np.asarray(astrometry["src_index"], int)]
    ref_index = np.asarray(astrometry["ref_index"], int)

    ra, dec = wcs.all_pix2world(np.asarray(catalog["centroid_x"], float), np.asarray(catalog["centroid_y"], float), 0)
    catalog["coord_ra"] = ra
    catalog["coord_dec"] = dec
    used_astrometry = np.zeros(len(catalog), dtype=bool)
    used_astrometry[src_index] = True
    catalog["calib_astrometry_used"] = used_astrometry

    phot = (snr[src_index] > photometry_min_snr) & (ref_flux[ref_index] > 0)
    calibration, calibration_err, phot_stats = fit_zero_point(
        np.asarray(catalog["psfFlux"], float)[src_index][phot],
        np.asarray(catalog["psfFluxErr"], float)[src_index][phot],
        ref_flux[ref_index][phot],
        ref_flux_err[ref_index][phot],
    )
    if aperture_correction is not None:
        # the aperture correction scales every calibration star alike: its error does not
        # average down with the number of stars and belongs to the calibration's error
        calibration_err = float(np.hypot(calibration_err, calibration * aperture_correction.err))
    photo_calib = PhotoCalib(calibration, calibration_err)
    used_photometry = np.zeros(len(catalog), dtype=bool)
    used_idx = src_index[phot][np.asarray(phot_stats.get("used", np.ones(phot.sum(), bool)), bool)]
    used_photometry[used_idx] = True
    catalog["calib_photometry_used"] = used_photometry
    flux_njy, flux_err_njy = photo_calib.inst_flux_to_njy(
        np.asarray(catalog["psfFlux"], float), np.asarray(catalog["psfFluxErr"], float), include_calibration_error=False
    )
    catalog["psfFlux_nJy"] = flux_njy
    catalog["psfFluxErr_nJy"] = flux_err_njy
    catalog["id"] = np.arange(len(catalog), dtype=np.int64)

    matches = Table(
        {
            "src_id": np.asarray(catalog["id"])[src_index],
            "ref_id": np.asarray(refcat["id"])[ref_index] if "id" in refcat.colnames else ref_index,
            "src_ra": ra[src_index],
            "src_dec": dec[src_index],
            "ref_ra": ref_ra[ref_index],
            "ref_dec": ref_dec[ref_index],
            "src_flux_nJy": flux_njy[src_index],
            "ref_flux_nJy": ref_flux[ref_index],
        }
    )
    stats = {
        "n_sources": int(len(catalog)),
        "astrometry": {k: v for k, v in astrometry.items() if np.isscalar(v)},
        "photometry": {k: v for k, v in phot_stats.items() if np.isscalar(v)},
        "zero_point_mag": float(photo_calib.instrumental_zero_point_mag),
    }
    return CalibrateResult(catalog, wcs, photo_calib, matches, stats)
