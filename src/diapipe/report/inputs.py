"""Reading what a report shows: the APDB (sqlite3 + pandas, as the guide does), the
butler's per-detector-visit datasets, the truth, the metrics JSON and pipeline graphs.

Every reader returns ``None`` (or an empty result) when its input is absent instead of
raising, so that the report can say what is missing; a present but unreadable input
raises an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.apdb_tables import DIA_SOURCE_COLUMNS, ApdbTables, apdb_sqlite_path, load_apdb

__all__ = [
    "ApdbTables",
    "ReportInputs",
    "apdb_sqlite_path",
    "find_pipeline_graphs",
    "load_apdb",
    "load_inputs",
    "load_metrics",
    "read_cutout",
]

@dataclass
class ReportInputs:
    """Everything the report's sections are drawn from; ``None`` = not available.

    ``visits``: (visit, detector) of the calexps; ``truth``: ``truth_source`` rows of all
    of them with ``visit``/``detector`` columns; ``dia_src``: all ``diaSrcTable`` rows
    (from the butler, else the APDB DiaSource table); ``missing``: why each absent
    input is absent, keyed by input name.
    """

    repo: str
    collections: list
    visits: list = field(default_factory=list)
    truth: pd.DataFrame | None = None
    dia_src: pd.DataFrame | None = None
    dia_src_origin: str = ""
    apdb: ApdbTables | None = None
    metrics: dict | None = None
    timings: dict | None = None
    graphs: list = field(default_factory=list)
    dataset_types: set = field(default_factory=set)
    butler: object = None
    missing: dict = field(default_factory=dict)


def load_metrics(path) -> dict:
    """The JSON written by ``diapipe metrics``."""
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"metrics JSON {path}: cannot be read ({err})") from err


def find_pipeline_graphs(*folders) -> list[Path]:
    """PNG renderings of pipeline graphs in ``folders``: ``X.png`` beside an ``X.dot`` (what
    ``pipetask build --pipeline-dot X.dot`` + ``dot -Tpng > X.png`` leave)."""
    found = []
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for png in sorted(Path(folder).glob("*.png")):
            if png.with_suffix(".dot").exists() and png.stat().st_size > 0 and png not in found:
                found.append(png)
    return found


def _dataset_types(butler) -> set:
    return {t.name for t in butler.registry.queryDatasetTypes("*")}


def _refs(butler, name, types):
    if name not in types:
        return []
    return list(butler.registry.queryDatasets(name, findFirst=True, collections=butler.collections.defaults))


def load_inputs(repo, collections, *, apdb=None, metrics_json=None, truth_collection="2.2i/truth",
                graphs=None, timings=True) -> ReportInputs:
    """Read everything available for a report (see `ReportInputs`)."""
    from lsst.daf.butler import Butler

    collections = [collections] if isinstance(collections, str) else list(collections)
    inputs = ReportInputs(repo=str(repo), collections=collections)
    if metrics_json is not None:
        inputs.metrics = load_metrics(metrics_json)
    else:
        inputs.missing["metrics"] = "no metrics JSON given (diapipe metrics ... --json FILE; then --metrics FILE)"
    butler = Butler(str(repo), collections=collections + [truth_collection])
    inputs.butler = butler
    types = _dataset_types(butler)
    inputs.dataset_types = types
    calexps = _refs(butler, "calexp", types)
    inputs.visits = sorted({(int(r.dataId["visit"]), int(r.dataId["detector"])) for r in calexps})
    if not inputs.visits:
        inputs.missing["calexp"] = f"no calexp in collections {collections}"

    truth_refs = {(int(r.dataId["visit"]), int(r.dataId["detector"])): r for r in _refs(butler, "truth_source", types)}
    frames = []
    for key in inputs.visits:
        if key in truth_refs:
            table = butler.get(truth_refs[key]).copy()
            table["visit"], table["detector"] = key
            frames.append(table)
    if frames:
        inputs.truth = pd.concat(frames, ignore_index=True)
    else:
        inputs.missing["truth"] = f"no truth_source for the calexps in collection {truth_collection}"

    src_refs = _refs(butler, "goodSeeingDiff_diaSrcTable", types)
    if src_refs:
        frames = []
        for ref in src_refs:
            table = butler.get(ref)
            if len(table):
                frames.append(table)
        inputs.dia_src = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DIA_SOURCE_COLUMNS)
        inputs.dia_src_origin = f"goodSeeingDiff_diaSrcTable ({len(src_refs)} detector-visits)"

    if apdb is not None:
        inputs.apdb = load_apdb(apdb)
        if inputs.dia_src is None and len(inputs.apdb.dia_sources):
            inputs.dia_src = inputs.apdb.dia_sources
            inputs.dia_src_origin = "the APDB DiaSource table"
    else:
        inputs.missing["apdb"] = "no APDB given (--apdb PATH, sqlite:/// URL or APDB config YAML)"
    if inputs.dia_src is None:
        inputs.missing["diaSrcTable"] = f"no goodSeeingDiff_diaSrcTable in {collections} and no APDB DiaSources"

    if inputs.metrics is not None and inputs.metrics.get("timings"):
        inputs.timings = inputs.metrics["timings"]
    elif timings:
        from ..analysis.metrics import task_timings

        inputs.timings = task_timings(butler) or None
    if not inputs.timings:
        inputs.missing["timings"] = "no <label>_metadata datasets (task metadata) in the collections"

    inputs.graphs = [Path(g) for g in graphs] if graphs is not None else find_pipeline_graphs(Path(repo).parent)
    if not inputs.graphs:
        inputs.missing["graphs"] = (f"no pipeline graph PNG (X.png beside X.dot) in {Path(repo).parent}; "
                                    "make one with pipetask build --pipeline-dot X.dot && dot -Tpng X.dot > X.png")
    return inputs


def read_cutout(butler, dataset_type, visit, detector, x, y, half: int = 15) -> np.ndarray | None:
    """A ``(2 half + 1)²`` image cut-out centred on parent pixel (x, y), NaN outside the
    exposure; ``None`` if the dataset does not exist. Pixel values are calibrated to nJy
    when the exposure has a photometric calibration."""
    data_id = {"visit": int(visit), "detector": int(detector)}
    try:
        x0, y0, width, height = butler.get(f"{dataset_type}.bbox", data_id)
    except LookupError:
        return None
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    size = 2 * half + 1
    out = np.full((size, size), np.nan)
    bx0, by0 = max(cx - half, x0), max(cy - half, y0)
    bx1, by1 = min(cx + half + 1, x0 + width), min(cy + half + 1, y0 + height)
    if bx1 <= bx0 or by1 <= by0:
        return out
    exposure = butler.get(dataset_type, data_id, parameters={"bbox": (bx0, by0, bx1 - bx0, by1 - by0)})
    image = np.asarray(exposure.image, float)
    calib = getattr(exposure, "photo_calib", None)
    if calib is not None:
        image = image * float(calib.calibration_mean)
    out[by0 - (cy - half):by1 - (cy - half), bx0 - (cx - half):bx1 - (cx - half)] = image
    return out
