"""Fit a spatially varying Alard–Lupton PSF-matching kernel on stamps around stars.

Model, for every stamp ``n`` centred on a kernel source at ``(x_n, y_n)``:

.. math::

    T(\\mathbf{r}) \\approx \\sum_b c_b(x_n, y_n)\\, (S \\ast B_b)(\\mathbf{r}) + \\mathrm{bg}(x_n, y_n),

``S`` the image being convolved ("source": the template in convolveTemplate
mode), ``T`` the image it is matched to ("target"), ``B_b`` the basis of
`diapipe.diffim.basis`. The coefficients are polynomials of position
(order 1 by default, the first — the kernel sum, i.e. the photometric scaling —
constant over the image as in ip_diffim's AL solution) and the differential
background is a polynomial of order 2. As in ip_diffim the spatial functions are
evaluated at the stamp centre.

Steps: per-stamp weighted least squares (basis + constant background), rejection
of stamps with poor fits or outlying kernel sums, then the spatial fit to all
remaining stamps at once, with up to ``max_iterations`` rounds of rejecting
stamps whose residual chi² (under the spatial model) is an outlier. Everything
works on the per-stamp normal equations, so each stamp is convolved only once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..exposure import masks
from ..exposure.psf import polynomial_terms
from .basis import KernelBasis
from .noise_bias import debiased_solve, source_noise_normal

__all__ = [
    "BadPsfMatchError",
    "KernelFitResult",
    "KernelSolution",
    "TooFewKernelSourcesError",
    "convolve_stamps",
    "fit_psf_matching_kernel",
    "normalised_position",
    "select_kernel_sources",
]

#: Stamps processed together in `fit_psf_matching_kernel`: large enough for batched
#: BLAS products, small enough that the (stamps x pixels x basis) float64 design
#: matrices (~0.2 MB per stamp) stay in cache instead of being fresh 50 MB arrays.
_STAMP_CHUNK = 32

#: Mask planes that disqualify a kernel stamp (ip_diffim's badMaskPlanes).
STAMP_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP", "SUSPECT")


class TooFewKernelSourcesError(RuntimeError):
    """Fewer usable kernel sources than the fit needs.

    Attributes ``n_found`` and ``n_needed`` hold the numbers (task metadata).
    """

    def __init__(self, n_found: int, n_needed: int, detail: str = ""):
        self.n_found = int(n_found)
        self.n_needed = int(n_needed)
        message = f"Too few kernel sources for PSF matching: found {self.n_found}, need {self.n_needed}"
        super().__init__(message + (f" ({detail})" if detail else ""))


class BadPsfMatchError(RuntimeError):
    """The kernel model cannot match the two PSFs (stamp residual chi² far above 1).

    Attributes ``chi2_per_dof`` (median over used stamps) and ``threshold``.
    """

    def __init__(self, chi2_per_dof: float, threshold: float):
        self.chi2_per_dof = float(chi2_per_dof)
        self.threshold = float(threshold)
        super().__init__(
            f"PSF matching failed: median stamp residual chi2/dof {self.chi2_per_dof:.2f} exceeds "
            f"{self.threshold:.2f}; the PSFs (or the registration) of the two images do not match "
            "within the kernel model"
        )


def normalised_position(x, y, bbox) -> tuple[np.ndarray, np.ndarray]:
    """Map positions to [-1, 1] over ``bbox = (x_min, y_min, x_max, y_max)`` (as `PixelPsf`)."""
    x0, y0, x1, y1 = bbox
    u = (2.0 * np.asarray(x, float) - (x0 + x1)) / max(x1 - x0, 1.0)
    v = (2.0 * np.asarray(y, float) - (y0 + y1)) / max(y1 - y0, 1.0)
    return u, v


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


@dataclass(frozen=True)
class KernelSolution:
    """A spatially varying matching kernel plus differential background.

    ``kernel(x, y) = sum_b sum_p kernel_coeffs[b, p] P_p(u, v) B_b`` and
    ``background(x, y) = sum_q background_coeffs[q] P_q(u, v)``, with
    ``P`` the monomials of `diapipe.exposure.psf.polynomial_terms` and ``(u, v)``
    the position normalised over ``bbox``. Applying it: ``source * kernel + background``
    matches the target image.
    """

    basis: KernelBasis
    kernel_coeffs: np.ndarray  # (n_basis, n_spatial)
    background_coeffs: np.ndarray  # (n_bg,)
    spatial_order: int
    background_order: int
    bbox: tuple

    @property
    def size(self) -> int:
        return self.basis.size

    def spatial_kernel_images(self) -> np.ndarray:
        """Kernels ``K_p`` (n_spatial, K, K) with ``kernel(x, y) = sum_p P_p(u, v) K_p``."""
        return np.tensordot(self.kernel_coeffs.T, self.basis.images, axes=(1, 0))

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The kernel at (x, y) (default: bbox centre), not normalised."""
        if x is None or y is None:
            x = 0.5 * (self.bbox[0] + self.bbox[2])
            y = 0.5 * (self.bbox[1] + self.bbox[3])
        u, v = normalised_position(x, y, self.bbox)
        weights = polynomial_terms(u, v, self.spatial_order)
        return np.tensordot(weights, self.spatial_kernel_images(), axes=(0, 0))

    def kernel_sum(self, x: float | None = None, y: float | None = None) -> float:
        """Photometric scaling (target/source flux ratio) at (x, y)."""
        return float(self.kernel_image(x, y).sum())

    def background(self, x, y) -> np.ndarray:
        """Differential background at positions (x, y) (parent pixel coordinates)."""
        u, v = normalised_position(x, y, self.bbox)
        return np.tensordot(self.background_coeffs, polynomial_terms(u, v, self.background_order), axes=(0, 0))

    def background_image(self, shape, xy0=(0, 0), dtype=np.float64) -> np.ndarray:
        """The background model on an image of ``shape`` whose pixel [0, 0] is at ``xy0``."""
        ny, nx = shape
        u, _ = normalised_position(np.arange(nx) + xy0[0], 0.0, self.bbox)
        _, v = normalised_position(0.0, np.arange(ny) + xy0[1], self.bbox)
        # sum_k c_k v^j u^i = sum_j v^j (sum_i c_ij u^i): one outer product per power of v
        rows = np.zeros((self.background_order + 1, nx))
        k = 0
        for degree in range(self.background_order + 1):
            for pv in range(degree + 1):
                rows[pv] += self.background_coeffs[k] * u ** (degree - pv)
                k += 1
        vpow = np.vander(v, self.background_order + 1, increasing=True)
        return (vpow @ rows).astype(dtype, copy=False)


