"""The LSSTCam-imSim instrument and its camera geometry."""

from .lsstcam_imsim import BANDS, PHYSICAL_FILTERS, LsstCamImSim, physical_filter_for_band

__all__ = ["BANDS", "PHYSICAL_FILTERS", "LsstCamImSim", "physical_filter_for_band"]
