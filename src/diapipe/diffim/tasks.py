"""Difference-imaging PipelineTasks of ApPipe: retrieveTemplate, subtractImages,
detectAndMeasure, transformDiaSrcCat (the guide's 2022 labels and dataset names;
ip_diffim's GetTemplateTask, AlardLuptonSubtractTask, DetectAndMeasureTask and
ap_association's TransformDiaSourceCatalogTask as the reference).

Photometric scales
------------------
- ``goodSeeingDiff_templateExp`` stays in nJy per pixel with ``PhotoCalib(1.0)``,
  like the coadd it comes from: a template does not depend on the science
  exposure's calibration.
- subtractImages divides the template by the science calibration (nJy per
  electron) before matching, so a perfectly calibrated pair has a matching
  kernel summing to 1; the fitted kernel then absorbs any residual flux
  scaling, and the difference, the matched template and their variances are in
  science electrons with the calexp's PhotoCalib (ip_diffim's convention).
- detectAndMeasure measures in electrons and writes nJy columns through that
  PhotoCalib (calibration error included, as Rubin's ``instFluxToNanojansky``).
"""

from __future__ import annotations

import math

import numpy as np
import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..errors import DiapipeAlgorithmError, TooFewSourcesError, data_id_str
from ..exposure.exposure import Exposure, PhotoCalib
from ..exposure.masks import MASK_DTYPE, bit

__all__ = [
    "RetrieveTemplateTask",
    "RetrieveTemplateConfig",
    "SubtractImagesTask",
    "SubtractImagesConfig",
    "DetectAndMeasureTask",
    "DetectAndMeasureConfig",
    "TransformDiaSrcCatTask",
    "TransformDiaSrcCatConfig",
    "kernel_source_table",
]


def _reraise_with_data_id(label, data_id, err):
    """Re-raise a DiapipeAlgorithmError with the quantum's data ID in its message."""
    extra = {k: v for k, v in err.metadata.items() if k != "message"}
    extra["dataId"] = data_id_str(data_id)
    raise type(err)(f"{label} for {{{data_id_str(data_id)}}}: {err}", **extra) from err