@dataclass
class KernelFitResult:
    """Kernel solution plus per-stamp diagnostics (arrays indexed like the input positions)."""

    solution: KernelSolution
    used: np.ndarray
    chi2_local: np.ndarray
    chi2_spatial: np.ndarray
    kernel_sum_local: np.ndarray
    n_iterations: int
    median_chi2: float
    metadata: dict = field(default_factory=dict)

    @property
    def n_used(self) -> int:
        return int(self.used.sum())

    @property
    def n_rejected(self) -> int:
        return int((~self.used).sum())


def select_kernel_sources(
    sources,
    mask: np.ndarray,
    half_size: int,
    *,
    sn_min: float = 10.0,
    sn_max: float = 500.0,
    isolation_radius_pix: float | None = None,
    max_sources: int = 1000,
    min_sources: int = 3,
    bad_planes=STAMP_BAD_PLANES,
    mask_half_size: int | None = None,
    spread_cells: int = 8,
) -> np.ndarray:
    """Indices of rows of ``sources`` usable as kernel stamps.

    Parameters
    ----------
    sources : `astropy.table.Table`
        Columns ``x``, ``y`` (pixels, the mask's frame), ``psfFlux``, ``psfFluxErr``
        and ``flags`` (bool or int; nonzero = flagged).
    mask : `numpy.ndarray` of int
        OR of science and template masks.
    half_size : `int`
        Half-size of the region a stamp needs (fit box plus kernel half width):
        the stamp must be inside the image and free of ``bad_planes``.
    isolation_radius_pix : `float`, optional
        No other source (of any brightness) closer than this; default ``half_size``.
    mask_half_size : `int`, optional
        Half-size of the box around the source that must be free of ``bad_planes``;
        default ``half_size``. A smaller box keeps stamps whose outskirts touch a
        masked pixel when the fit gives such pixels zero weight
        (`fit_psf_matching_kernel`'s ``source_bad``/``target_bad``).
    spread_cells : `int`
        When more than ``max_sources`` qualify, the image is cut into
        ``spread_cells`` x ``spread_cells`` cells and sources are taken round-robin,
        brightest first in each cell, so a capped set still covers the whole image
        (the spatial kernel model needs the corners, not just the densest region).

    Returns
    -------
    indices : `numpy.ndarray` of int
        At most ``max_sources``; highest-S/N first when not capped.

    Raises
    ------
    TooFewKernelSourcesError
        When fewer than ``min_sources`` survive (attributes hold the counts).
    """
    x = np.asarray(sources["x"], float)
    y = np.asarray(sources["y"], float)
    flux = np.asarray(sources["psfFlux"], float)
    err = np.asarray(sources["psfFluxErr"], float)
    flags = np.asarray(sources["flags"]) if "flags" in sources.colnames else np.zeros(len(x), bool)
    ny, nx = mask.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        sn = flux / err
    ok = np.isfinite(sn) & (sn >= sn_min) & (sn <= sn_max) & (flags == 0) & np.isfinite(x) & np.isfinite(y)
    xi = np.round(np.where(np.isfinite(x), x, -1e9)).astype(np.int64)
    yi = np.round(np.where(np.isfinite(y), y, -1e9)).astype(np.int64)
    ok &= (xi - half_size >= 0) & (xi + half_size < nx) & (yi - half_size >= 0) & (yi + half_size < ny)
    radius = half_size if isolation_radius_pix is None else isolation_radius_pix
    if len(x) > 1 and radius > 0:
        from scipy.spatial import cKDTree

        finite = np.isfinite(x) & np.isfinite(y)
        tree = cKDTree(np.column_stack([x[finite], y[finite]]))
        counts = np.zeros(len(x), int)
        counts[finite] = np.array([len(n) for n in tree.query_ball_point(tree.data, r=radius)])
        ok &= counts <= 1
    # A stamp is bad if any bad pixel lies within mask_half_size of its centre. Only the
    # candidates' boxes are read (a full-frame box filter of the bad map cost ~0.2 s at
    # 4k x 4k); indices clipped to the image only repeat pixels that are in the box.
    half_mask = half_size if mask_half_size is None else int(mask_half_size)
    bad_bits = masks.bits(bad_planes)
    offsets = np.arange(-half_mask, half_mask + 1)
    candidates = np.flatnonzero(ok)
    for start in range(0, len(candidates), 512):
        cand = candidates[start : start + 512]
        rows = np.clip(yi[cand, None] + offsets, 0, ny - 1)
        cols = np.clip(xi[cand, None] + offsets, 0, nx - 1)
        boxes = mask[rows[:, :, None], cols[:, None, :]] & bad_bits
        ok[cand] &= ~boxes.reshape(len(cand), -1).any(axis=1)
    indices = np.flatnonzero(ok)
    indices = indices[np.argsort(-sn[indices], kind="stable")]
    if len(indices) > max_sources:
        indices = _spread_over_image(indices, xi, yi, (ny, nx), max_sources, spread_cells)
    if len(indices) < min_sources:
        raise TooFewKernelSourcesError(
            len(indices), min_sources, f"{len(x)} input sources, S/N in [{sn_min}, {sn_max}], isolated, unmasked"
        )
    return indices


