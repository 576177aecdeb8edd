"""Astrometric calibration: match sources to a reference catalogue and fit a TAN-SIP WCS.

Three steps, each usable on its own:

1. `match_to_reference` finds the rotation and shift that take the source
   positions onto the reference positions projected with the (imperfect)
   initial WCS. It votes all source-reference pixel offsets of the brightest
   objects into a 2-D histogram, for a small grid of trial rotations, and takes
   the most significant peak (a Poisson test with a look-elsewhere factor, so
   an unrelated reference catalogue is refused rather than matched to noise).
   Nearest-neighbour matching with a shrinking radius and an increasingly
   flexible polynomial follows. This survives pointing errors of tens of arcsec
   and rotations of a few tenths of a degree (the search ranges are parameters).
2. `fit_tan_sip` fits a TAN projection plus SIP distortion by linear least
   squares with sigma clipping: the intermediate world coordinates (gnomonic
   projection about CRVAL) are a polynomial of the pixel offsets from CRPIX;
   its linear part is the CD matrix, its constant part moves CRVAL (iterated to
   zero) and its higher orders, multiplied by CD⁻¹, are the SIP ``A``/``B``
   coefficients. The inverse ``AP``/``BP`` polynomials are fit on a dense grid.
3. `fit_wcs` chains both and re-matches with each improved WCS.

Pixel convention: 0-based, the centre of the first pixel is (0, 0). ``crpix``
arguments are FITS (1-based) values, exactly as in ``wcs.wcs.crpix``. ``bbox``
is ``(x_min, y_min, x_max, y_max)``, inclusive pixel coordinates.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from astropy.wcs import WCS, Sip

__all__ = [
    "AstrometryError",
    "ReferenceMatch",
    "match_to_reference",
    "fit_tan_sip",
    "fit_wcs",
    "wcs_pixel_scale_arcsec",
]

_DEG2MAS = 3.6e6


class AstrometryError(RuntimeError):
    """The astrometric fit could not converge; the task should fail this quantum.

    Attributes carry the measured values that caused the failure (``None`` when
    not measured), so a task can put them in its metadata.
    """

    def __init__(self, message: str, *, n_matches: int | None = None, rms_mas: float | None = None,
                 threshold: float | None = None):
        super().__init__(message)
        self.n_matches = n_matches
        self.rms_mas = rms_mas
        self.threshold = threshold


@dataclasses.dataclass(frozen=True)
class ReferenceMatch:
    """One-to-one matches between sources and reference objects.

    Attributes
    ----------
    src_index, ref_index : `numpy.ndarray` of int
        Indices into the source and reference arrays given to the matcher.
    separation_arcsec : `numpy.ndarray`
        Distance of each pair after applying the fitted transform.
    shift_pix : `tuple` of 2 float
        (dx, dy) to add to (rotated) source positions to reach the reference positions
        projected with the initial WCS.
    rotation_deg : `float`
        Rotation of the source positions (counter-clockwise in pixel coordinates, about
        the bbox centre) found by the pattern search.
    n_votes : `int`
        Height of the offset-histogram peak; ``chance_probability`` its Poisson probability
        (with look-elsewhere factor) of arising from unrelated catalogues.
    n_refs_in_footprint : `int`
        References projected inside the (grown) detector box.
    """

    src_index: np.ndarray
    ref_index: np.ndarray
    separation_arcsec: np.ndarray
    shift_pix: tuple[float, float]
    rotation_deg: float
    n_votes: int
    chance_probability: float
    n_refs_in_footprint: int

    def __len__(self) -> int:
        return len(self.src_index)


def wcs_pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS at its reference point, arcsec/px."""
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def _bbox_from(bbox, x, y):
    if bbox is None:
        return (float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y)))
    if len(bbox) != 4 or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        raise ValueError(f"bbox must be (x_min, y_min, x_max, y_max) with max > min, got {bbox!r}")
    return tuple(float(b) for b in bbox)


