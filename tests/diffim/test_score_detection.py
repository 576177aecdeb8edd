"""Score detection with the difference image as fallback (diapipe.diffim.score_detection)."""

from __future__ import annotations

import numpy as np
import pytest

from diapipe.diffim.preconvolve import score_from_difference
from diapipe.diffim.score_detection import detect_on_score, merge_score_and_difference, score_fallback_region
from diapipe.exposure import masks
from diapipe.exposure.psf import PixelPsf
from diapipe.measure.detection import detect_sources

SIGMA = 2.0
SHAPE = (120, 140)
#: the difference has no data left of DIFF_EDGE; the score (wider kernels) left of SCORE_EDGE
DIFF_EDGE, SCORE_EDGE = 10, 18


def _scene(sources, seed=1):
    """White-noise difference (sigma 1) with PSF sources [(x, y, flux)], its matched-filter score
    with a wider no-data border, and the mask."""
    rng = np.random.default_rng(seed)
    psf = PixelPsf.gaussian(SIGMA, 21)
    ny, nx = SHAPE
    image = rng.normal(0.0, 1.0, SHAPE)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y, flux in sources:
        image += flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / SIGMA**2) / (2 * np.pi * SIGMA**2)
    image = image.astype(np.float32)
    variance = np.ones(SHAPE, np.float32)
    mask = np.zeros(SHAPE, np.int32)
    masks.set_plane(mask, xx < DIFF_EDGE, "NO_DATA")
    image[:, :DIFF_EDGE] = np.nan
    variance[:, :DIFF_EDGE] = np.inf
    score = score_from_difference(image, variance, mask, psf)
    score.image[:, :SCORE_EDGE] = np.nan
    score.variance[:, :SCORE_EDGE] = np.nan
    return image, variance, mask, score


def _detect(image, variance, mask, score):
    m = mask.copy()
    fps, stats = detect_on_score(score, image, variance, m, SIGMA, threshold=5.0, background_bin_pix=None,
                                 scale_variance=False)
    peaks = fps.peaks
    xy = np.column_stack([np.asarray(peaks["x"], float), np.asarray(peaks["y"], float)])
    return fps, stats, xy, m


def _near(xy, x, y, radius=2.5):
    """Peaks within the truth-matching radius (0.5" = 2.5 px) of (x, y)."""
    return int((np.hypot(xy[:, 0] - x, xy[:, 1] - y) <= radius).sum())


def test_transient_in_score_border_is_found_at_its_position():
    # x = 13: the difference has data, the score not (its border strip)
    image, variance, mask, score = _scene([(13.0, 60.0, 300.0)])
    fps, stats, xy, _ = _detect(image, variance, mask, score)
    assert len(fps) == 1
    # the score alone sees only the wing at its border (x >= 18), 5 px off
    assert abs(xy[0, 0] - 13.0) <= 1.0 and abs(xy[0, 1] - 60.0) <= 1.0
    assert stats["n_score_fallback"] == 1
    only_score = detect_sources(np.nan_to_num(score.image), np.nan_to_num(score.variance), mask.copy(), 0.05,
                                5.0, polarity="both", deblend=False)
    assert all(abs(x - 13.0) > 3.0 for x in only_score.peaks["x"])


def test_each_source_once_score_side_and_border():
    # in the valid area (score), straddling the score border (1 px inside it), negative in the strip
    sources = [(80.0, 40.0, 300.0), (19.0, 90.0, 300.0), (14.0, 20.0, -300.0)]
    image, variance, mask, score = _scene(sources, seed=2)
    fps, stats, xy, m = _detect(image, variance, mask, score)
    assert len(fps) == 3
    for x, y, _ in sources:
        assert _near(xy, x, y) == 1, (x, y, xy)
        assert _near(xy, x, y, radius=12.0) == 1, (x, y, xy)
    neg = np.asarray(fps.peaks["is_negative"], bool)
    assert neg.sum() == 1 and _near(xy[neg], 14.0, 20.0) == 1
    # the valid-area source comes from the score, the two border ones from the difference
    assert stats["n_score_fallback"] == 2
    # footprint ids unique over both polarities, detection planes set on their pixels
    ids = np.asarray(fps.peaks["footprint"])
    assert len(set(ids.tolist())) == 3
    assert masks.any_set(m, "DETECTED")[40, 80] and masks.any_set(m, "DETECTED_NEGATIVE")[20, 14]
    assert not masks.any_set(m, "DETECTED")[100, 120]


