"""Write a DC2-like butler repository: raws, calibs, refcat, truth, collections.

`simulate_repo` is the Python API under ``diapipe simulate``. The pixels come
from `diapipe.sim.render` (sky, optics) and `diapipe.sim.signature` (detector);
this module decides what to observe, fans the detector-visits out to worker
processes, and files the results in the butler the way the guide's
``/repo/dc2`` is organised.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import pandas as pd
from astropy.time import Time, TimeDelta

from ..exposure.exposure import Exposure, VisitInfo
from ..exposure.fits import wcs_to_dict, write_raw
from .presets import Preset, get_preset

__all__ = [
    "RAW_COLLECTION",
    "CALIB_COLLECTION",
    "CALIB_RUN",
    "REFCAT_COLLECTION",
    "REFCAT_RUN",
    "TRUTH_COLLECTION",
    "DEFAULTS_COLLECTION",
    "REFCAT_NAME",
    "SimulationError",
    "SimulationSummary",
    "plan_visits",
    "refcat_filter_map",
    "simulate_repo",
    "visit_info_for",
]

_log = logging.getLogger(__name__)

RAW_COLLECTION = "2.2i/raw/all"
CALIB_COLLECTION = "2.2i/calib"
CALIB_RUN = "2.2i/calib/sim"
REFCAT_COLLECTION = "refcats"
REFCAT_NAME = "cal_ref_cat_2_2"
REFCAT_RUN = f"refcats/{REFCAT_NAME}"
TRUTH_COLLECTION = "2.2i/truth"
DEFAULTS_COLLECTION = "2.2i/defaults"
INSTRUMENT = "LSSTCam-imSim"
#: rms of the telescope's pointing error: the raw's WCS comes from the
#: reported boresight, the pixels from the true one (astrometry must fix it)
POINTING_ERROR_ARCSEC = 2.0
REFCAT_HTM_LEVEL = 7


class SimulationError(RuntimeError):
    """The simulation could not be written; the repository was left as it was."""


@dataclass
class SimulationSummary:
    preset: str
    repo: str
    visits: list[int]
    detectors: list[int]
    n_raws: int
    n_sky_objects: int
    n_refcat: int
    seconds: float
    collections: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------
def _field_centre(preset: Preset, skymap) -> tuple[float, float]:
    """Sky position of the centre of the preset's patches."""
    from ..skymap.rings import _unit_vector  # noqa: PLC2701 (same package family)

    tract = skymap[preset.tract]
    vectors = []
    for patch_id in preset.patches:
        ra, dec = tract[patch_id].inner_center_radec
        vectors.append(_unit_vector(np.radians(ra), np.radians(dec)))
    mean = np.mean(vectors, axis=0)
    mean /= np.linalg.norm(mean)
    return float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0), float(np.degrees(np.arcsin(mean[2])))


def plan_visits(preset: Preset, skymap, rng: np.random.Generator):
    """Template-epoch visits then science visits, per band; returns (visits, science_window)."""
    from .observing import make_visits

    ra, dec = _field_centre(preset, skymap)
    visits = []
    science_end = preset.science_start_mjd + preset.n_science_visits * preset.cadence_days
    for index, band in enumerate(preset.bands):
        offset = 0.3 * index  # bands on different nights' hour angles: distinct visit ids
        for start, count in (
            (preset.template_start_mjd + offset, preset.n_template_visits),
            (preset.science_start_mjd + offset, preset.n_science_visits),
        ):
            if count:
                visits.extend(
                    make_visits(
                        count,
                        band,
                        ra,
                        dec,
                        rng,
                        start_mjd=start,
                        cadence_days=preset.cadence_days,
                        dither_radius_deg=preset.dither_radius_deg,
                    )
                )
    ids = [v.visit for v in visits]
    if len(set(ids)) != len(ids):
        raise SimulationError(f"visit ids collide in preset {preset.name}: {sorted(ids)}")
    return visits, (preset.science_start_mjd, science_end)


def _reported_boresight(visit, rng: np.random.Generator) -> tuple[float, float]:
    """The boresight the telescope reports: the true one plus a pointing error."""
    dra, ddec = rng.normal(0.0, POINTING_ERROR_ARCSEC / 3600.0, 2)
    return visit.boresight_ra + dra / np.cos(np.radians(visit.boresight_dec)), visit.boresight_dec + ddec


