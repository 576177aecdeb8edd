"""The ``isr`` PipelineTask: raw -> postISRCCD."""

from __future__ import annotations

import numpy as np
import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..errors import BadInputError, data_id_str
from ..exposure.exposure import Exposure

__all__ = ["IsrTask", "IsrTaskConfig", "IsrTaskConnections"]


class IsrTaskConnections(
    pipeBase.PipelineTaskConnections, dimensions=("instrument", "exposure", "detector")
):
    ccdExposure = cT.Input(
        name="raw",
        doc="Raw exposure: amplifiers with prescan and overscan, in ADU.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "exposure", "detector"),
    )
    bias = cT.PrerequisiteInput(
        name="bias",
        doc="Master bias (electrons, assembled).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "detector"),
        isCalibration=True,
    )
    dark = cT.PrerequisiteInput(
        name="dark",
        doc="Master dark (electrons per second, assembled).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "detector"),
        isCalibration=True,
    )
    flat = cT.PrerequisiteInput(
        name="flat",
        doc="Master flat (relative response, assembled).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "detector", "physical_filter"),
        isCalibration=True,
    )
    defects = cT.PrerequisiteInput(
        name="defects",
        doc="Known bad regions: x0, y0, width, height in assembled pixels.",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "detector"),
        isCalibration=True,
    )
    outputExposure = cT.Output(
        name="postISRCCD",
        doc="Instrument-corrected exposure in electrons, with mask and variance.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "exposure", "detector"),
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        for name in ("bias", "dark", "flat", "defects"):
            if not getattr(config, f"do{name.capitalize()}"):
                self.prerequisiteInputs.remove(name)


class IsrTaskConfig(pipeBase.PipelineTaskConfig, pipelineConnections=IsrTaskConnections):
    doBias = pexConfig.Field(dtype=bool, default=True, doc="Subtract the master bias.")
    doDark = pexConfig.Field(dtype=bool, default=True, doc="Subtract the master dark scaled by the dark time.")
    doFlat = pexConfig.Field(dtype=bool, default=True, doc="Divide by the master flat.")
    doDefects = pexConfig.Field(dtype=bool, default=True, doc="Mask (BAD) and interpolate over known defects.")
    overscanFitType = pexConfig.ChoiceField(
        dtype=str,
        default="poly",
        allowed={"poly": "polynomial in row of the per-row overscan median", "row": "per-row median"},
        doc="Serial-overscan model subtracted from each amplifier.",
    )
    overscanOrder = pexConfig.Field(dtype=int, default=3, doc="Polynomial order of the 'poly' overscan model.")
    edgePixels = pexConfig.Field(dtype=int, default=4, doc="Width in pixels of the EDGE mask border.")
    saturationGrowPixels = pexConfig.Field(
        dtype=int, default=1, doc="Saturated footprints (bleed trails) are grown by this many pixels."
    )


class IsrTask(pipeBase.PipelineTask):
    """Instrument signature removal: overscan, assembly, gain, bias, dark, flat,
    saturation and defect masks, interpolation, variance.

    The algorithms are `diapipe.isr.algorithms`; this task reads and writes.
    """

    ConfigClass = IsrTaskConfig
    _DefaultName = "isr"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.quantum.dataId
        try:
            outputs = self.run(**inputs)
        except (ValueError, FloatingPointError) as err:
            raise BadInputError(f"ISR of raw {{{data_id_str(data_id)}}} failed: {err}") from err
        butlerQC.put(outputs, outputRefs)

    def run(self, *, ccdExposure, bias=None, dark=None, flat=None, defects=None) -> pipeBase.Struct:
        from ..instrument.lsstcam_imsim import detector_for_raw
        from .algorithms import run_isr

        info = ccdExposure.visit_info
        detector = detector_for_raw(info.detector, ccdExposure.image.shape)
        defect_boxes = []
        if defects is not None:
            defect_boxes = [
                tuple(int(v) for v in row) for row in zip(defects["x0"], defects["y0"], defects["width"], defects["height"])
            ]
        for name, calib in (("bias", bias), ("dark", dark), ("flat", flat)):
            if calib is not None and calib.image.shape != detector.shape:
                raise ValueError(
                    f"{name} has shape {calib.image.shape} but detector {detector.name} is {detector.shape}"
                )
        image, mask, variance = run_isr(
            ccdExposure.image,
            detector,
            bias=None if bias is None else bias.image,
            dark=None if dark is None else dark.image,
            flat=None if flat is None else flat.image,
            defects=defect_boxes,
            exposure_time_s=info.dark_time_s or info.exposure_time_s,
            edge_px=self.config.edgePixels,
            saturation_grow_px=self.config.saturationGrowPixels,
            overscan_fit=self.config.overscanFitType,
            overscan_order=self.config.overscanOrder,
        )
        good = np.isfinite(image)
        self.metadata["medianLevel"] = float(np.median(image[good])) if good.any() else float("nan")
        exposure = Exposure(
            image=image,
            mask=mask,
            variance=variance,
            wcs=ccdExposure.wcs,
            visit_info=info,
            metadata=dict(ccdExposure.metadata, ISR="diapipe"),
        )
        return pipeBase.Struct(outputExposure=exposure)
