"""Decorrelation ("afterburner") of an Alard–Lupton difference image.

Convolving one input with the matching kernel ``κ`` correlates the noise of the
difference ``D = U - κ * C``: its power spectrum is
``σ_u² + σ_c² |κ̂(k)|²`` instead of flat. Multiplying ``D`` in Fourier space by

.. math::

    \\phi(k) = \\sqrt{\\frac{\\sigma_u^2 + \\sigma_c^2 (\\sum \\kappa)^2}
                          {\\sigma_u^2 + \\sigma_c^2 |\\hat\\kappa(k)|^2}}

whitens it (Kaiser 2004; Reiss & Lupton 2016, DMTN-021; ip_diffim
``DecorrelateALKernelTask``). ``σ_u²``, ``σ_c²`` are the mean variances of the
unconvolved and the convolved input. The numerator uses the squared kernel
*sum*, as ip_diffim does, so ``φ(0) = 1`` and fluxes are preserved (using
``sum(κ²)`` there would bias every flux low by ``φ(0) < 1``). The difference
PSF is convolved by the same ``φ``; the variance plane becomes
``V_u Σ φ² + V_c Σ (κ * φ)²`` (ip_diffim's ``estimateVariancePlane``), which on
blank sky equals the whitened noise level ``σ_u² + σ_c² (Σκ)²``.

``φ`` is applied as a compact real-space kernel (its transform is smooth, so it
is concentrated within about a matching-kernel width), which keeps the PSF and
image corrections identical and lets the image correction use one FFT pair (`diapipe.diffim.convolve.fft_convolve_same`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from ..exposure.psf import PixelPsf
from .convolve import fft_convolve_same

__all__ = ["DecorrelationKernel", "DecorrelationResult", "decorrelate_difference", "decorrelation_kernel"]


@dataclass(frozen=True)
class DecorrelationKernel:
    """The real-space correction ``φ`` and the variance weights it implies.

    Attributes
    ----------
    kernel : `numpy.ndarray`
        Odd-sized image of ``φ``, centre pixel = zero lag, sums to 1.
    weight_unconvolved, weight_convolved : `float`
        ``Σ φ²`` and ``Σ (κ * φ)²``: factors multiplying the two input variances.
    """

    kernel: np.ndarray
    weight_unconvolved: float
    weight_convolved: float


def _pad_centred(kernel: np.ndarray, shape) -> np.ndarray:
    """Place a centred odd kernel in an array with its centre at [0, 0] (FFT origin)."""
    out = np.zeros(shape)
    half_y, half_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    out[: kernel.shape[0], : kernel.shape[1]] = kernel
    return np.roll(out, (-half_y, -half_x), axis=(0, 1))


def decorrelation_kernel(
    matching_kernel: np.ndarray,
    variance_unconvolved: float,
    variance_convolved: float,
    *,
    half_size: int | None = None,
) -> DecorrelationKernel:
    """Compute the decorrelation kernel ``φ`` for a matching kernel ``κ``.

    Parameters
    ----------
    matching_kernel : `numpy.ndarray`
        ``κ`` (odd size, centred, *not* normalised: its sum is the photometric scaling).
    variance_unconvolved, variance_convolved : `float`
        Mean variance of the unconvolved input (science in convolveTemplate mode) and of
        the convolved input before convolution.
    half_size : `int`, optional
        Half-size of the returned kernel; default the matching kernel's size (so the
        kernel spans twice the matching kernel).

    >>> import numpy as np
    >>> y, x = np.mgrid[-10:11, -10:11]
    >>> kappa = np.exp(-0.5 * (x**2 + y**2) / 1.5**2); kappa /= kappa.sum()
    >>> dk = decorrelation_kernel(kappa, 1.0, 1.0)
    >>> round(float(dk.kernel.sum()), 6), round(dk.weight_unconvolved + dk.weight_convolved, 3)
    (1.0, 2.0)
    """
    kappa = np.asarray(matching_kernel, float)
    if kappa.ndim != 2 or kappa.shape[0] % 2 == 0 or kappa.shape[0] != kappa.shape[1]:
        raise ValueError(f"matching_kernel must be square with odd size, got {kappa.shape}")
    if not (variance_unconvolved > 0 and variance_convolved >= 0):
        raise ValueError(
            f"Variances must be positive: unconvolved {variance_unconvolved}, convolved {variance_convolved}"
        )
    k = kappa.shape[0]
    half = k if half_size is None else int(half_size)
    n = 4 * max(half, k) + 2  # even grid comfortably larger than the kernel support
    kft = np.fft.fft2(_pad_centred(kappa, (n, n)))
    ksum = kappa.sum()
    phi_ft = np.sqrt((variance_unconvolved + variance_convolved * ksum**2) /
                     (variance_unconvolved + variance_convolved * np.abs(kft) ** 2))
    phi = np.real(np.fft.ifft2(phi_ft))
    phi = np.roll(phi, (half, half), axis=(0, 1))[: 2 * half + 1, : 2 * half + 1]
    phi /= phi.sum()
    combined = fftconvolve(kappa, phi, mode="full")
    return DecorrelationKernel(
        kernel=phi,
        weight_unconvolved=float((phi**2).sum()),
        weight_convolved=float((combined**2).sum()),
    )


@dataclass
class DecorrelationResult:
    """Decorrelated difference image, its variance, its PSF and the correction used."""

    image: np.ndarray
    variance: np.ndarray
    psf: PixelPsf | None
    correction: DecorrelationKernel


def _convolve_psf(psf: PixelPsf, phi: np.ndarray) -> PixelPsf:
    basis = np.array([fftconvolve(term, phi, mode="same") for term in psf.basis])
    return PixelPsf(basis, psf.order, psf.bbox)


def decorrelate_difference(
    difference: np.ndarray,
    variance_unconvolved: np.ndarray,
    variance_convolved: np.ndarray,
    matching_kernel: np.ndarray,
    *,
    psf: PixelPsf | None = None,
    good: np.ndarray | None = None,
) -> DecorrelationResult:
    """Whiten the noise of a difference image ``D = U - κ * C``.

    Parameters
    ----------
    difference : `numpy.ndarray`
        ``D`` (finite everywhere; fill masked pixels, e.g. with 0, first).
    variance_unconvolved : `numpy.ndarray`
        Variance plane of ``U`` (finite).
    variance_convolved : `numpy.ndarray`
        Variance plane of ``C`` *before* convolution (finite).
    matching_kernel : `numpy.ndarray`
        ``κ`` at the image centre (the decorrelation is not spatially varying, as
        ip_diffim's default).
    psf : `PixelPsf`, optional
        PSF of ``D`` before decorrelation; returned convolved with ``φ``.
    good : `numpy.ndarray` of bool, optional
        Pixels used for the mean variances (default: all).

    Returns
    -------
    DecorrelationResult
    """
    sel = slice(None) if good is None else good
    var_u = float(np.mean(variance_unconvolved[sel]))
    var_c = float(np.mean(variance_convolved[sel]))
    correction = decorrelation_kernel(matching_kernel, var_u, var_c)
    image = fft_convolve_same(difference, [correction.kernel])[0]
    dtype = np.result_type(variance_unconvolved, variance_convolved)
    variance = np.multiply(variance_unconvolved, dtype.type(correction.weight_unconvolved), dtype=dtype)
    # the second term in row blocks: no full-frame temporary
    w_c = dtype.type(correction.weight_convolved)
    rows = max(1, (1 << 20) // max(variance.shape[-1], 1)) if variance.ndim == 2 else variance.shape[0]
    for start in range(0, variance.shape[0], rows):
        variance[start : start + rows] += variance_convolved[start : start + rows] * w_c
    new_psf = _convolve_psf(psf, correction.kernel) if psf is not None else None
    return DecorrelationResult(image=image, variance=variance, psf=new_psf, correction=correction)
