"""Alard–Lupton kernel basis: Gaussians times polynomials, with Rubin's defaults.

The PSF-matching kernel is a linear combination of basis images

.. math::

    B_{g,i,j}(u, v) = G_{\\sigma_g}(u, v)\\, (u/h)^i\\, (v/h)^j, \\qquad i + j \\le d_g,

with three Gaussian widths :math:`\\sigma_g` and polynomial degrees ``(4, 2, 2)``
(Alard & Lupton 1998; ip_diffim ``makeKernelBasisList``). ``h`` is the kernel
half-width, so the polynomial arguments run over [-1, 1].

The basis is renormalised as ip_diffim does: the first image sums to one, every
other image sums to zero (it had the first image, scaled by its own sum,
subtracted) and has unit L2 norm. The kernel sum — the photometric scaling
between the two images — is then the coefficient of the first basis image alone.

Every raw image is separable, ``G(u) u^i  x  G(v) v^j``; the renormalised basis
is stored as a matrix ``transform`` acting on the raw separable images so that
convolutions can be done with 1-d passes (see `diapipe.diffim.convolve`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SIGMA_TO_FWHM",
    "KernelBasis",
    "alard_lupton_sigmas",
    "basis_for_psfs",
    "make_alard_lupton_basis",
]

SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))

#: ip_diffim defaults (AlardLuptonSubtractConfig / PsfMatchConfigAL).
DEFAULT_SIGMAS_PIX = (0.7, 1.5, 3.0)
DEFAULT_DEGREES = (4, 2, 2)
DEFAULT_BETA = 2.0
DEFAULT_MIN_SIGMA_PIX = 0.7
DEFAULT_MIN_SIGMA_DECONV_PIX = 0.4
DEFAULT_DEGREE_DECONV = 3
DEFAULT_SIZE_FWHM_SCALING = 6.0
DEFAULT_SIZE_MIN = 21
DEFAULT_SIZE_MAX = 35


def alard_lupton_sigmas(
    convolved_sigma_pix: float | None,
    target_sigma_pix: float | None,
    *,
    beta: float = DEFAULT_BETA,
    min_sigma_pix: float = DEFAULT_MIN_SIGMA_PIX,
    min_sigma_deconv_pix: float = DEFAULT_MIN_SIGMA_DECONV_PIX,
    degrees=DEFAULT_DEGREES,
    degree_deconv: int = DEFAULT_DEGREE_DECONV,
    size_fwhm_scaling: float = DEFAULT_SIZE_FWHM_SCALING,
    size_min: int = DEFAULT_SIZE_MIN,
    size_max: int = DEFAULT_SIZE_MAX,
) -> tuple[list[float], list[int], int]:
    """Gaussian widths, polynomial degrees and kernel size for a PSF pair.

    Parameters
    ----------
    convolved_sigma_pix : `float` or `None`
        Gaussian-equivalent PSF sigma of the image that will be convolved (the
        template in ``convolveTemplate`` mode). `None` gives the unscaled defaults.
    target_sigma_pix : `float` or `None`
        PSF sigma of the image it is matched to.

    Returns
    -------
    sigmas_pix, degrees, kernel_size
        Kernel size is ``int(6 * max(sigmas))`` made odd and clipped to [21, 35].

    Notes
    -----
    Convolution (target wider): ``w = sqrt(target² - convolved²)`` floored at
    0.7 px; widths ``[w/β, w, wβ]`` when ``w/β`` is above the floor, otherwise
    ``[w, wβ, wβ²]`` (ip_diffim's rule). Deconvolution (target narrower): the
    floor is 0.4 px and the widths follow ip_diffim's sum-of-Gaussians
    deconvolution series built from ``[w, wβ, wβ²]``, all with degree 3.

    >>> [round(s, 3) for s in alard_lupton_sigmas(1.6, 2.2)[0]]
    [0.755, 1.51, 3.02]
    """
    degrees = [int(d) for d in degrees]
    n_gauss = len(degrees)
    if convolved_sigma_pix is None or target_sigma_pix is None or convolved_sigma_pix == target_sigma_pix:
        sigmas = list(DEFAULT_SIGMAS_PIX[:n_gauss])
    elif target_sigma_pix > convolved_sigma_pix:
        w = max(np.sqrt(target_sigma_pix**2 - convolved_sigma_pix**2), min_sigma_pix)
        sigmas = [w / beta, w] if (w / beta > min_sigma_pix and n_gauss > 1) else [w]
        while len(sigmas) < n_gauss:
            sigmas.append(sigmas[-1] * beta)
        sigmas = [float(s) for s in sigmas[:n_gauss]]
    else:
        w = max(np.sqrt(convolved_sigma_pix**2 - target_sigma_pix**2), min_sigma_deconv_pix)
        s0, s1, s2 = w, w * beta, w * beta**2
        sigmas = []
        for n in range(3):
            for j in range(n):
                sigmas.append(float(np.sqrt((n - j) * s1**2 + j * s2**2 - (n + 1) * s0**2)))
        sigmas.sort()
        degrees = [int(degree_deconv)] * len(sigmas)
    size = int(size_fwhm_scaling * max(sigmas))
    size += 0 if size % 2 else 1
    size = int(min(size_max, max(size, size_min)))
    return sigmas, degrees, size


@dataclass(frozen=True)
class KernelBasis:
    """A renormalised Alard–Lupton basis and its separable factorisation.

    Attributes
    ----------
    images : `numpy.ndarray`, shape (n_basis, K, K)
        Basis images indexed ``[b, y, x]``; centre pixel ``K // 2`` is zero lag.
    transform : `numpy.ndarray`, shape (n_basis, n_raw)
        ``images = transform @ raw`` with ``raw[r] = outer(fy[r], fx[r])``.
    fx, fy : `numpy.ndarray`, shape (n_raw, K)
        1-d factors of the raw separable images.
    sigmas_pix, degrees : `tuple`
        The Gaussian widths and polynomial degrees used.
    """

    images: np.ndarray
    transform: np.ndarray
    fx: np.ndarray
    fy: np.ndarray
    sigmas_pix: tuple
    degrees: tuple

    @property
    def size(self) -> int:
        return self.images.shape[1]

    @property
    def n_basis(self) -> int:
        return self.images.shape[0]

    def kernel(self, coefficients: np.ndarray) -> np.ndarray:
        """The kernel image ``sum_b coefficients[b] * images[b]``."""
        return np.tensordot(np.asarray(coefficients, float), self.images, axes=(0, 0))


def make_alard_lupton_basis(sigmas_pix, degrees, size: int) -> KernelBasis:
    """Build the renormalised basis for given widths, degrees and (odd) size.

    >>> basis = make_alard_lupton_basis([0.75, 1.5, 3.0], [4, 2, 2], 21)
    >>> basis.n_basis, round(float(basis.images[0].sum()), 12), abs(float(basis.images[5].sum())) < 1e-12
    (27, 1.0, True)
    """
    size = int(size)
    if size % 2 != 1 or size < 3:
        raise ValueError(f"Kernel size must be odd and >= 3, got {size}")
    if len(sigmas_pix) != len(degrees):
        raise ValueError(f"{len(sigmas_pix)} sigmas but {len(degrees)} degrees")
    half = size // 2
    lag = np.arange(-half, half + 1, dtype=float)
    scaled = lag / half
    fx, fy = [], []
    for sigma, degree in zip(sigmas_pix, degrees):
        gauss = np.exp(-0.5 * lag**2 / sigma**2)
        for total in range(int(degree) + 1):
            for j in range(total + 1):
                i = total - j
                fx.append(gauss * scaled**i)
                fy.append(gauss * scaled**j)
    fx = np.array(fx)
    fy = np.array(fy)
    n_raw = len(fx)
    raw_sums = fx.sum(axis=1) * fy.sum(axis=1)
    raw_norms = np.sqrt((fx**2).sum(axis=1) * (fy**2).sum(axis=1))
    transform = np.zeros((n_raw, n_raw))
    transform[0, 0] = 1.0 / raw_sums[0]
    for r in range(1, n_raw):
        row = np.zeros(n_raw)
        if abs(raw_sums[r]) > 1e-10 * raw_norms[r] * size:
            row[r] = 1.0 / raw_sums[r]
            row -= transform[0]
        else:
            row[r] = 1.0
        transform[r] = row
    raw_images = fy[:, :, None] * fx[:, None, :]
    images = np.tensordot(transform, raw_images, axes=(1, 0))
    # Unit L2 norm for every image but the first, as ip_diffim's renormalisation.
    norms = np.sqrt((images[1:] ** 2).sum(axis=(1, 2)))
    transform[1:] /= norms[:, None]
    images[1:] /= norms[:, None, None]
    return KernelBasis(
        images=images,
        transform=transform,
        fx=fx,
        fy=fy,
        sigmas_pix=tuple(float(s) for s in sigmas_pix),
        degrees=tuple(int(d) for d in degrees),
    )


def basis_for_psfs(convolved_sigma_pix: float | None, target_sigma_pix: float | None, **kwargs) -> KernelBasis:
    """`alard_lupton_sigmas` then `make_alard_lupton_basis` (keyword options pass through)."""
    sigmas, degrees, size = alard_lupton_sigmas(convolved_sigma_pix, target_sigma_pix, **kwargs)
    return make_alard_lupton_basis(sigmas, degrees, size)
