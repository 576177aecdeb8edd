"""Matching measurements to the simulator's truth, and the truth-based pixel selections
that the accuracy metrics need (blank sky, isolated stars).

Everything here works on arrays (positions in parent pixels, fluxes in electrons or
nJy); the butler-reading wrappers live in `diapipe.analysis.single_frame` and
`diapipe.analysis.template`.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "MOFFAT_BETA",
    "blank_sky_mask",
    "isolated",
    "match_sky",
    "match_xy",
    "moffat_radius_pix",
    "nearest_sky",
]

#: Moffat index of the simulator's PSF (`diapipe.sim.render.MOFFAT_BETA`); used only to
#: size the masks around truth objects, so a small mismatch does not matter.
MOFFAT_BETA = 4.765


def match_xy(x1, y1, x2, y2, radius_pix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour match of two position lists within ``radius_pix``.

    Pairs are accepted closest first, so each entry of either list is used at most once.

    Returns
    -------
    index1, index2 : `numpy.ndarray` of int
        Matched rows of list 1 and list 2.
    distance_pix : `numpy.ndarray`
    """
    p1 = np.column_stack([np.asarray(x1, float), np.asarray(y1, float)])
    p2 = np.column_stack([np.asarray(x2, float), np.asarray(y2, float)])
    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    if len(p1) == 0 or len(p2) == 0:
        return empty
    ok1 = np.all(np.isfinite(p1), axis=1)
    ok2 = np.all(np.isfinite(p2), axis=1)
    i1 = np.flatnonzero(ok1)
    i2 = np.flatnonzero(ok2)
    if len(i1) == 0 or len(i2) == 0:
        return empty
    tree = cKDTree(p2[i2])
    # "ndarray" output keeps exact (zero-distance) pairs, which a sparse matrix would drop
    pairs = tree.sparse_distance_matrix(cKDTree(p1[i1]), radius_pix, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used1, used2 = set(), set()
    out1, out2, dist = [], [], []
    for k in order:
        a, b = int(pairs["j"][k]), int(pairs["i"][k])
        if a in used1 or b in used2:
            continue
        used1.add(a)
        used2.add(b)
        out1.append(i1[a])
        out2.append(i2[b])
        dist.append(pairs["v"][k])
    return np.asarray(out1, int), np.asarray(out2, int), np.asarray(dist, float)


def match_sky(ra1, dec1, ra2, dec2, radius_arcsec: float):
    """One-to-one match on the sky (deg) within ``radius_arcsec``, via a local tangent plane.

    Returns ``index1, index2, distance_arcsec`` as `match_xy`.
    """
    ra1, dec1, ra2, dec2 = (np.asarray(a, float) for a in (ra1, dec1, ra2, dec2))
    if ra1.size == 0 or ra2.size == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    ra0 = np.nanmedian(ra1)
    dec0 = np.nanmedian(dec1)
    cosd = np.cos(np.radians(dec0))

    def plane(ra, dec):
        dra = (ra - ra0 + 180.0) % 360.0 - 180.0
        return dra * cosd * 3600.0, (dec - dec0) * 3600.0

    x1, y1 = plane(ra1, dec1)
    x2, y2 = plane(ra2, dec2)
    return match_xy(x1, y1, x2, y2, radius_arcsec)


def nearest_sky(ra1, dec1, ra2, dec2, radius_arcsec: float) -> np.ndarray:
    """For each position of list 1 (deg), the row of the nearest position of list 2
    closer than ``radius_arcsec`` (-1 when none): a many-to-one match, unlike `match_sky`.

    Distances are measured on a local tangent plane (exact enough at arcsecond radii).
    """
    ra1, dec1, ra2, dec2 = (np.asarray(a, float) for a in (ra1, dec1, ra2, dec2))
    out = np.full(ra1.size, -1, int)
    ok1 = np.isfinite(ra1) & np.isfinite(dec1)
    ok2 = np.flatnonzero(np.isfinite(ra2) & np.isfinite(dec2))
    if not ok1.any() or ok2.size == 0:
        return out
    ra0, dec0 = np.median(ra1[ok1]), np.median(dec1[ok1])
    cosd = np.cos(np.radians(dec0))

    def plane(ra, dec):
        return np.column_stack([((ra - ra0 + 180.0) % 360.0 - 180.0) * cosd * 3600.0, (dec - dec0) * 3600.0])

    dist, k = cKDTree(plane(ra2[ok2], dec2[ok2])).query(plane(ra1[ok1], dec1[ok1]),
                                                          distance_upper_bound=radius_arcsec)
    inside = np.isfinite(dist) & (dist < radius_arcsec)
    out[np.flatnonzero(ok1)[inside]] = ok2[k[inside]]
    return out


def moffat_radius_pix(flux_e, fwhm_pix: float, level_e: float, beta: float = MOFFAT_BETA) -> np.ndarray:
    """Radius (px) beyond which a Moffat point source of ``flux_e`` adds less than ``level_e``
    per pixel (at least one FWHM)."""
    flux_e = np.clip(np.asarray(flux_e, float), 0.0, None)
    alpha = fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    peak = flux_e * (beta - 1.0) / (np.pi * alpha**2)
    ratio = np.maximum(peak / level_e, 1.0)
    radius = alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
    return np.maximum(radius, fwhm_pix)


def blank_sky_mask(
    shape,
    x,
    y,
    flux_e,
    fwhm_pix: float,
    *,
    level_e: float,
    extra_radius_pix=None,
    xy0=(0, 0),
) -> np.ndarray:
    """Pixels far from every truth object: True where the summed light of the objects is
    expected below about ``level_e`` per pixel.

    Parameters
    ----------
    shape : `tuple`
        (ny, nx) of the image.
    x, y : array-like
        Parent pixel positions of all truth objects (including those just off the image).
    flux_e : array-like
        Their fluxes in electrons (or in the image's unit, consistently with ``level_e``).
    fwhm_pix : `float`
        PSF FWHM (px), sets the Moffat wings.
    level_e : `float`
        Largest light an object may add to a pixel kept as blank.
    extra_radius_pix : array-like, optional
        Added per object (galaxies: a few half-light radii).
    xy0 : `tuple`
        Parent coordinates of pixel [0, 0].
    """
    ny, nx = int(shape[0]), int(shape[1])
    blank = np.ones((ny, nx), bool)
    x = np.asarray(x, float) - xy0[0]
    y = np.asarray(y, float) - xy0[1]
    radius = moffat_radius_pix(flux_e, fwhm_pix, level_e)
    if extra_radius_pix is not None:
        radius = radius + np.nan_to_num(np.asarray(extra_radius_pix, float))
    for xi, yi, ri in zip(x, y, radius, strict=True):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        x0, x1 = int(max(np.floor(xi - ri), 0)), int(min(np.ceil(xi + ri) + 1, nx))
        y0, y1 = int(max(np.floor(yi - ri), 0)), int(min(np.ceil(yi + ri) + 1, ny))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        blank[y0:y1, x0:x1] &= (xx - xi) ** 2 + (yy - yi) ** 2 > ri**2
    return blank


def isolated(x, y, flux, radius_pix: float, *, flux_ratio: float = 0.01, others=None) -> np.ndarray:
    """True for objects with no neighbour brighter than ``flux_ratio`` times their flux within
    ``radius_pix``.

    ``others``: optional ``(x, y, flux)`` of the objects that count as neighbours (default:
    the same list; an object is never its own neighbour).
    """
    x, y, flux = (np.asarray(a, float) for a in (x, y, flux))
    if others is None:
        ox, oy, of = x, y, flux
        same = True
    else:
        ox, oy, of = (np.asarray(a, float) for a in others)
        same = False
    out = np.ones(x.size, bool)
    if x.size == 0 or ox.size == 0:
        return out
    tree = cKDTree(np.column_stack([ox, oy]))
    for i, near in enumerate(tree.query_ball_point(np.column_stack([x, y]), radius_pix)):
        for j in near:
            if same and j == i:
                continue
            if of[j] > flux_ratio * flux[i]:
                out[i] = False
                break
    return out
