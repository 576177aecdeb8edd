"""`diapipe metrics`: accuracy against truth and per-task run times of a processed repository.

`compute_metrics` gathers, for every calexp of the output collection, the single-frame
metrics of `diapipe.analysis.single_frame`, for every template the metrics of
`diapipe.analysis.template`, the difference-imaging and association figures of
`diapipe.analysis.dia`, summaries over them (medians, worst cases), issue 4's and issue
5's bounds with pass/fail, and the run times
that pipe_base records in each quantum's ``<label>_metadata`` (``quantum.startUtc`` /
``endUtc``, ``startCpuTime`` / ``endCpuTime``, ``endMaxResidentSetSize``). The result is
JSON-able; `format_table` prints it; `metrics_main` is the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime

import numpy as np

from .dia import dia_metrics_for
from .single_frame import astrometry_metrics_for, isr_metrics_for, photometry_metrics_for, psf_metrics_for
from .template import coadd_metrics_for

__all__ = [
    "BOUNDS",
    "DIA_BOUNDS",
    "add_metrics_command",
    "compute_metrics",
    "format_table",
    "metrics_main",
    "task_timings",
]

#: Issue 4's accuracy bounds, keyed by summary name: (comparison, value).
BOUNDS = {
    "isr_structure_frac_max": ("<", 0.002),
    "isr_norm_residual_std_dev_max": ("<", 0.05),
    "psf_fwhm_ratio_dev_median": ("<", 0.02),
    "astrometry_rms_mas_max": ("<", 10.0),
    "zp_offset_mmag_abs_max": ("<", 5.0),
    "flux_ratio_dev_median": ("<", 0.01),
    "coadd_flux_ratio_dev": ("<", 0.01),
    "coadd_position_rms_mas": ("<", 10.0),
    "coadd_transients_above_3sigma": ("<=", 0),
    "coadd_psf_size_ratio_dev": ("<", 0.03),
}

#: Issue 5's difference-imaging bounds, on visits that are not template inputs
#: (``dia.dia_sources.independent``; `_dia_summary` names them): (comparison, value).
DIA_BOUNDS = {
    "dia_completeness_snr_ge_6": (">=", 0.9),
    "dia_snr_at_50pct_completeness": ("<=", 5.5),
    "dia_psf_flux_ratio_dev": ("<", 0.02),
    "dia_pull_width_dev": ("<=", 0.15),
    "dia_spurious_per_deg2": ("<=", 100.0),
}


def _elapsed(md, start: str, end: str) -> float:
    try:
        a, b = md[f"quantum.{start}"], md[f"quantum.{end}"]
    except KeyError:
        return float("nan")
    a = a[-1] if isinstance(a, list) else a
    b = b[-1] if isinstance(b, list) else b
    if isinstance(a, str):
        return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
    return float(b) - float(a)


def task_timings(butler, collections=None) -> dict:
    """Per task label: number of quanta and wall/CPU seconds from their ``<label>_metadata``.

    pipe_base's ``quantum`` block records ``startUtc``/``endUtc`` (ISO times),
    ``startCpuTime``/``endCpuTime`` (process CPU seconds) and ``endMaxResidentSetSize``
    (bytes) around each quantum's ``runQuantum``.

    Returns ``{label: {"n_quanta", "wall_s_total", "wall_s_mean", "wall_s_max",
    "cpu_s_total", "max_rss_mb"}}``.
    """
    collections = collections or butler.collections.defaults
    out = {}
    for dataset_type in butler.registry.queryDatasetTypes("*_metadata"):
        label = dataset_type.name[: -len("_metadata")]
        walls, cpus, rss = [], [], []
        for ref in butler.registry.queryDatasets(dataset_type, collections=collections, findFirst=True):
            md = butler.get(ref)
            walls.append(_elapsed(md, "startUtc", "endUtc"))
            cpus.append(_elapsed(md, "startCpuTime", "endCpuTime"))
            try:
                value = md["quantum.endMaxResidentSetSize"]
                rss.append(float(value[-1] if isinstance(value, list) else value))
            except KeyError:
                pass
        if not walls:
            continue
        walls = np.asarray(walls, float)
        out[label] = {
            "n_quanta": int(walls.size),
            "wall_s_total": float(np.nansum(walls)),
            "wall_s_mean": float(np.nanmean(walls)),
            "wall_s_max": float(np.nanmax(walls)),
            "cpu_s_total": float(np.nansum(cpus)),
            "max_rss_mb": float(max(rss) / 2**20) if rss else float("nan"),
        }
    return out


def _summary(per_detector: list[dict], coadds: list[dict]) -> dict:
    def col(section, key):
        return np.array([d[section][key] for d in per_detector if section in d], float)

    s = {}
    if per_detector:
        s["n_calexps"] = len(per_detector)
        s["isr_structure_frac_max"] = float(np.nanmax(col("isr", "structure_frac")))
        s["isr_norm_residual_std_dev_max"] = float(np.nanmax(np.abs(col("isr", "norm_residual_std") - 1)))
        ratio = col("psf", "fwhm_ratio")
        s["psf_fwhm_ratio_median"] = float(np.nanmedian(ratio))
        s["psf_fwhm_ratio_dev_median"] = float(np.nanmedian(np.abs(ratio - 1)))
        s["psf_star_chi2_dof_median"] = float(np.nanmedian(col("psf", "star_chi2_dof_median")))
        s["astrometry_rms_mas_median"] = float(np.nanmedian(col("astrometry", "rms_mas")))
        s["astrometry_rms_mas_max"] = float(np.nanmax(col("astrometry", "rms_mas")))
        zp = col("photometry", "zp_offset_mmag")
        s["zp_offset_mmag_median"] = float(np.nanmedian(zp))
        s["zp_offset_mmag_abs_median"] = float(np.nanmedian(np.abs(zp)))
        s["zp_offset_mmag_abs_max"] = float(np.nanmax(np.abs(zp)))
        flux = col("photometry", "flux_ratio_median")
        s["flux_ratio_median"] = float(np.nanmedian(flux))
        s["flux_ratio_dev_median"] = float(abs(np.nanmedian(flux) - 1))
    if coadds:
        c = coadds[0]
        s["coadd_flux_ratio_median"] = c["flux_ratio_median"]
        s["coadd_flux_ratio_dev"] = float(max(abs(d["flux_ratio_median"] - 1) for d in coadds))
        s["coadd_position_rms_mas"] = float(max(d["position_rms_mas"] for d in coadds))
        s["coadd_transients_above_3sigma"] = int(sum(d["transient_n_above_3sigma"] for d in coadds))
        s["coadd_transients_low_coverage_above_3sigma"] = int(
            sum(d["transient_low_coverage_n_above_3sigma"] for d in coadds))
        s["coadd_psf_size_ratio_dev"] = float(max(abs(d["psf_size_ratio"] - 1) for d in coadds))
    return s


def _dia_summary(dia: dict | None) -> dict:
    """Issue 5's figures (`DIA_BOUNDS` names) from ``dia.dia_sources.independent``."""
    independent = ((dia or {}).get("dia_sources") or {}).get("independent")
    if not independent:
        return {}
    flux = independent["psf_flux"]
    return {
        "dia_completeness_snr_ge_6": independent["completeness_snr_ge_6"],
        "dia_snr_at_50pct_completeness": independent["snr_at_50pct_completeness"],
        "dia_psf_flux_ratio_median": flux["flux_ratio_median"],
        "dia_psf_flux_ratio_dev": float(abs(flux["flux_ratio_median"] - 1)),
        "dia_pull_median": flux["pull_median"],
        "dia_pull_iqr_width": flux["pull_iqr_width"],
        "dia_pull_width_dev": float(abs(flux["pull_iqr_width"] - 1)),
        "dia_spurious_per_deg2": independent["spurious_per_deg2"],
    }


_COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def _passes(value, op, bound) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(_COMPARE[op](value, bound))


def compute_metrics(repo, collections, *, truth_collection: str = "2.2i/truth", where: str = "",
                    coadd_name: str = "goodSeeingCoadd", timings: bool = True, apdb=None) -> dict:
    """All metrics of a processed repository, as a JSON-able dict.

    Parameters
    ----------
    repo : path-like or `lsst.daf.butler.Butler`
    collections : `str` or list of `str`
        The pipeline's output collection(s); ``truth_collection`` is appended.
    where : `str`
        Butler query restricting the calexps (e.g. ``"visit = 888407"``).

    Returns
    -------
    dict
        ``detectors`` (one entry per calexp: data ID and the isr, psf, astrometry,
        photometry metrics), ``coadds``, ``summary`` (aggregates), ``bounds`` (issue 4's
        `BOUNDS` and issue 5's `DIA_BOUNDS`, with pass/fail; ``pass`` None when the value
        is missing), ``dia`` (`diapipe.analysis.dia.dia_metrics_for`: DiaSource
        completeness/spurious over all visits, issue 5's figures on independent visits
        under ``dia_sources.independent`` and, with ``apdb``, association figures; None
        without difference imaging), ``timings`` (`task_timings`).
    """
    from lsst.daf.butler import Butler

    collections = [collections] if isinstance(collections, str) else list(collections)
    butler = repo if isinstance(repo, Butler) else Butler(str(repo), collections=collections + [truth_collection])
    query = butler.registry.queryDatasets("calexp", where=where, findFirst=True,
                                          collections=butler.collections.defaults)
    refs = sorted(query, key=lambda r: (r.dataId["visit"], r.dataId["detector"]))
    truth_skies = {}
    per_detector = []
    for ref in refs:
        data_id = {k: ref.dataId[k] for k in ("instrument", "visit", "detector")}
        entry = {"data_id": {k: (int(v) if k != "instrument" else str(v)) for k, v in data_id.items()}}
        entry["isr"] = isr_metrics_for(butler, data_id, truth_sky=_truth_sky_for(butler, ref, truth_skies))
        entry["psf"] = psf_metrics_for(butler, data_id)
        entry["astrometry"] = astrometry_metrics_for(butler, data_id)
        entry["photometry"] = photometry_metrics_for(butler, data_id)
        per_detector.append(entry)
    coadds = []
    if coadd_name in {t.name for t in butler.registry.queryDatasetTypes(coadd_name)}:
        for ref in butler.registry.queryDatasets(coadd_name, findFirst=True, collections=butler.collections.defaults):
            d = ref.dataId
            entry = coadd_metrics_for(butler, skymap=d["skymap"], tract=d["tract"], patch=d["patch"],
                                      band=d["band"], coadd_name=coadd_name)
            entry["data_id"] = {"skymap": str(d["skymap"]), "tract": int(d["tract"]), "patch": int(d["patch"]),
                                "band": str(d["band"])}
            coadds.append(entry)
    dia = dia_metrics_for(butler, apdb=apdb, truth_collection=truth_collection)
    summary = _summary(per_detector, coadds)
    summary.update(_dia_summary(dia))
    bounds = {
        name: {"value": summary.get(name), "op": op, "bound": bound, "pass": _passes(summary.get(name), op, bound)}
        for name, (op, bound) in {**BOUNDS, **DIA_BOUNDS}.items()
    }
    return {
        "collections": collections,
        "detectors": per_detector,
        "coadds": coadds,
        "summary": summary,
        "bounds": bounds,
        "dia": dia,
        "timings": task_timings(butler) if timings else {},
    }


