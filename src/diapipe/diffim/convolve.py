"""Apply a spatially varying matching kernel to a whole image, with variance and mask.

Because the kernel is ``K(x, y) = sum_p P_p(u, v) K_p`` (``P_p`` the spatial
monomials, ``K_p`` fixed images: the basis combined with the spatial
coefficients), convolving with it needs only one convolution per spatial term:

.. math::

    (I \\ast K)(x, y) = \\sum_p P_p(u, v)\\, (I \\ast K_p)(x, y),

three for a first-order kernel, independent of the number of basis images. The
variance is propagated exactly through the squared kernel,
``V * K² = sum_{p,q} P_p P_q (V * (K_p K_q))`` (six terms for order 1), and mask
planes are OR-ed over the kernel footprint. The convolutions use overlap-add FFTs
(`scipy.signal.oaconvolve`), whose cost grows only logarithmically with kernel size.

Pixels within ``K // 2`` of the image edge see the zero padding: they are flagged
EDGE.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter
from scipy.signal import oaconvolve

from ..exposure import masks
from .kernel_fit import KernelSolution, normalised_position

__all__ = [
    "convolve_image",
    "convolve_variance",
    "convolve_with_solution",
    "grow_mask",
    "spatial_weight_maps",
]

#: Planes OR-ed over the kernel footprint when an image is convolved.
GROWN_PLANES = ("BAD", "SAT", "INTRP", "CR", "EDGE", "SUSPECT", "NO_DATA", "SAT_TEMPLATE", "STREAK")


def spatial_weight_maps(shape, bbox, order: int, xy0=(0, 0), dtype=np.float64) -> list:
    """The spatial monomials ``P_p(u, v)`` as lazily broadcastable (ny, 1) x (1, nx) factors.

    Returns a list of ``(column_factor, row_factor)`` pairs so ``P_p = col * row``
    (every monomial ``u^i v^j`` is separable); multiplying by the broadcast pair
    avoids building full-size weight maps.
    """
    ny, nx = shape
    u, _ = normalised_position(np.arange(nx) + xy0[0], 0.0, bbox)
    _, v = normalised_position(0.0, np.arange(ny) + xy0[1], bbox)
    pairs = []
    for degree in range(order + 1):
        for pv in range(degree + 1):
            pairs.append(((v**pv).astype(dtype)[:, None], (u ** (degree - pv)).astype(dtype)[None, :]))
    return pairs


def _conv(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return oaconvolve(image, kernel.astype(image.dtype), mode="same")


def convolve_image(image: np.ndarray, solution: KernelSolution, xy0=(0, 0)) -> np.ndarray:
    """``image * kernel(x, y)`` for a spatially varying `KernelSolution` (background not added).

    Parameters
    ----------
    image : `numpy.ndarray`
        Finite values only (fill masked/NaN pixels first).
    solution : `KernelSolution`
    xy0 : `tuple`
        Parent coordinates of pixel [0, 0] (the solution's bbox is in parent coordinates).
    """
    if not np.all(np.isfinite(image)):
        raise ValueError("convolve_image: the image has non-finite pixels; fill and mask them first")
    terms = solution.spatial_kernel_images()
    weights = spatial_weight_maps(image.shape, solution.bbox, solution.spatial_order, xy0, image.dtype)
    out = np.zeros_like(image)
    for kernel, (col, row) in zip(terms, weights):
        if not np.any(kernel):
            continue
        out += _conv(image, kernel) * col * row
    return out


def convolve_variance(variance: np.ndarray, solution: KernelSolution, xy0=(0, 0), exact: bool = True) -> np.ndarray:
    """Variance of ``image * kernel(x, y)``: ``variance * kernel(x, y)²``.

    ``exact=True`` expands the squared spatial kernel into products of the spatial
    terms; ``exact=False`` convolves with the squared kernel at the image centre and
    rescales by the local ``sum(kernel²)`` (one convolution; good when the kernel
    varies little over a kernel width, which is always the case for order-1 models).
    """
    if not np.all(np.isfinite(variance)):
        raise ValueError("convolve_variance: the variance has non-finite pixels; fill and mask them first")
    terms = solution.spatial_kernel_images()
    weights = spatial_weight_maps(variance.shape, solution.bbox, solution.spatial_order, xy0, variance.dtype)
    active = [p for p in range(len(terms)) if np.any(terms[p])]
    out = np.zeros_like(variance)
    if exact:
        for a, p in enumerate(active):
            for q in active[a:]:
                factor = 1.0 if p == q else 2.0
                col = weights[p][0] * weights[q][0]
                row = weights[p][1] * weights[q][1]
                out += factor * _conv(variance, terms[p] * terms[q]) * col * row
        return out
    centre = solution.kernel_image()
    out = _conv(variance, centre**2)
    # local sum(K²) = sum_pq P_p P_q <K_p, K_q>
    gram = np.einsum("pij,qij->pq", terms, terms)
    local = np.zeros_like(variance)
    for p in active:
        for q in active:
            local += gram[p, q] * (weights[p][0] * weights[q][0]) * (weights[p][1] * weights[q][1])
    return out * (local / (centre**2).sum())


def grow_mask(mask: np.ndarray, size: int, planes=GROWN_PLANES) -> np.ndarray:
    """OR each of ``planes`` over a ``size`` x ``size`` footprint (other planes dropped).

    Only planes that are set somewhere cost a filter pass.
    """
    out = np.zeros_like(mask)
    for name in planes:
        value = masks.bit(name)
        plane = (mask & value) != 0
        if plane.any():
            grown = maximum_filter(plane.view(np.uint8), size=size, mode="constant") != 0
            out[grown] |= masks.MASK_DTYPE(value)
    return out


def convolve_with_solution(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    solution: KernelSolution,
    *,
    xy0=(0, 0),
    exact_variance: bool = True,
    add_background: bool = True,
):
    """Convolve an (image, variance, mask) triple with a `KernelSolution`.

    Returns ``(image, variance, mask)``: the image plus (optionally) the fitted
    differential background, the variance through the squared kernel, the mask
    grown over the kernel footprint (`GROWN_PLANES` only) with EDGE set within
    ``K // 2`` of the border.

    >>> import numpy as np
    >>> from diapipe.diffim.basis import make_alard_lupton_basis
    >>> from diapipe.diffim.kernel_fit import KernelSolution
    >>> basis = make_alard_lupton_basis([1.0], [0], 7)
    >>> sol = KernelSolution(basis, np.array([[2.0, 0, 0]]), np.zeros(1), 1, 0, (0, 0, 31, 31))
    >>> img, var, msk = convolve_with_solution(np.ones((32, 32)), np.ones((32, 32)),
    ...                                        np.zeros((32, 32), np.int32), sol)
    >>> round(float(img[16, 16]), 6)
    2.0
    """
    out_image = convolve_image(image, solution, xy0)
    if add_background:
        out_image += solution.background_image(image.shape, xy0).astype(out_image.dtype)
    out_var = convolve_variance(variance, solution, xy0, exact=exact_variance)
    out_mask = grow_mask(mask, solution.size)
    half = solution.size // 2
    edge = np.zeros(mask.shape, bool)
    edge[:half] = edge[-half:] = True
    edge[:, :half] = edge[:, -half:] = True
    masks.set_plane(out_mask, edge, "EDGE")
    return out_image, out_var, out_mask

