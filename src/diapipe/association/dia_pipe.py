"""diaPipe's steps over an open APDB: load, associate, summarise, force-photometer, store, alert.

`process_detector_visit` is the whole detector-visit, usable without a butler
(tests, notebooks); `DiaPipelineTask` (``tasks.py``) wraps it. The pure
algorithms live in `match`, `summary`, `forced` and `diapipe.alerts`.

Order of work (Rubin's ap_association, with two deliberate differences):

1. Under an exclusive APDB lock (`diapipe.apdb.apdb_lock`): if the APDB already
   holds this detector-visit, stop (no duplicates, ever).
2. Load the current DiaObjects in the detector's region grown by
   ``region_margin_pix``.
3. Associate the DiaSources one-to-one (optimal assignment within the radius);
   unmatched sources seed new DiaObjects with ``diaObjectId = diaSourceId``.
4. Recompute the summary of every updated object over its **full** DiaSource
   history (difference 1: Rubin reads 12 months; a full history makes the
   stored summary equal a recomputation from the stored DiaSources, whatever
   the order visits were processed in).
5. Forced PSF photometry of every DiaObject inside the detector on the
   difference image (``psfFlux``) and the calexp (``scienceFlux``), nJy.
6. Alerts (optional ``alert_sink``, e.g. `diapipe.alerts.AlertFile`): one
   packet per DiaSource with its 12-month history and cutouts, validated,
   written ahead to the detector-visit's *pending* Avro file.
7. `Apdb.store` of the new DiaObject versions, DiaSources and DiaForcedSources
   in one transaction; then the pending alert file is published (renamed)
   and the lock released. A rerun of a detector-visit the APDB holds
   publishes a pending file left by a process killed between store and
   rename, so alerts are neither lost nor duplicated (`diapipe.alerts.journal`).

Difference 2: the lock over steps 1-7 makes overlapping quanta run one after the
other, so concurrent quanta cannot create twin DiaObjects.
"""

from __future__ import annotations

import logging
import time as _time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .forced import forced_psf_flux
from .match import assign_dia_object_ids
from .summary import apdb_columns, dia_object_summary

__all__ = [
    "DiaPipeParameters",
    "DiaPipeResult",
    "AlreadyInApdbError",
    "detector_region",
    "prepare_dia_sources",
    "forced_photometry",
    "forced_source_ids",
    "process_detector_visit",
    "build_alerts",
    "njy_per_unit",
]

_LOG = logging.getLogger(__name__)

#: DiaSource columns that must be present (no sensible default).
REQUIRED_SOURCE_COLUMNS = ("diaSourceId", "ra", "dec", "x", "y")
#: MJD that starts "all of history" for the full-history summary.
_BEGINNING_MJD = 0.0


class AlreadyInApdbError(RuntimeError):
    """The APDB already holds this detector-visit (raised when reruns are configured to fail)."""


@dataclass
class DiaPipeParameters:
    """Settings of `process_detector_visit` (the task config's values)."""

    max_association_dist_arcsec: float = 1.0
    history_days: float = 360.0
    region_margin_pix: int = 250
    full_history_summary: bool = True
    fail_on_rerun: bool = False
    lock_timeout_s: float = 3600.0


@dataclass
class DiaPipeResult:
    """What `process_detector_visit` did; ``skipped`` if the APDB already held it."""

    skipped: bool
    midpoint_mjd_tai: float = float("nan")  #: visit time: validityStartMjdTai of the new versions
    n_dia_sources: int = 0
    n_new_dia_objects: int = 0
    n_updated_dia_objects: int = 0
    n_loaded_dia_objects: int = 0
    n_forced_sources: int = 0
    dia_sources: pd.DataFrame | None = None  #: stored DiaSources (with diaObjectId)
    dia_objects: pd.DataFrame | None = None  #: stored (new versions of) DiaObjects
    forced_sources: pd.DataFrame | None = None
    history_sources: pd.DataFrame | None = None  #: earlier DiaSources of the updated objects
    history_forced: pd.DataFrame | None = None  #: earlier DiaForcedSources of the updated objects
    timings: dict = field(default_factory=dict)
    #: alert file of the detector-visit: ``(state, path, n_packets)``; state ``written``,
    #: or for a skipped rerun ``present``, ``published`` (recovered) or ``missing``
    alerts: tuple | None = None

    def marker(self) -> dict:
        """The ``apdb_marker`` content (plain types)."""
        return {
            "alreadyInApdb": bool(self.skipped),
            "numDiaSources": int(self.n_dia_sources),
            "numNewDiaObjects": int(self.n_new_dia_objects),
            "numUpdatedDiaObjects": int(self.n_updated_dia_objects),
            "numLoadedDiaObjects": int(self.n_loaded_dia_objects),
            "numDiaForcedSources": int(self.n_forced_sources),
        }


