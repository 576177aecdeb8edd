"""Alard–Lupton basis: widths, sizes and normalisation against ip_diffim's rules."""

import numpy as np
import pytest

from diapipe.diffim.basis import alard_lupton_sigmas, basis_for_psfs, make_alard_lupton_basis


def test_sigmas_scale_with_matching_width():
    sigmas, degrees, size = alard_lupton_sigmas(1.6, 2.2)
    w = np.sqrt(2.2**2 - 1.6**2)
    assert sigmas == pytest.approx([w / 2, w, 2 * w])
    assert degrees == [4, 2, 2]
    assert size == 21  # 6 * 3.02 = 18 -> 19 -> clipped up to 21


def test_sigma_floor_and_size_clipping():
    # nearly equal PSFs: w floored at 0.7, and w/beta below the floor -> [w, w b, w b^2]
    sigmas, _, size = alard_lupton_sigmas(2.0, 2.05)
    assert sigmas == pytest.approx([0.7, 1.4, 2.8])
    assert size == 21
    # very different PSFs: 6 * largest sigma clipped to 35
    sigmas, _, size = alard_lupton_sigmas(1.0, 5.0)
    assert sigmas[1] == pytest.approx(np.sqrt(24.0))
    assert size == 35
    # mid-range size is odd: 6 * 2 * w with w = 2 -> 24 -> 25
    _, _, size = alard_lupton_sigmas(1.0, np.sqrt(5.0))
    assert size == 25


def test_deconvolution_uses_floor_and_degree_3():
    sigmas, degrees, _ = alard_lupton_sigmas(2.0, 1.98)
    assert degrees == [3, 3, 3]
    # floor 0.4 -> series sqrt(2, 5, 17) * 0.4
    assert sigmas == pytest.approx(0.4 * np.sqrt([2.0, 5.0, 17.0]))


def test_unscaled_defaults():
    assert alard_lupton_sigmas(None, None)[0] == [0.7, 1.5, 3.0]


def test_normalisation_and_separable_factorisation():
    basis = basis_for_psfs(1.6, 2.2)
    assert basis.n_basis == 15 + 6 + 6
    sums = basis.images.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose((basis.images[1:] ** 2).sum(axis=(1, 2)), 1.0, rtol=1e-12)
    raw = basis.fy[:, :, None] * basis.fx[:, None, :]
    np.testing.assert_allclose(np.tensordot(basis.transform, raw, axes=(1, 0)), basis.images, atol=1e-14)
    # the kernel sum is the first coefficient alone
    coeffs = np.random.default_rng(0).normal(size=basis.n_basis)
    assert basis.kernel(coeffs).sum() == pytest.approx(coeffs[0], abs=1e-10)
    # the basis spans a Gaussian of the matching width well
    half = basis.size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    target = np.exp(-0.5 * (x**2 + y**2) / 1.51**2)
    target /= target.sum()
    a = basis.images.reshape(basis.n_basis, -1).T
    coef, *_ = np.linalg.lstsq(a, target.ravel(), rcond=None)
    assert np.abs(a @ coef - target.ravel()).max() < 1e-3 * target.max()


def test_bad_size_rejected():
    with pytest.raises(ValueError, match="odd"):
        make_alard_lupton_basis([1.0], [2], 20)
