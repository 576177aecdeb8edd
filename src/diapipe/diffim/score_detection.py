"""Detection on a score image, with the difference image standing in where the score has no data.

A preconvolved score (`diapipe.diffim.preconvolve.preconvolved_score`) is the
better detection image where the science PSF is sharper than the template's,
but its wider kernels leave a border strip (along the detector edges and
around template gaps) where the score is NaN or computed from zero-filled
pixels while the ordinary difference image still has data. Detecting on the
score alone loses transients there; on the test preset two bright transients
within a few pixels of the difference's NO_DATA edge were detected only on the
score's truncated side, whose peak, 3 px from the truth, left the centroid and
PSF flux there (flux at half its value, no match within 0.5").

`detect_on_score` therefore runs both detections and `merge_score_and_difference`
keeps, for each physical source, exactly one of them:

- a difference-image footprint whose brightest peak lies in the *fallback
  region* (`score_fallback_region`: pixels where the score is unusable, grown by
  ``margin_pix``, and the difference usable) is kept as it is, exactly the
  detection the ordinary path would make there;
- every other score footprint is kept, unless it overlaps a kept
  difference footprint of the same polarity (the same source seen from the
  score's valid side), in which case only the difference footprint stays;
- the other difference footprints are dropped (the score saw them, or found
  them insignificant).
"""

from __future__ import annotations

import numpy as np
from astropy.table import vstack
from scipy import ndimage

from ..exposure import masks
from ..measure.background import estimate_background
from ..measure.detection import Footprints, detect_sources

__all__ = [
    "NO_SMOOTHING_SIGMA_PIX",
    "detect_on_score",
    "merge_score_and_difference",
    "score_fallback_region",
]

#: Smoothing width standing for "no smoothing" (a 3-tap kernel of weights ~[0, 1, 0]):
#: a score pixel is already the matched-filter value.
NO_SMOOTHING_SIGMA_PIX = 0.05


def score_fallback_region(score_image: np.ndarray, score_variance: np.ndarray, difference_image: np.ndarray,
                          difference_variance: np.ndarray, mask: np.ndarray | None = None,
                          margin_pix: int = 0) -> np.ndarray:
    """Pixels where the score is unusable but the difference image is usable.

    The score is unusable where it or its variance is not finite or the
    variance is not positive, and within ``margin_pix`` (a square of half-size
    ``margin_pix``) of such a pixel: a score pixel next to its no-data border is
    a convolution over zero-filled pixels, with its peak pulled away from the
    border. The difference is usable where image and variance are finite, the
    variance is positive and (with ``mask``) NO_DATA is not set.

    >>> s = np.ones((1, 8)); s[0, :3] = np.nan
    >>> score_fallback_region(s, np.ones((1, 8)), np.ones((1, 8)), np.ones((1, 8)), margin_pix=1).astype(int)
    array([[1, 1, 1, 1, 0, 0, 0, 0]])
    """
    shapes = {a.shape for a in (score_image, score_variance, difference_image, difference_variance)}
    if mask is not None:
        shapes.add(mask.shape)
    if len(shapes) != 1:
        raise ValueError(f"score, difference and mask arrays differ in shape: {sorted(shapes)}")
    with np.errstate(invalid="ignore"):
        score_bad = ~(np.isfinite(score_image) & np.isfinite(score_variance) & (score_variance > 0))
        diff_ok = np.isfinite(difference_image) & np.isfinite(difference_variance) & (difference_variance > 0)
    if mask is not None:
        diff_ok &= ~masks.any_set(mask, "NO_DATA")
    if margin_pix > 0:
        score_bad = ndimage.maximum_filter(score_bad.view(np.uint8), size=2 * int(margin_pix) + 1,
                                           mode="nearest").astype(bool)
    return score_bad & diff_ok


def _footprint_ids(fps: Footprints, negative: bool) -> np.ndarray:
    peaks = fps.peaks
    sel = np.asarray(peaks["is_negative"], bool) == negative
    return np.unique(np.asarray(peaks["footprint"], np.int64)[sel])