# -- geometry --------------------------------------------------------------------------


def detector_region(wcs, bbox, margin_pix: float = 250.0, n_per_side: int = 4):
    """`lsst.sphgeom.ConvexPolygon` of a detector box grown by ``margin_pix``.

    ``bbox`` is ``(x0, y0, width, height)`` in parent pixels; points along each
    side (not just corners) keep the polygon a superset under distortion.
    """
    import lsst.sphgeom as sphgeom

    x0, y0, w, h = bbox
    lo_x, hi_x = x0 - 0.5 - margin_pix, x0 + w - 0.5 + margin_pix
    lo_y, hi_y = y0 - 0.5 - margin_pix, y0 + h - 0.5 + margin_pix
    t = np.linspace(0.0, 1.0, n_per_side, endpoint=False)
    xs = np.concatenate([lo_x + (hi_x - lo_x) * t, np.full_like(t, hi_x), hi_x - (hi_x - lo_x) * t, np.full_like(t, lo_x)])
    ys = np.concatenate([np.full_like(t, lo_y), lo_y + (hi_y - lo_y) * t, np.full_like(t, hi_y), hi_y - (hi_y - lo_y) * t])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    vertices = [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d))) for r, d in zip(ra, dec)]
    return sphgeom.ConvexPolygon.convexHull(vertices)


def njy_per_unit(exposure) -> float:
    """Factor from an exposure's pixel units to nJy: an exposure with a PhotoCalib is
    in instrumental units (afw's convention), one without is already in nJy. Forced
    fluxes and cutouts are scaled by it afterwards (both are linear in the image), so
    no full-frame nJy copy of the planes is made."""
    calib = getattr(exposure, "photo_calib", None)
    return 1.0 if calib is None else float(calib.calibration_mean)


# -- tables ----------------------------------------------------------------------------


def prepare_dia_sources(
    table: pd.DataFrame,
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint_mjd_tai: float,
    time_processed_mjd_tai: float,
) -> pd.DataFrame:
    """DiaSource rows ready for the APDB: schema columns only, NOT NULL ones filled.

    ``visit``, ``detector``, ``band``, ``midpointMjdTai`` and
    ``timeProcessedMjdTai`` come from the data ID / visit when absent;
    ``psfNdata``, ``trailNdata``, ``dipoleNdata``, ``bboxSize`` default to 0.
    Columns not in the schema are dropped (named in a debug log).
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"goodSeeingDiff_diaSrcTable must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in REQUIRED_SOURCE_COLUMNS if c not in table.columns]
    if missing:
        raise KeyError(f"goodSeeingDiff_diaSrcTable lacks APDB DiaSource columns {missing}")
    out = table.reset_index(drop=True).copy()
    if out["diaSourceId"].duplicated().any():
        raise ValueError("goodSeeingDiff_diaSrcTable has duplicate diaSourceId values")
    for name, value in (
        ("visit", visit),
        ("detector", detector),
        ("band", band),
        ("midpointMjdTai", midpoint_mjd_tai),
        ("timeProcessedMjdTai", time_processed_mjd_tai),
    ):
        if name not in out.columns:
            out[name] = value
        else:
            out[name] = out[name].fillna(value) if out[name].isna().any() else out[name]
    if (out["visit"] != visit).any() or (out["detector"] != detector).any():
        raise ValueError(f"goodSeeingDiff_diaSrcTable has rows of another visit/detector than {visit}/{detector}")
    for name in ("psfNdata", "trailNdata", "dipoleNdata", "bboxSize"):
        if name not in out.columns:
            out[name] = 0
        out[name] = out[name].fillna(0).astype(np.int64)
    schema = apdb_columns("DiaSource")
    extra = [c for c in out.columns if c not in schema]
    if extra:
        _LOG.debug("dropping DiaSource columns not in the APDB schema: %s", extra)
    out = out[[c for c in schema if c in out.columns]]
    out["diaSourceId"] = out["diaSourceId"].astype(np.int64)
    # Round single-precision schema columns now, so the summaries computed from
    # these values equal those recomputed later from what the APDB returns.
    for name in _float32_columns("DiaSource"):
        if name in out.columns:
            out[name] = out[name].astype(np.float32).astype(np.float64)
    return out


def _float32_columns(table: str) -> list[str]:
    from ..apdb.schema import apdb_schema_tables as _apdb_tables

    return [c["name"] for c in _apdb_tables()[table] if c.get("datatype") == "float"]


def forced_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Unique ``diaForcedSourceId`` values: ``((visit * 256 + detector) << 32) + index``."""
    if not 0 <= detector < 256:
        raise ValueError(f"detector {detector} outside 0..255: cannot pack diaForcedSourceId")
    base = (int(visit) * 256 + int(detector)) << 32
    if base >= 2**63 - 2**32:
        raise ValueError(f"visit {visit} too large to pack a 64-bit diaForcedSourceId")
    return base + np.arange(n, dtype=np.int64)


