"""Optimal one-to-one association of DiaSources with DiaObjects.

Why not greedy: the 2022 pipeline matched each DiaSource to its nearest
DiaObject, greedily by distance. When two sources compete for one object the
greedy choice can leave a source unmatched (or matched to a far object) although
a swap would have matched both closer. Today's Rubin pipeline solves the
assignment problem instead; so do we.

Algorithm
---------
1. Candidates: every (source, object) pair closer than ``radius_arcsec``, found
   with a KD-tree on unit vectors (chord length <-> angle), so 1e4 sources
   against 1e6 objects costs one tree build and 1e4 ball queries.
2. Score of a candidate pair: a χ² in the local tangent plane,
   ``(Δξ / σξ)² + (Δη / ση)²`` with per-axis errors combined in quadrature
   from ``raErr``/``decErr`` (degrees, APDB convention; RA error is
   ``dRA·cos(dec)``) of the source and, if present, of the object, each
   axis floored at ``error_floor_arcsec`` (0.05"). Without error columns the
   score is the squared angular separation in arcsec².
3. The candidate graph is split into connected components; a component with
   one source and one object is matched directly (the common case), larger
   components are solved exactly with `scipy.optimize.linear_sum_assignment`.
   The objective is lexicographic: first the largest number of matched
   pairs, then the smallest total score among those (a source is never left
   unmatched to save score when it could be matched within the radius).
4. Unmatched sources become new DiaObjects whose ``diaObjectId`` is the
   source's ``diaSourceId`` (Rubin's convention), see `new_dia_object_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "AssociationResult",
    "associate",
    "assign_dia_object_ids",
    "new_dia_object_ids",
    "unit_vectors",
    "tangent_offsets_arcsec",
]

_ARCSEC_PER_RAD = 180.0 / np.pi * 3600.0


@dataclass
class AssociationResult:
    """Outcome of `associate`.

    Attributes
    ----------
    matches : `pandas.DataFrame`
        One row per matched pair, sorted by ``source_row``; columns
        ``source_row`` (positional index into ``dia_sources``),
        ``object_row`` (positional index into ``dia_objects``),
        ``diaObjectId``, ``distance_arcsec`` and ``score`` (χ², or
        separation² in arcsec² without errors).
    unmatched : `numpy.ndarray` of `int`
        Positional indices of the sources that matched nothing (sorted).
    n_candidates : `int`
        Number of (source, object) pairs inside the radius.
    """

    matches: pd.DataFrame
    unmatched: np.ndarray
    n_candidates: int

    def __iter__(self):
        # Allows ``matches, unmatched = associate(...)``.
        yield self.matches
        yield self.unmatched


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """Unit vectors (n, 3) of sky positions given in degrees."""
    ra = np.deg2rad(np.asarray(ra_deg, dtype=float))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=float))
    cos_dec = np.cos(dec)
    return np.column_stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)])


def tangent_offsets_arcsec(ra0_deg, dec0_deg, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (east, north) in arcsec of positions from reference positions.

    Computed from unit vectors projected on the local east and north axes of
    the reference point, so they stay correct at the poles and across RA=0
    (east offset = Δα·cos δ for small separations).
    """
    v0 = unit_vectors(ra0_deg, dec0_deg)
    v = unit_vectors(ra_deg, dec_deg)
    ra0 = np.deg2rad(np.asarray(ra0_deg, dtype=float))
    dec0 = np.deg2rad(np.asarray(dec0_deg, dtype=float))
    east = np.column_stack([-np.sin(ra0), np.cos(ra0), np.zeros_like(ra0)])
    north = np.column_stack([-np.sin(dec0) * np.cos(ra0), -np.sin(dec0) * np.sin(ra0), np.cos(dec0)])
    d = v - v0
    return (d * east).sum(axis=1) * _ARCSEC_PER_RAD, (d * north).sum(axis=1) * _ARCSEC_PER_RAD


def _column(df: pd.DataFrame, name: str, what: str) -> np.ndarray:
    try:
        return df[name].to_numpy(dtype=float)
    except KeyError:
        raise KeyError(f"{what} has no column {name!r} (columns: {list(df.columns)})") from None