def merge_score_and_difference(score_fps: Footprints, difference_fps: Footprints,
                               fallback: np.ndarray) -> tuple[Footprints, int]:
    """One detection per source from score and difference footprints (module docstring).

    ``score_fps`` and ``difference_fps`` are `detect_sources` results on the same
    grid (polarity "both"); ``fallback`` is `score_fallback_region`. A difference
    footprint belongs to the fallback when its brightest peak lies in
    ``fallback``. Returns the merged `Footprints` (footprint and peak ids
    renumbered, unique over both polarities; the score's threshold; peaks
    column ``on_score``, False for the difference's) and the number of
    difference footprints kept.
    """
    if score_fps.labels.shape != fallback.shape or difference_fps.labels.shape != fallback.shape:
        raise ValueError(f"footprints {score_fps.labels.shape} / {difference_fps.labels.shape} and fallback "
                         f"region {fallback.shape} differ in shape")
    dpk = difference_fps.peaks
    d_fp = np.asarray(dpk["footprint"], np.int64)
    brightest = np.asarray(dpk["rank"]) == 0
    in_fallback = fallback[np.asarray(dpk["y"], np.int64), np.asarray(dpk["x"], np.int64)]
    d_keep_ids = np.unique(d_fp[brightest & in_fallback])

    empty = np.zeros(fallback.shape, np.int32)
    s_labels = {False: score_fps.labels, True: score_fps.labels_negative}
    d_labels = {False: difference_fps.labels, True: difference_fps.labels_negative}
    s_drop: list[np.ndarray] = []
    d_kept_planes = {}
    for negative in (False, True):
        d_lab = empty if d_labels[negative] is None else d_labels[negative]
        s_lab = empty if s_labels[negative] is None else s_labels[negative]
        d_kept = np.isin(d_lab, d_keep_ids) & (d_lab > 0)
        d_kept_planes[negative] = d_kept
        overlap = np.unique(s_lab[d_kept & (s_lab > 0)])
        s_drop.append(overlap)
    s_drop_ids = np.concatenate(s_drop)

    spk = score_fps.peaks
    s_rows = ~np.isin(np.asarray(spk["footprint"], np.int64), s_drop_ids)
    d_rows = np.isin(d_fp, d_keep_ids)
    s_ids = np.unique(np.asarray(spk["footprint"], np.int64)[s_rows])
    # new ids: kept score footprints 1..a, then kept difference footprints a+1..
    s_map = {int(old): new for new, old in enumerate(s_ids, start=1)}
    d_map = {int(old): new for new, old in enumerate(d_keep_ids, start=len(s_ids) + 1)}

    def relabel(lab, mapping):
        if lab is None or not mapping:
            return empty.copy()
        lut = np.zeros(int(max(lab.max(), max(mapping))) + 1, np.int32)
        for old, new in mapping.items():
            lut[old] = new
        return lut[lab]

    labels = {}
    for negative in (False, True):
        s_new = relabel(s_labels[negative], s_map)
        d_new = relabel(d_labels[negative], d_map)
        labels[negative] = np.where(d_new > 0, d_new, s_new).astype(np.int32)
    s_part = spk[s_rows]
    s_part["footprint"] = np.array([s_map[int(f)] for f in s_part["footprint"]], np.int64)
    d_part = dpk[d_rows]
    d_part["footprint"] = np.array([d_map[int(f)] for f in d_part["footprint"]], np.int64)
    s_part["on_score"] = np.ones(len(s_part), bool)
    d_part["on_score"] = np.zeros(len(d_part), bool)
    peaks = vstack([s_part, d_part]) if len(d_part) else s_part
    peaks["id"] = np.arange(1, len(peaks) + 1, dtype=np.int64)
    merged = Footprints(labels=labels[False], labels_negative=labels[True], peaks=peaks,
                        threshold=score_fps.threshold)
    return merged, int(d_keep_ids.size)


