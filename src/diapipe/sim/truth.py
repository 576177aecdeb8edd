"""Truth tables for one detector-visit: what was drawn, where, how bright; and the visit's PSF,
calibration and sky.

Object truth (`object_truth_table`, one row per catalogue object whose centre is
within the rendering margin of the detector), a `pandas.DataFrame`:

=================  =====================================================================
``id``             int64 catalogue id (stable across visits and detectors)
``type``           'star', 'variable', 'galaxy', 'transient', 'moving'
``ra``, ``dec``    true position at this visit's time (deg)
``x``, ``y``       0-based parent pixel position, ``wcs.all_world2pix(ra, dec, 0)``
``band``           visit band
``mjd``            visit midpoint (TAI)
``flux_njy``       true flux at this visit (nJy; 0 for a transient before explosion)
``flux_e``         expected electrons (``flux_njy · njy_to_electrons(visit)``)
``mag``            AB magnitude of ``flux_njy`` (NaN if 0)
``ref_flux_njy``   flux a template holds: mean flux (variables), 0 (transients)
``diff_flux_njy``  ``flux_njy − ref_flux_njy``: what a difference image should show
``host_id``        host galaxy id for hosted transients, else -1
``psf_fwhm_arcsec`` true PSF FWHM at the object
``drawn``          flux_e > 0 (drawn into the image)
``on_detector``    centre inside the image, [-0.5, n-0.5) in local pixels
=================  =====================================================================

Visit truth (`visit_truth`, one dict/row per detector-visit): ``visit``,
``band``, ``physical_filter``, ``mjd``, ``airmass``, ``exposure_time_s``,
``seeing_500nm_arcsec``, ``psf_fwhm_arcsec`` / ``psf_fwhm_px`` (true PSF at the
detector centre), ``fwhm_eff_arcsec``, ``zp_1e_per_s``, ``zp_exposure`` (AB mag
for 1 e⁻ in the exposure), ``njy_per_electron`` (the calibration: multiply
electrons by it to get nJy), ``cloud_mag``, ``sky_mag_arcsec2``, ``sky_level_e``
(e⁻/px), ``m5``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .observing import Visit, njy_to_electrons
from .sky import njy_to_mag

__all__ = ["TRUTH_COLUMNS", "object_truth_table", "visit_truth"]

TRUTH_COLUMNS = (
    "id", "type", "ra", "dec", "x", "y", "band", "mjd", "flux_njy", "flux_e", "mag", "ref_flux_njy",
    "diff_flux_njy", "host_id", "psf_fwhm_arcsec", "drawn", "on_detector",
)


def object_truth_table(rows, x, y, visit: Visit, flux_njy, flux_e, drawn, psf_fwhm_arcsec, size_xy, xy0,
                       *, ref_flux_njy=None) -> pd.DataFrame:
    """Assemble the object truth (columns in the module docstring).

    ``rows``: the catalogue rows (`SkyCatalog.table` subset, same order as x, y);
    ``ref_flux_njy``: mapping band -> reference fluxes (default: ``flux_njy``).
    Moving objects' ``ra``/``dec`` are at the visit time (recomputed from x, y is
    not needed: the catalogue's `positions_at` gave x, y).
    """
    nx, ny = size_xy
    n = len(rows)
    ref = np.asarray(ref_flux_njy[visit.band], float) if ref_flux_njy is not None else np.asarray(flux_njy, float)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    lx, ly = x - xy0[0], y - xy0[1]
    ra = rows["ra"].to_numpy(float).copy()
    dec = rows["dec"].to_numpy(float).copy()
    moving = (rows["type"] == "moving").to_numpy()
    if moving.any():
        dt = visit.mjd - rows["epoch_mjd"].to_numpy(float)[moving]
        dec[moving] += rows["ddec_deg_per_day"].to_numpy(float)[moving] * dt
        ra[moving] += rows["dra_cosdec_deg_per_day"].to_numpy(float)[moving] * dt / np.cos(np.radians(dec[moving]))
    flux_njy = np.asarray(flux_njy, float)
    table = pd.DataFrame(
        {
            "id": rows["id"].to_numpy(np.int64),
            "type": rows["type"].to_numpy(str),
            "ra": ra,
            "dec": dec,
            "x": x,
            "y": y,
            "band": np.full(n, visit.band),
            "mjd": np.full(n, visit.mjd),
            "flux_njy": flux_njy,
            "flux_e": np.asarray(flux_e, float),
            "mag": njy_to_mag(flux_njy),
            "ref_flux_njy": ref,
            "diff_flux_njy": flux_njy - ref,
            "host_id": rows["host_id"].to_numpy(np.int64),
            "psf_fwhm_arcsec": np.asarray(psf_fwhm_arcsec, float),
            "drawn": np.asarray(drawn, bool),
            "on_detector": (lx >= -0.5) & (lx < nx - 0.5) & (ly >= -0.5) & (ly < ny - 0.5),
        },
        columns=list(TRUTH_COLUMNS),
    )
    return table


def visit_truth(visit: Visit, psf_model, shape, *, xy0=(0, 0), sky_level_e: float) -> dict:
    """Per detector-visit truth (keys in the module docstring); ``psf_model`` is a
    `diapipe.sim.render.DetectorPsfModel`, evaluated at the detector centre."""
    ny, nx = shape
    cx, cy = xy0[0] + 0.5 * (nx - 1), xy0[1] + 0.5 * (ny - 1)
    calib = njy_to_electrons(visit)
    return {
        "visit": visit.visit,
        "band": visit.band,
        "physical_filter": visit.physical_filter,
        "mjd": visit.mjd,
        "airmass": visit.airmass,
        "exposure_time_s": visit.exposure_time_s,
        "seeing_500nm_arcsec": visit.seeing_500nm_arcsec,
        "psf_fwhm_arcsec": float(np.atleast_1d(psf_model.fwhm_arcsec(cx, cy))[0]),
        "psf_fwhm_px": float(psf_model.fwhm_px(cx, cy)[0]),
        "fwhm_eff_arcsec": visit.fwhm_eff_arcsec,
        "zp_1e_per_s": visit.zp_1e_per_s,
        "zp_exposure": visit.zp_exposure,
        "njy_per_electron": 1.0 / calib,
        "cloud_mag": visit.cloud_mag,
        "sky_mag_arcsec2": visit.sky_mag_arcsec2,
        "sky_level_e": float(sky_level_e),
        "m5": visit.m5,
    }
