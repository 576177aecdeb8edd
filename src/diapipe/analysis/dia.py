"""Difference-imaging and association figures against truth (ap_verify-style).

- DiaSources, over every processed detector-visit: number, real/spurious (matching a
  truth variable within 0.5"), spurious density per deg² of processed detector area
  (calexp bounding boxes), completeness of truth variables overall and in ap_verify's
  magnitude bins (20-22, 22-24, 24-26).
- Issue 5's quality figures, over *independent* detector-visits only (visits that are
  not inputs of the template: not in the ``goodSeeingVisits`` of any patch; a visit
  inside its own template subtracts part of its own noise and transients):
  completeness against truth S/N, the S/N of 50 % completeness, completeness at
  S/N >= 6, PSF-flux ratio and pulls, and the spurious density per deg² of *usable
  difference-image pixels* (not NO_DATA; `usable_area_deg2`). See
  `diapipe.analysis.dia_match` for the definitions (`score_dia_sources`,
  `difference_quality`); `forced_sigma_njy` measures the truth S/N's denominator.
- APDB (when given): DiaObjects, new/updated/unassociated counts (ap_verify's
  numNewDiaObjects, totalUnassociatedDiaObjects, fracUpdatedDiaObjects),
  association purity (DiaObjects whose DiaSources all match one truth object)
  and completeness (truth objects detected at least twice that end up in
  exactly one DiaObject).

Definitions of "truth variable" and "real" are those of `dia_match`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .dia_match import (
    binned_fraction,
    difference_quality,
    match_dia_sources_to_truth,
    score_dia_sources,
    truth_variables,
)

__all__ = [
    "MAG_BINS",
    "PIXEL_SCALE_ARCSEC",
    "association_metrics",
    "dia_metrics_for",
    "dia_source_metrics",
    "forced_sigma_njy",
    "template_visits",
    "usable_area_deg2",
]

#: ap_verify's fakes-completeness magnitude bins
MAG_BINS = (20.0, 22.0, 24.0, 26.0)
PIXEL_SCALE_ARCSEC = 0.2
DIFFERENCE = "goodSeeingDiff_differenceExp"


def forced_sigma_njy(diff, x, y) -> np.ndarray:
    """Forced PSF-flux error (nJy) at parent pixel positions ``x``, ``y`` of a difference
    `~diapipe.exposure.Exposure`: the denominator of the truth S/N (`dia_match.truth_snr`).

    `diapipe.measure.measurement.forced_measure` on the difference's image, variance
    (which includes the sources' own photon noise), mask and PSF, times the mean
    calibration; NaN where the PSF footprint is not usable.
    """
    from ..measure.measurement import forced_measure

    if diff.photo_calib is None:
        raise ValueError("forced_sigma_njy: the difference image has no photo_calib to convert its errors to nJy")
    x = np.asarray(x, float) - diff.xy0[0]
    y = np.asarray(y, float) - diff.xy0[1]
    if x.size == 0:
        return np.zeros(0)
    forced = forced_measure(diff.image, diff.variance, diff.mask, diff.psf, x, y)
    return np.asarray(forced["psfFluxErr"], float) * float(diff.photo_calib.calibration_mean)


def usable_area_deg2(mask, pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> float:
    """Sky area (deg²) of the pixels of a difference-image ``mask`` without NO_DATA."""
    from ..exposure import masks

    return float((~masks.any_set(mask, "NO_DATA")).sum()) * (pixel_scale_arcsec / 3600.0) ** 2


def _registered(butler, name: str) -> bool:
    return name in {t.name for t in butler.registry.queryDatasetTypes()}


def _refs(butler, name: str) -> list:
    """Find-first refs of dataset type ``name`` in the butler's default collections
    ([] when the type is not registered)."""
    if not _registered(butler, name):
        return []
    return list(butler.registry.queryDatasets(name, findFirst=True, collections=butler.collections.defaults))


def template_visits(butler) -> set[int] | None:
    """Visits selected for the templates: the union over every patch and band of the
    ``goodSeeingVisits`` datasets (``{visit: True}``) the butler's collections hold;
    None when there are none (the template inputs are then unknown)."""
    refs = _refs(butler, "goodSeeingVisits")
    if not refs:
        return None
    visits = set()
    for ref in refs:
        visits |= {int(v) for v, keep in butler.get(ref).items() if keep}
    return visits


def dia_source_metrics(dia_src: pd.DataFrame, truth: pd.DataFrame, area_deg2: float) -> dict:
    """Counts, spurious density and completeness of DiaSources against truth."""
    sources, variables = match_dia_sources_to_truth(dia_src, truth)
    n_real = int(sources["real"].sum()) if len(sources) else 0
    n_spurious = int(len(sources) - n_real)
    mags = 31.4 - 2.5 * np.log10(np.abs(variables["diff_flux_njy"].to_numpy(float)))
    bins = binned_fraction(mags, variables["detected"].to_numpy(bool), np.array(MAG_BINS))
    return {
        "n_dia_sources": int(len(sources)),
        "n_real": n_real,
        "n_spurious": n_spurious,
        "area_deg2": float(area_deg2),
        "spurious_per_deg2": float(n_spurious / area_deg2) if area_deg2 > 0 else float("nan"),
        "n_truth_variables": int(len(variables)),
        "completeness": float(variables["detected"].mean()) if len(variables) else float("nan"),
        "completeness_vs_mag": [
            {"lo": float(r.lo), "hi": float(r.hi), "n": int(r.n), "k": int(r.k)} for r in bins.itertuples()
        ],
    }


def association_metrics(dia_objects: pd.DataFrame, dia_sources: pd.DataFrame, truth: pd.DataFrame,
                        radius_arcsec: float = 0.5) -> dict:
    """ap_verify counts and association purity/completeness of an APDB against truth.

    ``dia_objects``: current DiaObject rows; ``dia_sources``: all DiaSource rows (with
    diaObjectId, visit, detector, ra, dec); ``truth``: truth_source rows of the visits.
    """
    sources, _ = match_dia_sources_to_truth(dia_sources, truth, radius_arcsec)
    n_objects = int(len(dia_objects))
    n_single = int((dia_objects["nDiaSources"] == 1).sum()) if n_objects else 0
    real = sources[sources["real"]]
    by_object = real.groupby("diaObjectId")["truth_id"].nunique()
    objects_with_real = int(len(by_object))
    pure = int((by_object == 1).sum())
    per_truth = real.groupby("truth_id").agg(n=("diaSourceId", "size"), n_objects=("diaObjectId", "nunique"))
    seen_twice = per_truth[per_truth["n"] >= 2]
    return {
        "n_dia_objects": n_objects,
        "totalUnassociatedDiaObjects": n_single,
        "fracUpdatedDiaObjects": float(1 - n_single / n_objects) if n_objects else float("nan"),
        "association_purity": float(pure / objects_with_real) if objects_with_real else float("nan"),
        "n_objects_with_real_sources": objects_with_real,
        "association_completeness": float((seen_twice["n_objects"] == 1).mean()) if len(seen_twice) else float("nan"),
        "n_truth_objects_seen_twice": int(len(seen_twice)),
    }


def dia_metrics_for(butler, *, apdb=None, truth_collection: str = "2.2i/truth") -> dict | None:
    """`dia_source_metrics` over every ``goodSeeingDiff_diaSrcTable`` the butler's
    collections hold (None when there are none), with issue 5's figures on independent
    visits under ``["dia_sources"]["independent"]``, plus `association_metrics` when an
    sqlite ``apdb`` (path, ``sqlite:///`` URL or config YAML) is given.

    Independent figures (`diapipe.analysis.dia_match.difference_quality`) need
    ``goodSeeingVisits`` (which visits are template inputs) and the
    ``goodSeeingDiff_differenceExp`` of each independent detector-visit (truth S/N,
    usable area); detector-visits without one are left out, and when none is left
    ``independent`` is None. ``["dia_sources"]["notes"]`` says what was skipped and why;
    ``detector_visits`` lists each one with ``in_template`` and ``scored``.
    """
    refs = _refs(butler, "goodSeeingDiff_diaSrcTable")
    if not refs:
        return None
    refs.sort(key=lambda r: (r.dataId["visit"], r.dataId["detector"]))
    template = template_visits(butler)
    have_diff = _registered(butler, DIFFERENCE)
    notes = []
    if template is None:
        notes.append("no goodSeeingVisits dataset in the collections: template input visits unknown, so no "
                     "independent-visit figures")
    elif not have_diff:
        notes.append(f"no {DIFFERENCE} dataset type: no truth S/N or usable area, so no independent-visit figures")
    tables, truths, scored_tables, scored_truths, per_dv = [], [], [], [], []
    area = scored_area = 0.0
    for ref in refs:
        data_id = {k: ref.dataId[k] for k in ("instrument", "visit", "detector")}
        visit, detector = int(data_id["visit"]), int(data_id["detector"])
        table = butler.get(ref)
        truth = butler.get("truth_source", data_id, collections=truth_collection)
        truth = truth.assign(visit=visit, detector=detector)
        tables.append(table)
        truths.append(truth)
        _, _, width, height = butler.get("calexp.bbox", data_id)
        area += width * height * (PIXEL_SCALE_ARCSEC / 3600.0) ** 2
        in_template = None if template is None else visit in template
        scored = False
        if in_template is False and have_diff:
            try:
                diff = butler.get(DIFFERENCE, data_id)
            except LookupError:
                notes.append(f"visit {visit} detector {detector}: no {DIFFERENCE}; left out of the "
                             "independent-visit figures")
            else:
                variables = truth_variables(truth).copy()
                variables["sigma_njy"] = forced_sigma_njy(diff, variables["x"], variables["y"])
                scored_tables.append(table)
                scored_truths.append(variables)
                scored_area += usable_area_deg2(diff.mask)
                scored = True
        per_dv.append({"visit": visit, "detector": detector, "in_template": in_template, "scored": scored,
                       "n_dia_sources": len(table)})
    dia_src = pd.concat(tables, ignore_index=True)
    truth = pd.concat(truths, ignore_index=True)
    block = dia_source_metrics(dia_src, truth, area)
    block["template_visits"] = sorted(template) if template is not None else None
    block["independent_visits"] = sorted({d["visit"] for d in per_dv if d["scored"]})
    block["detector_visits"] = per_dv
    block["independent"] = None
    if scored_tables:
        sources, variables = score_dia_sources(pd.concat(scored_tables, ignore_index=True),
                                               pd.concat(scored_truths, ignore_index=True))
        block["independent"] = difference_quality(sources, variables, scored_area)
    elif template is not None and have_diff:
        notes.append("every detector-visit with DiaSources is a template input: no independent-visit figures")
    block["notes"] = notes
    result = {"dia_sources": block}
    if apdb is not None:
        from .apdb_tables import load_apdb

        tables = load_apdb(apdb)
        result["association"] = association_metrics(tables.dia_objects, tables.dia_sources, truth)
    return result
