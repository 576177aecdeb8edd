"""Background model: accuracy against a known smooth sky, masking, serialisation."""

import numpy as np
import pytest
import sep

from diapipe.exposure.masks import MASK_DTYPE, set_plane
from diapipe.measure.background import Background, estimate_background, subtract_background

SHAPE = (512, 640)
NOISE = 10.0


def _sky(shape=SHAPE):
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return 1000.0 + 40.0 * np.sin(x / 300.0) + 25.0 * (y / shape[0]) ** 2 + 0.02 * x


def _image_with_stars(seed, n_stars=150, sigma=2.0):
    rng = np.random.default_rng(seed)
    sky = _sky()
    stars = np.zeros(SHAPE)
    yy, xx = np.mgrid[-15:16, -15:16]
    positions = []
    for _ in range(n_stars):
        x, y = rng.uniform(20, SHAPE[1] - 20), rng.uniform(20, SHAPE[0] - 20)
        flux = 10 ** rng.uniform(3.5, 5.5)
        ix, iy = int(x), int(y)
        stamp = np.exp(-((xx + ix - x) ** 2 + (yy + iy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        stars[iy - 15 : iy + 16, ix - 15 : ix + 16] += flux * stamp
        positions.append((x, y))
    image = sky + stars + rng.normal(0.0, NOISE, SHAPE)
    return image.astype(np.float32), sky, stars


def test_smooth_sky_recovered_below_noise():
    image, sky, stars = _image_with_stars(1)
    mask = np.zeros(SHAPE, MASK_DTYPE)
    set_plane(mask, stars > 0.5 * NOISE, "DETECTED")
    bkg = estimate_background(image, mask, bin_size=64)
    resid = bkg() - sky
    # Per-cell statistical error is ~NOISE/64 = 0.16; interpolation error must be comparable.
    assert np.sqrt(np.mean(resid**2)) < 0.5, np.sqrt(np.mean(resid**2))
    assert abs(np.mean(resid)) < 0.15
    assert np.allclose(np.median(bkg.rms), NOISE, rtol=0.05)


def test_unmasked_stars_bias_is_small_with_clipping():
    image, sky, _ = _image_with_stars(2)
    clipped = estimate_background(image, None, bin_size=64)
    plain = estimate_background(image, None, bin_size=64, nsigma=1e6, n_iter=1)
    bias_clipped = np.mean(clipped() - sky)
    bias_plain = np.mean(plain() - sky)
    assert bias_plain > 3 * abs(bias_clipped)  # without clipping the stars leak into the sky
    assert abs(bias_clipped) < 0.1 * NOISE


def test_matches_sep_background_on_same_image():
    image, sky, _ = _image_with_stars(3)
    ours = estimate_background(image, None, bin_size=64, statistic="mode")()
    theirs = sep.Background(image.astype(np.float64), bw=64, bh=64, fw=3, fh=3).back()
    # Same estimator (SExtractor mode, spline) away from the outer cells, where sep's
    # unconditional 3x3 median filter biases a curved sky and ours does not.
    inner = np.s_[64:-64, 64:-64]
    assert np.sqrt(np.mean((ours - theirs)[inner] ** 2)) < 0.1 * NOISE
    rms_ours = np.sqrt(np.mean((ours - sky) ** 2))
    rms_sep = np.sqrt(np.mean((theirs - sky) ** 2))
    assert rms_ours < 1.2 * rms_sep, (rms_ours, rms_sep)  # both ~0.04 NOISE


def test_masked_region_is_ignored():
    rng = np.random.default_rng(4)
    image = (100.0 + rng.normal(0.0, 1.0, (256, 256))).astype(np.float32)
    image[:, :128] += 1e4  # a "bad" half
    mask = np.zeros(image.shape, MASK_DTYPE)
    bad = np.zeros(image.shape, bool)
    bad[:, :128] = True
    set_plane(mask, bad, "BAD")
    bkg = estimate_background(image, mask, bin_size=64, filter_size=1)
    assert np.allclose(bkg()[:, 128:], 100.0, atol=0.2)
    # Cells without usable pixels are filled from their neighbours, not left at the bad level.
    assert np.allclose(bkg()[:, :100], 100.0, atol=0.5)


def test_serialisation_round_trip_and_subtract():
    image, sky, _ = _image_with_stars(5, n_stars=20)
    sub, bkg = subtract_background(image, None, bin_size=128, interpolation="bilinear")
    again = Background.from_arrays(bkg.to_arrays())
    assert np.array_equal(again(), bkg())
    assert again.interpolation == "bilinear"
    assert abs(float(np.median(sub))) < 1.0
    in_place = image.copy()
    out, _ = subtract_background(in_place, None, bin_size=128, in_place=True, interpolation="bilinear")
    assert out is in_place and np.allclose(out, sub)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mask shape"):
        estimate_background(np.zeros((10, 10)), np.zeros((5, 5), MASK_DTYPE))
    with pytest.raises(ValueError, match="statistic"):
        estimate_background(np.zeros((10, 10)), statistic="mean")
    mask = np.full((64, 64), 1, MASK_DTYPE)  # everything BAD
    with pytest.raises(ValueError, match="No background cell"):
        estimate_background(np.zeros((64, 64)), mask, bin_size=32)
    with pytest.raises(KeyError, match="values"):
        Background.from_arrays({"shape": np.array([2, 2])})
