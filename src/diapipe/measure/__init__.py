"""Background, detection, source measurement and cosmic rays on plain arrays."""

from diapipe.measure.background import Background, estimate_background, subtract_background
from diapipe.measure.cosmic_rays import find_cosmic_rays, repair_cosmic_rays
from diapipe.measure.detection import Footprints, detect_sources
from diapipe.measure.measurement import DEFAULT_APERTURE_RADII, forced_measure, measure_sources

__all__ = [
    "DEFAULT_APERTURE_RADII",
    "Background",
    "Footprints",
    "detect_sources",
    "estimate_background",
    "find_cosmic_rays",
    "forced_measure",
    "measure_sources",
    "repair_cosmic_rays",
    "subtract_background",
]