def _errors_arcsec(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-axis position errors in arcsec, or None without error columns."""
    if "raErr" not in df.columns or "decErr" not in df.columns:
        return None
    ra_err = df["raErr"].to_numpy(dtype=float) * 3600.0
    dec_err = df["decErr"].to_numpy(dtype=float) * 3600.0
    # Missing errors count as zero: the floor then applies.
    return np.nan_to_num(ra_err, nan=0.0), np.nan_to_num(dec_err, nan=0.0)


def associate(
    dia_sources: pd.DataFrame,
    dia_objects: pd.DataFrame,
    radius_arcsec: float = 1.0,
    *,
    use_chi2: bool = True,
    error_floor_arcsec: float = 0.05,
) -> AssociationResult:
    """Match DiaSources to DiaObjects one-to-one, optimally, within a radius.

    Parameters
    ----------
    dia_sources : `pandas.DataFrame`
        Columns ``ra``, ``dec`` (degrees) and optionally ``raErr``,
        ``decErr`` (degrees, RA error as ``dRA·cos(dec)``).
    dia_objects : `pandas.DataFrame`
        Columns ``diaObjectId``, ``ra``, ``dec`` and optionally
        ``raErr``/``decErr`` (added in quadrature to the source errors).
    radius_arcsec : `float`
        Hard matching radius (angular separation), 1" in Rubin's pipeline.
    use_chi2 : `bool`
        Score pairs by χ² using the position errors (floored per axis at
        ``error_floor_arcsec``); if False, or if ``dia_sources`` has no
        error columns, score by squared separation.
    error_floor_arcsec : `float`
        Minimum per-axis position error used in the χ².

    Returns
    -------
    result : `AssociationResult`
        ``matches`` (DataFrame of pairs) and ``unmatched`` (positional source
        indices); unpacks as ``matches, unmatched = associate(...)``.

    Examples
    --------
    >>> import pandas as pd
    >>> src = pd.DataFrame({"ra": [10.0, 10.0 + 0.3 / 3600], "dec": [0.0, 0.0]})
    >>> obj = pd.DataFrame({"diaObjectId": [7, 8], "ra": [10.0 + 0.2 / 3600, 10.0 - 0.1 / 3600],
    ...                     "dec": [0.0, 0.0]})
    >>> matches, unmatched = associate(src, obj, use_chi2=False)
    >>> matches[["source_row", "diaObjectId"]].to_numpy().tolist()
    [[0, 8], [1, 7]]
    >>> unmatched.tolist()
    []
    """
    if radius_arcsec <= 0:
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec}")
    n_src = len(dia_sources)
    n_obj = len(dia_objects)
    empty = pd.DataFrame(
        {
            "source_row": np.zeros(0, dtype=np.int64),
            "object_row": np.zeros(0, dtype=np.int64),
            "diaObjectId": np.zeros(0, dtype=np.int64),
            "distance_arcsec": np.zeros(0),
            "score": np.zeros(0),
        }
    )
    if n_src == 0 or n_obj == 0:
        return AssociationResult(empty, np.arange(n_src, dtype=np.int64), 0)

    src_ra = _column(dia_sources, "ra", "dia_sources")
    src_dec = _column(dia_sources, "dec", "dia_sources")
    obj_ra = _column(dia_objects, "ra", "dia_objects")
    obj_dec = _column(dia_objects, "dec", "dia_objects")
    if "diaObjectId" not in dia_objects.columns:
        raise KeyError(f"dia_objects has no column 'diaObjectId' (columns: {list(dia_objects.columns)})")
    obj_ids = dia_objects["diaObjectId"].to_numpy(dtype=np.int64)
    for name, arr in (("dia_sources", src_ra), ("dia_sources", src_dec)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite ra/dec values")

    # -- 1. candidates -----------------------------------------------------
    src_xyz = unit_vectors(src_ra, src_dec)
    obj_xyz = unit_vectors(obj_ra, obj_dec)
    radius_rad = np.deg2rad(radius_arcsec / 3600.0)
    chord = 2.0 * np.sin(0.5 * radius_rad)
    # An unbalanced tree without node compaction builds ~2x faster; queries
    # are few (one per source) so their small slowdown does not matter.
    tree = cKDTree(obj_xyz, balanced_tree=False, compact_nodes=False)
    neighbours = tree.query_ball_point(src_xyz, chord * (1.0 + 1e-9))
    counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=n_src)
    n_cand = int(counts.sum())
    if n_cand == 0:
        return AssociationResult(empty, np.arange(n_src, dtype=np.int64), 0)
    cand_src = np.repeat(np.arange(n_src, dtype=np.int64), counts)
    cand_obj = np.fromiter((j for n in neighbours for j in n), dtype=np.int64, count=n_cand)

    # -- 2. scores ---------------------------------------------------------
    d_east, d_north = tangent_offsets_arcsec(
        src_ra[cand_src], src_dec[cand_src], obj_ra[cand_obj], obj_dec[cand_obj]
    )
    dist = np.linalg.norm(src_xyz[cand_src] - obj_xyz[cand_obj], axis=1)
    dist_arcsec = 2.0 * np.arcsin(np.clip(0.5 * dist, 0.0, 1.0)) * _ARCSEC_PER_RAD
    keep = dist_arcsec <= radius_arcsec
    cand_src, cand_obj = cand_src[keep], cand_obj[keep]
    d_east, d_north, dist_arcsec = d_east[keep], d_north[keep], dist_arcsec[keep]
    n_cand = int(keep.sum())
    if n_cand == 0:
        return AssociationResult(empty, np.arange(n_src, dtype=np.int64), 0)

    src_err = _errors_arcsec(dia_sources) if use_chi2 else None
    if src_err is not None:
        var_e = src_err[0][cand_src] ** 2
        var_n = src_err[1][cand_src] ** 2
        obj_err = _errors_arcsec(dia_objects)
        if obj_err is not None:
            var_e = var_e + obj_err[0][cand_obj] ** 2
            var_n = var_n + obj_err[1][cand_obj] ** 2
        floor2 = error_floor_arcsec**2
        score = d_east**2 / np.maximum(var_e, floor2) + d_north**2 / np.maximum(var_n, floor2)
    else:
        score = dist_arcsec**2

    # -- 3. components and assignment -------------------------------------
    # Graph nodes: sources 0..n_src-1, then candidate objects (relabelled).
    used_obj, obj_local = np.unique(cand_obj, return_inverse=True)
    n_nodes = n_src + len(used_obj)
    graph = coo_matrix(
        (np.ones(n_cand), (cand_src, n_src + obj_local)), shape=(n_nodes, n_nodes)
    ).tocsr()
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[cand_src]
    edges_per_comp = np.bincount(edge_label, minlength=labels.max() + 1)

    chosen = np.zeros(n_cand, dtype=bool)
    # Single-edge components: one source, one object, nothing to decide.
    chosen[edges_per_comp[edge_label] == 1] = True
    multi = np.flatnonzero(edges_per_comp[edge_label] > 1)
    if multi.size:
        order = multi[np.argsort(edge_label[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(edge_label[order])) + 1
        for group in np.split(order, bounds):
            chosen[group[_solve_component(cand_src[group], cand_obj[group], score[group])]] = True

    sel = np.flatnonzero(chosen)
    sel = sel[np.argsort(cand_src[sel], kind="stable")]
    matches = pd.DataFrame(
        {
            "source_row": cand_src[sel],
            "object_row": cand_obj[sel],
            "diaObjectId": obj_ids[cand_obj[sel]],
            "distance_arcsec": dist_arcsec[sel],
            "score": score[sel],
        }
    )
    matched = np.zeros(n_src, dtype=bool)
    matched[cand_src[sel]] = True
    return AssociationResult(matches, np.flatnonzero(~matched).astype(np.int64), n_cand)


def _solve_component(src: np.ndarray, obj: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices (into the edge arrays) of the optimal matching of one component.

    Lexicographic objective via a weight offset: each match earns a bonus
    ``big`` larger than the sum of all scores, so the solution first maximises
    the number of matches and then minimises the total score. Non-edges are
    forbidden with an infinite-like cost and dropped afterwards.
    """
    us, si = np.unique(src, return_inverse=True)
    uo, oi = np.unique(obj, return_inverse=True)
    big = float(np.sum(score)) + 1.0
    forbidden = big * (len(us) + len(uo) + 1) * 4.0
    cost = np.full((len(us), len(uo)), forbidden)
    edge_at = np.full((len(us), len(uo)), -1, dtype=np.int64)
    cost[si, oi] = score - big
    edge_at[si, oi] = np.arange(len(score))
    rows, cols = linear_sum_assignment(cost)
    picked = edge_at[rows, cols]
    return picked[picked >= 0]


def new_dia_object_ids(dia_sources: pd.DataFrame, unmatched: np.ndarray) -> np.ndarray:
    """``diaObjectId`` of the new DiaObjects seeded by unmatched sources.

    Rubin's convention: a new DiaObject takes the ``diaSourceId`` of the
    DiaSource that created it (unique, and traceable back to the source).
    """
    if "diaSourceId" not in dia_sources.columns:
        raise KeyError("dia_sources needs a 'diaSourceId' column to create new DiaObjects")
    return dia_sources["diaSourceId"].to_numpy(dtype=np.int64)[np.asarray(unmatched, dtype=np.int64)]


def assign_dia_object_ids(
    dia_sources: pd.DataFrame,
    dia_objects: pd.DataFrame,
    radius_arcsec: float = 1.0,
    **kwargs,
) -> tuple[pd.Series, AssociationResult]:
    """Associate and return the ``diaObjectId`` of every source.

    Matched sources get their object's id; unmatched ones get their own
    ``diaSourceId`` (they seed new DiaObjects). Extra keyword arguments go to
    `associate`.

    Returns
    -------
    ids : `pandas.Series` of int64
        Indexed like ``dia_sources``.
    result : `AssociationResult`
    """
    result = associate(dia_sources, dia_objects, radius_arcsec, **kwargs)
    ids = np.zeros(len(dia_sources), dtype=np.int64)
    ids[result.matches["source_row"].to_numpy()] = result.matches["diaObjectId"].to_numpy()
    ids[result.unmatched] = new_dia_object_ids(dia_sources, result.unmatched)
    return pd.Series(ids, index=dia_sources.index, name="diaObjectId"), result
