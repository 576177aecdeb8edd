"""PSF models: pixelized kernels whose pixels vary as a polynomial over the image.

One class serves every stage: a constant Gaussian (simulator, tests), a PSF fit
to stars in characterizeImage (polynomial order 1-2), the PSF of a warp or a
coadd (fit to warped input PSFs), and the PSF of a difference image.

Conventions: arrays are indexed ``[y, x]``; pixel centres are integers, the
centre of the first pixel is (0, 0) (as sep). A kernel image has odd size K and
its centre pixel ``K // 2`` is the PSF centre. Kernels are normalised to sum 1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PixelPsf", "polynomial_terms", "fractional_shift"]


def polynomial_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Monomials of total degree <= ``order`` in (u, v), shape (n_terms, *u.shape).

    Order of terms: 1, u, v, u², uv, v², u³, ... (by degree, then decreasing power of u).
    """
    u = np.asarray(u, dtype=float)
    v = np.asarray(v, dtype=float)
    terms = []
    for degree in range(order + 1):
        for pv in range(degree + 1):
            terms.append(u ** (degree - pv) * v**pv)
    return np.array(terms)


def fractional_shift(kernel: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift a well-sampled kernel by (dx, dy) pixels with a Fourier phase ramp.

    Exact for band-limited images; a PSF sampled at >= 2 px FWHM is close enough.
    """
    if dx == 0 and dy == 0:
        return kernel.copy()
    ny, nx = kernel.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    phase = np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(np.fft.rfft2(kernel) * phase, s=kernel.shape)


class PixelPsf:
    """A PSF whose kernel pixels are polynomials of position.

    ``kernel(x, y) = sum_k P_k(u, v) * basis[k]``, with ``u, v`` the position
    scaled to [-1, 1] over ``bbox = (x_min, y_min, x_max, y_max)`` (inclusive
    pixel coordinates, in the parent frame of the image the PSF belongs to).

    Parameters
    ----------
    basis : `numpy.ndarray`, shape (n_terms, K, K)
        One kernel image per polynomial term (see `polynomial_terms`).
    order : `int`
        Polynomial order; ``n_terms == (order + 1) * (order + 2) // 2``.
    bbox : `tuple` of 4 `float`
        Region over which positions are normalised.

    Examples
    --------
    >>> psf = PixelPsf.gaussian(sigma=2.0, size=25)
    >>> round(float(psf.compute_kernel_image(10, 10).sum()), 6)
    1.0
    >>> round(psf.sigma(), 2)
    2.0
    """

    def __init__(self, basis: np.ndarray, order: int, bbox=(0.0, 0.0, 1.0, 1.0)):
        basis = np.asarray(basis, dtype=np.float64)
        if basis.ndim == 2:
            basis = basis[None]
        n_terms = (order + 1) * (order + 2) // 2
        if basis.shape[0] != n_terms:
            raise ValueError(f"PSF basis has {basis.shape[0]} terms; order {order} needs {n_terms}")
        if basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise ValueError(f"PSF kernels must be square with odd size, got {basis.shape[1:]}")
        self.basis = basis
        self.order = int(order)
        self.bbox = tuple(float(b) for b in bbox)

    # -- constructors ------------------------------------------------------
    @classmethod
    def gaussian(cls, sigma: float, size: int | None = None, bbox=(0.0, 0.0, 1.0, 1.0)) -> PixelPsf:
        """A constant circular Gaussian of width ``sigma`` pixels."""
        if size is None:
            size = 2 * int(np.ceil(5 * sigma)) + 1
        half = size // 2
        y, x = np.mgrid[-half : half + 1, -half : half + 1]
        kernel = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
        return cls(kernel / kernel.sum(), 0, bbox)

    @classmethod
    def constant(cls, kernel: np.ndarray, bbox=(0.0, 0.0, 1.0, 1.0)) -> PixelPsf:
        """A PSF that is the same image everywhere."""
        kernel = np.asarray(kernel, dtype=np.float64)
        return cls(kernel / kernel.sum(), 0, bbox)

    # -- evaluation --------------------------------------------------------
    @property
    def kernel_size(self) -> int:
        return self.basis.shape[1]

    def _normalised(self, x, y):
        x0, y0, x1, y1 = self.bbox
        u = (2.0 * np.asarray(x, float) - (x0 + x1)) / max(x1 - x0, 1.0)
        v = (2.0 * np.asarray(y, float) - (y0 + y1)) / max(y1 - y0, 1.0)
        return u, v

    def compute_kernel_image(self, x: float, y: float) -> np.ndarray:
        """The PSF at (x, y), centred on the central pixel, summing to 1."""
        u, v = self._normalised(x, y)
        weights = polynomial_terms(u, v, self.order)
        kernel = np.tensordot(weights, self.basis, axes=(0, 0))
        return kernel / kernel.sum()

    def compute_image(self, x: float, y: float) -> np.ndarray:
        """The PSF at (x, y), shifted so its centre sits at the sub-pixel
        position of (x, y) relative to the central pixel (for PSF photometry:
        pixel ``K//2`` of the result corresponds to pixel ``round(x)``)."""
        kernel = self.compute_kernel_image(x, y)
        dx = float(x) - np.round(x)
        dy = float(y) - np.round(y)
        return fractional_shift(kernel, dx, dy)

    def moments(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Second moments (Ixx, Iyy, Ixy) in px² of the kernel at (x, y) (default: bbox centre)."""
        if x is None or y is None:
            x = 0.5 * (self.bbox[0] + self.bbox[2])
            y = 0.5 * (self.bbox[1] + self.bbox[3])
        kernel = self.compute_kernel_image(x, y)
        half = self.kernel_size // 2
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        weight = kernel / kernel.sum()
        cx = (weight * xx).sum()
        cy = (weight * yy).sum()
        ixx = (weight * (xx - cx) ** 2).sum()
        iyy = (weight * (yy - cy) ** 2).sum()
        ixy = (weight * (xx - cx) * (yy - cy)).sum()
        return float(ixx), float(iyy), float(ixy)

    def sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Determinant radius (Ixx·Iyy − Ixy²)^(1/4) in pixels: a Gaussian's sigma."""
        ixx, iyy, ixy = self.moments(x, y)
        return float(max(ixx * iyy - ixy**2, 0.0) ** 0.25)

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Gaussian-equivalent FWHM in pixels (2.3548 · sigma)."""
        return 2.0 * np.sqrt(2.0 * np.log(2.0)) * self.sigma(x, y)

    def __repr__(self) -> str:
        return f"PixelPsf(order={self.order}, kernel_size={self.kernel_size}, sigma={self.sigma():.3f})"

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, PixelPsf)
            and self.order == other.order
            and self.bbox == other.bbox
            and np.array_equal(self.basis, other.basis)
        )