def visit_info_for(visit, detector_id: int, reported=None) -> VisitInfo:
    """The `VisitInfo` of one detector-visit; ``reported`` is the boresight the telescope
    reports (default: the true one)."""
    if reported is None:
        reported = (visit.boresight_ra, visit.boresight_dec)
    return VisitInfo(
        instrument=INSTRUMENT,
        exposure=visit.visit,
        visit=visit.visit,
        detector=detector_id,
        physical_filter=visit.physical_filter,
        band=visit.band,
        exposure_time_s=visit.exposure_time_s,
        dark_time_s=visit.exposure_time_s,
        mjd_tai=visit.mjd,
        boresight_ra_deg=float(reported[0]),
        boresight_dec_deg=float(reported[1]),
        rot_sky_pos_deg=visit.rot_sky_pos_deg,
        airmass=visit.airmass,
    )


# --------------------------------------------------------------------------
# one detector-visit (runs in a worker process)
# --------------------------------------------------------------------------
def _detector_visit_rng(seed: int, visit: int, detector: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, visit, detector]))


def _simulate_detector_visit(args):
    """Render one detector-visit and write its raw to ``staging``; returns truth."""
    preset, visit, detector_id, sky, seed, reported, staging = args
    from ..instrument.camera import Camera, detector_wcs
    from .observing import njy_to_electrons
    from .render import DetectorPsfModel, psf_for_detector, render_detector
    from .signature import apply_detector_signature

    camera = Camera.lsstcam_imsim(amp_data_shape=preset.amp_data_shape)
    detector = camera[detector_id]
    rng = _detector_visit_rng(seed, visit.visit, detector_id)
    true_wcs = detector_wcs(detector, visit.boresight_ra, visit.boresight_dec, visit.rot_sky_pos_deg)
    psf_model = DetectorPsfModel(visit, pix_to_fp_mm=detector.pixel_to_focal_plane)
    rendered = render_detector(sky, visit, true_wcs, detector.shape, psf_model, rng, include_noise=False)
    # the signature chain works in the rendered frame itself: drop every other reference to it
    electrons, truth, sky_level_e = rendered.image, rendered.truth, float(rendered.sky_level_e)
    del rendered
    raw_adu = apply_detector_signature(electrons, detector, visit.exposure_time_s, rng, overwrite_input=True)
    del electrons
    reported_wcs = detector_wcs(detector, reported[0], reported[1], visit.rot_sky_pos_deg)
    raw = Exposure(
        image=raw_adu,
        wcs=reported_wcs,
        visit_info=visit_info_for(visit, detector_id, reported),
        metadata={
            "OBSID": f"{visit.visit}",
            "DETNAME": detector.name,
            "RAWLAYOUT": "amplifiers in raw order; the WCS maps assembled-detector pixels",
            "AMPSHAPE": list(preset.amp_data_shape),
        },
    )
    del raw_adu
    path = os.path.join(staging, f"raw_{visit.visit}_{detector_id:03d}.fits")
    write_raw(raw, path)
    del raw
    true_psf = psf_for_detector(psf_model, detector.shape)
    cx, cy = (detector.shape[1] - 1) / 2, (detector.shape[0] - 1) / 2
    summary = {
        "visit": visit.visit,
        "detector": detector_id,
        "band": visit.band,
        "mjd_tai": visit.mjd,
        "airmass": visit.airmass,
        "seeing_500nm_arcsec": visit.seeing_500nm_arcsec,
        "psf_fwhm_arcsec": float(np.atleast_1d(psf_model.fwhm_arcsec(cx, cy))[0]),
        "psf_fwhm_px": float(np.atleast_1d(psf_model.fwhm_px(cx, cy))[0]),
        "psf_sigma_px": float(true_psf.sigma(cx, cy)),
        "sky_level_e": sky_level_e,
        # electrons on a flat-fielded (ideal) detector per nJy; its inverse is the calexp's PhotoCalib
        "electrons_per_njy": float(njy_to_electrons(visit)),
        "calibration_njy_per_e": float(1.0 / njy_to_electrons(visit)),
        "zp_exposure_mag": float(visit.zp_exposure),
        "cloud_mag": float(visit.cloud_mag),
        "true_boresight_ra_deg": float(visit.boresight_ra),
        "true_boresight_dec_deg": float(visit.boresight_dec),
        "reported_boresight_ra_deg": float(reported[0]),
        "reported_boresight_dec_deg": float(reported[1]),
        "true_wcs": wcs_to_dict(true_wcs),
    }
    return visit.visit, detector_id, path, truth, summary, true_psf


