"""Detection noise that grows with the template's brightness: PSF-matching residuals at stars and galaxies.

The difference image's variance plane holds the photon and read noise of the
science image and the matched template. It has no term for the *systematic*
residual that an imperfect PSF match leaves at every bright object: rings and
arcs whose amplitude is a fixed fraction of the object's flux (on ci_imsim about
0.4 % of the peak at a 16.5 mag star, in every visit), far above the photon
noise of the star once the matched filter sums them. ZOGY (Zackay, Ofek & Gal-Yam
2016, section 3.3) adds such a "source noise" term for registration errors to its
score's variance; we do the same for the PSF mismatch, in its simplest form:

    sigma_detection² = sigma_noise² · (1 + (epsilon · z_T)²)

where ``z_T`` is the matched template's PSF-filtered significance at the pixel
(its point-source S/N in the difference's noise) and ``epsilon`` the residual
as a fraction of that flux. On blank sky and faint hosts ``z_T`` is a few and the
factor is 1 to within 1e-3; on a 16.5 mag star (``z_T`` ~ 1000) the threshold
rises tenfold. It only changes detection: DiaSource fluxes and errors are still
measured with the plain variance.

That term acts at the object itself. A mismatched kernel also spreads residual
over the kernel's footprint, and where the template's star is a patchwork (its
wings clipped in some coadd inputs, its core saturated in others) the residual
rings reach 10-20 px from the star, where the star's own ``z_T`` is small. A
second term follows the brightest object within reach (`neighbourhood_peak`)::

    sigma_detection² = sigma_noise² · (1 + (epsilon · z_T)² + (epsilon_n · D)²)

``D`` is the object's PSF-filtered flux over the *sky* noise (`block_median_map` of
the variance), not over the pixel variance: a ring's amplitude is a fraction of the
star's flux, while the star's significance in a variance that holds its own photon
noise grows only as the square root of it. Counted that way, rings at 7-10 px from
16.6-18.3 mag stars reached 3-4 % of ``D`` and passed any fixed ``epsilon_n``; over
the sky noise they are a fixed fraction of it. With epsilon_n = 0.002 no ring is left on 0.3 deg²
of rendered pairs (`tests/diffim/test_spurious_wide_field.py`, 49 → 19 spurious), and on
4patch_4431 (detector 94, visits not in their template) spurious fell 51 → 44 with no
truth-matched DiaSource lost.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from .convolve import fft_convolve_same

__all__ = [
    "block_median_map",
    "low_coverage_map",
    "neighbourhood_peak",
    "template_residual_variance_factor",
    "template_significance",
]


def template_significance(template_image: np.ndarray, variance: np.ndarray, psf_kernel: np.ndarray) -> np.ndarray:
    """PSF-filtered significance of the matched template in the difference's noise.

    ``(T * P) / sqrt(V * P²)`` with ``*`` a convolution, ``T`` the matched template,
    ``V`` the difference variance and ``P`` the difference PSF (normalised kernel
    image, odd size). Non-finite template pixels count as 0; pixels without a finite
    positive variance are left out of the noise, which is the filtered mean variance of
    the others (a pixel with less than 10 % of the filter's weight on such pixels has
    significance 0).
    """
    template = np.asarray(template_image, np.float32)
    var = np.asarray(variance, np.float32)
    kernel = np.asarray(psf_kernel, np.float32)
    kernel = kernel / kernel.sum()
    t = np.nan_to_num(template, nan=0.0, posinf=0.0, neginf=0.0)
    has_var = np.isfinite(var) & (var > 0)
    v = np.where(has_var, var, np.float32(0.0))
    k2 = (kernel * kernel).astype(np.float32)
    # the block FFT convolver: ~1 s for these at 4k x 4k against 3.5 s for scipy's fftconvolve
    flux, = fft_convolve_same(t, [kernel])
    noise2, = fft_convolve_same(v, [k2])
    weight, = fft_convolve_same(has_var.astype(np.float32), [k2])
    # next to pixels without variance (NO_DATA borders) the filtered variance covers only part of
    # the filter: scale it to the full filter, else z explodes there (to ~1e6 on ci_imsim)
    total = np.float32(k2.sum())
    no_noise = (noise2 <= 0) | (weight < 0.1 * total)
    noise2 = noise2 * total / np.maximum(weight, np.float32(1e-30))
    np.maximum(noise2, np.float32(1e-30), out=noise2)
    z = np.divide(flux, np.sqrt(noise2, out=noise2), out=flux)
    z[no_noise] = 0.0
    return z.astype(np.float32, copy=False)


def neighbourhood_peak(template_z: np.ndarray, radius_pix: float, *, min_template_z: float = 100.0,
                       level_step: float = 10.0**0.5, growth_per_decade: float = 10.0 ** (1.0 / 6.0),
                       smooth: bool = True) -> np.ndarray:
    """The brightest template object nearby: ``D(x)``, the largest ``|template_z|`` of the
    pixels within a square half-size ``R_k = radius_pix · growth_per_decade^(k / 2)`` of
    ``x`` that reach level ``min_template_z · level_step^k`` (0 where none does). The
    level only sets how far an object reaches; ``D`` is its own peak, not the level (a
    17.3 mag star of peak 690 counted as 316 let 16 sigma rings through).

    A PSF-matching residual spreads over the matching kernel (rings, arcs, the
    patchwork of a clipped or saturated star), so its amplitude at ``x`` follows the
    brightest object within a kernel's reach, not the template at ``x``; brighter
    objects reach further (1.5x per decade of flux; 2.2x lost real transients 45 px from a
    17.1 mag galaxy on 4patch_4431).

    With ``smooth`` the map is then smoothed by a Gaussian of ``radius_pix / 2``:
    a step of the detection threshold through a transient moves its detection peak
    (by 3 px, off the transient, for one on 4patch_4431).

    >>> z = np.zeros((100, 100), np.float32); z[50, 50] = 1000.0; z[50, 10] = 150.0
    >>> d = neighbourhood_peak(z, 10, smooth=False)  # radius 10 px at level 100, 15 px at level 1000
    >>> [round(float(d[50, x])) for x in (50, 65, 66, 18, 25)]
    [1000, 1000, 0, 150, 0]
    """
    z = np.abs(np.asarray(template_z, np.float32))
    peak = np.zeros(z.shape, np.float32)
    level, k = float(min_template_z), 0
    while (above := z >= level).any():
        radius = radius_pix * growth_per_decade ** (k / 2.0)
        size = 2 * round(radius) + 1
        np.maximum(peak, ndimage.maximum_filter(np.where(above, z, np.float32(0)), size=size, mode="constant"),
                   out=peak)
        level *= level_step
        k += 1
    if smooth and peak.any():
        peak = ndimage.gaussian_filter(peak, 0.5 * radius_pix).astype(np.float32, copy=False)
    return peak


def template_residual_variance_factor(template_z: np.ndarray, fraction: float,
                                      neighbourhood: np.ndarray | None = None,
                                      neighbourhood_fraction: float = 0.0) -> np.ndarray:
    """``1 + (fraction · z_T)² + (neighbourhood_fraction · D)²``: the factor by which to
    multiply a detection variance (``template_z`` from `template_significance`, ``D``
    from `neighbourhood_peak`); all ones when both fractions are 0."""
    if fraction < 0 or neighbourhood_fraction < 0:
        raise ValueError(f"template residual fractions must be >= 0, got {fraction}, {neighbourhood_fraction}")
    factor = np.ones(np.shape(template_z), np.float32)
    if fraction > 0:
        factor += (np.float32(fraction) * np.asarray(template_z, np.float32)) ** 2
    if neighbourhood_fraction > 0 and neighbourhood is not None:
        factor += (np.float32(neighbourhood_fraction) * np.asarray(neighbourhood, np.float32)) ** 2
    return factor


def low_coverage_map(template_variance: np.ndarray, ratio: float, block_pix: int = 32) -> np.ndarray:
    """Where the template has few coadd inputs: the median template variance of each
    ``block_pix`` block exceeds ``ratio`` times that of the whole image (boolean map).

    A coadd's variance scales as 1/(number of inputs), so this finds the patches at the
    edges of the dithered visits' coverage without the coadd's nImage. The block median
    ignores stars, whose own photon noise raises the variance over a few pixels. There the
    template's PSF is that of one or two visits, not the coadd PSF the kernel was fit
    for, and CompareWarp cannot reject anything: on 4patch_4431 detector 94 such blocks
    (variance > 2x the median; 11 % of the area) held 51 of the 89 spurious DiaSources and
    19 of the 170 real ones.

    >>> v = np.ones((64, 64)); v[:, 40:] = 6.0; v[10, 10] = 100.0  # a star in the deep part
    >>> m = low_coverage_map(v, 2.0, block_pix=16)
    >>> bool(m[10, 10]), bool(m[:, 48:].all()), bool(m[:, :32].any())
    (False, True, False)
    """
    var = np.asarray(template_variance, np.float32)
    good = np.isfinite(var) & (var > 0)
    if not good.any():
        return np.zeros(var.shape, bool)
    with np.errstate(invalid="ignore"):
        return block_median_map(np.where(good, var, np.nan), block_pix) > ratio * float(np.median(var[good]))


def block_median_map(values: np.ndarray, block_pix: int = 32) -> np.ndarray:
    """Each pixel's value replaced by the median of the finite values of its
    ``block_pix`` block (NaN where the block has none): a map without the stars.

    >>> v = np.ones((8, 8)); v[1, 1] = 50.0; v[:, 4:] = np.nan
    >>> m = block_median_map(v, 4)
    >>> float(m[1, 1]), bool(np.isnan(m[0, 5]))
    (1.0, True)
    """
    values = np.asarray(values, np.float32)
    ny, nx = values.shape
    by, bx = -(-ny // block_pix), -(-nx // block_pix)
    padded = np.full((by * block_pix, bx * block_pix), np.nan, np.float32)
    padded[:ny, :nx] = values
    blocks = padded.reshape(by, block_pix, bx, block_pix).transpose(0, 2, 1, 3).reshape(by, bx, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # blocks with no finite value
        medians = np.nanmedian(blocks, axis=2).astype(np.float32)
    return np.repeat(np.repeat(medians, block_pix, axis=0), block_pix, axis=1)[:ny, :nx]
