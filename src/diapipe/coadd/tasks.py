"""Template-building PipelineTasks: selectGoodSeeingVisits, makeWarp, assembleCoadd."""

from __future__ import annotations

import math

import numpy as np
import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..errors import DiapipeAlgorithmError, data_id_str, naming_data_id
from ..exposure.exposure import Exposure, PhotoCalib
from ..exposure.masks import MASK_DTYPE, bit

__all__ = [
    "SelectGoodSeeingVisitsTask",
    "SelectGoodSeeingVisitsConfig",
    "MakeWarpTask",
    "MakeWarpConfig",
    "AssembleCoaddTask",
    "AssembleCoaddConfig",
    "select_good_seeing_visits",
    "patch_overlap_bbox",
]


# ---------------------------------------------------------------------------
# selectGoodSeeingVisits
# ---------------------------------------------------------------------------
def select_good_seeing_visits(fwhm_by_visit: dict[int, float], *, q_min=0.0, q_max=0.33, n_visits_min=6) -> list[int]:
    """Visits whose PSF FWHM lies in the [q_min, q_max] quantile range, but at
    least ``n_visits_min`` (the best-seeing ones) when that many exist.

    Rubin's BestSeeingQuantiles selection, as used by the 2022 ApTemplate.
    """
    ordered = sorted(fwhm_by_visit, key=lambda v: (fwhm_by_visit[v], v))
    n = len(ordered)
    lo = int(math.floor(q_min * n))
    hi = max(int(math.ceil(q_max * n)), lo + min(n_visits_min, n))
    return sorted(ordered[lo : min(hi, n)])


class SelectGoodSeeingVisitsConnections(
    pipeBase.PipelineTaskConnections, dimensions=("tract", "patch", "skymap", "band", "instrument")
):
    visitSummaries = cT.Input(
        name="visitSummary",
        doc="Per-visit summaries (PSF sizes).",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit"),
        multiple=True,
        deferLoad=True,
    )
    goodVisits = cT.Output(
        name="goodSeeingVisits",
        doc="Visits selected for the template: {visit: True}.",
        storageClass="StructuredDataDict",
        dimensions=("tract", "patch", "skymap", "band", "instrument"),
    )


class SelectGoodSeeingVisitsConfig(
    pipeBase.PipelineTaskConfig, pipelineConnections=SelectGoodSeeingVisitsConnections
):
    qMin = pexConfig.RangeField(dtype=float, default=0.0, min=0.0, max=1.0, doc="Lower seeing quantile kept.")
    qMax = pexConfig.RangeField(dtype=float, default=0.33, min=0.0, max=1.0, doc="Upper seeing quantile kept.")
    nVisitsMin = pexConfig.Field(
        dtype=int, default=6, doc="Keep at least this many best-seeing visits when available (overrides qMax)."
    )
    minRequiredVisits = pexConfig.Field(
        dtype=int,
        default=3,
        doc="Fewer overlapping visits than this fail the quantum: outlier rejection needs three epochs.",
    )
    maxPsfFwhmArcsec = pexConfig.Field(
        dtype=float, default=2.0, doc="Visits with a median PSF FWHM above this are never used."
    )

    def validate(self):
        super().validate()
        if self.qMin >= self.qMax:
            raise pexConfig.FieldValidationError(
                SelectGoodSeeingVisitsConfig.qMin, self, f"qMin ({self.qMin}) must be below qMax ({self.qMax})"
            )