def _tan_projector(crval) -> WCS:
    """A TAN WCS whose 1-based 'pixel' coordinates are intermediate world coordinates (deg)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(crval[0]), float(crval[1])]
    w.wcs.crpix = [0.0, 0.0]
    w.wcs.cd = np.eye(2)
    w.wcs.set()
    return w


def _angular_sep_deg(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = (np.radians(a) for a in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def _project_refs(wcs: WCS, ref_ra, ref_dec, bbox, margin_pix):
    """Pixel positions of references near the detector; NaN for the others."""
    xc, yc = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    ra_c, dec_c = (float(v) for v in wcs.pixel_to_world_values(xc, yc))
    radius_pix = np.hypot(bbox[2] - bbox[0], bbox[3] - bbox[1]) / 2 + margin_pix
    radius_deg = 1.5 * radius_pix * wcs_pixel_scale_arcsec(wcs) / 3600.0
    near = _angular_sep_deg(ra_c, dec_c, ref_ra, ref_dec) < radius_deg
    px = np.full(len(ref_ra), np.nan)
    py = np.full(len(ref_ra), np.nan)
    if near.any():
        xy = wcs.all_world2pix(np.column_stack([ref_ra[near], ref_dec[near]]), 0, quiet=True)
        px[near], py[near] = xy[:, 0], xy[:, 1]
    inside = ((px > bbox[0] - margin_pix) & (px < bbox[2] + margin_pix)
              & (py > bbox[1] - margin_pix) & (py < bbox[3] + margin_pix))
    px[~inside] = np.nan
    py[~inside] = np.nan
    return px, py


def _brightest(flux, n):
    idx = np.flatnonzero(np.isfinite(flux))
    return idx[np.argsort(-flux[idx], kind="stable")][:n]


def _rotate(x, y, xc, yc, theta_rad):
    c, s = np.cos(theta_rad), np.sin(theta_rad)
    dx, dy = x - xc, y - yc
    return xc + c * dx - s * dy, yc + s * dx + c * dy


def _one_to_one(tree, x, y, radius):
    """Nearest reference within ``radius`` of each point; a reference keeps its closest source."""
    dist, j = tree.query(np.column_stack([x, y]), k=1, distance_upper_bound=radius)
    i = np.flatnonzero(np.isfinite(dist))
    j, dist = j[i], dist[i]
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(j[order], return_index=True)
    keep = order[first]
    return i[keep], j[keep], dist[keep]


def _poly_design(u, v, order):
    return np.column_stack([u ** (d - q) * v ** q for d in range(order + 1) for q in range(d + 1)])


def _n_terms(order):
    return (order + 1) * (order + 2) // 2


def _offset_vote(sx, sy, rx, ry, bbox, max_offset_pix, max_rotation_deg, bin_pix):
    """Best (rotation, shift) from histograms of source-reference offsets."""
    xc, yc = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    r_max = max(np.hypot(bbox[2] - bbox[0], bbox[3] - bbox[1]) / 2, 1.0)
    step = np.degrees(bin_pix / r_max)
    n_rot = int(np.ceil(max_rotation_deg / step)) if max_rotation_deg > 0 else 0
    rotations = np.linspace(-n_rot * step, n_rot * step, 2 * n_rot + 1)
    edges = np.arange(-max_offset_pix - bin_pix, max_offset_pix + 1.5 * bin_pix, bin_pix)
    n_bins = len(edges) - 1
    best = None
    for rot in rotations:
        tx, ty = _rotate(sx, sy, xc, yc, np.radians(rot))
        dx = (rx[None, :] - tx[:, None]).ravel()
        dy = (ry[None, :] - ty[:, None]).ravel()
        ok = (np.abs(dx) < edges[-1]) & (np.abs(dy) < edges[-1])
        hist, _, _ = np.histogram2d(dx[ok], dy[ok], bins=(edges, edges))
        # 2x2 sums: a true peak split over a bin boundary still counts fully.
        h2 = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        k = np.unravel_index(np.argmax(h2), h2.shape)
        if best is None or h2[k] > best[0]:
            best = (h2[k], rot, k, tx, ty, ok.sum())
    votes, rot, (kx, ky), tx, ty, n_pairs = best
    # Refine the shift: mean offset of the pairs in the peak cells.
    lo_x, lo_y = edges[kx], edges[ky]
    dx = (rx[None, :] - tx[:, None]).ravel()
    dy = (ry[None, :] - ty[:, None]).ravel()
    sel = (dx >= lo_x) & (dx < lo_x + 2 * bin_pix) & (dy >= lo_y) & (dy < lo_y + 2 * bin_pix)
    shift = (float(np.mean(dx[sel])), float(np.mean(dy[sel])))
    n_cells = (n_bins - 1) ** 2
    background = n_pairs / max(n_cells, 1)
    n_trials = n_cells * len(rotations)
    from scipy import stats  # lazy: scipy.stats costs ~0.5 s of import for every task module

    p_chance = float(min(1.0, n_trials * stats.poisson.sf(votes - 1, max(background, 1e-3))))
    return rot, shift, int(votes), p_chance


def match_to_reference(src_x, src_y, src_flux, ref_ra, ref_dec, ref_flux, initial_wcs: WCS, *,
                       bbox=None, max_offset_arcsec: float = 20.0, max_rotation_deg: float = 0.3,
                       n_bright_src: int = 200, n_bright_ref: int = 500, bin_arcsec: float = 0.5,
                       match_radius_arcsec: float = 1.0, min_matches: int = 6,
                       max_chance_probability: float = 1e-3) -> ReferenceMatch:
    """Match sources to reference objects despite a pointing error of the initial WCS.

    Parameters
    ----------
    src_x, src_y : array_like
        Source centroids, pixels (0-based).
    src_flux : array_like
        Source fluxes (any unit): only their order is used, to pick the brightest.
    ref_ra, ref_dec : array_like
        Reference positions, degrees (ICRS).
    ref_flux : array_like or `None`
        Reference fluxes (order only). `None` uses the references in the footprint in order.
    initial_wcs : `astropy.wcs.WCS`
        Approximate WCS (e.g. from the raw header: boresight + rotator + camera geometry).
    bbox : `tuple`, optional
        Detector box ``(x_min, y_min, x_max, y_max)``; defaults to the extent of the sources.
    max_offset_arcsec, max_rotation_deg : `float`
        Search range of the pointing error and of the rotation error of the initial WCS.
    n_bright_src, n_bright_ref : `int`
        Numbers of brightest sources / references used in the offset vote. More references
        than sources tolerates a catalogue deeper than the detections; if the brightest
        references give no significant peak (e.g. they are saturated on the image), a window
        of ``n_bright_ref`` slides down the reference ranking by half its size.
    bin_arcsec : `float`
        Histogram bin of the vote; also sets the rotation step (bin / detector half-diagonal).
    match_radius_arcsec : `float`
        Final nearest-neighbour radius.
    min_matches : `int`
        Fewer matches raise `AstrometryError`.
    max_chance_probability : `float`
        The vote peak must be less likely than this to arise from unrelated catalogues.

    Returns
    -------
    matches : `ReferenceMatch`

    Raises
    ------
    AstrometryError
        No references in the footprint, no significant offset peak or too few matches.
    """
    src_x, src_y, src_flux = (np.asarray(a, dtype=float) for a in (src_x, src_y, src_flux))
    ref_ra, ref_dec = np.asarray(ref_ra, dtype=float), np.asarray(ref_dec, dtype=float)
    if not (len(src_x) == len(src_y) == len(src_flux)):
        raise ValueError("src_x, src_y and src_flux must have the same length")
    if len(ref_ra) != len(ref_dec) or (ref_flux is not None and len(ref_flux) != len(ref_ra)):
        raise ValueError("ref_ra, ref_dec and ref_flux must have the same length")
    good_src = np.isfinite(src_x) & np.isfinite(src_y)
    if good_src.sum() < min_matches:
        raise AstrometryError(f"only {good_src.sum()} sources with finite centroids; need {min_matches}",
                              n_matches=0, threshold=min_matches)
    bbox = _bbox_from(bbox, src_x[good_src], src_y[good_src])
    scale = wcs_pixel_scale_arcsec(initial_wcs)
    max_offset_pix = max_offset_arcsec / scale
    r_max = np.hypot(bbox[2] - bbox[0], bbox[3] - bbox[1]) / 2
    margin = max_offset_pix + r_max * np.radians(max_rotation_deg)
    rx, ry = _project_refs(initial_wcs, ref_ra, ref_dec, bbox, margin)
    in_fp = np.flatnonzero(np.isfinite(rx))
    if len(in_fp) < min_matches:
        raise AstrometryError(
            f"only {len(in_fp)} reference objects fall on the detector with the initial WCS "
            f"(need {min_matches}): wrong reference shards or a grossly wrong initial WCS?",
            n_matches=0, threshold=min_matches)
    ranked = in_fp if ref_flux is None else in_fp[_brightest(np.asarray(ref_flux, dtype=float)[in_fp],
                                                              len(in_fp))]
    si = np.flatnonzero(good_src)[_brightest(src_flux[good_src], n_bright_src)]
    bin_pix = bin_arcsec / scale
    # Slide a window down the reference brightness ranking until the vote is significant:
    # the brightest references may be saturated, hence absent from the sources.
    start = 0
    while True:
        ri = ranked[start:start + n_bright_ref]
        rot, shift, votes, p_chance = _offset_vote(src_x[si], src_y[si], rx[ri], ry[ri], bbox,
                                                   max_offset_pix, max_rotation_deg, bin_pix)
        start += max(n_bright_ref // 2, 1)
        found = p_chance <= max_chance_probability and votes >= min_matches
        if found or start + n_bright_ref // 2 >= len(ranked):
            break
    if p_chance > max_chance_probability or votes < min_matches:
        raise AstrometryError(
            f"no significant source-reference offset found: best peak {votes} pairs "
            f"(chance probability {p_chance:.2g}, need < {max_chance_probability:g} and >= {min_matches} "
            f"pairs); the reference catalogue may not cover this detector",
            n_matches=votes, threshold=min_matches)

    # Refine with nearest neighbours and a polynomial of growing order, shrinking the radius.
    xc, yc = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    half = max((bbox[2] - bbox[0]) / 2, (bbox[3] - bbox[1]) / 2, 1.0)
    from scipy.spatial import cKDTree  # lazy: keeps the task modules' import time low

    tree = cKDTree(np.column_stack([rx[in_fp], ry[in_fp]]))
    gi = np.flatnonzero(good_src)
    tx, ty = _rotate(src_x[gi], src_y[gi], xc, yc, np.radians(rot))
    px, py = tx + shift[0], ty + shift[1]
    radius = max(3 * bin_pix, match_radius_arcsec / scale)
    final_radius = match_radius_arcsec / scale
    for order in (1, 1, 2, 3, 3):
        i, j, _ = _one_to_one(tree, px, py, radius)
        if len(i) < min_matches:
            break
        order = min(order, max(1, int(np.sqrt(len(i) / 3)) - 1))
        design_all = _poly_design((src_x[gi] - xc) / half, (src_y[gi] - yc) / half, order)
        design = design_all[i]
        coef, *_ = np.linalg.lstsq(design, np.column_stack([rx[in_fp][j], ry[in_fp][j]]), rcond=None)
        cx, cy = coef[:, 0], coef[:, 1]
        resid = np.hypot(design @ cx - rx[in_fp][j], design @ cy - ry[in_fp][j])
        px, py = design_all @ cx, design_all @ cy
        rms = np.sqrt(np.mean(resid**2))
        radius = max(final_radius, min(radius, 5 * rms))
    i, j, dist = _one_to_one(tree, px, py, max(radius, final_radius))
    if len(i) < min_matches:
        raise AstrometryError(f"only {len(i)} source-reference matches; need {min_matches}",
                              n_matches=len(i), threshold=min_matches)
    return ReferenceMatch(src_index=gi[i], ref_index=in_fp[j], separation_arcsec=dist * scale,
                          shift_pix=shift, rotation_deg=float(rot), n_votes=votes,
                          chance_probability=p_chance, n_refs_in_footprint=len(in_fp))


@dataclasses.dataclass
class _TanSipFit:
    wcs: WCS
    used: np.ndarray
    resid_mas: np.ndarray  # (n, 2) residuals (measured - model) in the tangent plane, mas
    sip_order: int
    inverse_max_err_pix: float


def _fit_tan_sip_detail(x, y, ra, dec, *, crpix=None, crval=None, sip_order=3, inverse_order=None,
                        bbox=None, sigma_pix=None, n_sigma=3.0, max_clip_iter=5) -> _TanSipFit:
    x, y, ra, dec = (np.asarray(a, dtype=float) for a in (x, y, ra, dec))
    n = len(x)
    if not (len(y) == len(ra) == len(dec) == n):
        raise ValueError("x, y, ra and dec must have the same length")
    if sip_order < 1:
        raise ValueError(f"sip_order must be >= 1 (1 means a pure TAN fit), got {sip_order}")
    bbox = _bbox_from(bbox, x, y)
    if crpix is None:
        crpix = ((bbox[0] + bbox[2]) / 2 + 1.0, (bbox[1] + bbox[3]) / 2 + 1.0)
    crpix = np.asarray(crpix, dtype=float)
    u, v = x + 1.0 - crpix[0], y + 1.0 - crpix[1]
    su = max(bbox[2] - bbox[0], 1.0) / 2
    sv = max(bbox[3] - bbox[1], 1.0) / 2
    if crval is None:
        # Mean unit vector of the stars: close enough for the iteration below.
        vec = np.column_stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                               np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))])
        m = vec.mean(axis=0)
        crval = (np.degrees(np.arctan2(m[1], m[0])) % 360.0, np.degrees(np.arcsin(m[2] / np.linalg.norm(m))))
    crval = np.asarray(crval, dtype=float)
    weights = np.ones(n) if sigma_pix is None else 1.0 / np.maximum(np.asarray(sigma_pix, float), 1e-3) ** 2
    exps = [(d - q, q) for d in range(sip_order + 1) for q in range(d + 1)]
    design = np.column_stack([(u / su) ** p * (v / sv) ** q for p, q in exps])
    used = np.isfinite(u) & np.isfinite(v) & np.isfinite(ra) & np.isfinite(dec)
    from scipy import special

    clip_radius = np.sqrt(-2 * np.log(special.erfc(n_sigma / np.sqrt(2))))
    for _ in range(max_clip_iter + 1):
        if used.sum() < 2 * len(exps):
            raise AstrometryError(
                f"TAN-SIP order {sip_order} needs at least {2 * len(exps)} matched stars; {used.sum()} left",
                n_matches=int(used.sum()), threshold=2 * len(exps))
        sw = np.sqrt(weights[used])[:, None]
        for _it in range(4):  # move CRVAL until the polynomial has no constant term
            proj = _tan_projector(crval)
            xi, eta = proj.wcs_world2pix(ra, dec, 1)
            coef, *_ = np.linalg.lstsq(design[used] * sw, np.column_stack([xi, eta])[used] * sw, rcond=None)
            cxi, ceta = coef[:, 0], coef[:, 1]
            crval = np.array([float(c) for c in proj.wcs_pix2world(cxi[0], ceta[0], 1)])
            if np.hypot(cxi[0], ceta[0]) * _DEG2MAS < 1e-3:
                break
        proj = _tan_projector(crval)
        xi, eta = proj.wcs_world2pix(ra, dec, 1)
        resid = np.column_stack([xi - design @ cxi + cxi[0], eta - design @ ceta + ceta[0]]) * _DEG2MAS
        # Per-axis robust sigma (outliers are often along one axis), floored at 0.1 mas so
        # that noiseless (simulated) inputs do not clip on rounding errors. With centroid
        # errors, residuals are normalised by them first: otherwise a fit that (rightly)
        # follows the bright stars clips the faint ones for their expected noise.
        norm = resid * np.sqrt(weights / np.mean(weights[used]))[:, None]
        sigma = np.maximum(1.4826 * np.median(np.abs(norm[used]), axis=0), 0.1)
        new_used = used & (np.hypot(*(norm / sigma).T) <= clip_radius)
        if np.array_equal(new_used, used):
            break
        used = new_used
    cd = np.array([[cxi[1] / su, cxi[2] / sv], [ceta[1] / su, ceta[2] / sv]])
    cd_inv = np.linalg.inv(cd)
    a = np.zeros((sip_order + 1, sip_order + 1))
    b = np.zeros_like(a)
    for k, (p, q) in enumerate(exps):
        if p + q >= 2:
            a[p, q], b[p, q] = cd_inv @ np.array([cxi[k], ceta[k]]) / (su**p * sv**q)

    # Inverse polynomial on a grid a little larger than the box.
    inverse_order = sip_order + 2 if inverse_order is None else inverse_order
    ng = 60
    gx, gy = np.meshgrid(np.linspace(bbox[0] - 0.05 * 2 * su, bbox[2] + 0.05 * 2 * su, ng),
                         np.linspace(bbox[1] - 0.05 * 2 * sv, bbox[3] + 0.05 * 2 * sv, ng))
    gu, gv = gx.ravel() + 1.0 - crpix[0], gy.ravel() + 1.0 - crpix[1]
    fu = gu + sum(a[p, q] * gu**p * gv**q for p, q in exps if p + q >= 2)
    fv = gv + sum(b[p, q] * gu**p * gv**q for p, q in exps if p + q >= 2)
    iexps = [(d - q, q) for d in range(inverse_order + 1) for q in range(d + 1)]
    idesign = np.column_stack([(fu / su) ** p * (fv / sv) ** q for p, q in iexps])
    coef, *_ = np.linalg.lstsq(idesign, np.column_stack([gu - fu, gv - fv]), rcond=None)
    cap, cbp = coef[:, 0], coef[:, 1]
    inv_err = float(np.max(np.hypot(idesign @ cap - (gu - fu), idesign @ cbp - (gv - fv))))
    ap = np.zeros((inverse_order + 1, inverse_order + 1))
    bp = np.zeros_like(ap)
    for k, (p, q) in enumerate(iexps):
        ap[p, q], bp[p, q] = cap[k] / (su**p * sv**q), cbp[k] / (su**p * sv**q)

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip_order >= 2 else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = crval
    wcs.wcs.crpix = crpix
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    if sip_order >= 2:
        wcs.sip = Sip(a, b, ap, bp, crpix)
    wcs.wcs.set()
    nx = int(round(bbox[2] - bbox[0] + 1))
    ny = int(round(bbox[3] - bbox[1] + 1))
    if bbox[0] == 0 and bbox[1] == 0:
        wcs.pixel_shape = (nx, ny)
    return _TanSipFit(wcs=wcs, used=used, resid_mas=resid, sip_order=sip_order, inverse_max_err_pix=inv_err)


def _weighted_chi2(fit: _TanSipFit, weights: np.ndarray, rows: np.ndarray) -> float:
    return float(np.sum(np.sum(fit.resid_mas[rows] ** 2, axis=1) * weights[rows]))


def _select_order(x, y, ra, dec, *, crpix, max_order: int, bbox, sigma_pix=None) -> _TanSipFit:
    """Fit orders ``max_order`` down to 1 and keep the lowest order that the data do not
    reject (Bayesian information criterion, with the noise scale of the highest-order fit).

    A distortion polynomial that the stars do not constrain only adds noise, worst at the
    corners where it extrapolates: on a small detector or a sparse field the distortion is
    far below the centroid noise and a lower order is more accurate against the truth.
    """
    best = _fit_tan_sip_detail(x, y, ra, dec, crpix=crpix, sip_order=max_order, bbox=bbox, sigma_pix=sigma_pix)
    if max_order <= 1:
        return best
    weights = np.ones(len(x)) if sigma_pix is None else 1.0 / np.maximum(np.asarray(sigma_pix, float), 1e-3) ** 2
    n_terms_high = _n_terms(max_order)
    rows_high = np.flatnonzero(best.used)
    dof = 2 * len(rows_high) - 2 * n_terms_high
    if dof <= 0:
        return best
    scale2 = max(_weighted_chi2(best, weights, rows_high) / dof, 1e-12)
    for order in range(max_order - 1, 0, -1):
        try:
            lower = _fit_tan_sip_detail(x, y, ra, dec, crpix=crpix, sip_order=order, bbox=bbox, sigma_pix=sigma_pix)
        except AstrometryError:
            break
        rows = np.flatnonzero(best.used & lower.used)
        if len(rows) < 0.9 * len(rows_high):
            break
        delta_chi2 = (_weighted_chi2(lower, weights, rows) - _weighted_chi2(best, weights, rows)) / scale2
        penalty = 2 * (_n_terms(best.sip_order) - _n_terms(order)) * np.log(2 * len(rows))
        if delta_chi2 > penalty:
            break
        best = lower
    return best


def fit_tan_sip(x, y, ra, dec, *, crpix=None, crval=None, sip_order: int = 3,
                inverse_order: int | None = None, bbox=None, sigma_pix=None, n_sigma: float = 3.0,
                max_clip_iter: int = 5) -> WCS:
    """Fit a TAN-SIP WCS to matched pixel and sky positions by sigma-clipped least squares.

    The model, with :math:`(u, v)` the pixel offsets from CRPIX and :math:`(\\xi, \\eta)` the
    gnomonic projection of (ra, dec) about CRVAL:

    .. math:: (\\xi, \\eta)^T = CD\\,(u + A(u, v),\\; v + B(u, v))^T

    with :math:`A, B` polynomials of orders 2..``sip_order``. It is linear in the
    coefficients for fixed CRVAL; CRVAL is moved until the fitted constant term vanishes.

    Parameters
    ----------
    x, y : array_like
        Pixel positions (0-based).
    ra, dec : array_like
        Sky positions, degrees.
    crpix : pair of float, optional
        FITS (1-based) reference pixel, held fixed; default the centre of ``bbox``.
    crval : pair of float, optional
        Starting tangent point, degrees; default the mean direction of the stars.
    sip_order : `int`
        Distortion order (1 = pure TAN; 3 or 4 typical for a 4k detector).
    inverse_order : `int`, optional
        Order of the inverse ``AP``/``BP`` polynomials; default ``sip_order + 2`` (an
        inverse of the same order leaves ~0.01 px errors for a few-arcsec distortion).
    bbox : `tuple`, optional
        ``(x_min, y_min, x_max, y_max)`` over which the inverse is fit; default the star extent.
        When it starts at (0, 0) the WCS's ``pixel_shape`` is set from it.
    sigma_pix : array_like, optional
        Per-star position errors (pixels) for weighting; default equal weights.
    n_sigma : `float`
        Clipping threshold (2-D residual radius at the same tail probability as a 1-D
        ``n_sigma`` cut, against the MAD scatter).

    Returns
    -------
    wcs : `astropy.wcs.WCS`

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> true = WCS(naxis=2); true.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> true.wcs.crval = [60.0, -35.0]; true.wcs.crpix = [51, 51]; true.wcs.cd = np.eye(2) * 5.6e-5
    >>> x, y = np.random.default_rng(1).uniform(0, 100, (2, 50))
    >>> ra, dec = true.all_pix2world(x, y, 0)
    >>> fit = fit_tan_sip(x, y, ra, dec, sip_order=1)
    >>> bool(np.allclose(fit.wcs.crval, true.wcs.crval, atol=1e-9))
    True
    """
    return _fit_tan_sip_detail(x, y, ra, dec, crpix=crpix, crval=crval, sip_order=sip_order,
                               inverse_order=inverse_order, bbox=bbox, sigma_pix=sigma_pix,
                               n_sigma=n_sigma, max_clip_iter=max_clip_iter).wcs


def _rotation_deg(initial: WCS, fitted: WCS) -> float:
    rel = initial.pixel_scale_matrix @ np.linalg.inv(fitted.pixel_scale_matrix)
    return float(np.degrees(np.arctan2(rel[1, 0] - rel[0, 1], rel[0, 0] + rel[1, 1])))


def fit_wcs(src_x, src_y, src_flux, ref_ra, ref_dec, ref_flux, initial_wcs: WCS, *, bbox=None,
            sip_order: int = 3, crpix=None, n_iter: int = 3, match_radius_arcsec: float = 0.5,
            min_matches: int = 10, max_rms_mas: float = 200.0, sigma_pix=None,
            **match_kwargs) -> tuple[WCS, dict]:
    """Match to the reference catalogue and fit a TAN-SIP WCS; re-match with each new fit.

    Parameters
    ----------
    src_x, src_y, src_flux : array_like
        Source centroids (0-based pixels) and fluxes (for picking the brightest).
    ref_ra, ref_dec, ref_flux : array_like
        Reference catalogue positions (deg) and fluxes (`None` allowed).
    initial_wcs : `astropy.wcs.WCS`
        Approximate WCS; distortion terms in it help the first match but are not required.
    bbox : `tuple`, optional
        Detector box ``(x_min, y_min, x_max, y_max)``; pass it (e.g. ``(0, 0, 4071, 3999)``)
        so the inverse distortion covers the whole detector.
    sip_order : `int`
        Distortion order; lowered automatically when there are fewer than 3 stars per
        coefficient, and, below 5 stars per coefficient, to the lowest order the
        data do not reject by the Bayesian information criterion (reported as
        ``stats['sip_order']``).
    crpix : pair of float, optional
        FITS (1-based) reference pixel of the fitted WCS; default the centre of ``bbox``
        (well-conditioned polynomials; an initial WCS's CRPIX may lie off the detector).
    n_iter : `int`
        Fit / re-match cycles after the initial match.
    match_radius_arcsec : `float`
        Re-match radius once a TAN-SIP fit exists.
    min_matches : `int`
        Fewer matches raise `AstrometryError`.
    max_rms_mas : `float`
        Larger RMS (2-D, of the clipped fit) raises `AstrometryError`.
    sigma_pix : array_like, optional
        Centroid errors of the sources (pixels), used as fit weights.
    **match_kwargs
        Passed to `match_to_reference` (``max_offset_arcsec``, ``max_rotation_deg``, ...).

    Returns
    -------
    wcs : `astropy.wcs.WCS`
    stats : `dict`
        ``n_matches`` (used in the final fit), ``n_matched`` (before clipping),
        ``rms_mas`` (2-D RMS of the fit residuals), ``rms_ra_mas``/``rms_dec_mas``,
        ``median_sep_mas``, ``offset_ra_arcsec``/``offset_dec_arcsec`` (fitted minus initial
        position of the bbox centre; RA offset times cos(dec)), ``rotation_deg`` (rotation of
        the initial CD matrix relative to the fitted one, counter-clockwise on the tangent plane),
        ``match_rotation_deg`` (coarse rotation found by the matcher), ``sip_order``, ``inverse_max_err_pix``,
        ``n_refs_in_footprint``, ``src_index``/``ref_index`` (the final matches, arrays).

    Raises
    ------
    AstrometryError
        Too few matches or too large an RMS; attributes ``n_matches`` and ``rms_mas``.
    """
    src_x, src_y = np.asarray(src_x, dtype=float), np.asarray(src_y, dtype=float)
    ref_ra, ref_dec = np.asarray(ref_ra, dtype=float), np.asarray(ref_dec, dtype=float)
    good = np.isfinite(src_x) & np.isfinite(src_y)
    bbox = _bbox_from(bbox, src_x[good], src_y[good]) if good.any() else bbox
    match = match_to_reference(src_x, src_y, src_flux, ref_ra, ref_dec, ref_flux, initial_wcs,
                               bbox=bbox, min_matches=min_matches, **match_kwargs)
    sig = None if sigma_pix is None else np.asarray(sigma_pix, dtype=float)
    si, ri = match.src_index, match.ref_index
    if crpix is None:
        crpix = ((bbox[0] + bbox[2]) / 2 + 1.0, (bbox[1] + bbox[3]) / 2 + 1.0)
    wcs = initial_wcs
    margin = 10.0 / wcs_pixel_scale_arcsec(initial_wcs)
    for it in range(n_iter + 1):
        order = sip_order
        while order > 1 and len(si) < 3 * 2 * _n_terms(order):
            order -= 1
        if len(si) >= 5 * 2 * _n_terms(order):
            fit = _fit_tan_sip_detail(src_x[si], src_y[si], ref_ra[ri], ref_dec[ri], crpix=crpix,
                                      sip_order=order, bbox=bbox, sigma_pix=None if sig is None else sig[si])
        else:  # few stars per coefficient: keep only the terms the data support
            fit = _select_order(src_x[si], src_y[si], ref_ra[ri], ref_dec[ri], crpix=crpix, max_order=order,
                                bbox=bbox, sigma_pix=None if sig is None else sig[si])
        wcs = fit.wcs
        if it == n_iter:
            break
        rx, ry = _project_refs(wcs, ref_ra, ref_dec, bbox, margin)
        in_fp = np.flatnonzero(np.isfinite(rx))
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([rx[in_fp], ry[in_fp]]))
        gi = np.flatnonzero(good)
        rms_pix = np.sqrt(np.mean(np.sum(fit.resid_mas[fit.used] ** 2, axis=1))) / 1e3 / \
            wcs_pixel_scale_arcsec(wcs)
        radius = max(match_radius_arcsec / wcs_pixel_scale_arcsec(wcs), 5 * rms_pix)
        i, j, _ = _one_to_one(tree, src_x[gi], src_y[gi], radius)
        if len(i) < min_matches:
            raise AstrometryError(f"only {len(i)} matches after re-matching with the fitted WCS; "
                                  f"need {min_matches}", n_matches=len(i), threshold=min_matches)
        si, ri = gi[i], in_fp[j]
    res = fit.resid_mas[fit.used]
    n_used = int(fit.used.sum())
    rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1))))
    xc, yc = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    ra0, dec0 = (float(v) for v in initial_wcs.pixel_to_world_values(xc, yc))
    ra1, dec1 = (float(v) for v in wcs.pixel_to_world_values(xc, yc))
    stats_out = {
        "n_matches": n_used,
        "n_matched": len(si),
        "rms_mas": rms,
        "rms_ra_mas": float(np.sqrt(np.mean(res[:, 0] ** 2))),
        "rms_dec_mas": float(np.sqrt(np.mean(res[:, 1] ** 2))),
        "median_sep_mas": float(np.median(np.hypot(res[:, 0], res[:, 1]))),
        "offset_ra_arcsec": float(((ra1 - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec1)) * 3600),
        "offset_dec_arcsec": float((dec1 - dec0) * 3600),
        "rotation_deg": _rotation_deg(initial_wcs, wcs),
        "match_rotation_deg": match.rotation_deg,
        "sip_order": fit.sip_order,
        "inverse_max_err_pix": fit.inverse_max_err_pix,
        "n_refs_in_footprint": match.n_refs_in_footprint,
        "src_index": si[fit.used],
        "ref_index": ri[fit.used],
    }
    if n_used < min_matches:
        raise AstrometryError(f"only {n_used} matches survive clipping; need {min_matches}",
                              n_matches=n_used, rms_mas=rms, threshold=min_matches)
    if rms > max_rms_mas:
        raise AstrometryError(f"astrometric fit RMS {rms:.1f} mas exceeds {max_rms_mas:g} mas "
                              f"({n_used} matches)", n_matches=n_used, rms_mas=rms, threshold=max_rms_mas)
    return wcs, stats_out