# --------------------------------------------------------------------------
# butler bookkeeping
# --------------------------------------------------------------------------
def _dataset_types(universe):
    from lsst.daf.butler import DatasetType

    def dt(name, dims, storage, calib=False):
        return DatasetType(name, dims, storage, universe=universe, isCalibration=calib)

    return [
        dt("raw", ["instrument", "exposure", "detector"], "DiapipeExposure"),
        dt("bias", ["instrument", "detector"], "DiapipeExposure", calib=True),
        dt("dark", ["instrument", "detector"], "DiapipeExposure", calib=True),
        dt("flat", ["instrument", "detector", "physical_filter"], "DiapipeExposure", calib=True),
        dt("defects", ["instrument", "detector"], "ArrowAstropy", calib=True),
        dt(REFCAT_NAME, ["htm7"], "ArrowAstropy"),
        dt(f"{REFCAT_NAME}_filterMap", [], "StructuredDataDict"),
        dt("truth_source", ["instrument", "visit", "detector"], "DataFrame"),
        dt("truth_summary", ["instrument", "visit", "detector"], "StructuredDataDict"),
        dt("truth_psf", ["instrument", "visit", "detector"], "DiapipePsf"),
        dt("truth_sky", ["skymap", "tract"], "DataFrame"),
    ]


def _day_obs(mjd: float) -> int:
    # Rubin's observing day rolls over at noon (UTC-12h).
    return int(Time(mjd - 0.5, format="mjd", scale="tai").utc.strftime("%Y%m%d"))


def _insert_observation_records(butler, visits, regions, reported):
    """exposure/visit/day_obs/group/visit_detector_region records (idempotent).

    ``reported``: visit id -> the boresight the telescope reports, which is what
    the records (like the raws' headers) carry; the true one is only in the truth.
    """
    from lsst.daf.butler import Timespan

    from ..butler.repo import polygon_from_radec

    registry = butler.registry
    for visit in visits:
        begin = Time(visit.mjd - visit.exposure_time_s / 2 / 86400, format="mjd", scale="tai")
        end = Time(visit.mjd + visit.exposure_time_s / 2 / 86400, format="mjd", scale="tai")
        timespan = Timespan(begin, end)
        day_obs = _day_obs(visit.mjd)
        day_begin = Time(int(Time(visit.mjd - 0.5, format="mjd").mjd) + 0.5, format="mjd", scale="tai")
        registry.syncDimensionData(
            "day_obs", {"instrument": INSTRUMENT, "id": day_obs, "timespan": Timespan(day_begin, day_begin + TimeDelta(1.0, format="jd"))}
        )
        group = f"{visit.visit}"
        registry.syncDimensionData("group", {"instrument": INSTRUMENT, "name": group})
        zenith = 90.0 - visit.altitude_deg
        registry.syncDimensionData(
            "exposure",
            {
                "instrument": INSTRUMENT,
                "id": visit.visit,
                "obs_id": f"{visit.visit}",
                "physical_filter": visit.physical_filter,
                "group": group,
                "day_obs": day_obs,
                "exposure_time": visit.exposure_time_s,
                "dark_time": visit.exposure_time_s,
                "observation_type": "science",
                "observation_reason": "science",
                "seq_num": visit.visit % 100000,
                "seq_start": visit.visit % 100000,
                "seq_end": visit.visit % 100000,
                "target_name": "DC2",
                "science_program": "diapipe-sim",
                "tracking_ra": float(reported[visit.visit][0]),
                "tracking_dec": float(reported[visit.visit][1]),
                "sky_angle": visit.rot_sky_pos_deg,
                "azimuth": None,
                "zenith_angle": zenith,
                "has_simulated": True,
                "can_see_sky": True,
                "timespan": timespan,
            },
        )
        corners = np.concatenate([regions[(visit.visit, d)] for d in sorted(d for v, d in regions if v == visit.visit)])
        registry.syncDimensionData(
            "visit",
            {
                "instrument": INSTRUMENT,
                "id": visit.visit,
                "name": f"{visit.visit}",
                "physical_filter": visit.physical_filter,
                "day_obs": day_obs,
                "seq_num": visit.visit % 100000,
                "exposure_time": visit.exposure_time_s,
                "target_name": "DC2",
                "observation_reason": "science",
                "science_program": "diapipe-sim",
                "azimuth": None,
                "zenith_angle": zenith,
                "region": polygon_from_radec(corners[:, 0], corners[:, 1]),
                "timespan": timespan,
            },
        )
        registry.syncDimensionData(
            "visit_definition", {"instrument": INSTRUMENT, "exposure": visit.visit, "visit": visit.visit}
        )
        registry.syncDimensionData(
            "visit_system_membership", {"instrument": INSTRUMENT, "visit_system": 0, "visit": visit.visit}
        )
        for (v, detector_id), corner in regions.items():
            if v == visit.visit:
                registry.syncDimensionData(
                    "visit_detector_region",
                    {
                        "instrument": INSTRUMENT,
                        "visit": v,
                        "detector": detector_id,
                        "region": polygon_from_radec(corner[:, 0], corner[:, 1]),
                    },
                )