def forced_photometry(
    objects: pd.DataFrame,
    difference,
    science,
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint_mjd_tai: float,
    time_processed_mjd_tai: float,
) -> pd.DataFrame:
    """DiaForcedSource rows of the ``objects`` whose position lies on the detector.

    ``psfFlux`` on the difference image, ``scienceFlux`` on the calexp (nJy),
    PSF fitted at the fixed position (`forced_psf_flux`; a PSF running off the
    image uses the pixels that are on it).
    """
    columns = apdb_columns("DiaForcedSource")
    if len(objects) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    ra = objects["ra"].to_numpy(dtype=float)
    dec = objects["dec"].to_numpy(dtype=float)
    x, y = (np.asarray(v, dtype=float) for v in difference.wcs.world_to_pixel_values(ra, dec))
    x0, y0, w, h = difference.bbox
    inside = (x > x0 - 0.5) & (x < x0 + w - 0.5) & (y > y0 - 0.5) & (y < y0 + h - 0.5)
    objects = objects.loc[inside]
    x, y, ra, dec = x[inside], y[inside], ra[inside], dec[inside]
    n = len(objects)
    out = {c: np.full(n, np.nan) for c in columns}
    out["diaForcedSourceId"] = forced_source_ids(visit, detector, n)
    out["diaObjectId"] = objects["diaObjectId"].to_numpy(dtype=np.int64)
    out["ra"], out["dec"] = ra, dec
    out["visit"] = np.full(n, int(visit), dtype=np.int64)
    out["detector"] = np.full(n, int(detector), dtype=np.int64)
    out["midpointMjdTai"] = np.full(n, float(midpoint_mjd_tai))
    out["timeProcessedMjdTai"] = np.full(n, float(time_processed_mjd_tai))
    out["band"] = np.full(n, band, dtype=object)
    out["timeWithdrawnMjdTai"] = np.full(n, np.nan)
    for exposure, prefix in ((difference, "psfFlux"), (science, "scienceFlux")):
        if exposure is None or exposure.psf is None:
            continue
        if exposure is science:
            xs, ys = (np.asarray(v, dtype=float) for v in science.wcs.world_to_pixel_values(ra, dec))
        else:
            xs, ys = x, y
        flux, err = forced_psf_flux(
            exposure.image, exposure.variance, exposure.psf, xs, ys, mask=exposure.mask, xy0=exposure.xy0,
            allow_partial=True,
        )
        scale = njy_per_unit(exposure)
        out[prefix], out[prefix + "Err"] = flux * scale, err * scale
    return pd.DataFrame(out)[columns]


def _empty_like_schema(table: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float) for c in apdb_columns(table)})


# -- the detector-visit ----------------------------------------------------------------