class SelectGoodSeeingVisitsTask(pipeBase.PipelineTask):
    """Choose the best-seeing visits of a patch and band for the template."""

    ConfigClass = SelectGoodSeeingVisitsConfig
    _DefaultName = "selectGoodSeeingVisits"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        handles = butlerQC.get(inputRefs.visitSummaries)
        band = butlerQC.quantum.dataId["band"]
        fwhm = {}
        for handle in handles:
            table = handle.get()
            rows = table[table["band"] == band] if len(table) else table
            if len(rows):
                fwhm[int(rows["visit"][0])] = float(np.median(rows["psfFwhmArcsec"]))
        try:
            outputs = self.run(fwhm_by_visit=fwhm)
        except DiapipeAlgorithmError as err:
            raise naming_data_id(err, self._DefaultName, butlerQC.quantum.dataId) from err
        butlerQC.put(outputs, outputRefs)

    def run(self, *, fwhm_by_visit: dict[int, float]) -> pipeBase.Struct:
        config = self.config
        usable = {v: f for v, f in fwhm_by_visit.items() if np.isfinite(f) and f <= config.maxPsfFwhmArcsec}
        if len(usable) < config.minRequiredVisits:
            raise DiapipeAlgorithmError(
                f"only {len(usable)} usable visits (PSF FWHM <= {config.maxPsfFwhmArcsec}\") of "
                f"{len(fwhm_by_visit)}; a template needs at least {config.minRequiredVisits}",
                measured=len(usable),
                threshold=config.minRequiredVisits,
            )
        selected = select_good_seeing_visits(
            usable, q_min=config.qMin, q_max=config.qMax, n_visits_min=config.nVisitsMin
        )
        self.metadata["n_candidates"] = len(usable)
        self.metadata["n_selected"] = len(selected)
        self.log.info("Selected %d of %d visits for the template: %s", len(selected), len(usable), selected)
        return pipeBase.Struct(goodVisits={int(v): True for v in selected})


# ---------------------------------------------------------------------------
# makeWarp
# ---------------------------------------------------------------------------
def patch_overlap_bbox(wcs, detector_bbox, tract_wcs, patch_outer_bbox, margin_pix=4):
    """The part of a patch's outer box (x0, y0, w, h in tract pixels) covered by a detector, or None."""
    x0, y0, width, height = detector_bbox
    xs = np.array([x0 - 0.5, x0 + width - 0.5, x0 + width - 0.5, x0 - 0.5, x0 + width / 2, x0 + width / 2])
    ys = np.array([y0 - 0.5, y0 - 0.5, y0 + height - 0.5, y0 + height - 0.5, y0 - 0.5, y0 + height - 0.5])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    tx, ty = tract_wcs.all_world2pix(ra, dec, 0)
    px0, py0, pw, ph = patch_outer_bbox
    lo_x = max(int(math.floor(tx.min())) - margin_pix, px0)
    lo_y = max(int(math.floor(ty.min())) - margin_pix, py0)
    hi_x = min(int(math.ceil(tx.max())) + margin_pix, px0 + pw - 1)
    hi_y = min(int(math.ceil(ty.max())) + margin_pix, py0 + ph - 1)
    if hi_x < lo_x or hi_y < lo_y:
        return None
    return (lo_x, lo_y, hi_x - lo_x + 1, hi_y - lo_y + 1)


class MakeWarpConnections(
    pipeBase.PipelineTaskConnections, dimensions=("tract", "patch", "skymap", "instrument", "visit")
):
    calExpList = cT.Input(
        name="calexp",
        doc="Calibrated exposures of the visit that overlap the patch.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
        multiple=True,
        deferLoad=True,
    )
    skyMap = cT.Input(
        name="skyMap",
        doc="The skymap (patch geometry).",
        storageClass="DiapipeSkyMap",
        dimensions=("skymap",),
    )
    direct = cT.Output(
        name="deepCoadd_directWarp",
        doc="The visit resampled onto the patch grid, in nJy, with its PSF.",
        storageClass="DiapipeExposure",
        dimensions=("tract", "patch", "skymap", "instrument", "visit"),
    )


class MakeWarpConfig(pipeBase.PipelineTaskConfig, pipelineConnections=MakeWarpConnections):
    warpingKernelName = pexConfig.ChoiceField(
        dtype=str, default="lanczos3", allowed={"lanczos3": "Lanczos, a = 3"}, doc="Resampling kernel."
    )