def _write_calibs(butler, preset, camera, seed, visits):
    from astropy.table import Table
    from lsst.daf.butler import CollectionType, Timespan

    from .signature import make_defects, make_flat, make_master_bias, make_master_dark

    butler.registry.registerRun(CALIB_RUN)
    refs = []
    filters = sorted({v.physical_filter for v in visits})
    for detector_id in preset.detectors:
        detector = camera[detector_id]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7, detector_id]))
        data_id = {"instrument": INSTRUMENT, "detector": detector_id}
        info = VisitInfo(instrument=INSTRUMENT, detector=detector_id, observation_type="calibration")
        refs.append(butler.put(Exposure(make_master_bias(detector, rng), visit_info=info), "bias", data_id, run=CALIB_RUN))
        refs.append(butler.put(Exposure(make_master_dark(detector, rng), visit_info=info), "dark", data_id, run=CALIB_RUN))
        flat = make_flat(detector, rng)
        for physical_filter in filters:
            refs.append(
                butler.put(
                    Exposure(flat, visit_info=info.replace(physical_filter=physical_filter)),
                    "flat",
                    dict(data_id, physical_filter=physical_filter),
                    run=CALIB_RUN,
                )
            )
        boxes = np.array(make_defects(detector), dtype=np.int64).reshape(-1, 4)
        defects = Table(
            {"x0": boxes[:, 0], "y0": boxes[:, 1], "width": boxes[:, 2], "height": boxes[:, 3]},
            meta={"detector": detector_id},
        )
        refs.append(butler.put(defects, "defects", data_id, run=CALIB_RUN))
    butler.registry.registerCollection(CALIB_COLLECTION, CollectionType.CALIBRATION)
    mjds = [v.mjd for v in visits]
    validity = Timespan(
        Time(min(mjds) - 30, format="mjd", scale="tai"), Time(max(mjds) + 30, format="mjd", scale="tai")
    )
    butler.registry.certify(CALIB_COLLECTION, refs, validity)


def _write_refcat(butler, refcat: pd.DataFrame):
    from astropy.table import Table
    from lsst.sphgeom import HtmPixelization, LonLat, UnitVector3d

    butler.registry.registerRun(REFCAT_RUN)
    pixelization = HtmPixelization(REFCAT_HTM_LEVEL)
    shard = np.array(
        [
            pixelization.index(UnitVector3d(LonLat.fromDegrees(float(ra), float(dec))))
            for ra, dec in zip(refcat["coord_ra"], refcat["coord_dec"])
        ]
    )
    for index in np.unique(shard):
        table = Table.from_pandas(refcat[shard == index].reset_index(drop=True))
        table.meta["REFCAT"] = REFCAT_NAME
        butler.put(table, REFCAT_NAME, {"htm7": int(index)}, run=REFCAT_RUN)
    butler.put(refcat_filter_map(), f"{REFCAT_NAME}_filterMap", {}, run=REFCAT_RUN)


def refcat_filter_map() -> dict[str, str]:
    """Physical filter -> refcat filter name (flux column ``<name>_flux``), DC2's
    ``{band}: lsst_{band}_smeared`` map keyed by LSSTCam-imSim physical filter."""
    from ..instrument import PHYSICAL_FILTERS

    return {physical: f"lsst_{band}_smeared" for physical, band in PHYSICAL_FILTERS.items()}


def _chain(butler, name, children):
    from lsst.daf.butler import CollectionType

    butler.registry.registerCollection(name, CollectionType.CHAINED)
    butler.registry.setCollectionChain(name, children)


