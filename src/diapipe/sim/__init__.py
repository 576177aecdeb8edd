"""DC2-like simulator: sky catalogue, observing conditions, rendering, truth (detector effects in signature)."""

from __future__ import annotations

from .._lazy import lazy_exports

# Lazy: `diapipe` commands import diapipe.sim.presets for their options; the
# renderer and its dependencies load only when simulating.
_LAZY = {
    "BANDS": "sky",
    "BAND_PARAMS": "observing",
    "DetectorPsfModel": "render",
    "RenderedDetector": "render",
    "SkyCatalog": "sky",
    "Visit": "observing",
    "affine_pix_to_fp": "render",
    "draw_point_source": "render",
    "flux_njy": "sky",
    "fwhm_eff_arcsec": "observing",
    "fwhm_geom_arcsec": "observing",
    "m5_point_source": "observing",
    "mag_to_njy": "sky",
    "make_sky_catalog": "sky",
    "make_sky_catalog_cone": "sky",
    "make_visits": "observing",
    "njy_to_electrons": "observing",
    "njy_to_mag": "sky",
    "object_truth_table": "truth",
    "psf_ellipticity_at": "observing",
    "psf_for_detector": "render",
    "psf_fwhm_at": "observing",
    "reference_catalog": "sky",
    "render_detector": "render",
    "render_difference_pair": "pair",
    "DifferencePair": "pair",
    "sky_e_per_px": "observing",
    "visit_truth": "truth",
    "visits_table": "observing",
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