def detect_on_score(score, image, variance, mask, psf_sigma_pix, *, threshold=5.0, threshold_type="pixel_stdev",
                    grow_pix=2, deblend=False, background_bin_pix=128, scale_variance=True,
                    margin_pix=None, variance_factor=None, noise_cell_pix=512,
                    difference_variance=None, noise_region=None) -> tuple[Footprints, dict]:
    """Detection on a score image with the difference image as fallback; sets ``mask``'s detection planes.

    Parameters
    ----------
    score : `diapipe.exposure.exposure.Exposure` or `diapipe.diffim.preconvolve.ScoreResult`
        ``image`` / ``variance``: pixel / sqrt(variance) is the point-source
        significance; detected without smoothing, after its own smooth
        background (cells of ``background_bin_pix``) is removed and, with
        ``scale_variance``, its variance scaled up to the measured noise.
    image, variance, mask : `numpy.ndarray`
        The difference image as it is measured (background-subtracted,
        variance already scaled) and its mask (modified: DETECTED /
        DETECTED_NEGATIVE of the merged footprints).
    psf_sigma_pix : `float`
        The difference PSF's sigma: smoothing of the fallback detection, peak
        search radius and, by default, ``margin_pix = ceil(2 psf_sigma_pix)``.
    variance_factor : `numpy.ndarray`, optional
        Multiplies the score variance for the final detection only (after its
        noise scaling), e.g. `diapipe.diffim.template_residual` 's factor; the
        caller passes ``variance`` already multiplied.

    difference_variance : `numpy.ndarray`, optional
        Variance for the detection on the difference (kept only in the fallback
        region); default ``variance``.
    noise_region : `numpy.ndarray` of bool, optional
        Where the score's noise is calibrated on its own as well (``region`` of
        `diapipe.diffim.dia_sources.detection_noise_scale_map`).

    Returns
    -------
    footprints : `Footprints`
        Merged detections (`merge_score_and_difference`).
    stats : `dict`
        ``score_noise_scale`` (1 without scaling), ``n_score_fallback``
        (difference footprints kept in the fallback region) and
        ``score_fallback_fraction`` (its share of the difference's usable pixels).
    """
    from .dia_sources import detection_noise_scale_map  # dia_sources imports this module lazily

    if score.image.shape != mask.shape or image.shape != mask.shape:
        raise ValueError(f"score image {score.image.shape}, difference {image.shape} and mask {mask.shape} "
                         "differ in shape")
    margin = int(np.ceil(2.0 * psf_sigma_pix)) if margin_pix is None else int(margin_pix)
    s_img = np.array(score.image, np.float32)
    s_var = np.array(score.variance, np.float32)
    scale = 1.0
    if background_bin_pix:
        smask = mask.copy()
        detect_sources(s_img, s_var, smask, NO_SMOOTHING_SIGMA_PIX, threshold, polarity="both",
                       threshold_type=threshold_type, grow_pix=max(grow_pix, int(np.ceil(3 * psf_sigma_pix))))
        model = estimate_background(s_img, smask, bin_size=int(background_bin_pix))()
        s_img = np.where(np.isfinite(s_img), s_img - model, s_img).astype(np.float32)
        if scale_variance:
            scale, scale_map = detection_noise_scale_map(s_img, s_var, smask, NO_SMOOTHING_SIGMA_PIX,
                                                         cell_pix=noise_cell_pix, region=noise_region)
            s_var = (s_var * np.maximum(scale_map, np.float32(1.0)) ** 2).astype(np.float32)
    common = {"polarity": "both", "threshold_type": threshold_type, "grow_pix": grow_pix, "deblend": deblend,
              "set_mask": False}
    if variance_factor is not None:
        s_var = (s_var * variance_factor).astype(np.float32)
    s_fps = detect_sources(s_img, s_var, mask, NO_SMOOTHING_SIGMA_PIX, threshold,
                           peak_radius_pix=max(1.0, psf_sigma_pix), **common)
    d_fps = detect_sources(image, variance if difference_variance is None else difference_variance, mask,
                           psf_sigma_pix, threshold, **common)
    fallback = score_fallback_region(s_img, s_var, image, variance, mask, margin_pix=margin)
    merged, n_fallback = merge_score_and_difference(s_fps, d_fps, fallback)
    mask &= np.int32(~masks.bits(("DETECTED", "DETECTED_NEGATIVE")))
    masks.set_plane(mask, merged.labels > 0, "DETECTED")
    masks.set_plane(mask, merged.labels_negative > 0, "DETECTED_NEGATIVE")
    usable = ~masks.any_set(mask, "NO_DATA") & np.isfinite(image)
    stats = {
        "score_noise_scale": float(scale),
        "n_score_fallback": n_fallback,
        "score_fallback_fraction": float(fallback.sum() / max(int(usable.sum()), 1)),
    }
    return merged, stats