def test_no_fallback_where_score_valid_everywhere():
    image, variance, mask, _ = _scene([(80.0, 40.0, 300.0)], seed=3)
    # a score with data wherever the difference has it: nothing comes from the difference
    full = score_from_difference(image, variance, mask, PixelPsf.gaussian(SIGMA, 21))
    fps, stats, xy, _ = _detect(image, variance, mask, full)
    assert len(fps) == 1 and _near(xy, 80.0, 40.0) == 1
    assert stats["n_score_fallback"] == 0


def test_fallback_region_planes():
    s = np.ones((5, 6), np.float32)
    sv = np.ones((5, 6), np.float32)
    d = np.ones((5, 6), np.float32)
    dv = np.ones((5, 6), np.float32)
    sv[1, 1] = np.inf
    sv[3, 4] = 0.0
    s[0, 5] = np.nan
    d[0, 5] = np.nan  # neither has data: not a fallback pixel
    region = score_fallback_region(s, sv, d, dv)
    assert region.sum() == 2 and region[1, 1] and region[3, 4]
    mask = np.zeros((5, 6), np.int32)
    masks.set_plane(mask, np.ones((5, 6), bool), "NO_DATA")
    assert not score_fallback_region(s, sv, d, dv, mask).any()
    with pytest.raises(ValueError, match="differ in shape"):
        score_fallback_region(s, sv, d[:4], dv)


def test_merge_rejects_mismatched_shapes():
    image, variance, mask, _ = _scene([(80.0, 40.0, 300.0)], seed=4)
    fps = detect_sources(image, variance, mask.copy(), SIGMA, 5.0, polarity="both", deblend=False)
    with pytest.raises(ValueError, match="differ in shape"):
        merge_score_and_difference(fps, fps, np.zeros((3, 3), bool))


def test_score_peak_without_difference_source_is_removed():
    """A score peak (e.g. of a ring at a star) where the difference has no point source but other
    structure: the PSF-fit centroid on the difference runs off (> 2 px) and the detection is removed;
    the real source stays."""
    from diffim.test_dia_sources import _add, _difference, _run

    from diapipe.exposure.exposure import Exposure

    rng = np.random.default_rng(21)
    psf = PixelPsf.gaussian(SIGMA, 21)
    img = rng.normal(0.0, 1.0, (200, 200))
    _add(img, psf, 60.3, 70.6, 150.0)
    diff = _difference(img.copy())
    art = img.copy()
    _add(art, psf, 140.0, 130.0, 200.0)  # only in the score ...
    _add(diff.image, psf, 143.5, 130.0, 150.0)  # ... where the difference has other structure, 3.5 px off
    s = score_from_difference(art, np.ones(img.shape), np.zeros(img.shape, np.int32), psf)
    score = Exposure(image=s.image, mask=s.mask, variance=s.variance, wcs=diff.wcs, psf=s.psf,
                     photo_calib=diff.photo_calib)
    kept = _run(diff, score=score, remove_score_centroid_failures=False)
    cat = kept.catalog[~kept.catalog["sky_source"]]
    assert len(cat) == 2 and cat["centroid_flag"].sum() == 1
    res = _run(diff, score=score)
    cat = res.catalog[~res.catalog["sky_source"]]
    assert len(cat) == 1 and abs(cat["x"][0] - 60.3) < 0.3 and abs(cat["y"][0] - 70.6) < 0.3
    assert res.stats["n_removed_score_centroid"] == 1
