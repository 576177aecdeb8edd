"""The fast paths of detection and cosmic-ray finding (issue 4) against straightforward
full-frame references built from scipy.ndimage: bit-for-bit the same results."""

import numpy as np
import pytest
from scipy import ndimage

from diapipe.measure import cosmic_rays, detection
from diapipe.measure.detection import dilate_rows, gaussian_kernel_1d, smoothed_significance


def _reference_significance(image, variance, sigma_pix, valid):
    """smoothed_significance("pixel_stdev") on the full frame, as before the row blocks."""
    g = gaussian_kernel_1d(sigma_pix)
    data = np.where(valid, image.astype(np.float32), np.float32(0.0))
    var = np.where(valid, variance.astype(np.float32), np.float32(0.0))
    smooth = ndimage.correlate1d(ndimage.correlate1d(data, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    g2 = g**2
    svar = ndimage.correlate1d(ndimage.correlate1d(var, g2, axis=0, mode="constant"), g2, axis=1, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(svar > 0, smooth / np.sqrt(svar), np.float32(0.0))
    return np.where(valid, sig, np.float32(0.0)).astype(np.float32)


@pytest.mark.parametrize("sigma_pix", [0.4, 1.7, 6.0])
def test_blocked_smoothing_equals_full_frame(sigma_pix):
    # taller than several blocks, with a kernel wider than a block's halo for sigma 6
    rng = np.random.default_rng(1)
    shape = (3 * detection._BLOCK_ROWS + 37, 150)
    image = rng.normal(0.0, 3.0, shape)
    image[100:104, 70:74] += 500.0
    variance = rng.uniform(5.0, 20.0, shape)
    valid = rng.random(shape) > 0.01
    sig = smoothed_significance(image, variance, sigma_pix, valid=valid)
    assert sig.dtype == np.float32
    assert np.array_equal(sig, _reference_significance(image, variance, sigma_pix, valid))
    # the other threshold types share the blocked image smoothing
    g = gaussian_kernel_1d(sigma_pix)
    smooth = ndimage.correlate1d(ndimage.correlate1d(image.astype(np.float32), g, axis=0, mode="constant"),
                                 g, axis=1, mode="constant")
    expected = smooth / np.sqrt(np.median(variance.astype(np.float32)) * np.sum(g**2) ** 2)
    assert np.array_equal(smoothed_significance(image, variance, sigma_pix, "variance"), expected.astype(np.float32))


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_dilate_rows_equals_binary_dilation_with_a_disk(radius):
    rng = np.random.default_rng(radius)
    binary = rng.random((61, 47)) < 0.01
    binary[0, 5] = binary[-1, -1] = binary[30, 0] = True  # touching the borders
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = dx**2 + dy**2 <= radius**2 + 0.5
    expected = ndimage.binary_dilation(binary, structure=disk)
    assert np.array_equal(detection._grow(binary, radius), expected)
    # an asymmetric-in-y element (rows only for dy >= 0)
    rows = {dy_: radius - dy_ for dy_ in range(radius + 1)}
    element = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
    for dy_, half in rows.items():
        element[radius + dy_, radius - half : radius + half + 1] = True
    assert np.array_equal(dilate_rows(binary, rows), ndimage.binary_dilation(binary, structure=element))


def test_footprint_areas_and_ids_match_labels():
    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 1.0, (200, 180)).astype(np.float32)
    for x, y in rng.uniform(10, 170, (25, 2)):
        image[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] += rng.uniform(20, 200)
    fp = detection.detect_sources(image, np.ones_like(image), None, 1.5, 5.0, min_pixels=3)
    labels = fp.labels
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, ids.size + 1))
    areas = np.bincount(labels.ravel())
    assert np.array_equal(np.asarray(fp.peaks["footprint_area"]), areas[np.asarray(fp.peaks["footprint"])])
    assert set(np.asarray(fp.peaks["footprint"])) == set(ids)


def _reference_interpolate(image, good, where, sigma_pix=1.5):
    """The dense version: label the dilated pixels to repair, Gaussian-weighted mean per box."""
    out = image.copy()
    labels, _ = ndimage.label(ndimage.binary_dilation(where, iterations=1))
    pad = int(np.ceil(4 * sigma_pix)) + 1
    ny, nx = image.shape
    for slc in ndimage.find_objects(labels):
        y0, y1 = max(slc[0].start - pad, 0), min(slc[0].stop + pad, ny)
        x0, x1 = max(slc[1].start - pad, 0), min(slc[1].stop + pad, nx)
        box = (slice(y0, y1), slice(x0, x1))
        num = ndimage.gaussian_filter(np.where(good[box], image[box], 0.0).astype(np.float32), sigma_pix, mode="constant")
        den = ndimage.gaussian_filter(good[box].astype(np.float32), sigma_pix, mode="constant")
        fix = where[box]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[box][fix] = np.where(den[fix] > 1e-3, num[fix] / den[fix], 0.0)
    return out


def test_sparse_interpolation_equals_dense_labelling():
    rng = np.random.default_rng(7)
    for _ in range(20):
        shape = tuple(rng.integers(10, 60, 2))
        image = rng.normal(0.0, 1.0, shape).astype(np.float32)
        where = rng.random(shape) < rng.uniform(0.005, 0.15)  # clusters, neighbours, borders
        good = (rng.random(shape) > 0.1) & ~where
        assert np.array_equal(cosmic_rays._interpolate(image, good, where), _reference_interpolate(image, good, where))


def test_sparse_neighbours_equal_binary_dilation():
    rng = np.random.default_rng(8)
    points = rng.random((40, 33)) < 0.05
    points[0, 0] = points[-1, 10] = True
    py, px = np.nonzero(points)
    ny_, nx_ = cosmic_rays._neighbours(py, px, points.shape, cosmic_rays._EIGHT)
    expected = np.nonzero(ndimage.binary_dilation(points, structure=np.ones((3, 3), bool)))
    assert np.array_equal(ny_, expected[0]) and np.array_equal(nx_, expected[1])
