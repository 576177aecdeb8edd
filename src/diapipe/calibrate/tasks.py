"""PipelineTasks of single-frame processing: characterizeImage, calibrate,
consolidateVisitSummary (the guide's 2022 labels and dataset names)."""

from __future__ import annotations

import numpy as np
import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..errors import BadInputError, DiapipeAlgorithmError, data_id_str, naming_data_id
from ..exposure.exposure import Exposure

__all__ = [
    "CharacterizeImageTask",
    "CharacterizeImageConfig",
    "CalibrateTask",
    "CalibrateConfig",
    "ConsolidateVisitSummaryTask",
    "ConsolidateVisitSummaryConfig",
]


# ---------------------------------------------------------------------------
# characterizeImage
# ---------------------------------------------------------------------------
class CharacterizeImageConnections(
    pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")
):
    exposure = cT.Input(
        name="postISRCCD",
        doc="ISR-corrected exposure (electrons).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "exposure", "detector"),
    )
    characterized = cT.Output(
        name="icExp",
        doc="Background-subtracted, cosmic-ray-repaired exposure with a PSF model.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    sourceCat = cT.Output(
        name="icSrc",
        doc="Bright sources used to model the PSF (calib_psf_used marks the PSF stars).",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )
    backgroundModel = cT.Output(
        name="icExpBackground",
        doc="The background subtracted from icExp.",
        storageClass="DiapipeBackground",
        dimensions=("instrument", "visit", "detector"),
    )


class CharacterizeImageConfig(pipeBase.PipelineTaskConfig, pipelineConnections=CharacterizeImageConnections):
    initialFwhmArcsec = pexConfig.Field(
        dtype=float, default=0.8, doc="FWHM of the Gaussian PSF guess for the first pass (arcsec)."
    )
    pixelScaleArcsec = pexConfig.Field(dtype=float, default=0.2, doc="Pixel scale used to convert the guess.")
    detectionThreshold = pexConfig.Field(
        dtype=float, default=10.0, doc="Bright-source threshold in units of the PSF-smoothed noise."
    )
    backgroundBinSize = pexConfig.Field(dtype=int, default=128, doc="Background cell size (pixels).")
    psfKernelSize = pexConfig.Field(dtype=int, default=25, doc="Size of the pixelized PSF model (odd).")
    psfSpatialOrder = pexConfig.Field(
        dtype=int, default=2, doc="Polynomial order of the PSF's variation over the detector."
    )
    minPsfStars = pexConfig.Field(
        dtype=int, default=5, doc="Fewer usable PSF stars fail the quantum (a constant PSF needs a handful)."
    )
    apCorrRadiusPixels = pexConfig.Field(
        dtype=float, default=12.0, doc="Aperture radius (pixels) that PSF fluxes are corrected to."
    )


class CharacterizeImageTask(pipeBase.PipelineTask):
    """Background, cosmic rays, bright sources, PSF and aperture correction."""

    ConfigClass = CharacterizeImageConfig
    _DefaultName = "characterizeImage"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        try:
            outputs = self.run(**inputs)
        except DiapipeAlgorithmError as err:
            raise naming_data_id(err, self._DefaultName, butlerQC.quantum.dataId) from err
        butlerQC.put(outputs, outputRefs)

    def run(self, *, exposure: Exposure) -> pipeBase.Struct:
        from .characterize import characterize_image

        config = self.config
        finite = np.isfinite(exposure.image)
        if not finite.any():
            raise BadInputError(f"postISRCCD of visit {exposure.visit_info.visit} has no finite pixels")
        result = characterize_image(
            exposure.image,
            exposure.mask,
            exposure.variance,
            initial_fwhm_pix=config.initialFwhmArcsec / config.pixelScaleArcsec,
            detection_threshold=config.detectionThreshold,
            background_bin_size=config.backgroundBinSize,
            psf_kernel_size=config.psfKernelSize,
            psf_order=config.psfSpatialOrder,
            min_psf_stars=config.minPsfStars,
            ap_corr_radius_pix=config.apCorrRadiusPixels,
        )
        for key, value in result.stats.items():
            if np.isscalar(value):
                self.metadata[key] = value
        metadata = dict(exposure.metadata)
        metadata["SKYLEVEL"] = result.stats["sky_level_e"]
        metadata["SKYSIGMA"] = result.stats["sky_noise_e"]
        if result.aperture_correction is not None:
            metadata["AP_CORR"] = result.aperture_correction.to_dict()
        characterized = Exposure(
            image=result.image,
            mask=result.mask,
            variance=result.variance,
            wcs=exposure.wcs,
            psf=result.psf,
            visit_info=exposure.visit_info,
            metadata=metadata,
        )
        return pipeBase.Struct(characterized=characterized, sourceCat=result.catalog, backgroundModel=result.background)


