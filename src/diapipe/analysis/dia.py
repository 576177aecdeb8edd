"""Difference-imaging and association figures against truth (ap_verify-style).

- DiaSources: number, real/spurious (matching a truth variable within 0.5"),
  spurious density per deg² of processed detector area, completeness of truth
  variables overall and in ap_verify's magnitude bins (20-22, 22-24, 24-26).
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

from .dia_match import binned_fraction, match_dia_sources_to_truth

__all__ = ["dia_source_metrics", "association_metrics", "dia_metrics_for", "MAG_BINS", "PIXEL_SCALE_ARCSEC"]

#: ap_verify's fakes-completeness magnitude bins
MAG_BINS = (20.0, 22.0, 24.0, 26.0)
PIXEL_SCALE_ARCSEC = 0.2


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
    collections hold (None when there are none), plus `association_metrics` when an
    sqlite ``apdb`` (path, ``sqlite:///`` URL or config YAML) is given."""
    if "goodSeeingDiff_diaSrcTable" not in {t.name for t in butler.registry.queryDatasetTypes()}:
        return None
    refs = list(butler.registry.queryDatasets("goodSeeingDiff_diaSrcTable", findFirst=True,
                                              collections=butler.collections.defaults))
    if not refs:
        return None
    tables, truths, area = [], [], 0.0
    for ref in refs:
        data_id = {k: ref.dataId[k] for k in ("instrument", "visit", "detector")}
        tables.append(butler.get(ref))
        truth = butler.get("truth_source", data_id, collections=truth_collection)
        truths.append(truth.assign(visit=int(data_id["visit"]), detector=int(data_id["detector"])))
        _, _, width, height = butler.get("calexp.bbox", data_id)
        area += width * height * (PIXEL_SCALE_ARCSEC / 3600.0) ** 2
    dia_src = pd.concat(tables, ignore_index=True)
    truth = pd.concat(truths, ignore_index=True)
    result = {"dia_sources": dia_source_metrics(dia_src, truth, area)}
    if apdb is not None:
        from .apdb_tables import load_apdb

        tables = load_apdb(apdb)
        result["association"] = association_metrics(tables.dia_objects, tables.dia_sources, truth)
    return result