# ---------------------------------------------------------------------------
# retrieveTemplate
# ---------------------------------------------------------------------------
class RetrieveTemplateConnections(
    pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector", "skymap")
):
    calexp = cT.Input(
        name="calexp",
        doc="Science exposure; only its bbox, wcs and psf components are read.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
        deferLoad=True,
    )
    skyMap = cT.Input(
        name="skyMap",
        doc="The skymap (tract WCSs and patch boxes).",
        storageClass="DiapipeSkyMap",
        dimensions=("skymap",),
    )
    coaddExposures = cT.Input(
        name="goodSeeingCoadd",
        doc="Template coadd patches overlapping the detector (read as cut-outs).",
        storageClass="DiapipeExposure",
        dimensions=("tract", "patch", "skymap", "band"),
        multiple=True,
        deferLoad=True,
    )
    template = cT.Output(
        name="goodSeeingDiff_templateExp",
        doc="Template resampled onto the calexp's pixel grid: nJy per pixel, PhotoCalib(1.0), warped PSF.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )


class RetrieveTemplateConfig(pipeBase.PipelineTaskConfig, pipelineConnections=RetrieveTemplateConnections):
    requiredTemplateFraction = pexConfig.RangeField(
        dtype=float,
        default=0.1,
        min=0.0,
        max=1.0,
        inclusiveMax=True,
        doc="Smallest fraction of the detector the template must cover; below it the quantum is "
        "skipped with NoWorkFound (ip_diffim default 0.1; set it to 0 to force a subtraction).",
    )
    warpingKernelName = pexConfig.ChoiceField(
        dtype=str, default="lanczos3", allowed={"lanczos3": "Lanczos, a = 3"}, doc="Resampling kernel."
    )


class RetrieveTemplateTask(pipeBase.PipelineTask):
    """Resample the coadd patches covering a detector onto its pixel grid.

    Patches of one tract share the tract's pixel grid, so their overlapping
    cut-outs are first pasted into one tract-frame mosaic and warped once (no
    resampling seams between patches). With several tracts, the one covering
    most of the detector is used and the others fill its holes.
    """

    ConfigClass = RetrieveTemplateConfig
    _DefaultName = "retrieveTemplate"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        from ..coadd.tasks import patch_overlap_bbox

        calexp = butlerQC.get(inputRefs.calexp)
        skymap = butlerQC.get(inputRefs.skyMap)
        data_id = butlerQC.quantum.dataId
        sci_bbox = calexp.get(component="bbox")
        sci_wcs = calexp.get(component="wcs")
        sci_psf = calexp.get(component="psf")
        by_tract: dict[int, list] = {}
        for handle in butlerQC.get(inputRefs.coaddExposures):
            tract = int(handle.dataId["tract"])
            # The coadd's own box (the union of its warps) is within the patch's outer box.
            cut = patch_overlap_bbox(sci_wcs, sci_bbox, skymap[tract].wcs, handle.get(component="bbox"),
                                     margin_pix=6)
            if cut is not None:
                by_tract.setdefault(tract, []).append(handle.get(parameters={"bbox": cut}))
        try:
            outputs = self.run(coadds_by_tract=by_tract, science_bbox=sci_bbox, science_wcs=sci_wcs,
                               science_psf=sci_psf)
        except pipeBase.NoWorkFound as err:
            raise pipeBase.NoWorkFound(f"retrieveTemplate for {{{data_id_str(data_id)}}}: {err}") from err
        butlerQC.put(outputs, outputRefs)

    def run(self, *, coadds_by_tract, science_bbox, science_wcs, science_psf=None) -> pipeBase.Struct:
        """Warp coadd cut-outs (dict tract -> list of Exposures on that tract's grid) onto the science grid."""
        from ..coadd.warp import warp_image, warp_psf

        x0, y0, width, height = science_bbox
        shape = (height, width)
        image = np.full(shape, np.nan, np.float32)
        variance = np.full(shape, np.inf, np.float32)
        mask = np.full(shape, bit("NO_DATA"), MASK_DTYPE)
        pieces = []
        for tract, cutouts in coadds_by_tract.items():
            if not cutouts:
                continue
            mosaic = _mosaic(cutouts)
            w_img, w_var, w_mask = warp_image(
                mosaic.image, mosaic.variance, mosaic.mask, mosaic.wcs, science_wcs, shape,
                dst_xy0=(x0, y0), src_xy0=mosaic.xy0, kernel=self.config.warpingKernelName,
            )
            covered = (w_mask & bit("NO_DATA")) == 0
            pieces.append((int(covered.sum()), tract, mosaic, w_img, w_var, w_mask, covered))
        pieces.sort(key=lambda p: -p[0])
        for _, _, _, w_img, w_var, w_mask, covered in pieces:
            fill = covered & ((mask & bit("NO_DATA")) != 0)
            image[fill], variance[fill], mask[fill] = w_img[fill], w_var[fill], w_mask[fill]
        fraction = float(((mask & bit("NO_DATA")) == 0).mean())
        self.metadata["template_coverage_fraction"] = fraction
        if not pieces or fraction < self.config.requiredTemplateFraction:
            raise pipeBase.NoWorkFound(
                f"the template covers {fraction:.1%} of the detector, below requiredTemplateFraction="
                f"{self.config.requiredTemplateFraction:.1%} (set it to 0 to force)"
            )
        best = pieces[0][2]
        psf = warp_psf(best.psf, best.wcs, science_wcs, (x0, y0, x0 + width - 1, y0 + height - 1),
                       kernel=self.config.warpingKernelName)
        metadata = {
            "TEMPLATE_COVERAGE": fraction,
            "TEMPLATE_TRACTS": [p[1] for p in pieces],
            "COADD_VISITS": sorted({int(v) for p in pieces for v in _as_list(p[2].metadata.get("COADD_VISITS"))}),
        }
        if science_psf is not None:
            self.metadata["template_psf_sigma_pix"] = psf.sigma()
            self.metadata["science_psf_sigma_pix"] = science_psf.sigma()
        template = Exposure(image=image, mask=mask, variance=variance, wcs=science_wcs, psf=psf,
                            photo_calib=PhotoCalib(1.0), metadata=metadata, xy0=(x0, y0))
        return pipeBase.Struct(template=template)


def _as_list(value) -> list:
    """A metadata value that should be a list (a scalar when only one item survived storage)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [] if value is None else [value]


def _mosaic(cutouts) -> Exposure:
    """Paste cut-outs of one tract's coadds (same WCS) into one exposure; NO_DATA where none."""
    x0 = min(c.xy0[0] for c in cutouts)
    y0 = min(c.xy0[1] for c in cutouts)
    x1 = max(c.xy0[0] + c.shape[1] for c in cutouts)
    y1 = max(c.xy0[1] + c.shape[0] for c in cutouts)
    shape = (y1 - y0, x1 - x0)
    image = np.full(shape, np.nan, np.float32)
    variance = np.full(shape, np.inf, np.float32)
    mask = np.full(shape, bit("NO_DATA"), MASK_DTYPE)
    visits = set()
    # Largest cut-out first; later ones only fill pixels still without data.
    for cut in sorted(cutouts, key=lambda c: -c.image.size):
        sl = (slice(cut.xy0[1] - y0, cut.xy0[1] - y0 + cut.shape[0]),
              slice(cut.xy0[0] - x0, cut.xy0[0] - x0 + cut.shape[1]))
        good = ((cut.mask & bit("NO_DATA")) == 0) & np.isfinite(cut.image) & ((mask[sl] & bit("NO_DATA")) != 0)
        image[sl][good], variance[sl][good], mask[sl][good] = cut.image[good], cut.variance[good], cut.mask[good]
        visits.update(_as_list(cut.metadata.get("COADD_VISITS", [])))
    psf = max(cutouts, key=lambda c: c.image.size).psf
    return Exposure(image=image, mask=mask, variance=variance, wcs=cutouts[0].wcs, psf=psf,
                    photo_calib=PhotoCalib(1.0), metadata={"COADD_VISITS": sorted(visits)}, xy0=(x0, y0))


# ---------------------------------------------------------------------------
# subtractImages
# ---------------------------------------------------------------------------
#: src flags that disqualify a kernel source.
KERNEL_SOURCE_BAD_FLAGS = (
    "flag_centroid", "flag_psfFlux", "flag_edge", "flag_saturated", "flag_bad", "flag_noData",
    "flag_cr", "flag_interpolatedCenter", "flag_suspect", "flag_shape",
)


def kernel_source_table(src, xy0=(0, 0), psf=None, max_size_ratio: float = 1.3):
    """The columns `diapipe.diffim.subtract.subtract_images` needs, from a ``src`` catalogue.

    ``x``, ``y`` (array pixels: centroid minus ``xy0``), ``psfFlux``, ``psfFluxErr`` and
    ``flags``: any bad measurement flag, a blended (deblended child or parent)
    source, or — with ``psf`` — a resolved one (adaptive-moment size ``Ixx + Iyy``
    above ``max_size_ratio`` times the PSF's): AL kernel sources are isolated,
    unflagged point sources.
    """
    from astropy.table import Table

    n = len(src)
    flags = np.zeros(n, bool)
    for name in KERNEL_SOURCE_BAD_FLAGS:
        if name in src.colnames:
            flags |= np.asarray(src[name], bool)
    if "parent" in src.colnames:
        flags |= np.asarray(src["parent"]) != 0
    if "deblend_nChild" in src.colnames:
        flags |= np.asarray(src["deblend_nChild"]) > 0
    if psf is not None and "shape_xx" in src.colnames:
        ixx, iyy, _ = psf.moments()
        size = np.asarray(src["shape_xx"], float) + np.asarray(src["shape_yy"], float)
        flags |= ~(size <= max_size_ratio * (ixx + iyy))
    return Table(
        {
            "x": np.asarray(src["centroid_x"], float) - xy0[0],
            "y": np.asarray(src["centroid_y"], float) - xy0[1],
            "psfFlux": np.asarray(src["psfFlux"], float),
            "psfFluxErr": np.asarray(src["psfFluxErr"], float),
            "flags": flags,
        }
    )


class SubtractImagesConnections(pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    template = cT.Input(
        name="goodSeeingDiff_templateExp",
        doc="Template on the science pixel grid (nJy).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    science = cT.Input(
        name="calexp",
        doc="Science exposure (electrons, PhotoCalib to nJy).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    sources = cT.Input(
        name="src",
        doc="Sources of the science exposure; isolated point sources become kernel stamps.",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )
    difference = cT.Output(
        name="goodSeeingDiff_differenceTempExp",
        doc="Decorrelated difference (science minus matched template), science electrons, calexp PhotoCalib.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    matchedTemplate = cT.Output(
        name="goodSeeingDiff_matchedExp",
        doc="Template on the science scale with the difference's PSF matching (convolved template, "
        "or the unconvolved template in convolveScience mode).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )


    scoreExposure = cT.Output(
        name="goodSeeingDiff_scoreExp",
        doc="Score image for detection (pixel / sqrt(variance) = point-source significance): the "
        "preconvolved difference, or the PSF-filtered difference where preconvolution is not used. "
        "Only with preconvolution != 'never'.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if config is not None and config.preconvolution == "never":
            del self.scoreExposure


class SubtractImagesConfig(pipeBase.PipelineTaskConfig, pipelineConnections=SubtractImagesConnections):
    preconvolution = pexConfig.ChoiceField(
        dtype=str,
        default="sharperScience",
        allowed={
            "never": "no score image (detection filters the difference with its PSF)",
            "sharperScience": "preconvolve (ip_diffim AlardLuptonPreconvolveSubtractTask) where the science PSF "
            "is narrower than the template's in x and y; elsewhere the score is the PSF-filtered difference",
            "always": "preconvolve every visit",
        },
        doc="Also write goodSeeingDiff_scoreExp for detectAndMeasure (doDetectOnScore). A science image "
        "sharper than the template needs a deconvolving matching kernel, which leaves residuals at "
        "galaxies and stars; the preconvolved score needs only a broadening one (see "
        "diapipe.diffim.preconvolve). The difference image used for measurement is unchanged. Measured "
        "(sharperScience + doDetectOnScore vs never; the score's border falls back to the difference, "
        "diapipe.diffim.score_detection): ci_imsim (13 visits) spurious DiaSources 306 -> 103 "
        "(1951 -> 657 per deg²), completeness at truth S/N >= 3 unchanged (92/94 at S/N >= 6), PSF-flux "
        "pulls unchanged; tests/diffim_pipeline preset (3 independent visits) spurious 21 -> 15, "
        "completeness at S/N >= 6 57/61 both (0.902 without the fallback).",
    )
    minPreconvolutionWidth = pexConfig.Field(
        dtype=float, default=0.6,
        doc="With preconvolution='sharperScience', preconvolve only when the deconvolution the template "
        "would need is at least this wide (px, sqrt of the mean difference of the PSFs' second moments): "
        "narrower ones are matched well by the AL basis, and there the score detection was no better "
        "(spurious DiaSources, never -> preconvolved: ci_imsim visit 933863 at 0.52 px 5 -> 9, test-preset "
        "visit 1554244 at 0.44 px 7 -> 8; the five ci_imsim visits at 0.71-1.25 px 255 -> 65).",
    )
    mode = pexConfig.ChoiceField(
        dtype=str,
        default="convolveTemplate",
        allowed={
            "convolveTemplate": "match the template to the science PSF (Rubin's default)",
            "convolveScience": "match the science image to the template PSF",
            "auto": "convolve the template unless it is wider than the science PSF in both x and y",
        },
        doc="Which image is convolved with the matching kernel.",
    )
    kernelSourceMinSnr = pexConfig.Field(dtype=float, default=10.0, doc="Faintest kernel source (src S/N).")
    kernelSourceMaxSnr = pexConfig.Field(dtype=float, default=500.0, doc="Brightest kernel source (src S/N).")
    minKernelSources = pexConfig.Field(
        dtype=int, default=3, doc="Fewer usable kernel sources fail the quantum (ip_diffim: 3)."
    )
    maxKernelSources = pexConfig.Field(dtype=int, default=1000, doc="At most this many kernel stamps.")
    spatialKernelOrder = pexConfig.Field(dtype=int, default=1, doc="Polynomial order of the kernel's variation.")
    spatialBackgroundOrder = pexConfig.Field(
        dtype=int,
        default=0,
        doc="Polynomial order of the differential background fitted with the kernel. Rubin's AL "
        "fits none (fitForBackground=False); a constant absorbs a sky offset between the inputs, "
        "while higher orders, constrained only at the few kernel stamps, extrapolate gradients "
        "of several tenths of sigma across a detector (measured on the test preset). Smooth "
        "residual sky is removed by detectAndMeasure (doSubtractBackground).",
    )
    maxMedianChi2 = pexConfig.Field(
        dtype=float, default=4.0, doc="Median stamp chi²/dof above which PSF matching is declared failed."
    )
    doDebiasKernelFit = pexConfig.Field(
        dtype=bool, default=False,
        doc="Remove the convolved image's own noise from the kernel fit's normal equations "
        "(diapipe.diffim.noise_bias; errors in variables shrink and broaden a least-squares kernel). "
        "Measured on ci_imsim: where the science PSF is sharper than the template's (visit 1547789) the "
        "stacked star residual of the difference drops from 1.8 % to 0.6 % rms of the star flux; over the "
        "7 visits not in the template, spurious DiaSources unchanged (23), PSF-flux ratio 1.003 -> 1.002, "
        "pull width 0.93 -> 0.84. Off by default until the pull width is understood.",
    )
    doDebiasScoreKernelFit = pexConfig.Field(
        dtype=bool, default=True,
        doc="doDebiasKernelFit for the preconvolved score's kernel only (detection; the difference image "
        "that DiaSources are measured on keeps doDebiasKernelFit). Without it the score's kernel comes out "
        "too broad and every bright star leaves a core residual of 1-4 % of its flux in the score.",
    )
    doScaleVariance = pexConfig.Field(
        dtype=bool, default=True, doc="Rescale both variance planes to the measured noise before matching."
    )
    doDecorrelation = pexConfig.Field(
        dtype=bool, default=True, doc="Whiten the difference's noise (afterburner) so 5 sigma means 5 sigma."
    )
    maxPsfResolvedRatio = pexConfig.Field(
        dtype=float, default=1.3,
        doc="Kernel sources must have Ixx+Iyy below this times the PSF's (unresolved).",
    )


def _kernel_fit_options(config) -> dict:
    """subtractImages' kernel-fit settings as keyword arguments (one home for both fits)."""
    return {
        "spatial_kernel_order": config.spatialKernelOrder,
        "background_order": config.spatialBackgroundOrder,
        "max_kernel_sources": config.maxKernelSources,
        "min_kernel_sources": config.minKernelSources,
        "kernel_sn_range": (config.kernelSourceMinSnr, config.kernelSourceMaxSnr),
        "max_median_chi2": config.maxMedianChi2,
        "debias_kernel_fit": config.doDebiasKernelFit,
    }


class SubtractImagesTask(pipeBase.PipelineTask):
    """Alard–Lupton PSF-matched subtraction of the template from the calexp."""

    ConfigClass = SubtractImagesConfig
    _DefaultName = "subtractImages"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        try:
            outputs = self.run(**inputs)
        except DiapipeAlgorithmError as err:
            _reraise_with_data_id("subtractImages", butlerQC.quantum.dataId, err)
        butlerQC.put(outputs, outputRefs)

    def run(self, *, template: Exposure, science: Exposure, sources) -> pipeBase.Struct:
        from .kernel_fit import BadPsfMatchError, TooFewKernelSourcesError
        from .subtract import subtract_images

        config = self.config
        if science.photo_calib is None:
            raise ValueError("subtractImages: the science exposure has no PhotoCalib")
        if template.shape != science.shape or template.xy0 != science.xy0:
            raise ValueError(f"template box {template.bbox} differs from the science box {science.bbox}")
        # Template nJy -> science electrons (kernel sum 1 for a perfectly calibrated pair).
        to_e = template.photo_calib.calibration_mean / science.photo_calib.calibration_mean
        table = kernel_source_table(sources, science.xy0, science.psf, config.maxPsfResolvedRatio)
        try:
            result = subtract_images(
                science.image, science.variance, science.mask, science.psf,
                template.image * to_e, template.variance * to_e**2, template.mask, template.psf,
                table,
                config.mode,
                rescale_variance=config.doScaleVariance,
                decorrelate=config.doDecorrelation,
                **_kernel_fit_options(config),
            )
        except TooFewKernelSourcesError as err:
            n_candidates = int((~np.asarray(table["flags"], bool)).sum())
            raise TooFewSourcesError(
                f"too few kernel sources for PSF matching: {err.n_found} usable (of {len(table)} src rows, "
                f"{n_candidates} unflagged isolated-point candidates before the S/N "
                f"{config.kernelSourceMinSnr:g}-{config.kernelSourceMaxSnr:g} and mask cuts), "
                f"need {err.n_needed}",
                measured=err.n_found,
                threshold=err.n_needed,
            ) from err
        except BadPsfMatchError as err:
            raise DiapipeAlgorithmError(str(err), measured=err.chi2_per_dof, threshold=err.threshold) from err
        meta = result.metadata
        for key, value in meta.items():
            if np.isscalar(value):
                self.metadata[key] = value
        self.log.info(
            "%s: %d kernel stamps (%d rejected), kernel sum %.4f, median chi2/dof %.2f, %.2f s",
            meta["mode"], meta["n_stamps_used"], meta["n_stamps_rejected"], meta["kernel_sum"],
            meta["median_chi2_per_dof"], meta["time_total_s"],
        )
        header = {k: v for k, v in meta.items() if np.isscalar(v)}
        extra = {}
        if config.preconvolution != "never":
            extra["scoreExposure"] = self._score(science, template, to_e, table, result, header)
        difference = Exposure(
            image=result.difference_image, mask=result.difference_mask, variance=result.difference_variance,
            wcs=science.wcs, psf=result.difference_psf, photo_calib=science.photo_calib,
            visit_info=science.visit_info, metadata={**science.metadata, "DIFFIM": header}, xy0=science.xy0,
        )
        if meta["mode"] == "convolveTemplate":
            matched = Exposure(
                image=result.matched_image, mask=result.matched_mask, variance=result.matched_variance,
                wcs=science.wcs, psf=science.psf, photo_calib=science.photo_calib,
                visit_info=science.visit_info, xy0=science.xy0,
            )
        else:
            ksum = meta["kernel_sum"]
            matched = Exposure(
                image=template.image * (to_e / ksum), mask=template.mask,
                variance=template.variance * (to_e / ksum) ** 2, wcs=science.wcs, psf=template.psf,
                photo_calib=science.photo_calib, visit_info=science.visit_info, xy0=science.xy0,
            )
        return pipeBase.Struct(difference=difference, matchedTemplate=matched, **extra)

    def _score(self, science, template, to_e, table, result, header) -> Exposure:
        """goodSeeingDiff_scoreExp (`diapipe.diffim.preconvolve.score_exposure`)."""
        from .preconvolve import score_exposure

        config = self.config
        score = score_exposure(science, template, to_e, table, result, header, config.preconvolution,
                               config.minPreconvolutionWidth, rescale_variance=config.doScaleVariance,
                               **{**_kernel_fit_options(config), "debias_kernel_fit": config.doDebiasScoreKernelFit})
        if score.metadata["SCORE"]["score_kind"] == "preconvolved":
            self.log.info("preconvolved score: kernel sum %.4f, %d stamps", score.metadata["SCORE"]["kernel_sum"],
                          score.metadata["SCORE"]["n_stamps_used"])
        self.metadata["score_kind"] = score.metadata["SCORE"]["score_kind"]
        return score


# ---------------------------------------------------------------------------
# detectAndMeasure
# ---------------------------------------------------------------------------
class DetectAndMeasureConnections(pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    science = cT.Input(
        name="calexp",
        doc="Science exposure, for forced PSF photometry (scienceFlux).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    matchedTemplate = cT.Input(
        name="goodSeeingDiff_matchedExp",
        doc="Matched template, for forced PSF photometry (templateFlux).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    difference = cT.Input(
        name="goodSeeingDiff_differenceTempExp",
        doc="Decorrelated difference image.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    diaSources = cT.Output(
        name="goodSeeingDiff_diaSrc",
        doc="DiaSources and sky sources (flag sky_source), calibrated: nJy, degrees, arcsec².",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )
    subtractedMeasuredExposure = cT.Output(
        name="goodSeeingDiff_differenceExp",
        doc="The difference image with DETECTED / DETECTED_NEGATIVE mask planes set.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )


    scoreExposure = cT.Input(
        name="goodSeeingDiff_scoreExp",
        doc="Score image detection runs on (only with doDetectOnScore).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if config is not None and not config.doDetectOnScore:
            del self.scoreExposure


class DetectAndMeasureConfig(pipeBase.PipelineTaskConfig, pipelineConnections=DetectAndMeasureConnections):
    doDetectOnScore = pexConfig.Field(
        dtype=bool, default=True,
        doc="Where subtractImages preconvolved (goodSeeingDiff_scoreExp metadata SCORE.score_kind = "
        "'preconvolved'), detect on that score without smoothing and measure on the difference (ip_diffim "
        "DetectAndMeasureScoreTask); where the score has no data but the difference has (its wider kernel "
        "border), and for visits not preconvolved, detect on the difference as usual. Needs "
        "subtractImages.preconvolution != 'never'; set both off together. Measured numbers: "
        "subtractImages.preconvolution.",
    )
    doRemoveScoreCentroidFailures = pexConfig.Field(
        dtype=bool, default=True,
        doc="With doDetectOnScore, remove score detections whose PSF-fit centroid on the difference fails "
        "(moves > 2 px from the score peak: no point source in the difference there). Measured: ci_imsim "
        "spurious 122 -> 103, test preset (9 visits) 83 -> 51 (score peaks 4-10 px from stars of mag "
        "17-21), no real DiaSource removed.",
    )
    detectionThreshold = pexConfig.Field(
        dtype=float, default=5.0, doc="Detection threshold in units of the PSF-filtered noise."
    )
    detectionNoiseCellSize = pexConfig.Field(
        dtype=int, default=512,
        doc="Cell size (pixels) of the local detection-noise calibration (doScaleDetectionVariance): the "
        "variance is raised to the PSF-scale noise measured in each cell, interpolated between cells; 0 uses "
        "one whole-image factor. Measured (512 against 0): 4patch_4431 detector 94, 10 independent visits, "
        "spurious 250 -> 163 (corner cells of up to 1.15 where fewer template inputs overlap), ci_imsim 43 -> "
        "38, test preset unchanged, no truth-matched DiaSource lost.",
    )
    templateResidualNeighbourhoodFraction = pexConfig.RangeField(
        dtype=float, default=0.002, min=0.0,
        doc="PSF-matching residual spread over the kernel's reach: the detection noise also gets this fraction "
        "of the brightest matched-template object nearby (its PSF-filtered flux over the sky noise; "
        "templateResidualNeighbourhoodRadius; diapipe.diffim.template_residual.neighbourhood_peak) in "
        "quadrature. 0 disables. Measured on the visits not in their template: 4patch_4431 detector 94 "
        "spurious 51 -> 44, ci_imsim 6 -> 5; rendered pairs over 0.3 deg² (tests/diffim/"
        "test_spurious_wide_field.py): every ring beside a bright star gone.",
    )
    scoreFallbackResidualScale = pexConfig.RangeField(
        dtype=float, default=10.0, min=1.0,
        doc="Where the score has no data and the ordinary difference stands in for detection "
        "(diapipe.diffim.score_detection), both template-residual fractions are multiplied by this, and the "
        "neighbourhood term also follows bright objects of the science image: next to template holes at "
        "bright stars and along the detector edge, the difference of a sharper-science visit carries "
        "deconvolution residuals of 1-20 % of a star's flux. Measured on ci_imsim's 7 visits not in their "
        "template: spurious 12 -> 7 (1 -> 10: all 6 fallback detections but one were spurious), test preset "
        "unchanged (6), no truth-matched DiaSource lost. 1 disables.",
    )
    lowCoverageVarianceRatio = pexConfig.RangeField(
        dtype=float, default=2.0, min=0.0,
        doc="Template blocks (32 px) whose median variance exceeds this times the image's median have few "
        "coadd inputs (diapipe.diffim.template_residual.low_coverage_map): there the template's PSF is not "
        "the coadd PSF the kernel was fit for, and CompareWarp could reject nothing. The detection noise is "
        "calibrated there on its own (it was 1.16-1.24x the variance plane's on 4patch_4431) and "
        "lowCoverageResidualScale applies. Measured on the visits not in their template: 4patch_4431 detector "
        "94 spurious 89 -> 51 (about 10 % of the area held 51 of the 89), 4 variable stars of 21.8 mag in "
        "those blocks lost (170 -> 166 truth-matched); ci_imsim 7 -> 6; test preset unchanged (3). 0 disables.",
    )
    lowCoverageResidualScale = pexConfig.RangeField(
        dtype=float, default=10.0, min=1.0,
        doc="Both template-residual fractions are multiplied by this in low-coverage template blocks "
        "(lowCoverageVarianceRatio): 4patch_4431 spurious 89 -> 55 with 10 and about 61 with 5 (one more "
        "variable star kept), both before the region's own noise calibration. 1 disables.",
    )
    templateResidualNeighbourhoodRadius = pexConfig.RangeField(
        dtype=float, default=7.0, min=0.0, inclusiveMin=False,
        doc="Reach of templateResidualNeighbourhoodFraction from an object of template PSF-flux S/N 100, in PSF "
        "sigmas (2.2x further per decade of S/N).",
    )
    templateResidualFraction = pexConfig.RangeField(
        dtype=float, default=0.01, min=0.0,
        doc="PSF-matching residual at bright objects, as a fraction of the matched template's PSF flux, added "
        "in quadrature to the detection noise (diapipe.diffim.template_residual; ZOGY's source-noise idea); "
        "fluxes and errors are measured without it. 0 disables. Measured with 0.01: ci_imsim spurious 64 -> 43 "
        "(visits not in the template 37 -> 23), test preset 15 -> 11, no truth-matched DiaSource lost; 0.02 and "
        "0.03 gave 36 and 34 on ci_imsim but divide the significance of a transient on a host of template "
        "PSF-flux S/N 100 by 2.2 and 3.2 (0.01: by 1.4).",
    )
    thresholdType = pexConfig.ChoiceField(
        dtype=str, default="pixel_stdev",
        allowed={"pixel_stdev": "per-pixel variance plane", "stdev": "measured clipped noise",
                 "variance": "median of the variance plane"},
        doc="Noise the threshold is in units of.",
    )
    footprintGrowPix = pexConfig.Field(dtype=int, default=2, doc="Radius (px) detection footprints are grown by.")
    doMerge = pexConfig.Field(
        dtype=bool, default=True, doc="Merge close positive/negative detections into one (dipole) DiaSource."
    )
    maxDipoleSeparationPix = pexConfig.Field(
        dtype=float, default=5.0, doc="Largest lobe separation merged and classified as a dipole (px)."
    )
    apertureRadiusPix = pexConfig.Field(
        dtype=float, default=12.0, doc="Radius (px) of the DiaSource apFlux aperture (APDB: 12 px)."
    )
    doForcedMeasurement = pexConfig.Field(
        dtype=bool, default=True, doc="Forced PSF flux on the science image (scienceFlux) and matched template."
    )
    doSkySources = pexConfig.Field(
        dtype=bool, default=True, doc="Add sky sources (blank positions, flagged sky_source) to monitor the noise."
    )
    nSkySources = pexConfig.Field(dtype=int, default=100, doc="Number of sky sources per detector.")
    skySourceRadiusPix = pexConfig.Field(
        dtype=int, default=8, doc="Sky sources keep at least this distance (px) from any detection and bad pixel."
    )
    doSubtractBackground = pexConfig.Field(
        dtype=bool, default=True,
        doc="Subtract a smooth background (sources masked) from the difference before detection.",
    )
    backgroundBinSizePix = pexConfig.Field(dtype=int, default=128, doc="Cell size (px) of that background.")
    doDeblendPeaks = pexConfig.Field(
        dtype=bool, default=False,
        doc="Make every peak of a footprint a DiaSource. Default: one DiaSource per footprint (its most "
        "significant peak), as ip_diffim without a deblender; secondary peaks are mostly residual "
        "structure in the wings of bright stars (measured on the test preset and ci_imsim).",
    )
    doScaleDetectionVariance = pexConfig.Field(
        dtype=bool, default=True,
        doc="Scale the difference's variance up to the noise measured on the PSF-filtered image (source-free "
        "pixels) before detection, so that thresholds and errors are in units of the real noise "
        "(correlated template noise survives decorrelation). Needs doSubtractBackground.",
    )
    badSourceCenterPlanes = pexConfig.ListField(
        dtype=str, default=["INTRP", "SAT", "SAT_TEMPLATE"],
        doc="Remove DiaSources whose 3x3 centre pixels all carry one of these planes, or whose centre is "
        "off the image (ip_diffim's badSourceFlags: interpolated/saturatedCenterAll, offimage; plus "
        "saturation in the template; edge/nodata/badCenterAll left out as they removed real transients "
        "near the border or on bad columns of the test preset and ci_imsim). Empty: keep everything.",
    )


class DetectAndMeasureTask(pipeBase.PipelineTask):
    """Detect, merge, measure and calibrate DiaSources on the difference image."""

    ConfigClass = DetectAndMeasureConfig
    _DefaultName = "detectAndMeasure"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.quantum.dataId
        outputs = self.run(**inputs, visit=int(data_id["visit"]), detector=int(data_id["detector"]))
        butlerQC.put(outputs, outputRefs)

    def run(self, *, science: Exposure, matchedTemplate: Exposure, difference: Exposure,
            visit: int | None = None, detector: int | None = None,
            scoreExposure: Exposure | None = None) -> pipeBase.Struct:
        config = self.config
        info = difference.visit_info
        visit = int(info.visit if visit is None else visit)
        detector = int(info.detector if detector is None else detector)
        rng = np.random.default_rng([visit, detector])
        from .dia_sources import detect_and_measure_dia_sources  # lazy: task-module import time

        # Only a preconvolved score replaces the detection: where subtractImages did not
        # preconvolve, its score is the PSF-filtered difference and the usual detection runs.
        use_score = (config.doDetectOnScore and scoreExposure is not None
                     and scoreExposure.metadata.get("SCORE", {}).get("score_kind") == "preconvolved")
        self.metadata["detected_on_score"] = bool(use_score)

        result = detect_and_measure_dia_sources(
            difference,
            science=science if config.doForcedMeasurement else None,
            matched_template=matchedTemplate if config.doForcedMeasurement else None,
            visit=visit,
            detector=detector,
            threshold=config.detectionThreshold,
            threshold_type=config.thresholdType,
            grow_pix=config.footprintGrowPix,
            merge_dipoles=config.doMerge,
            max_dipole_separation_pix=config.maxDipoleSeparationPix,
            aperture_radius_pix=config.apertureRadiusPix,
            n_sky_sources=config.nSkySources if config.doSkySources else 0,
            sky_source_radius_pix=config.skySourceRadiusPix,
            background_bin_pix=config.backgroundBinSizePix if config.doSubtractBackground else None,
            deblend_peaks=config.doDeblendPeaks,
            scale_variance=config.doScaleDetectionVariance,
            bad_center_planes=tuple(config.badSourceCenterPlanes),
            rng=rng,
            score=scoreExposure if use_score else None,
            remove_score_centroid_failures=config.doRemoveScoreCentroidFailures,
            template_residual_fraction=config.templateResidualFraction,
            template_residual_neighbourhood_fraction=config.templateResidualNeighbourhoodFraction,
            noise_cell_pix=config.detectionNoiseCellSize,
            neighbourhood_radius_sigma=config.templateResidualNeighbourhoodRadius,
            fallback_residual_scale=config.scoreFallbackResidualScale,
            low_coverage_variance_ratio=config.lowCoverageVarianceRatio,
            low_coverage_residual_scale=config.lowCoverageResidualScale,
        )
        for key, value in result.stats.items():
            self.metadata[key] = value
        self.log.info(
            "%d DiaSources (%d positive, %d negative, %d dipoles) and %d sky sources",
            result.stats["n_dia_sources"], result.stats["n_positive"], result.stats["n_negative"],
            result.stats["n_dipoles"], result.stats["n_sky_sources"],
        )
        return pipeBase.Struct(diaSources=result.catalog, subtractedMeasuredExposure=result.exposure)


# ---------------------------------------------------------------------------
# transformDiaSrcCat
# ---------------------------------------------------------------------------
class TransformDiaSrcCatConnections(
    pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")
):
    diaSourceCat = cT.Input(
        name="goodSeeingDiff_diaSrc",
        doc="DiaSources from detectAndMeasure.",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )
    diffIm = cT.Input(
        name="goodSeeingDiff_differenceExp",
        doc="Difference image; only its visitInfo (band, midpoint, exposure time) is read.",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
        deferLoad=True,
    )
    diaSourceTable = cT.Output(
        name="goodSeeingDiff_diaSrcTable",
        doc="DiaSources in the APDB DiaSource schema (sdm_schemas apdb.yaml), sky sources removed.",
        storageClass="DataFrame",
        dimensions=("instrument", "visit", "detector"),
    )


class TransformDiaSrcCatConfig(pipeBase.PipelineTaskConfig, pipelineConnections=TransformDiaSrcCatConnections):
    doRemoveSkySources = pexConfig.Field(
        dtype=bool, default=True, doc="Drop sky sources (they are noise monitors, not DiaSources)."
    )


class TransformDiaSrcCatTask(pipeBase.PipelineTask):
    """The detectAndMeasure catalogue as APDB DiaSource rows (a pandas DataFrame)."""

    ConfigClass = TransformDiaSrcCatConfig
    _DefaultName = "transformDiaSrcCat"

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        catalog = butlerQC.get(inputRefs.diaSourceCat)
        visit_info = butlerQC.get(inputRefs.diffIm).get(component="visitInfo")
        data_id = butlerQC.quantum.dataId
        outputs = self.run(diaSourceCat=catalog, visitInfo=visit_info, visit=int(data_id["visit"]),
                           detector=int(data_id["detector"]), band=str(data_id["band"]))
        butlerQC.put(outputs, outputRefs)

    def run(self, *, diaSourceCat, visitInfo, visit=None, detector=None, band=None) -> pipeBase.Struct:
        from .transform import dia_source_table

        if not math.isfinite(float(visitInfo.mjd_tai)):
            raise ValueError(f"visit {visit}: the difference image's visitInfo has no midpoint time")
        table = dia_source_table(
            diaSourceCat,
            visit=int(visitInfo.visit if visit is None else visit),
            detector=int(visitInfo.detector if detector is None else detector),
            band=visitInfo.band if band is None else band,
            midpoint_mjd_tai=float(visitInfo.mjd_tai),
            exposure_time_s=float(visitInfo.exposure_time_s),
            remove_sky_sources=self.config.doRemoveSkySources,
        )
        self.metadata["n_dia_sources"] = len(table)
        return pipeBase.Struct(diaSourceTable=table)