# ---------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------
class CalibrateConnections(pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    exposure = cT.Input(
        name="icExp",
        doc="Characterized exposure.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    background = cT.Input(
        name="icExpBackground",
        doc="Background subtracted by characterizeImage (passed on as calexpBackground).",
        storageClass="DiapipeBackground",
        dimensions=("instrument", "visit", "detector"),
    )
    astromRefCat = cT.PrerequisiteInput(
        name="cal_ref_cat_2_2",
        doc="Reference catalogue shards overlapping the detector.",
        storageClass="ArrowAstropy",
        dimensions=("htm7",),
        multiple=True,
        deferLoad=True,
    )
    outputExposure = cT.Output(
        name="calexp",
        doc="Calibrated exposure: electrons, fitted TAN-SIP WCS, PSF, PhotoCalib to nJy.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    outputCat = cT.Output(
        name="src",
        doc="Sources with sky coordinates and PSF/aperture fluxes (instrumental and nJy).",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )
    outputBackground = cT.Output(
        name="calexpBackground",
        doc="Background subtracted from the calexp.",
        storageClass="DiapipeBackground",
        dimensions=("instrument", "visit", "detector"),
    )
    matches = cT.Output(
        name="srcMatch",
        doc="Source-reference matches used for astrometry.",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )


class CalibrateConfig(pipeBase.PipelineTaskConfig, pipelineConnections=CalibrateConnections):
    detectionThreshold = pexConfig.Field(dtype=float, default=5.0, doc="Detection threshold (sigma).")
    filterMap = pexConfig.DictField(
        keytype=str,
        itemtype=str,
        default={band: f"lsst_{band}_smeared" for band in "ugrizy"},
        doc="Band -> reference catalogue filter name (flux column is '<name>_flux'); DC2's cal_ref_cat_2_2 map.",
    )
    sipOrder = pexConfig.Field(dtype=int, default=3, doc="SIP distortion order of the fitted WCS.")
    maxOffsetArcsec = pexConfig.Field(
        dtype=float, default=20.0, doc="Largest pointing error the reference matcher searches (arcsec)."
    )


class CalibrateTask(pipeBase.PipelineTask):
    """Deep detection and measurement, astrometric and photometric calibration."""

    ConfigClass = CalibrateConfig
    _DefaultName = "calibrate"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        from astropy.table import vstack

        inputs = butlerQC.get(inputRefs)
        shards = [handle.get() for handle in inputs.pop("astromRefCat")]
        if not shards:
            raise pipeBase.NoWorkFound(
                f"no cal_ref_cat_2_2 shards overlap {{{data_id_str(butlerQC.quantum.dataId)}}}"
            )
        refcat = vstack(shards, metadata_conflicts="silent")
        try:
            outputs = self.run(refcat=refcat, **inputs)
        except DiapipeAlgorithmError as err:
            raise naming_data_id(err, self._DefaultName, butlerQC.quantum.dataId) from err
        butlerQC.put(outputs, outputRefs)

    def run(self, *, exposure: Exposure, background, refcat) -> pipeBase.Struct:
        from .aperture_correction import ApertureCorrection
        from .astrometry import AstrometryError
        from .calibrate_image import calibrate_image
        from .photometry import PhotometryError

        ap_corr = exposure.metadata.get("AP_CORR")
        try:
            result = calibrate_image(
                exposure.image,
                exposure.mask,
                exposure.variance,
                exposure.psf,
                exposure.wcs,
                refcat,
                exposure.visit_info.band,
                filter_map=dict(self.config.filterMap),
                aperture_correction=None if ap_corr is None else ApertureCorrection.from_dict(ap_corr),
                detection_threshold=self.config.detectionThreshold,
                sip_order=self.config.sipOrder,
                max_offset_arcsec=self.config.maxOffsetArcsec,
            )
        except AstrometryError as err:
            raise DiapipeAlgorithmError(
                f"astrometry did not converge: {err}",
                measured=getattr(err, "n_matches", None),
                threshold=getattr(err, "threshold", None),
            ) from err
        except PhotometryError as err:
            raise DiapipeAlgorithmError(
                f"photometric calibration failed: {err}",
                measured=getattr(err, "n_stars", None),
                threshold=getattr(err, "threshold", None),
            ) from err
        astrometry = result.stats["astrometry"]
        self.metadata["astrometry_rms_mas"] = float(astrometry.get("rms_mas", np.nan))
        self.metadata["astrometry_n_matches"] = int(astrometry.get("n_matches", 0))
        self.metadata["zero_point_mag"] = result.stats["zero_point_mag"]
        self.metadata["n_sources"] = result.stats["n_sources"]
        metadata = dict(exposure.metadata)
        metadata["ASTROM_RMS_MAS"] = float(astrometry.get("rms_mas", np.nan))
        metadata["ZEROPOINT"] = result.stats["zero_point_mag"]
        calexp = Exposure(
            image=exposure.image,
            mask=exposure.mask,
            variance=exposure.variance,
            wcs=result.wcs,
            psf=exposure.psf,
            photo_calib=result.photo_calib,
            visit_info=exposure.visit_info,
            metadata=metadata,
        )
        return pipeBase.Struct(
            outputExposure=calexp, outputCat=result.catalog, outputBackground=background, matches=result.matches
        )


# ---------------------------------------------------------------------------
# consolidateVisitSummary
# ---------------------------------------------------------------------------
class ConsolidateVisitSummaryConnections(pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit")):
    calexp = cT.Input(
        name="calexp",
        doc="Calibrated exposures of the visit (read by component).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
        multiple=True,
        deferLoad=True,
    )
    visitSummary = cT.Output(
        name="visitSummary",
        doc="One row per detector: PSF size, zero point, sky, WCS, corners.",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit"),
    )


class ConsolidateVisitSummaryConfig(
    pipeBase.PipelineTaskConfig, pipelineConnections=ConsolidateVisitSummaryConnections
):
    pass


class ConsolidateVisitSummaryTask(pipeBase.PipelineTask):
    """Gather per-detector summaries of a visit into one table."""

    ConfigClass = ConsolidateVisitSummaryConfig
    _DefaultName = "consolidateVisitSummary"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        handles = butlerQC.get(inputRefs.calexp)
        butlerQC.put(self.run(calexp_handles=handles), outputRefs)

    def run(self, *, calexp_handles) -> pipeBase.Struct:
        import json

        from astropy.table import Table

        from ..exposure.fits import wcs_to_dict

        rows = []
        for handle in calexp_handles:
            psf = handle.get(component="psf")
            wcs = handle.get(component="wcs")
            photo_calib = handle.get(component="photoCalib")
            info = handle.get(component="visitInfo")
            metadata = handle.get(component="metadata")
            x0, y0, width, height = handle.get(component="bbox")
            cx, cy = x0 + (width - 1) / 2, y0 + (height - 1) / 2
            corner_x = np.array([x0 - 0.5, x0 + width - 0.5, x0 + width - 0.5, x0 - 0.5])
            corner_y = np.array([y0 - 0.5, y0 - 0.5, y0 + height - 0.5, y0 + height - 0.5])
            ra, dec = wcs.all_pix2world(corner_x, corner_y, 0)
            ra0, dec0 = wcs.all_pix2world([cx], [cy], 0)
            scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
            ixx, iyy, ixy = psf.moments(cx, cy)
            rows.append(
                {
                    "visit": info.visit,
                    "detector": info.detector,
                    "band": info.band,
                    "physical_filter": info.physical_filter,
                    "expMidptMJD": info.mjd_tai,
                    "airmass": info.airmass,
                    "psfSigma": psf.sigma(cx, cy),
                    "psfFwhmArcsec": psf.fwhm(cx, cy) * scale,
                    "psfIxx": ixx,
                    "psfIyy": iyy,
                    "psfIxy": ixy,
                    "zeroPoint": photo_calib.instrumental_zero_point_mag + 2.5 * np.log10(info.exposure_time_s),
                    "calibrationMean": photo_calib.calibration_mean,
                    "calibrationErr": photo_calib.calibration_err,
                    "skyBg": metadata.get("SKYLEVEL", np.nan),
                    "skyNoise": metadata.get("SKYSIGMA", np.nan),
                    "astromRmsMas": metadata.get("ASTROM_RMS_MAS", np.nan),
                    "ra": float(ra0[0]),
                    "dec": float(dec0[0]),
                    "raCorners": ra.astype(float),
                    "decCorners": dec.astype(float),
                    "bbox_x0": x0,
                    "bbox_y0": y0,
                    "bbox_width": width,
                    "bbox_height": height,
                    "wcs": json.dumps(wcs_to_dict(wcs)),
                }
            )
        table = Table(rows=rows) if rows else Table()
        return pipeBase.Struct(visitSummary=table)
