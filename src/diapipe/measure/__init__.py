"""Background, detection, source measurement and cosmic rays on plain arrays."""

from diapipe.measure.background import Background, estimate_background, subtract_background
from diapipe.measure.cosmic_rays import find_cosmic_rays, repair_cosmic_rays
from diapipe.measure.detection import Footprints, detect_sources
from diapipe.measure.measurement import DEFAULT_APERTURE_RADII, forced_measure, measure_sources

__all__ = [
    "Background",
    "estimate_background",
    "subtract_background",
    "Footprints",
    "detect_sources",
    "DEFAULT_APERTURE_RADII",
    "measure_sources",
    "forced_measure",
    "find_cosmic_rays",
    "repair_cosmic_rays",
]