def _truth_sky_for(butler, ref, cache):
    """The truth_sky of the tract holding this calexp (None if there is none)."""
    if "tract" not in cache:
        refs = list(butler.registry.queryDatasets("truth_sky", findFirst=True, collections=butler.collections.defaults))
        cache["tract"] = butler.get(refs[0]) if len(refs) == 1 else None
    return cache["tract"]


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(metrics: dict) -> str:
    """Plain-text tables: per-detector numbers, template numbers, bounds, task timings."""
    lines = []
    if metrics["detectors"]:
        head = ("visit", "det", "isr_struct%", "isr_std", "psf_ratio", "chi2/dof", "astro_mas", "dzp_mmag", "flux_ratio")
        lines.append("Single-frame accuracy against truth")
        lines.append(" ".join(f"{h:>11}" for h in head))
        for d in metrics["detectors"]:
            row = (d["data_id"]["visit"], d["data_id"]["detector"], 100 * d["isr"]["structure_frac"],
                   d["isr"]["norm_residual_std"], d["psf"]["fwhm_ratio"], d["psf"]["star_chi2_dof_median"],
                   d["astrometry"]["rms_mas"], d["photometry"]["zp_offset_mmag"], d["photometry"]["flux_ratio_median"])
            lines.append(" ".join(f"{_fmt(v):>11}" for v in row))
        lines.append("")
    for c in metrics["coadds"]:
        lines.append(f"Template {c['data_id']}")
        for key in ("n_stars", "flux_ratio_median", "position_rms_mas", "centroid_err_rms_mas", "psf_size_ratio",
                    "transient_n_transients", "transient_max_snr", "transient_n_above_3sigma",
                    "transient_low_coverage_n", "transient_low_coverage_n_above_3sigma"):
            lines.append(f"  {key:<40} {_fmt(c.get(key))}")
        lines.append("")
    for title, names in (("Bounds (issue 4)", BOUNDS), ("Bounds (issue 5, independent visits)", DIA_BOUNDS)):
        lines.append(title)
        for name, b in metrics["bounds"].items():
            if name not in names:
                continue
            status = {True: "ok", False: "FAIL", None: "n/a"}[b["pass"]]
            lines.append(f"  {name:<40} {_fmt(b['value']):>10} {b['op']:<2} {_fmt(b['bound']):<8} {status}")
    dia = metrics.get("dia")
    if dia:
        lines.append("")
        lines.append("Difference imaging against truth, all visits (match radius 0.5\")")
        d = dia["dia_sources"]
        for key in ("n_dia_sources", "n_real", "n_spurious", "area_deg2", "spurious_per_deg2", "n_truth_variables",
                    "completeness"):
            lines.append(f"  {key:<40} {_fmt(d.get(key))}")
        for b in d["completeness_vs_mag"]:
            frac = b["k"] / b["n"] if b["n"] else float("nan")
            lines.append(f"  completeness {b['lo']:.0f}-{b['hi']:.0f} mag{'':<22} {_fmt(frac)} ({b['k']}/{b['n']})")
        lines.extend(_independent_lines(d))
        for key, value in (dia.get("association") or {}).items():
            lines.append(f"  {key:<40} {_fmt(value)}")
    if metrics.get("timings"):
        lines.append("")
        lines.append("Per-task run time (from <label>_metadata)")
        lines.append(f"  {'task':<28}{'quanta':>7}{'wall_s':>10}{'mean_s':>9}{'max_s':>9}{'cpu_s':>9}{'rss_MB':>9}")
        for label, t in sorted(metrics["timings"].items()):
            lines.append(f"  {label:<28}{t['n_quanta']:>7}{t['wall_s_total']:>10.2f}{t['wall_s_mean']:>9.2f}"
                         f"{t['wall_s_max']:>9.2f}{t['cpu_s_total']:>9.2f}{t['max_rss_mb']:>9.0f}")
    return "\n".join(lines)


