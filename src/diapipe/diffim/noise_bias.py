"""Errors-in-variables correction of the PSF-matching kernel fit.

The kernel is fitted by least squares with the *convolved* image as the
regressor. When that image is noisy (a single-visit science image in
convolveScience mode) the normal matrix ``AᵀWA`` carries the regressor noise's
expected contribution ``N`` while ``AᵀWt`` does not (the two images' noises are
independent), so the solution is shrunk towards zero: the kernel sum, i.e. the
photometric scale, comes out low (-6 % measured on ci_imsim). `source_noise_normal`
computes ``N`` per stamp; `debiased_solve` removes it where that is stable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["debiased_solve", "source_noise_normal"]


def source_noise_normal(source_variance: np.ndarray, weights: np.ndarray, basis_images: np.ndarray) -> np.ndarray:
    """Expected noise part of the per-stamp normal matrices of the kernel basis.

    With ``A_b = S * B_b`` on the fitted box and ``S`` carrying independent pixel
    noise of variance ``V``, ``E[Σ_p w_p A_b(p) A_c(p)]`` exceeds its noise-free
    value by ``N_bc = Σ_q B_b(q) B_c(q) C(q)``, ``C(q) = Σ_p w_p V(p - q)``.

    Parameters
    ----------
    source_variance : `numpy.ndarray`, shape (n, S, S)
        Variance stamps of the convolved image (``S = F + K - 1``).
    weights : `numpy.ndarray`, shape (n, F, F)
        Fit weights of the fitted box.
    basis_images : `numpy.ndarray`, shape (n_basis, K, K)

    Returns
    -------
    `numpy.ndarray`, shape (n, n_basis, n_basis)

    >>> import numpy as np
    >>> b = np.zeros((1, 3, 3)); b[0, 1, 1] = 1.0  # delta kernel: N = sum(w * V)
    >>> float(source_noise_normal(np.full((1, 5, 5), 2.0), np.ones((1, 3, 3)), b)[0, 0, 0])
    18.0
    """
    from scipy.signal import fftconvolve

    var = np.asarray(source_variance, float)
    w = np.asarray(weights, float)
    k = basis_images.shape[-1]
    if var.shape[1] - w.shape[1] + 1 != k:
        raise ValueError(f"variance stamps {var.shape} and weights {w.shape} do not match a kernel of size {k}")
    # corr[m] = Σ_j w[j] V[j + m]; the kernel offset q = h - (m - h) indexes C(q) flipped
    corr = fftconvolve(var, w[:, ::-1, ::-1], mode="valid", axes=(1, 2))
    c = corr[:, ::-1, ::-1].reshape(len(var), -1)
    b = basis_images.reshape(len(basis_images), -1)
    return np.einsum("ik,nk,jk->nij", b, c, b, optimize=True)


def debiased_solve(normal: np.ndarray, rhs: np.ndarray, noise: np.ndarray, max_noise_fraction: float = 0.3):
    """Solve ``(M - N) θ = r`` in the directions where the noise part ``N`` of ``M`` is small.

    ``M = Lᵀ L`` (Cholesky) and ``C = L⁻¹ N L⁻ᵀ = U diag(μ) Uᵀ``: ``μ`` is the
    expected fraction of ``M`` that is regressor noise along each eigen-direction.
    Where ``μ <= max_noise_fraction`` the least-squares solution is divided by
    ``1 - μ`` (the errors-in-variables correction; for the kernel sum of a
    single-visit science image ``μ`` is a few percent); where the noise dominates
    (high-order basis terms on faint stamps) the plain least-squares solution is
    kept, because the exact correction ``(M - N)⁻¹`` is unstable there.

    >>> import numpy as np
    >>> m = np.diag([10.0, 4.0]); n = np.diag([1.0, 3.0]); r = np.array([9.0, 4.0])
    >>> [round(float(v), 3) for v in debiased_solve(m, r, n)]
    [1.0, 1.0]
    """
    m = np.asarray(normal, float)
    try:
        chol = np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(m, rhs, rcond=None)[0]
    from scipy.linalg import solve_triangular

    half = solve_triangular(chol, np.asarray(noise, float), lower=True)
    c = solve_triangular(chol, half.T, lower=True)
    mu, u = np.linalg.eigh(0.5 * (c + c.T))
    gain = np.where(mu <= max_noise_fraction, 1.0 / (1.0 - np.clip(mu, 0.0, max_noise_fraction)), 1.0)
    z = solve_triangular(chol, np.asarray(rhs, float), lower=True)
    z = u @ (gain * (u.T @ z))
    return solve_triangular(chol.T, z, lower=False)