# --------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------
def _check_target(butler, repo):
    from lsst.daf.butler import MissingCollectionError

    try:
        existing = butler.registry.queryDatasets("raw", collections=RAW_COLLECTION, findFirst=False)
        if any(True for _ in existing):
            raise SimulationError(
                f"{repo} already holds raws in {RAW_COLLECTION}: simulate into an empty repository "
                "(a new path, or one made with `diapipe make-repo`)"
            )
    except (MissingCollectionError, LookupError):
        pass


def simulate_repo(
    repo: str | os.PathLike,
    preset: str | Preset = "ci_imsim",
    *,
    seed: int = 1,
    bands=None,
    jobs: int = 1,
    progress=None,
) -> SimulationSummary:
    """Simulate a preset into the butler repository ``repo`` (created if absent).

    On any failure the runs written so far are removed (dimension records,
    being deterministic, are kept and re-synced by a rerun) and
    `SimulationError` names the detector-visit at fault.
    """
    from lsst.daf.butler import Butler

    from ..butler.repo import SKYMAP_COLLECTION, check_repo_config, make_repo
    from ..instrument import BANDS
    from ..instrument.camera import Camera, detector_corners_sky
    from ..skymap import RingsSkyMap
    from .sky import make_sky_catalog, reference_catalog

    started = time.monotonic()
    say = progress or (lambda message: _log.info("%s", message))
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if bands:
        bands = [bands] if isinstance(bands, str) else list(bands)
        unknown = [b for b in bands if b not in BANDS]
        if unknown:
            raise ValueError(f"Unknown band(s) {unknown}; LSSTCam-imSim has {', '.join(BANDS)}")
        preset = preset.with_bands(bands)
    if jobs < 1:
        raise ValueError(f"-j/--jobs must be >= 1, got {jobs}")
    repo = os.path.abspath(os.fspath(repo))
    skymap = RingsSkyMap(name="DC2")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    visits, science_window = plan_visits(preset, skymap, rng)
    camera = Camera.lsstcam_imsim(amp_data_shape=preset.amp_data_shape)

    regions, reported = {}, {}
    pointing_rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    for visit in visits:
        reported[visit.visit] = _reported_boresight(visit, pointing_rng)
        for detector_id in preset.detectors:
            corners = detector_corners_sky(
                camera[detector_id], *reported[visit.visit], visit.rot_sky_pos_deg
            )
            regions[(visit.visit, detector_id)] = np.asarray(corners)
    all_corners = np.concatenate(list(regions.values()))
    tract_ids = sorted(
        {t.tract_id for t, _ in skymap.find_tract_patch_list(all_corners[:, 0], all_corners[:, 1])} | {preset.tract}
    )

    if not os.path.exists(os.path.join(repo, "butler.yaml")):
        say(f"creating repository {repo} (instrument LSSTCam-imSim, skymap DC2 tracts {tract_ids})")
        make_repo(repo, tract_ids=tract_ids)
    butler = Butler.from_config(repo, writeable=True)
    check_repo_config(butler)
    _check_target(butler, repo)
    from ..butler.repo import register_skymap

    register_skymap(butler, tract_ids=tract_ids)
    for dataset_type in _dataset_types(butler.dimensions):
        butler.registry.registerDatasetType(dataset_type)

    margin = 60.0 / 3600
    ra_min, dec_min = all_corners.min(axis=0) - margin
    ra_max, dec_max = all_corners.max(axis=0) + margin
    sky = make_sky_catalog(
        ra_min,
        ra_max,
        dec_min,
        dec_max,
        np.random.default_rng(np.random.SeedSequence([seed, 3])),
        bands=tuple(BANDS),
        mjd_range=science_window,
        transients_per_deg2=preset.transients_per_deg2,
        star_density_scale=preset.star_density_scale,
        galaxy_density_scale=preset.galaxy_density_scale,
        moving_per_deg2=preset.moving_per_deg2,
    )
    say(f"sky: {len(sky)} objects in RA {ra_min:.3f}..{ra_max:.3f}, Dec {dec_min:.3f}..{dec_max:.3f}")

    created_runs = [RAW_COLLECTION, CALIB_RUN, REFCAT_RUN, TRUTH_COLLECTION]
    staging = os.path.join(repo, ".sim_staging")
    os.makedirs(staging, exist_ok=True)
    try:
        _insert_observation_records(butler, visits, regions, reported)
        butler.registry.registerRun(RAW_COLLECTION)
        butler.registry.registerRun(TRUTH_COLLECTION)
        tasks = [
            (preset, visit, detector_id, sky, seed, reported[visit.visit], staging)
            for visit in visits
            for detector_id in preset.detectors
        ]
        say(f"rendering {len(tasks)} detector-visits ({len(visits)} visits x {len(preset.detectors)} detectors) with {jobs} process(es)")
        n_done = 0
        for result in _run_all(tasks, jobs):
            visit_id, detector_id, path, truth, summary, psf = result
            _ingest_raw(butler, path, visit_id, detector_id)
            data_id = {"instrument": INSTRUMENT, "visit": visit_id, "detector": detector_id}
            butler.put(truth, "truth_source", data_id, run=TRUTH_COLLECTION)
            butler.put(summary, "truth_summary", data_id, run=TRUTH_COLLECTION)
            butler.put(psf, "truth_psf", data_id, run=TRUTH_COLLECTION)
            n_done += 1
            say(f"  [{n_done}/{len(tasks)}] visit {visit_id} detector {detector_id} ({time.monotonic() - started:.0f} s)")
        butler.put(sky.table, "truth_sky", {"skymap": "DC2", "tract": preset.tract}, run=TRUTH_COLLECTION)
        say("writing calibrations (bias, dark, flat, defects) and the reference catalogue")
        _write_calibs(butler, preset, camera, seed, visits)
        refcat = reference_catalog(sky, np.random.default_rng(np.random.SeedSequence([seed, 4])))
        _write_refcat(butler, refcat)
        _chain(butler, REFCAT_COLLECTION, [REFCAT_RUN])
        _chain(butler, DEFAULTS_COLLECTION, [RAW_COLLECTION, CALIB_COLLECTION, SKYMAP_COLLECTION, REFCAT_COLLECTION])
        _chain(butler, preset.collection, [DEFAULTS_COLLECTION])
    except BaseException as err:
        _rollback(
            butler, [preset.collection, DEFAULTS_COLLECTION, REFCAT_COLLECTION, CALIB_COLLECTION], created_runs
        )
        if isinstance(err, SimulationError):
            raise
        raise SimulationError(f"simulation of preset {preset.name} into {repo} failed: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SimulationSummary(
        preset=preset.name,
        repo=repo,
        visits=[v.visit for v in visits],
        detectors=list(preset.detectors),
        n_raws=len(visits) * len(preset.detectors),
        n_sky_objects=len(sky),
        n_refcat=len(refcat),
        seconds=time.monotonic() - started,
        collections={"preset": preset.collection, "defaults": DEFAULTS_COLLECTION, "truth": TRUTH_COLLECTION},
    )