class MakeWarpTask(pipeBase.PipelineTask):
    """Resample a visit's calexps onto a patch: flux-calibrated (nJy), with
    variance, mask and the warped PSF."""

    ConfigClass = MakeWarpConfig
    _DefaultName = "makeWarp"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        handles = butlerQC.get(inputRefs.calExpList)
        skymap = butlerQC.get(inputRefs.skyMap)
        data_id = butlerQC.quantum.dataId
        patch = skymap[data_id["tract"]][data_id["patch"]]
        outputs = self.run(calexp_handles=handles, tract_wcs=patch.wcs, patch_outer_bbox=patch.outer_bbox)
        butlerQC.put(outputs, outputRefs)

    def run(self, *, calexp_handles, tract_wcs, patch_outer_bbox) -> pipeBase.Struct:
        from diapipe.calibrate.aperture_correction import ApertureCorrection

        from .warp import warp_aperture_correction, warp_image, warp_psf

        pieces = []
        for handle in calexp_handles:
            wcs = handle.get(component="wcs")
            bbox = patch_overlap_bbox(wcs, handle.get(component="bbox"), tract_wcs, patch_outer_bbox)
            if bbox is not None:
                pieces.append((handle, wcs, bbox))
        if not pieces:
            raise pipeBase.NoWorkFound("no calexp of this visit overlaps the patch")
        x0 = min(b[0] for _, _, b in pieces)
        y0 = min(b[1] for _, _, b in pieces)
        x1 = max(b[0] + b[2] for _, _, b in pieces)
        y1 = max(b[1] + b[3] for _, _, b in pieces)
        shape = (y1 - y0, x1 - x0)
        image = np.full(shape, np.nan, dtype=np.float32)
        variance = np.full(shape, np.inf, dtype=np.float32)
        mask = np.full(shape, bit("NO_DATA"), dtype=MASK_DTYPE)
        best_psf, best_area, visit_info, ap_corr = None, -1, None, None
        for handle, wcs, bbox in pieces:
            calexp = handle.get()
            scale = calexp.photo_calib.calibration_mean
            w_image, w_var, w_mask = warp_image(
                calexp.image * scale,
                calexp.variance * scale**2,
                calexp.mask,
                wcs,
                tract_wcs,
                (bbox[3], bbox[2]),
                dst_xy0=(bbox[0], bbox[1]),
                src_xy0=calexp.xy0,
                kernel=self.config.warpingKernelName,
            )
            covered = (w_mask & bit("NO_DATA")) == 0
            sl = (slice(bbox[1] - y0, bbox[1] - y0 + bbox[3]), slice(bbox[0] - x0, bbox[0] - x0 + bbox[2]))
            image[sl][covered] = w_image[covered]
            variance[sl][covered] = w_var[covered]
            mask[sl][covered] = w_mask[covered]
            area = int(covered.sum())
            if area > best_area:
                # the warp carries the PSF of the detector covering most of it
                best_area = area
                best_psf = warp_psf(
                    calexp.psf, wcs, tract_wcs, (x0, y0, x1 - 1, y1 - 1), kernel=self.config.warpingKernelName
                )
                visit_info = calexp.visit_info
                # and that detector's aperture correction (PSF flux -> total flux)
                calexp_ap_corr = calexp.metadata.get("AP_CORR")
                ap_corr = None if calexp_ap_corr is None else warp_aperture_correction(
                    ApertureCorrection.from_dict(calexp_ap_corr), wcs, tract_wcs, (x0, y0, x1 - 1, y1 - 1))
        self.metadata["n_detectors"] = len(pieces)
        self.metadata["coverage_fraction"] = float((mask & bit("NO_DATA") == 0).mean())
        warp = Exposure(
            image=image,
            mask=mask,
            variance=variance,
            wcs=tract_wcs,
            psf=best_psf,
            photo_calib=PhotoCalib(1.0),
            visit_info=visit_info,
            metadata={} if ap_corr is None else {"AP_CORR": ap_corr.to_dict()},
            xy0=(x0, y0),
        )
        return pipeBase.Struct(direct=warp)


# ---------------------------------------------------------------------------
# assembleCoadd
# ---------------------------------------------------------------------------
class AssembleCoaddConnections(pipeBase.PipelineTaskConnections, dimensions=("tract", "patch", "band", "skymap")):
    inputWarps = cT.Input(
        name="deepCoadd_directWarp",
        doc="Warps of the patch.",
        storageClass="DiapipeExposure",
        dimensions=("tract", "patch", "skymap", "instrument", "visit"),
        multiple=True,
        deferLoad=True,
    )
    selectedVisits = cT.Input(
        name="goodSeeingVisits",
        doc="Visits chosen by selectGoodSeeingVisits.",
        storageClass="StructuredDataDict",
        dimensions=("tract", "patch", "skymap", "band", "instrument"),
        multiple=True,
    )
    coaddExposure = cT.Output(
        name="goodSeeingCoadd",
        doc="The template: a good-seeing coadd in nJy, with its PSF.",
        storageClass="DiapipeExposure",
        dimensions=("tract", "patch", "skymap", "band"),
    )
    nImage = cT.Output(
        name="goodSeeingCoadd_nImage",
        doc="Number of inputs contributing to each coadd pixel (image plane).",
        storageClass="DiapipeExposure",
        dimensions=("tract", "patch", "skymap", "band"),
    )