def process_detector_visit(
    apdb,
    dia_sources: pd.DataFrame,
    difference,
    science,
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint_mjd_tai: float,
    params: DiaPipeParameters | None = None,
    log: logging.Logger | None = None,
    alert_sink=None,
) -> DiaPipeResult:
    """Associate one detector-visit's DiaSources into ``apdb`` and store everything.

    Parameters
    ----------
    apdb : `lsst.dax.apdb.Apdb`
        Open APDB (`diapipe.apdb.open_apdb`).
    dia_sources : `pandas.DataFrame`
        ``goodSeeingDiff_diaSrcTable``: DiaSource rows in APDB column names.
    difference, science : `diapipe.exposure.exposure.Exposure`
        Difference image and calexp (WCS, PSF, PhotoCalib if instrumental).
    visit, detector, band, midpoint_mjd_tai
        The data ID and exposure midpoint (TAI MJD).
    params : `DiaPipeParameters`
    alert_sink : optional
        Exactly-once alert output, called under the APDB lock: ``prepare(result)``
        before the store (write the pending file; returns the packet count),
        ``commit()`` after it (publish), and ``recover()`` when the APDB already
        holds the detector-visit (publish a pending file left by a killed run;
        returns an object with ``state``, ``path``, ``n_packets``). See
        `diapipe.alerts.AlertFile`.

    Returns
    -------
    result : `DiaPipeResult`
        ``skipped=True`` (nothing written) if the APDB already held this
        detector-visit and ``params.fail_on_rerun`` is False.

    Raises
    ------
    AlreadyInApdbError
        The detector-visit is in the APDB and ``params.fail_on_rerun`` is True.
    """
    from astropy.time import Time

    from ..apdb import apdb_lock, retry_locked

    params = params or DiaPipeParameters()
    log = log or _LOG
    visit_time = Time(midpoint_mjd_tai, format="mjd", scale="tai")
    now_mjd = float(Time.now().tai.mjd)
    sources = prepare_dia_sources(
        dia_sources,
        visit=visit,
        detector=detector,
        band=band,
        midpoint_mjd_tai=midpoint_mjd_tai,
        time_processed_mjd_tai=now_mjd,
    )
    region = detector_region(science.wcs, science.bbox, params.region_margin_pix)

    def section() -> DiaPipeResult:
        timings = {}
        t0 = _time.perf_counter()
        if apdb.containsVisitDetector(visit, detector, region, visit_time):
            message = (
                f"the APDB already holds visit={visit}, detector={detector}: nothing stored (rerunning a "
                "detector-visit would duplicate its DiaSources and DiaObjects). Use a new APDB to reprocess it"
            )
            if params.fail_on_rerun:
                raise AlreadyInApdbError(message + " (diaPipe is configured with failOnRerun=True)")
            log.warning("%s; skipping", message)
            # Report what the APDB holds for it (e.g. after a run killed between store and output).
            start = Time(midpoint_mjd_tai - 1.0, format="mjd", scale="tai")
            stored = apdb.getDiaSources(region, None, visit_time, start_time=start)
            if stored is not None and len(stored):
                stored = stored[(stored["visit"] == visit) & (stored["detector"] == detector)]
            n_stored = 0 if stored is None else len(stored)
            alerts = None
            if alert_sink is not None:
                found = alert_sink.recover()
                alerts = (found.state, found.path, found.n_packets)
                if found.state == "published":
                    log.warning(
                        "visit=%s, detector=%s: the run that stored it died before publishing its alerts; "
                        "published its %d pending alerts to %s",
                        visit, detector, found.n_packets, found.path,
                    )
                elif found.state == "missing" and n_stored:
                    log.warning(
                        "visit=%s, detector=%s: the APDB holds %d DiaSources but there is no alert file %s "
                        "(nor a pending one): made by another alertsPath or an older diapipe; not rebuilt",
                        visit, detector, n_stored, found.path,
                    )
            return DiaPipeResult(skipped=True, dia_sources=stored, n_dia_sources=n_stored, alerts=alerts)

        objects = apdb.getDiaObjects(region)
        timings["load_objects_s"] = _time.perf_counter() - t0
        ids, assoc = assign_dia_object_ids(sources, objects, params.max_association_dist_arcsec)
        sources["diaObjectId"] = ids.to_numpy(dtype=np.int64)
        matched_ids = np.unique(assoc.matches["diaObjectId"].to_numpy(dtype=np.int64))
        n_new = len(assoc.unmatched)

        start = Time(
            _BEGINNING_MJD if params.full_history_summary else midpoint_mjd_tai - params.history_days,
            format="mjd",
            scale="tai",
        )
        t1 = _time.perf_counter()
        if len(matched_ids):
            history = apdb.getDiaSources(region, matched_ids.tolist(), visit_time, start_time=start)
            history_forced = apdb.getDiaForcedSources(region, matched_ids.tolist(), visit_time, start_time=start)
        else:
            history, history_forced = _empty_like_schema("DiaSource"), _empty_like_schema("DiaForcedSource")
        history = history if history is not None else _empty_like_schema("DiaSource")
        history_forced = history_forced if history_forced is not None else _empty_like_schema("DiaForcedSource")
        timings["load_history_s"] = _time.perf_counter() - t1

        # Positions for forced photometry: updated objects at their new mean
        # position, everything else where the APDB has it.
        provisional = dia_object_summary(pd.concat([history, sources], ignore_index=True))
        keep_old = ~objects["diaObjectId"].isin(provisional["diaObjectId"]) if len(objects) else []
        positions = pd.concat(
            [objects.loc[keep_old, ["diaObjectId", "ra", "dec"]] if len(objects) else None,
             provisional[["diaObjectId", "ra", "dec"]]],
            ignore_index=True,
        )
        forced = forced_photometry(
            positions,
            difference,
            science,
            visit=visit,
            detector=detector,
            band=band,
            midpoint_mjd_tai=midpoint_mjd_tai,
            time_processed_mjd_tai=now_mjd,
        )
        updated = dia_object_summary(
            pd.concat([history, sources], ignore_index=True),
            pd.concat([history_forced, forced], ignore_index=True),
        )
        updated = updated[[c for c in apdb_columns("DiaObject") if c in updated.columns and not c.startswith("validity")]]
        # An object already versioned at this visit time (updated from another
        # detector of the same visit, possible where detectors overlap) would
        # collide on the DiaObject primary key (diaObjectId, validityStartMjdTai):
        # then version this detector's update 1 ms per detector number later.
        # The same holds for a closed version when visits are processed out of
        # time order (pipetask -j runs quanta in any order), hence all versions.
        store_time = visit_time
        if len(matched_ids):
            versions = apdb.getDiaObjectsForDedup(since=visit_time)
            versions = versions[versions["diaObjectId"].isin(matched_ids)]
            taken = set(versions["validityStartMjdTai"].to_numpy(dtype=float).round(10))
            step = 1e-3 / 86400.0
            k = 0
            while round(float(store_time.tai.mjd), 10) in taken and k < 10000:
                k += 1
                store_time = Time(midpoint_mjd_tai + (int(detector) * 1000 + k) * step, format="mjd", scale="tai")
        result = DiaPipeResult(
            skipped=False,
            midpoint_mjd_tai=float(store_time.tai.mjd),
            n_dia_sources=len(sources),
            n_new_dia_objects=n_new,
            n_updated_dia_objects=len(matched_ids),
            n_loaded_dia_objects=len(objects),
            n_forced_sources=len(forced),
            dia_sources=sources,
            dia_objects=updated,
            forced_sources=forced,
            history_sources=history,
            history_forced=history_forced,
            timings=timings,
        )
        if alert_sink is not None:
            t2 = _time.perf_counter()
            n_alerts = alert_sink.prepare(result)
            timings["alerts_s"] = _time.perf_counter() - t2
        t2 = _time.perf_counter()
        apdb.store(store_time, updated, sources, forced)
        timings["store_s"] = _time.perf_counter() - t2
        if alert_sink is not None:
            result.alerts = ("written", alert_sink.commit(), int(n_alerts))
        return result

    def locked_section() -> DiaPipeResult:
        with apdb_lock(apdb, timeout_s=params.lock_timeout_s):
            return section()

    return retry_locked(locked_section, what=f"diaPipe visit={visit} detector={detector}")