def _spread_over_image(indices, xi, yi, shape, n_keep: int, n_cells: int) -> np.ndarray:
    """Round-robin over grid cells of S/N-sorted ``indices`` (brightest per cell first)."""
    ny, nx = shape
    cell = (np.clip(yi[indices] * n_cells // max(ny, 1), 0, n_cells - 1) * n_cells
            + np.clip(xi[indices] * n_cells // max(nx, 1), 0, n_cells - 1))
    # rank of each source within its cell (indices are already S/N-sorted)
    order = np.argsort(cell, kind="stable")
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank = np.empty(len(indices), np.int64)
    rank[order] = np.arange(len(indices)) - starts
    pick = np.lexsort((np.arange(len(indices)), rank))[:n_keep]
    return indices[np.sort(pick)]


def _cutouts(image: np.ndarray, xi: np.ndarray, yi: np.ndarray, half: int) -> np.ndarray:
    """Stamps (N, 2h+1, 2h+1); floating images are promoted to float64 for the normal equations."""
    offsets = np.arange(-half, half + 1)
    out = image[(yi[:, None] + offsets)[:, :, None], (xi[:, None] + offsets)[:, None, :]]
    return out.astype(np.float64) if out.dtype.kind == "f" else out


def _bad_cutouts(bad: np.ndarray, xi: np.ndarray, yi: np.ndarray, half: int, bad_bits: int | None) -> np.ndarray:
    """Boolean stamps of a bad-pixel map, or of an integer mask tested against ``bad_bits``."""
    stamps = _cutouts(bad, xi, yi, half)
    if stamps.dtype == bool:
        return stamps
    bits = masks.bits(STAMP_BAD_PLANES) if bad_bits is None else int(bad_bits)
    return (stamps & bits) != 0


def convolve_stamps(stamps: np.ndarray, basis: KernelBasis) -> np.ndarray:
    """Convolve stamps (N, S, S) with every basis image, 'valid' region only.

    Returns (N, F, F, n_basis) with ``F = S - K + 1``. Uses the separable raw
    factors (two 1-d passes) and then the basis transform.
    """
    size = basis.size
    n, s, _ = stamps.shape
    f = s - size + 1
    if f < 1:
        raise ValueError(f"Stamps of size {s} are smaller than the kernel ({size})")
    # Both 1-d passes are matrix products with banded (Toeplitz) matrices, so they
    # run in BLAS; identical 1-d factors are convolved once.
    ux, x_index = np.unique(basis.fx, axis=0, return_inverse=True)
    uy, y_index = np.unique(basis.fy, axis=0, return_inverse=True)
    band_x = _band_matrices(ux, s)  # (n_ux, S, F)
    band_y = _band_matrices(uy, s)
    tmp = np.matmul(stamps[None], band_x[:, None])  # (n_ux, N, S, F): rows y, columns x
    raw = np.empty((n, f, f, len(x_index)))
    for r, (ix, iy) in enumerate(zip(np.ravel(x_index), np.ravel(y_index))):
        raw[..., r] = np.matmul(band_y[iy].T, tmp[ix])
    return raw @ basis.transform.T


def _band_matrices(factors: np.ndarray, s: int) -> np.ndarray:
    """M (n, S, F) with ``(row @ M[r])[j] = sum_k factors[r, k] row[j + K - 1 - k]``: a 'valid' convolution."""
    n_f, size = factors.shape
    f = s - size + 1
    out = np.zeros((n_f, s, f))
    j = np.arange(f)
    for k in range(size):
        out[:, j + size - 1 - k, j] = factors[:, k][:, None]
    return out


def _spatial_design(u: np.ndarray, v: np.ndarray, n_basis: int, spatial_order: int, bg_order: int, constant_first: bool):
    """E (N, n_local, n_theta): local coefficients = E @ theta for each stamp."""
    n = len(u)
    p_k = polynomial_terms(u, v, spatial_order).T  # (N, n_sp)
    p_b = polynomial_terms(u, v, bg_order).T  # (N, n_bg)
    n_sp, n_bg = p_k.shape[1], p_b.shape[1]
    first = 1 if constant_first else n_sp
    n_theta = first + (n_basis - 1) * n_sp + n_bg
    e = np.zeros((n, n_basis + 1, n_theta))
    if constant_first:
        e[:, 0, 0] = 1.0
    else:
        e[:, 0, :n_sp] = p_k
    col = first
    for b in range(1, n_basis):
        e[:, b, col : col + n_sp] = p_k
        col += n_sp
    e[:, n_basis, col : col + n_bg] = p_b
    return e


def _spatial_normal(e: np.ndarray, normal: np.ndarray, rhs: np.ndarray):
    """Global normal equations sum_n E_nᵀ M_n E_n, sum_n E_nᵀ r_n."""
    n, n_l, n_theta = e.shape
    me = normal @ e  # (n, n_l, n_theta)
    big_m = e.reshape(n * n_l, n_theta).T @ me.reshape(n * n_l, n_theta)
    big_r = e.reshape(n * n_l, n_theta).T @ rhs.reshape(n * n_l)
    return big_m, big_r


def _solve_spatial(e, normal, rhs, noise):
    big_m, big_r = _spatial_normal(e, normal, rhs)
    if noise is not None:
        big_n, _ = _spatial_normal(e, noise, rhs)
        return debiased_solve(big_m, big_r, big_n)
    try:
        return np.linalg.solve(big_m, big_r)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(big_m, big_r, rcond=None)[0]


def _unpack_theta(theta, n_basis, spatial_order, constant_first):
    n_sp = _n_terms(spatial_order)
    coeffs = np.zeros((n_basis, n_sp))
    if constant_first:
        coeffs[0, 0] = theta[0]
        col = 1
    else:
        coeffs[0] = theta[:n_sp]
        col = n_sp
    for b in range(1, n_basis):
        coeffs[b] = theta[col : col + n_sp]
        col += n_sp
    return coeffs, np.asarray(theta[col:], float)


def _robust_sigma(values: np.ndarray) -> float:
    med = np.median(values)
    return float(1.4826 * np.median(np.abs(values - med)))


def kernel_sum_outliers(kernel_sums, errors, used, clip_sigma: float, floor: float) -> np.ndarray:
    """Per-stamp kernel sums inconsistent with the consensus: a boolean array.

    The consensus is the inverse-variance weighted median of the ``used`` stamps'
    sums; each stamp is judged against its own error (with ``floor`` added in
    quadrature), not the population's scatter. The scatter is set by the faint stamps,
    whose sums are also biased high (a science-selected S/N 10 source is more often a
    positive noise excursion), so a robust-sigma clip kept a S/N 230 variable star 22 %
    off and let it bend the spatial fit, which then rejected the bright stars that
    define the kernel (test preset visit 1560714: residuals of 4 % of a star's
    significance in the score).
    """
    sums = np.asarray(kernel_sums, float)
    err = np.hypot(np.asarray(errors, float), floor)
    ok = np.asarray(used, bool) & np.isfinite(sums) & np.isfinite(err)
    if not ok.any():
        return np.zeros(sums.shape, bool)
    order = np.argsort(sums[ok])
    w = 1.0 / err[ok][order] ** 2
    cum = np.cumsum(w)
    centre = sums[ok][order][np.searchsorted(cum, 0.5 * cum[-1])]
    with np.errstate(invalid="ignore"):
        return ~(np.abs(sums - centre) <= clip_sigma * err)


def fit_psf_matching_kernel(
    source_image: np.ndarray,
    source_variance: np.ndarray,
    target_image: np.ndarray,
    target_variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    basis: KernelBasis,
    *,
    fit_half_size: int | None = None,
    spatial_order: int = 1,
    background_order: int = 2,
    constant_scale: bool = True,
    max_iterations: int = 3,
    chi2_floor: float = 2.25,
    core_half_size: int | None = None,
    neighbour_xy=None,
    neighbour_radius_pix: float = 8.0,
    clip_sigma: float = 4.0,
    kernel_sum_clip_sigma: float = 3.0,
    kernel_sum_floor: float = 0.01,
    max_median_chi2: float = 4.0,
    min_stamps: int = 3,
    expected_kernel_sq_sum: float | None = None,
    source_bad: np.ndarray | None = None,
    target_bad: np.ndarray | None = None,
    debias_source_noise: bool = False,
    bad_bits: int | None = None,
) -> KernelFitResult:
    """Fit the matching kernel ``source * kernel + bg ≈ target`` on stamps at (x, y).

    Parameters
    ----------
    source_image, source_variance : `numpy.ndarray`
        Image to be convolved and its variance (finite everywhere).
    target_image, target_variance : `numpy.ndarray`
        Image matched to, same shape and pixel grid.
    x, y : `numpy.ndarray`
        Stamp centres (pixels; rounded to the nearest pixel), e.g. from
        `select_kernel_sources`. Stamps must lie inside the image with margin
        ``fit_half_size + K // 2``.
    basis : `KernelBasis`
    fit_half_size : `int`, optional
        Half-size of the fitted box; default the kernel half-width ``K // 2``.
    spatial_order, background_order : `int`
        Polynomial orders of the kernel coefficients and differential background.
    constant_scale : `bool`
        Keep the kernel sum (first basis coefficient) constant over the image (ip_diffim AL).
    max_iterations : `int`
        Rounds of spatial fit + outlier-stamp rejection.
    chi2_floor, clip_sigma : `float`
        A stamp is rejected when its core chi² per pixel exceeds both ``chi2_floor``
        (ip_diffim's residual-std limit 1.5, squared) and ``median + clip_sigma * robust sigma``.
    neighbour_xy : array (n, 2), optional
        Positions of all catalogue sources; pixels within ``neighbour_radius_pix`` of
        any of them (other than the stamp's own source) get zero weight.
    core_half_size : `int`, optional
        Half-size of the central box used for the rejection chi²; default
        ``fit_half_size - K // 2`` (at least 2).
    kernel_sum_clip_sigma, kernel_sum_floor : `float`
        A stamp whose own kernel sum differs from the stamps' consensus by more than
        ``kernel_sum_clip_sigma`` times its uncertainty (its fit error and
        ``kernel_sum_floor`` in quadrature) is rejected: a variable star, or a blend
        (`kernel_sum_outliers`).
    max_median_chi2 : `float`
        If the median chi²/dof of the used stamps exceeds this, raise `BadPsfMatchError`
        (``numpy.inf`` disables the check; the value is in the result either way).
    expected_kernel_sq_sum : `float`, optional
        Initial guess of ``sum(kernel²)`` for the stamp noise model
        ``var = target_var + source_var * sum(kernel²)``; default from the middle basis width.
    source_bad, target_bad : `numpy.ndarray` of bool or int, optional
        Unusable pixels of the two images. A fitted pixel gets zero weight when it is
        bad in the target or when the kernel footprint around it touches a bad source
        pixel, so a stamp survives a masked pixel in its outskirts. An integer array
        is a mask plane image: pixels with any of ``bad_bits`` set are bad (only the
        stamps are read, no full-frame boolean map is built).
    bad_bits : `int`, optional
        Bits that make a pixel of an integer ``source_bad``/``target_bad`` unusable;
        default `STAMP_BAD_PLANES`.
    debias_source_noise : `bool`
        Remove the noise of the *source* image from the normal equations of the
        spatial fit (`source_noise_normal`). Least squares with a noisy regressor
        (errors in variables) shrinks the kernel towards zero: its normal matrix
        ``AᵀWA`` carries the expected noise term ``N`` on top of the noise-free
        one, while ``AᵀWt`` does not (the two images' noises are independent), so
        the kernel sum comes out low by ~``N/(AᵀWA)``. That is negligible for a
        deep template but was -6 % for a single-visit science image in
        convolveScience mode; ``(AᵀWA - N)⁻¹ AᵀWt`` is unbiased.

    Returns
    -------
    KernelFitResult

    Raises
    ------
    TooFewKernelSourcesError
        Fewer than ``min_stamps`` stamps survive rejection.
    BadPsfMatchError
        See ``max_median_chi2``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n_stamps = len(x)
    if n_stamps < min_stamps:
        raise TooFewKernelSourcesError(n_stamps, min_stamps, "before fitting")
    ny, nx = target_image.shape
    size = basis.size
    half_k = size // 2
    half_fit = half_k if fit_half_size is None else int(fit_half_size)
    half_src = half_fit + half_k
    xi = np.round(x).astype(np.int64)
    yi = np.round(y).astype(np.int64)
    inside = (xi - half_src >= 0) & (xi + half_src < nx) & (yi - half_src >= 0) & (yi + half_src < ny)
    if not inside.all():
        raise ValueError(
            f"{int((~inside).sum())} kernel stamps extend beyond the image (need a margin of {half_src} px)"
        )
    if expected_kernel_sq_sum is None:
        mid = basis.sigmas_pix[len(basis.sigmas_pix) // 2]
        expected_kernel_sq_sum = 1.0 / (4.0 * np.pi * mid**2)
    n_b = basis.n_basis
    n_l = n_b + 1
    normal = np.empty((n_stamps, n_l, n_l))
    rhs = np.empty((n_stamps, n_l))
    tt = np.empty(n_stamps)
    # Same quantities restricted to the stamp core, where a transient or a variable
    # star concentrates its signal: rejection uses the core chi² (the full-box
    # chi² dilutes a S/N 15 transient below any sensible threshold).
    half_core = max(2, min(half_fit, half_fit - half_k if core_half_size is None else int(core_half_size)))
    core = np.zeros((2 * half_fit + 1,) * 2, bool)
    core[half_fit - half_core : half_fit + half_core + 1, half_fit - half_core : half_fit + half_core + 1] = True
    core = core.ravel()
    n_good = np.zeros(n_stamps)
    n_good_core = np.zeros(n_stamps)
    neighbour_tree = None
    if neighbour_xy is not None and len(neighbour_xy) > 1:
        from scipy.spatial import cKDTree

        neighbour_tree = cKDTree(np.asarray(neighbour_xy, float).reshape(-1, 2))
        reach = np.sqrt(2.0) * (half_fit + 1) + neighbour_radius_pix
    normal_c = np.empty((n_stamps, n_l, n_l))
    rhs_c = np.empty((n_stamps, n_l))
    tt_c = np.empty(n_stamps)
    noise_n = np.zeros((n_stamps, n_l, n_l)) if debias_source_noise else None
    chunk = _STAMP_CHUNK
    for start in range(0, n_stamps, chunk):
        sl = slice(start, min(start + chunk, n_stamps))
        src = _cutouts(source_image, xi[sl], yi[sl], half_src)
        conv = convolve_stamps(src, basis)  # (n, F, F, n_b)
        tgt = _cutouts(target_image, xi[sl], yi[sl], half_fit)
        var = _cutouts(target_variance, xi[sl], yi[sl], half_fit) + expected_kernel_sq_sum * _cutouts(
            source_variance, xi[sl], yi[sl], half_fit
        )
        w = 1.0 / np.maximum(var, 1e-300)
        if target_bad is not None:
            w[_bad_cutouts(target_bad, xi[sl], yi[sl], half_fit, bad_bits)] = 0.0
        if source_bad is not None:
            sbad = _bad_cutouts(source_bad, xi[sl], yi[sl], half_src, bad_bits)
            if sbad.any():
                from scipy.ndimage import maximum_filter

                grown = maximum_filter(sbad.view(np.uint8), size=(1, size, size), mode="constant")
                w[grown[:, half_k : half_k + 2 * half_fit + 1, half_k : half_k + 2 * half_fit + 1] != 0] = 0.0
        if neighbour_tree is not None:
            # zero the weight of pixels near other catalogue sources (a variable or a
            # transient in a stamp corner would otherwise bend the kernel)
            offs = np.arange(-half_fit, half_fit + 1)
            for m, n_idx in enumerate(range(sl.start, sl.stop)):
                near = neighbour_tree.query_ball_point([x[n_idx], y[n_idx]], r=reach)
                for j in near:
                    nxj, nyj = neighbour_tree.data[j]
                    if np.hypot(nxj - x[n_idx], nyj - y[n_idx]) < 0.5:
                        continue  # the stamp's own source
                    dx = offs[None, :] + xi[n_idx] - nxj
                    dy = offs[:, None] + yi[n_idx] - nyj
                    w[m][dx**2 + dy**2 < neighbour_radius_pix**2] = 0.0
        n_good[sl] = (w > 0).reshape(w.shape[0], -1).sum(axis=1)
        n_good_core[sl] = (w > 0).reshape(w.shape[0], -1)[:, core].sum(axis=1)
        n = conv.shape[0]
        a = np.concatenate([conv.reshape(n, -1, n_b), np.ones((n, conv.shape[1] * conv.shape[2], 1))], axis=2)
        t = tgt.reshape(n, -1)
        wf = w.reshape(n, -1)
        aw = a * wf[:, :, None]
        # batched BLAS products (N small (P x n_l) matrices)
        awt = aw.transpose(0, 2, 1)
        normal[sl] = awt @ a
        rhs[sl] = (awt @ t[:, :, None])[:, :, 0]
        tt[sl] = ((t * wf) * t).sum(axis=1)
        awc, ac, tc, wc = aw[:, core], a[:, core], t[:, core], wf[:, core]
        awct = awc.transpose(0, 2, 1)
        normal_c[sl] = awct @ ac
        rhs_c[sl] = (awct @ tc[:, :, None])[:, :, 0]
        tt_c[sl] = ((tc * wc) * tc).sum(axis=1)
        if noise_n is not None:
            noise_n[sl, :n_b, :n_b] = source_noise_normal(
                _cutouts(source_variance, xi[sl], yi[sl], half_src), w, basis.images)
    dof = np.maximum(n_good - n_l, 1)
    n_core = np.maximum(n_good_core, 1)

    def chi2_of(coeffs, use_core=True):
        m, r, t2, d = (normal_c, rhs_c, tt_c, n_core) if use_core else (normal, rhs, tt, dof)
        quad = (coeffs * (m @ coeffs[:, :, None])[:, :, 0]).sum(axis=1)
        return (t2 - 2.0 * (coeffs * r).sum(axis=1) + quad) / d

    # 1. per-stamp solutions
    local = np.zeros((n_stamps, n_l))
    ksum_err = np.full(n_stamps, np.inf)
    good_local = np.ones(n_stamps, bool)
    for n in range(n_stamps):
        try:
            cov = np.linalg.inv(normal[n])
        except np.linalg.LinAlgError:
            good_local[n] = False
            continue
        local[n] = cov @ rhs[n]
        ksum_err[n] = np.sqrt(max(cov[0, 0], 0.0))
    chi2_local = np.where(good_local, chi2_of(local), np.inf)
    ksum_local = local[:, 0].copy()
    used = good_local & np.isfinite(chi2_local)
    if used.sum() >= min_stamps:
        c = chi2_local[used]
        limit = max(chi2_floor, np.median(c) + clip_sigma * _robust_sigma(c))
        used &= chi2_local <= limit
    if used.sum() >= min_stamps and kernel_sum_clip_sigma > 0:
        used &= ~kernel_sum_outliers(ksum_local, ksum_err, used, kernel_sum_clip_sigma, kernel_sum_floor)
    if used.sum() < min_stamps:
        raise TooFewKernelSourcesError(int(used.sum()), min_stamps, "after per-stamp rejection")

    # 2. spatial fit with iterative rejection. With few stamps a polynomial of
    # position is not constrained: lower the orders until there are at least
    # two stamps per spatial term (else the fit is garbage away from the stamps).
    requested_orders = (spatial_order, background_order)
    n_ok = int(used.sum())
    while spatial_order > 0 and n_ok < 2 * _n_terms(spatial_order):
        spatial_order -= 1
    while background_order > 0 and n_ok < 2 * _n_terms(background_order):
        background_order -= 1
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    u, v = normalised_position(x, y, bbox)
    e = _spatial_design(u, v, n_b, spatial_order, background_order, constant_scale)
    iterations = 0
    chi2_spatial = chi2_local
    theta = None
    for iterations in range(1, max_iterations + 1):
        theta = _solve_spatial(e[used], normal[used], rhs[used], None if noise_n is None else noise_n[used])
        coeffs = e @ theta
        chi2_spatial = chi2_of(coeffs)
        c = chi2_spatial[used]
        limit = max(chi2_floor, np.median(c) + clip_sigma * _robust_sigma(c))
        reject = used & (chi2_spatial > limit)
        if not reject.any():
            break
        if used.sum() - reject.sum() < min_stamps:
            break
        used &= ~reject
        if iterations == max_iterations:
            # refit once more on the cleaned set so the solution matches `used`
            theta = _solve_spatial(e[used], normal[used], rhs[used], None if noise_n is None else noise_n[used])
            chi2_spatial = chi2_of(e @ theta)
    kernel_coeffs, bg_coeffs = _unpack_theta(theta, n_b, spatial_order, constant_scale)
    solution = KernelSolution(
        basis=basis,
        kernel_coeffs=kernel_coeffs,
        background_coeffs=bg_coeffs,
        spatial_order=spatial_order,
        background_order=background_order,
        bbox=bbox,
    )
    # Re-normalise chi² to the fitted kernel's noise (the fit used a guessed sum(kernel²)).
    ksq = float((solution.kernel_image() ** 2).sum())
    median_chi2 = float(np.median(chi2_spatial[used]))
    result = KernelFitResult(
        solution=solution,
        used=used,
        chi2_local=chi2_local,
        chi2_spatial=chi2_spatial,
        kernel_sum_local=ksum_local,
        n_iterations=iterations,
        median_chi2=median_chi2,
        metadata={
            "kernel_size": size,
            "n_stamps_input": n_stamps,
            "n_stamps_used": int(used.sum()),
            "n_stamps_rejected": int(n_stamps - used.sum()),
            "kernel_sq_sum": ksq,
            "kernel_sq_sum_assumed": float(expected_kernel_sq_sum),
            "median_chi2_per_dof": median_chi2,
            "spatial_iterations": iterations,
            "spatial_order": spatial_order,
            "background_order": background_order,
            "orders_reduced": (spatial_order, background_order) != requested_orders,
            "source_noise_debiased": bool(debias_source_noise),
        },
    )
    if median_chi2 > max_median_chi2:
        raise BadPsfMatchError(median_chi2, max_median_chi2)
    return result