def _run_all(tasks, jobs):
    if jobs == 1:
        for task in tasks:
            try:
                result = _simulate_detector_visit(task)
            except Exception as err:
                raise SimulationError(f"failed on visit {task[1].visit} detector {task[2]}: {err}") from err
            yield result
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_simulate_detector_visit, task) for task in tasks]
        for future, task in zip(futures, tasks):
            try:
                yield future.result()
            except Exception as err:
                for other in futures:
                    other.cancel()
                raise SimulationError(
                    f"worker failed on visit {task[1].visit} detector {task[2]}: {err}"
                ) from err


def _ingest_raw(butler, path, visit_id, detector_id):
    from lsst.daf.butler import DatasetRef, FileDataset

    dataset_type = butler.registry.getDatasetType("raw")
    data_id = butler.registry.expandDataId(instrument=INSTRUMENT, exposure=visit_id, detector=detector_id)
    ref = DatasetRef(dataset_type, data_id, run=RAW_COLLECTION)
    butler.ingest(FileDataset(path=path, refs=[ref], formatter="diapipe.butler.formatters.ExposureFormatter"), transfer="move")


def _rollback(butler, chains, runs):
    """Remove what this simulation wrote: chains first (they pin their children), then runs."""
    from lsst.daf.butler import MissingCollectionError

    for name in chains:
        try:
            butler.registry.removeCollection(name)
        except MissingCollectionError:
            pass
    existing = []
    for run in runs:
        try:
            butler.registry.getCollectionType(run)
            existing.append(run)
        except MissingCollectionError:
            pass
    if existing:
        butler.removeRuns(existing)