# -- alerts ----------------------------------------------------------------------------


def build_alerts(
    result: DiaPipeResult,
    difference,
    science,
    template=None,
    *,
    history_days: float = 360.0,
    cutout_size: int = 31,
) -> list[dict]:
    """One validated-ready alert packet per stored DiaSource (empty if skipped)."""
    from ..alerts import build_alert_packet, load_alert_schema, make_cutout

    if result.skipped or result.dia_sources is None or len(result.dia_sources) == 0:
        return []
    schema = load_alert_schema()
    objects = result.dia_objects.set_index("diaObjectId", drop=False)
    objects["validityStartMjdTai"] = result.midpoint_mjd_tai  # as the APDB stored it
    hist = result.history_sources
    hist_by_obj = {k: g for k, g in hist.groupby("diaObjectId")} if len(hist) else {}
    fhist = result.history_forced
    fhist_by_obj = {k: g for k, g in fhist.groupby("diaObjectId")} if len(fhist) else {}

    planes = {}
    for name, exposure in (("difference", difference), ("science", science), ("template", template)):
        if exposure is not None:
            planes[name] = (exposure, njy_per_unit(exposure))

    def cutout(name, ra, dec, x=None, y=None):
        if name not in planes:
            return None
        exposure, scale = planes[name]
        if x is None:
            x, y = (float(v) for v in exposure.wcs.world_to_pixel_values(ra, dec))
        psf = exposure.psf if exposure.psf is not None else np.ones((1, 1))
        return make_cutout(
            exposure.image, exposure.variance, exposure.wcs, psf, x, y, size=cutout_size, mask=exposure.mask,
            xy0=exposure.xy0, flux_scale=scale,
        )

    packets = []
    for _, src in result.dia_sources.iterrows():
        obj_id = int(src["diaObjectId"])
        ra, dec = float(src["ra"]), float(src["dec"])
        packets.append(
            build_alert_packet(
                src,
                objects.loc[obj_id],
                hist_by_obj.get(obj_id),
                fhist_by_obj.get(obj_id),
                cutout_difference=cutout("difference", ra, dec, float(src["x"]), float(src["y"])),
                cutout_science=cutout("science", ra, dec),
                cutout_template=cutout("template", ra, dec),
                window_days=history_days,
                schema=schema,
            )
        )
    return packets
