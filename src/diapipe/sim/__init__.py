"""DC2-like simulator: sky catalogue, observing conditions, rendering, truth (detector effects in signature)."""

from .observing import (
    BAND_PARAMS,
    Visit,
    fwhm_eff_arcsec,
    fwhm_geom_arcsec,
    m5_point_source,
    make_visits,
    njy_to_electrons,
    psf_ellipticity_at,
    psf_fwhm_at,
    sky_e_per_px,
    visits_table,
)
from .render import (
    DetectorPsfModel,
    RenderedDetector,
    affine_pix_to_fp,
    draw_point_source,
    psf_for_detector,
    render_detector,
)
from .sky import (
    BANDS,
    SkyCatalog,
    flux_njy,
    mag_to_njy,
    make_sky_catalog,
    make_sky_catalog_cone,
    njy_to_mag,
    reference_catalog,
)
from .truth import object_truth_table, visit_truth

__all__ = [
    "BANDS",
    "BAND_PARAMS",
    "DetectorPsfModel",
    "RenderedDetector",
    "SkyCatalog",
    "Visit",
    "affine_pix_to_fp",
    "draw_point_source",
    "flux_njy",
    "fwhm_eff_arcsec",
    "fwhm_geom_arcsec",
    "m5_point_source",
    "mag_to_njy",
    "make_sky_catalog",
    "make_sky_catalog_cone",
    "make_visits",
    "njy_to_electrons",
    "njy_to_mag",
    "object_truth_table",
    "psf_ellipticity_at",
    "psf_for_detector",
    "psf_fwhm_at",
    "reference_catalog",
    "render_detector",
    "sky_e_per_px",
    "visit_truth",
    "visits_table",
]