class AssembleCoaddConfig(pipeBase.PipelineTaskConfig, pipelineConnections=AssembleCoaddConnections):
    rejection = pexConfig.ChoiceField(
        dtype=str,
        default="compare_warp",
        allowed={
            "compare_warp": "Rubin's CompareWarp: mask artifacts found in few epochs, then a weighted mean",
            "sigma_clip": "per-pixel sigma clipping",
            "none": "plain weighted mean",
        },
        doc="How transients and artifacts are kept out of the template.",
    )
    nSigma = pexConfig.Field(dtype=float, default=5.0, doc="Rejection threshold (sigma).")


class AssembleCoaddTask(pipeBase.PipelineTask):
    """Stack the selected warps with outlier rejection into the template."""

    ConfigClass = AssembleCoaddConfig
    _DefaultName = "assembleCoadd"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        selected = {}
        for visits in butlerQC.get(inputRefs.selectedVisits):
            selected.update({int(v): bool(keep) for v, keep in visits.items()})
        handles = [h for h in butlerQC.get(inputRefs.inputWarps) if selected.get(int(h.dataId["visit"]))]
        if not handles:
            raise pipeBase.NoWorkFound(f"no selected warps for {{{data_id_str(butlerQC.quantum.dataId)}}}")
        warps = [h.get() for h in handles]
        butlerQC.put(self.run(warps=warps), outputRefs)

    def run(self, *, warps) -> pipeBase.Struct:
        from diapipe.calibrate.aperture_correction import ApertureCorrection

        from .assemble import assemble_coadd

        x0 = min(w.xy0[0] for w in warps)
        y0 = min(w.xy0[1] for w in warps)
        x1 = max(w.xy0[0] + w.shape[1] for w in warps)
        y1 = max(w.xy0[1] + w.shape[0] for w in warps)
        shape = (y1 - y0, x1 - x0)
        images, variances, masks = [], [], []
        for warp in warps:
            image = np.full(shape, np.nan, dtype=np.float32)
            variance = np.full(shape, np.inf, dtype=np.float32)
            mask = np.full(shape, bit("NO_DATA"), dtype=MASK_DTYPE)
            sl = (slice(warp.xy0[1] - y0, warp.xy0[1] - y0 + warp.shape[0]), slice(warp.xy0[0] - x0, warp.xy0[0] - x0 + warp.shape[1]))
            image[sl], variance[sl], mask[sl] = warp.image, warp.variance, warp.mask
            images.append(image)
            variances.append(variance)
            masks.append(mask)
        ap_corrs = [w.metadata.get("AP_CORR") for w in warps]
        # a coadd aperture correction only when every input has one (older warps do not)
        ap_corrs = None if any(a is None for a in ap_corrs) else [ApertureCorrection.from_dict(a) for a in ap_corrs]
        coadd, variance, mask, n_image, psf, ap_corr = assemble_coadd(
            images,
            variances,
            masks,
            psfs=[w.psf for w in warps],
            rejection=self.config.rejection,
            nsigma=self.config.nSigma,
            xy0=(x0, y0),
            aperture_corrections=ap_corrs,
        )
        self.metadata["n_inputs"] = len(warps)
        visits = [int(w.visit_info.visit) for w in warps if w.visit_info is not None]
        self.metadata["visits"] = visits
        wcs = warps[0].wcs
        exposure = Exposure(
            image=coadd,
            mask=mask,
            variance=variance,
            wcs=wcs,
            psf=psf,
            photo_calib=PhotoCalib(1.0),
            metadata={"COADD_VISITS": visits, "N_INPUTS": len(warps),
                      **({} if ap_corr is None else {"AP_CORR": ap_corr.to_dict()})},
            xy0=(x0, y0),
        )
        n_image_exposure = Exposure(image=n_image.astype(np.float32), wcs=wcs, xy0=(x0, y0))
        return pipeBase.Struct(coaddExposure=exposure, nImage=n_image_exposure)
