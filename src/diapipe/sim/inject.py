"""Fake point sources injected into a processed exposure (Rubin's source-injection idea).

The simulator's own transients are few per detector-visit (53 usable ones on the
``test`` preset's three independent visits), so a width of their PSF-flux pulls
is known only to about ±0.15. Injecting a few hundred point sources of known flux
into a calexp, then running subtraction, detection and measurement on it, measures
the same figure to a few per cent.

Sources are drawn with the exposure's own PSF model at sub-pixel positions, with
Poisson noise on the source electrons; the variance plane gets the expected
source electrons, as ISR's variance would.
"""

from __future__ import annotations

import numpy as np

from ..exposure.psf import PixelPsf

__all__ = ["blank_positions", "flux_for_snr", "inject_point_sources"]


def inject_point_sources(image: np.ndarray, variance: np.ndarray, psf: PixelPsf, x, y, flux_e,
                         rng: np.random.Generator, *, xy0=(0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``image`` (electrons) and ``variance`` with point sources added.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Exposure planes in electrons (a calexp).
    psf : `PixelPsf`
        PSF model in the parent frame (``compute_image(x, y)``).
    x, y : array-like
        Parent-frame positions; stamps must lie inside the image.
    flux_e : array-like
        Total source electrons.
    rng : `numpy.random.Generator`
        For the Poisson noise.
    """
    out = np.array(image, np.float64)
    var = np.array(variance, np.float64)
    x0, y0 = xy0
    ny, nx = out.shape
    for xi, yi, f in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux_e), strict=True):
        stamp = psf.compute_image(float(xi), float(yi))
        half = stamp.shape[0] // 2
        cx, cy = int(np.floor(xi + 0.5)) - x0, int(np.floor(yi + 0.5)) - y0
        if cx - half < 0 or cy - half < 0 or cx + half >= nx or cy + half >= ny:
            raise ValueError(f"injected source at ({xi:.1f}, {yi:.1f}) does not fit in the image "
                             f"(box x {x0}..{x0 + nx - 1}, y {y0}..{y0 + ny - 1})")
        model = np.clip(float(f) * stamp, 0.0, None)
        sl = np.s_[cy - half:cy + half + 1, cx - half:cx + half + 1]
        out[sl] += rng.poisson(model)
        var[sl] += model
    return out.astype(np.float32), var.astype(np.float32)


def flux_for_snr(snr, sky_sigma_e: float, psf_sigma_pix: float) -> np.ndarray:
    """Electrons giving PSF-flux S/N ``snr`` for a Gaussian-like PSF of ``psf_sigma_pix``
    on sky of per-pixel noise ``sky_sigma_e`` (gain 1): solves
    ``f / sqrt(f + 4 pi sigma² sky²) = snr`` (the source's own noise approximated as
    spread over the same effective area)."""
    s = np.asarray(snr, float)
    area = 4.0 * np.pi * psf_sigma_pix**2
    return 0.5 * (s**2 + np.sqrt(s**4 + 4.0 * s**2 * area * sky_sigma_e**2))


def blank_positions(busy: np.ndarray, n: int, rng: np.random.Generator, *, margin: int = 40,
                    min_separation: float = 25.0, xy0=(0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` parent-frame positions on pixels where ``busy`` is False, at least
    ``margin`` pixels from the border and ``min_separation`` apart (random, then thinned).

    ``busy``: boolean map of pixels to avoid (sources, masks), e.g. template objects
    grown by a PSF footprint.
    """
    ny, nx = busy.shape
    inner = ~np.asarray(busy, bool)[margin:ny - margin, margin:nx - margin]
    ys, xs = np.nonzero(inner)
    if xs.size == 0:
        return np.zeros(0), np.zeros(0)
    pick = rng.choice(xs.size, min(4 * n, xs.size), replace=False)
    px = xs[pick] + margin + rng.uniform(-0.5, 0.5, pick.size)
    py = ys[pick] + margin + rng.uniform(-0.5, 0.5, pick.size)
    kept: list[int] = []
    for i in range(px.size):
        if len(kept) == n:
            break
        if not kept or np.min(np.hypot(px[kept] - px[i], py[kept] - py[i])) >= min_separation:
            kept.append(i)
    return px[kept] + xy0[0], py[kept] + xy0[1]
