"""The ``LSSTCam-imSim`` instrument: DC2's simulated LSSTCam, for the butler."""

from __future__ import annotations

from functools import cache

from lsst.pipe.base import Instrument
from lsst.utils.introspection import get_full_type_name

from .camera import PARALLEL_OVERSCAN, SERIAL_OVERSCAN, SERIAL_PRESCAN, Camera, Detector

__all__ = [
    "BANDS",
    "PHYSICAL_FILTERS",
    "LsstCamImSim",
    "camera_for_amp_shape",
    "detector_for_raw",
    "physical_filter_for_band",
]

BANDS = ("u", "g", "r", "i", "z", "y")
#: physical filter -> band, as DC2's obs_lsst imsim filter definitions
PHYSICAL_FILTERS = {f"{band}_sim_1.4": band for band in BANDS}


def physical_filter_for_band(band: str) -> str:
    """The physical filter of a band (``'g'`` -> ``'g_sim_1.4'``)."""
    if band not in BANDS:
        raise ValueError(f"Unknown band {band!r}; LSSTCam-imSim has bands {', '.join(BANDS)}")
    return f"{band}_sim_1.4"


@cache
def camera_for_amp_shape(amp_data_shape: tuple[int, int] = (2000, 509)) -> Camera:
    """The camera with full-size (default) or cropped detectors (cached)."""
    return Camera.lsstcam_imsim(amp_data_shape=tuple(amp_data_shape))


def _camera() -> Camera:
    return camera_for_amp_shape()


def detector_for_raw(detector_id: int, raw_shape: tuple[int, int]) -> Detector:
    """The geometry of a detector whose raw image has ``raw_shape``: full-size or
    cropped (the simulator's small presets crop every amplifier alike)."""
    raw_ny, raw_nx = raw_shape
    amp_ny = raw_ny // 2 - PARALLEL_OVERSCAN
    amp_nx = raw_nx // 8 - SERIAL_PRESCAN - SERIAL_OVERSCAN
    if amp_ny < 1 or amp_nx < 1 or raw_ny % 2 or raw_nx % 8:
        raise ValueError(
            f"A raw of shape {raw_shape} is not an LSSTCam-imSim detector (16 amplifiers in 2 x 8, "
            f"{SERIAL_PRESCAN} px prescan, {SERIAL_OVERSCAN} px serial and {PARALLEL_OVERSCAN} rows parallel overscan)"
        )
    return camera_for_amp_shape((amp_ny, amp_nx))[detector_id]


class LsstCamImSim(Instrument):
    """DC2's simulated LSSTCam (imSim): 189 science detectors, bands ugrizy.

    ``butler register-instrument REPO diapipe.instrument.LsstCamImSim``
    registers it; the camera geometry is `diapipe.instrument.camera`.
    """

    # DC2 visit ids are < 10^7; exposure ids equal visit ids (one snap per visit).
    visit_max = 2**31 - 1
    exposure_max = 2**31 - 1
    policyName = "imsim"

    @classmethod
    def getName(cls) -> str:
        return "LSSTCam-imSim"

    def getCamera(self) -> Camera:
        """The full-size camera geometry."""
        return _camera()

    def register(self, registry, *, update: bool = False) -> None:
        camera = self.getCamera()
        name = self.getName()
        with registry.transaction():
            registry.syncDimensionData(
                "instrument",
                {
                    "name": name,
                    "detector_max": len(camera),
                    "visit_max": self.visit_max,
                    "exposure_max": self.exposure_max,
                    "visit_system": 0,
                    "class_name": get_full_type_name(self),
                },
                update=update,
            )
            for physical_filter, band in PHYSICAL_FILTERS.items():
                registry.syncDimensionData(
                    "physical_filter",
                    {"instrument": name, "name": physical_filter, "band": band},
                    update=update,
                )
            for detector in camera:
                registry.syncDimensionData(
                    "detector",
                    {
                        "instrument": name,
                        "id": detector.id,
                        "full_name": detector.name,
                        "name_in_raft": detector.sensor,
                        "raft": detector.raft,
                        "purpose": "SCIENCE",
                    },
                    update=update,
                )
            # DC2 visits are single exposures: the one-to-one visit system.
            registry.syncDimensionData(
                "visit_system", {"instrument": name, "id": 0, "name": "one-to-one"}, update=update
            )

    def getRawFormatter(self, dataId):
        from ..butler.formatters import ExposureFormatter

        return ExposureFormatter
