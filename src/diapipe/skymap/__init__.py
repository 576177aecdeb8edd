"""Sky maps: tracts and patches (the DC2 rings sky map)."""

from .rings import BBox, PatchInfo, RingsSkyMap, RingsSkyMapConfig, TractInfo

__all__ = ["BBox", "PatchInfo", "RingsSkyMap", "RingsSkyMapConfig", "TractInfo"]