def _independent_lines(d: dict) -> list[str]:
    """The table lines of issue 5's figures (``dia_sources.independent``) and the notes."""
    lines = []
    ind = d.get("independent")
    if ind:
        lines.append("")
        lines.append(f"Difference imaging on visits that are not template inputs ({len(d['independent_visits'])} "
                     "visits; area: difference pixels without NO_DATA)")
        for key in ("n_dia_sources", "n_real", "n_spurious", "n_spurious_unflagged", "area_deg2",
                    "spurious_per_deg2", "unflagged_spurious_per_deg2", "n_truth_variables", "completeness",
                    "snr_at_50pct_completeness", "n_snr_ge_6", "completeness_snr_ge_6"):
            lines.append(f"  {key:<40} {_fmt(ind.get(key))}")
        for b in ind["completeness_vs_snr"]:
            frac = b["k"] / b["n"] if b["n"] else float("nan")
            hi = "inf" if b["hi"] is None or not math.isfinite(b["hi"]) else f"{b['hi']:g}"
            label = f"completeness S/N {b['lo']:g}-{hi}"
            lines.append(f"  {label:<40} {_fmt(frac)} ({b['k']}/{b['n']})")
        for key, value in ind["psf_flux"].items():
            lines.append(f"  {'psf_flux_' + key + ' (S/N>=6, clean)':<40} {_fmt(value)}")
    for note in d.get("notes") or []:
        lines.append(f"  note: {note}")
    return lines


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def add_metrics_command(subparsers) -> argparse.ArgumentParser:
    """Add ``metrics`` to an argparse subparsers object (``diapipe metrics REPO ...``)."""
    parser = subparsers.add_parser("metrics", help="accuracy against truth and per-task run times of a repository")
    _configure(parser)
    parser.set_defaults(func=_run)
    return parser


def _configure(parser):
    parser.add_argument("repo", help="butler repository")
    parser.add_argument("-c", "--collections", required=True, action="append",
                        help="pipeline output collection (repeatable)")
    parser.add_argument("--truth-collection", default="2.2i/truth")
    parser.add_argument("--where", default="", help="butler query restricting the calexps")
    parser.add_argument("--json", default="metrics.json", help="where to write the JSON (default metrics.json)")
    parser.add_argument("--no-timings", action="store_true", help="skip reading the task metadata")
    parser.add_argument("--apdb", default=None,
                        help="sqlite APDB (path, sqlite:/// URL or config YAML) for association figures")


def _run(args) -> int:
    metrics = _jsonable(compute_metrics(args.repo, args.collections, truth_collection=args.truth_collection,
                                        where=args.where, timings=not args.no_timings, apdb=args.apdb))
    with open(args.json, "w") as stream:
        json.dump(metrics, stream, indent=1)
    print(format_table(metrics))
    print(f"\nJSON written to {args.json}")
    return 0


def metrics_main(argv=None) -> int:
    """``diapipe metrics REPO -c COLLECTION [--json FILE]``: table on stdout, JSON to a file."""
    parser = argparse.ArgumentParser(prog="diapipe metrics", description=__doc__.splitlines()[0])
    _configure(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(metrics_main())
