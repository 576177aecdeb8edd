"""Apply a spatially varying matching kernel to a whole image, with variance and mask.

Because the kernel is ``K(x, y) = sum_p P_p(u, v) K_p`` (``P_p`` the spatial
monomials, ``K_p`` fixed images: the basis combined with the spatial
coefficients), convolving with it needs only one convolution per spatial term:

.. math::

    (I \\ast K)(x, y) = \\sum_p P_p(u, v)\\, (I \\ast K_p)(x, y),

three for a first-order kernel, independent of the number of basis images. The
variance is propagated exactly through the squared kernel,
``V * K² = sum_{p,q} P_p P_q (V * (K_p K_q))`` (six terms for order 1), and mask
planes are OR-ed over the kernel footprint (all planes at once, `grow_mask`).

Convolutions are overlap-save on ~`BLOCK_PX`² FFT blocks, float32 for float32
input (`_BlockConvolver`): each block of the image is transformed once, every
spatial term costs one product and one inverse transform of that block, and the
terms are weighted by their monomials and summed (with the background) while the
block is in cache, so no full-frame convolution of a single term is stored. At
4096² this halves the CPU time of whole-frame transforms padded to 4320², whose
passes are bound by memory traffic rather than arithmetic; the kernels'
transforms are block-sized. Results equal a whole-frame FFT convolution to
float32 round-off (~1e-7 of the image scale).

By default (``exact=False``) the variance is convolved once, with the squared
centre kernel, and rescaled pixel by pixel by the local ``sum(K²)``. On the
benchmark pair (benchmarks/bench_subtract.py, 4096², order-1 kernel) it differs from
the exact propagation by a median 1e-7 relative, 0.5% at the 99.9th percentile and
2.7% at worst (steep variance gradients at bright stars); the exact path costs six
convolutions instead of one. The decorrelated difference does
not use this plane at all (its variance comes from the unconvolved inputs).

Pixels within ``K // 2`` of the image edge see the zero padding: they are flagged
EDGE.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from ..exposure import masks
from .kernel_fit import KernelSolution, normalised_position

__all__ = [
    "convolve_image",
    "convolve_variance",
    "convolve_with_solution",
    "fft_convolve_same",
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


#: Edge (px) of the FFT blocks of the overlap-save convolutions. A 4096² float32 frame
#: padded to one 4320² transform spends most of its time waiting on memory (the column
#: pass strides through 75 MB); ~500² blocks stay in cache and their transforms are
#: shorter, so the same convolution costs about half the CPU (measured, one core:
#: r2c 0.17 -> 0.11 s, c2r 0.22 -> 0.11 s per 4096² frame), and the kernel transforms
#: are block-sized instead of frame-sized.
BLOCK_PX = 512


def _axis_tiles(n: int, half: int, block: int) -> tuple[int, int, int]:
    """Output tile length, FFT length and tile count along one axis of length ``n``.

    Tiles are as even as possible, so the last one is not a sliver; a single tile
    (small images) is the whole axis padded to a fast length, as a plain FFT
    convolution would be.
    """
    max_tile = max(block - 2 * half, 4 * half, 16)
    n_tiles = -(-n // max_tile)
    tile = -(-n // n_tiles)
    return tile, scipy.fft.next_fast_len(tile + 2 * half, real=True), n_tiles


class _BlockConvolver:
    """Overlap-save 'same' convolution of images with a few fixed kernels, block by block.

    Every kernel is embedded, centre on centre, in a common odd ``(2hy+1, 2hx+1)``
    footprint and transformed once at the block size. `blocks` transforms each
    zero-padded input block once and yields, per output tile, the tile of every
    kernel's convolution. The circular convolution of a block of ``L`` rows
    starting ``hy`` rows above the tile is exact (no wrap-around) in rows
    ``[2hy, L)``, which hold the tile.
    """

    def __init__(self, shape, kernels, dtype, block: int = BLOCK_PX):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        hy = max(k.shape[0] // 2 for k in kernels)
        hx = max(k.shape[1] // 2 for k in kernels)
        self.half = (hy, hx)
        ny, nx = self.shape
        self.tile_y, self.len_y, self.n_y = _axis_tiles(ny, hy, block)
        self.tile_x, self.len_x, self.n_x = _axis_tiles(nx, hx, block)
        self.kernel_fts = []
        for kernel in kernels:
            ky, kx = kernel.shape
            padded = np.zeros((self.len_y, self.len_x), self.dtype)
            oy, ox = hy - ky // 2, hx - kx // 2
            padded[oy : oy + ky, ox : ox + kx] = kernel
            self.kernel_fts.append(scipy.fft.rfft2(padded))

    def tiles(self):
        """Output tiles ``(slice_y, slice_x)`` in the order `blocks` yields them."""
        ny, nx = self.shape
        for iy in range(self.n_y):
            y0 = iy * self.tile_y
            for ix in range(self.n_x):
                x0 = ix * self.tile_x
                yield slice(y0, min(y0 + self.tile_y, ny)), slice(x0, min(x0 + self.tile_x, nx))

    def blocks(self, image: np.ndarray):
        """Yield ``(slice_y, slice_x, [tile of image * kernel_k])`` over the whole output."""
        ny, nx = self.shape
        hy, hx = self.half
        buf = np.zeros((self.len_y, self.len_x), self.dtype)
        prod = np.empty((self.len_y, self.len_x // 2 + 1), np.result_type(self.dtype, np.complex64))
        for sy, sx in self.tiles():
            # input rows [y0 - hy, y1 + hy) land in buffer rows [0, y1 - y0 + 2hy)
            in_y0, in_y1 = max(sy.start - hy, 0), min(sy.stop + hy, ny)
            in_x0, in_x1 = max(sx.start - hx, 0), min(sx.stop + hx, nx)
            by, bx = in_y0 - (sy.start - hy), in_x0 - (sx.start - hx)
            buf.fill(0)
            buf[by : by + in_y1 - in_y0, bx : bx + in_x1 - in_x0] = image[in_y0:in_y1, in_x0:in_x1]
            image_ft = scipy.fft.rfft2(buf)
            h, w = sy.stop - sy.start, sx.stop - sx.start
            out = []
            for kernel_ft in self.kernel_fts:
                np.multiply(image_ft, kernel_ft, out=prod)
                full = scipy.fft.irfft2(prod, s=(self.len_y, self.len_x), overwrite_x=True)
                out.append(full[2 * hy : 2 * hy + h, 2 * hx : 2 * hx + w])
            yield sy, sx, out


def _work_dtype(image: np.ndarray):
    return np.float32 if image.dtype == np.float32 else np.float64


def fft_convolve_same(image: np.ndarray, kernels) -> list:
    """Convolve ``image`` with several centred kernels ('same' size, zero padding).

    Overlap-save on FFT blocks of ~`BLOCK_PX` px (`_BlockConvolver`): each input
    block is transformed once and each kernel costs one product and one inverse
    transform per block. Computation is float32 for float32 input (the inputs' own
    precision; FFT round-off is ~1e-7 of the image scale), else float64.

    >>> import numpy as np
    >>> img = np.zeros((9, 9), np.float32); img[4, 4] = 1.0
    >>> k = np.arange(9.0).reshape(3, 3)
    >>> out = fft_convolve_same(img, [k])[0]
    >>> bool(np.allclose(out[3:6, 3:6], k, atol=1e-6)), out.dtype.name
    (True, 'float32')
    """
    image = np.asarray(image)
    dtype = _work_dtype(image)
    kernels = [np.asarray(k) for k in kernels]
    if not kernels:
        return []
    conv = _BlockConvolver(image.shape, kernels, dtype)
    out = [np.empty(image.shape, dtype) for _ in kernels]
    for sy, sx, tiles in conv.blocks(image):
        for dst, tile in zip(out, tiles):
            dst[sy, sx] = tile
    return out


def _weighted_tile(tiles, weights, sy, sx, factors=None):
    """``sum_p factor_p P_p * tile_p`` on one output tile (``P_p = col_p row_p``).

    ``weights[p]`` is a ``(col, row)`` pair as `spatial_weight_maps` returns; a
    factor that is identically one (the constant monomial) costs nothing.
    """
    acc = None
    for p, tile in enumerate(tiles):
        # tiles are views of fresh inverse transforms: scaled in place
        col, row = weights[p]
        if factors is not None and factors[p] != 1:
            tile *= factors[p]
        if not _is_one(col):
            tile *= col[sy]
        if not _is_one(row):
            tile *= row[:, sx]
        if acc is None:
            acc = tile
        else:
            acc += tile
    return acc


def _is_one(factor: np.ndarray) -> bool:
    return bool(factor.size and factor.flat[0] == 1 and factor.min() == 1 and factor.max() == 1)


def _monomial_powers(order: int) -> list:
    """``(power of u, power of v)`` of each `polynomial_terms` monomial, in order."""
    return [(degree - pv, pv) for degree in range(order + 1) for pv in range(degree + 1)]


def _quadratic_factors(solution: KernelSolution, gram: np.ndarray, active, shape, xy0, dtype):
    """``sum_pq gram[p, q] P_p P_q`` as ``sum_j v^j (ny, 1) x R_j(u) (1, nx)`` factor pairs.

    The quadratic form in the monomials is a polynomial of position; grouping it by
    powers of ``v`` leaves ``2 * order + 1`` outer products per tile.
    """
    ny, nx = shape
    u, _ = normalised_position(np.arange(nx) + xy0[0], 0.0, solution.bbox)
    _, v = normalised_position(0.0, np.arange(ny) + xy0[1], solution.bbox)
    powers = _monomial_powers(solution.spatial_order)
    n_pow = 2 * solution.spatial_order + 1
    coeff = np.zeros((n_pow, n_pow))  # [power of v, power of u]
    for p in active:
        for q in active:
            coeff[powers[p][1] + powers[q][1], powers[p][0] + powers[q][0]] += gram[p, q]
    factors = []
    for j in range(n_pow):
        if np.any(coeff[j]):
            row = np.polynomial.polynomial.polyval(u, coeff[j])
            factors.append(((v**j).astype(dtype)[:, None], row.astype(dtype)[None, :]))
    return factors


def _separable_sum(factors, sy, sx) -> np.ndarray:
    """``sum_j col_j[sy] * row_j[sx]`` on one tile."""
    out = None
    for col, row in factors:
        term = col[sy] * row[:, sx]
        out = term if out is None else out.__iadd__(term)
    return out


def _active_terms(terms) -> list:
    return [p for p in range(len(terms)) if np.any(terms[p])]


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array.sum(dtype=np.float64)) and not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: non-finite pixels; fill and mask them first")


def convolve_image(image: np.ndarray, solution: KernelSolution, xy0=(0, 0), *, add_background: bool = False) -> np.ndarray:
    """``image * kernel(x, y)`` for a spatially varying `KernelSolution`.

    Parameters
    ----------
    image : `numpy.ndarray`
        Finite values only (fill masked/NaN pixels first).
    solution : `KernelSolution`
    xy0 : `tuple`
        Parent coordinates of pixel [0, 0] (the solution's bbox is in parent coordinates).
    add_background : `bool`
        Also add the fitted differential background (tile by tile, no full-frame
        float64 model).

    The spatial terms ``image * K_p`` are computed block by block and weighted by
    their monomials ``P_p`` in the same block, so no full-frame convolution of a
    single term is ever stored.
    """
    _check_finite(image, "convolve_image: the image")
    dtype = _work_dtype(image)
    terms = solution.spatial_kernel_images()
    weights = spatial_weight_maps(image.shape, solution.bbox, solution.spatial_order, xy0, dtype)
    active = _active_terms(terms)
    out = np.zeros(image.shape, dtype)
    if not active:
        if add_background:
            out += solution.background_image(image.shape, xy0, dtype=dtype)
        return out
    conv = _BlockConvolver(image.shape, [terms[p] for p in active], dtype)
    active_weights = [weights[p] for p in active]
    for sy, sx, tiles in conv.blocks(image):
        tile = _weighted_tile(tiles, active_weights, sy, sx)
        if add_background:
            tile += solution.background_image(tile.shape, (xy0[0] + sx.start, xy0[1] + sy.start), dtype=dtype)
        out[sy, sx] = tile
    return out


def convolve_variance(variance: np.ndarray, solution: KernelSolution, xy0=(0, 0), exact: bool = True) -> np.ndarray:
    """Variance of ``image * kernel(x, y)``: ``variance * kernel(x, y)²``.

    ``exact=True`` expands the squared spatial kernel into products of the spatial
    terms; ``exact=False`` convolves with the squared kernel at the image centre and
    rescales by the local ``sum(kernel²)`` (one convolution; good when the kernel
    varies little over a kernel width, which is always the case for order-1 models).
    """
    _check_finite(variance, "convolve_variance: the variance")
    dtype = _work_dtype(variance)
    terms = solution.spatial_kernel_images()
    weights = spatial_weight_maps(variance.shape, solution.bbox, solution.spatial_order, xy0, np.float64)
    active = _active_terms(terms)
    if not active:
        return np.zeros(variance.shape, dtype)
    out = np.empty(variance.shape, dtype)
    if exact:
        pairs = [(p, q) for a, p in enumerate(active) for q in active[a:]]
        conv = _BlockConvolver(variance.shape, [terms[p] * terms[q] for p, q in pairs], dtype)
        pair_weights = [((weights[p][0] * weights[q][0]).astype(dtype), (weights[p][1] * weights[q][1]).astype(dtype))
                        for p, q in pairs]
        factors = [dtype(1.0 if p == q else 2.0) for p, q in pairs]
        for sy, sx, tiles in conv.blocks(variance):
            out[sy, sx] = _weighted_tile(tiles, pair_weights, sy, sx, factors)
        return out
    centre = solution.kernel_image()
    # local sum(K²) = sum_pq P_p P_q <K_p, K_q>: a polynomial of position, built
    # per tile from the separable factors on the (ny, 1) x (1, nx) grids.
    gram = np.einsum("pij,qij->pq", terms, terms) / (centre**2).sum()
    local = _quadratic_factors(solution, gram, active, variance.shape, xy0, dtype)
    conv = _BlockConvolver(variance.shape, [centre**2], dtype)
    for sy, sx, (tile,) in conv.blocks(variance):
        np.multiply(tile, _separable_sum(local, sy, sx), out=out[sy, sx])
    return out


def _or_filter1d(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Bitwise OR over a ``size``-long window along ``axis`` (zero outside).

    The window of output ``i`` is ``[i - size // 2, i - size // 2 + size - 1]``, as
    `scipy.ndimage.maximum_filter`'s. Built by doubling: ``OR`` over 1, 2, 4, ...
    pixels, then two overlapping power-of-two windows cover ``size``; ~log2(size)
    whole-array ``|`` passes for every plane at once, instead of one filter per plane.
    """
    half = size // 2
    n = a.shape[axis]
    a = np.moveaxis(a, axis, 0)
    padded = np.zeros((n + size - 1,) + a.shape[1:], a.dtype)
    padded[half : half + n] = a
    width, cur = 1, padded  # cur[j] = OR of padded[j : j + width]
    while 2 * width <= size:
        m = cur.shape[0] - width
        nxt = cur[:m].copy() if cur is padded else cur[:m]
        nxt |= cur[width : width + m]
        cur, width = nxt, 2 * width
    out = cur[:n] | cur[size - width : size - width + n] if width < size else cur[:n]
    return np.moveaxis(out, 0, axis)


def grow_mask(mask: np.ndarray, size: int, planes=GROWN_PLANES) -> np.ndarray:
    """OR each of ``planes`` over a ``size`` x ``size`` footprint (other planes dropped).

    All planes are grown together with separable bitwise-OR windows (`_or_filter1d`),
    in uint16 when the planes' bits fit; a mask with none of them set costs one pass.
    """
    selected = masks.bits(planes)
    kept = mask & masks.MASK_DTYPE(selected)
    if not kept.any():
        return kept
    work = kept.astype(np.uint16) if selected < (1 << 16) else kept
    grown = _or_filter1d(_or_filter1d(work, size, 0), size, 1)
    return grown.astype(mask.dtype, copy=False)


def convolve_with_solution(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    solution: KernelSolution,
    *,
    xy0=(0, 0),
    exact_variance: bool = False,
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
    out_image = convolve_image(image, solution, xy0, add_background=add_background)
    out_var = convolve_variance(variance, solution, xy0, exact=exact_variance)
    out_mask = grow_mask(mask, solution.size)
    half = solution.size // 2
    edge = np.zeros(mask.shape, bool)
    edge[:half] = edge[-half:] = True
    edge[:, :half] = edge[:, -half:] = True
    masks.set_plane(out_mask, edge, "EDGE")
    return out_image, out_var, out_mask

