"""Block-wise (overlap-save) convolution paths of diapipe.diffim.convolve against direct references.

The images are larger than one FFT block (`BLOCK_PX`), so tile seams, uneven last tiles
and the zero-padded borders are all exercised; the references are scipy's plain FFT
convolution, a per-pixel evaluation of the spatially varying kernel, and
scipy.ndimage.maximum_filter per mask plane.
"""

import numpy as np
import pytest
from scipy.ndimage import maximum_filter
from scipy.signal import fftconvolve

from diapipe.diffim.basis import basis_for_psfs
from diapipe.diffim.convolve import (
    BLOCK_PX,
    GROWN_PLANES,
    convolve_variance,
    convolve_with_solution,
    fft_convolve_same,
    grow_mask,
)
from diapipe.diffim.kernel_fit import KernelSolution, normalised_position
from diapipe.exposure import masks
from diapipe.exposure.psf import polynomial_terms

SHAPE = (2 * BLOCK_PX - 150, BLOCK_PX + 333)  # several tiles per axis, uneven


@pytest.fixture(scope="module")
def solution():
    rng = np.random.default_rng(7)
    basis = basis_for_psfs(1.6, 2.2)
    coeffs = rng.normal(0.0, 0.05, (basis.n_basis, 3))
    coeffs[0] = [1.02, 0.0, 0.0]
    coeffs[1:4] += [[0.0, 0.3, -0.2], [0.1, -0.2, 0.25], [0.0, 0.15, 0.1]]
    bbox = (0.0, 0.0, SHAPE[1] - 1.0, SHAPE[0] - 1.0)
    return KernelSolution(basis, coeffs, np.array([3.0, 1.0, -2.0, 0.5, 0.3, -0.4]), 1, 2, bbox)


def test_fft_convolve_same_matches_plain_fft_across_tiles():
    rng = np.random.default_rng(1)
    image = rng.normal(100.0, 10.0, SHAPE)
    kernels = [rng.normal(size=(35, 35)), rng.normal(size=(71, 71)), rng.normal(size=(5, 9))]
    for kernel, out in zip(kernels, fft_convolve_same(image, kernels)):
        ref = fftconvolve(image, kernel, mode="same")
        assert out.dtype == np.float64
        assert np.max(np.abs(out - ref)) < 1e-9 * np.max(np.abs(ref))
    out32 = fft_convolve_same(image.astype(np.float32), kernels[:1])[0]
    ref = fftconvolve(image, kernels[0], mode="same")
    assert out32.dtype == np.float32
    assert np.max(np.abs(out32 - ref)) < 1e-5 * np.max(np.abs(ref))


def _reference(solution, plane, xy0, ys, xs, squared=False):
    """Per-pixel sum of kernel(x, y) (or its square) times the flipped, zero-padded neighbourhood."""
    half = solution.size // 2
    padded = np.pad(plane.astype(float), half)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * half + 1,) * 2)
    terms = solution.spatial_kernel_images()
    out = np.empty(len(ys))
    for i, (y, x) in enumerate(zip(ys, xs)):
        u, v = normalised_position(x + xy0[0], y + xy0[1], solution.bbox)
        k = np.tensordot(polynomial_terms(u, v, solution.spatial_order), terms, axes=(0, 0))
        out[i] = ((k**2 if squared else k) * windows[y, x][::-1, ::-1]).sum()
    return out


def _rows_and_columns(shape, half):
    """Every pixel of a few rows and columns: tile seams fall on them whatever the plan."""
    ny, nx = shape
    ys, xs = [], []
    for y in (0, half, ny // 3, ny // 2, ny - 1):
        ys += [y] * nx
        xs += list(range(nx))
    for x in (1, nx // 2, nx - half - 1):
        ys += list(range(ny))
        xs += [x] * ny
    return np.array(ys), np.array(xs)


def test_spatially_varying_image_and_variance_match_per_pixel_kernels(solution):
    """Every output pixel is the convolution with the kernel *at that pixel* (plus background)."""
    rng = np.random.default_rng(2)
    xy0 = (40, 25)  # a sub-image: positions are parent coordinates
    image = rng.normal(500.0, 30.0, SHAPE).astype(np.float32)
    variance = rng.uniform(50.0, 200.0, SHAPE).astype(np.float32)
    img, var, _ = convolve_with_solution(image, variance, np.zeros(SHAPE, np.int32), solution, xy0=xy0)
    var_exact = convolve_variance(variance, solution, xy0=xy0, exact=True)
    ys, xs = _rows_and_columns(SHAPE, solution.size // 2)
    expect = _reference(solution, image, xy0, ys, xs) + solution.background(xs + xy0[0], ys + xy0[1])
    assert np.max(np.abs(img[ys, xs] - expect) / np.abs(expect)) < 1e-5
    expect_v = _reference(solution, variance, xy0, ys, xs, squared=True)
    assert np.max(np.abs(var_exact[ys, xs] - expect_v) / expect_v) < 1e-5
    # (the default variance path is an approximation for white variance planes; its
    # exact case is the next test)
    assert var.dtype == np.float32 and np.all(var[ys, xs] > 0)


def test_default_variance_on_flat_plane_is_local_kernel_sq_sum(solution):
    """Away from the border a flat variance plane becomes exactly the local sum(K²)."""
    half = solution.size // 2
    var = convolve_variance(np.ones(SHAPE, np.float32), solution, exact=False)
    ys, xs = _rows_and_columns((SHAPE[0] - 2 * half, SHAPE[1] - 2 * half), 0)
    ys, xs = ys + half, xs + half
    expect = _reference(solution, np.ones(SHAPE), (0, 0), ys, xs, squared=True)
    assert np.max(np.abs(var[ys, xs] - expect) / expect) < 1e-5


@pytest.mark.parametrize("size", [1, 4, 21, 35])
def test_grow_mask_equals_per_plane_maximum_filter(size):
    rng = np.random.default_rng(size)
    mask = np.zeros((300, 517), np.int32)
    for b in range(12):
        n = int(rng.integers(0, 40))
        mask[rng.integers(0, 300, n), rng.integers(0, 517, n)] |= 1 << b
    mask[:, 100] |= masks.bit("BAD")
    expect = np.zeros_like(mask)
    for name in GROWN_PLANES:
        plane = masks.any_set(mask, name)
        if plane.any():
            expect[maximum_filter(plane.view(np.uint8), size=size, mode="constant") != 0] |= masks.bit(name)
    out = grow_mask(mask, size)
    assert out.dtype == mask.dtype
    np.testing.assert_array_equal(out, expect)
    # planes outside GROWN_PLANES (DETECTED, CLIPPED) are dropped
    assert not masks.any_set(out, ("DETECTED", "CLIPPED")).any()
    assert not grow_mask(mask & masks.bit("DETECTED"), size).any()
