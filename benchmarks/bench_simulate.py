"""Benchmark: simulate one FULL-SIZE 4072 x 4000 LSSTCam-imSim detector-visit at DC2 density.

Issue 3 asks for "seconds, not minutes" per full detector. Times, in one process:

- ``worker``: the simulator's per-detector-visit worker (`diapipe.sim.simulate._simulate_detector_visit`,
  what every ``-j`` process runs): camera, true WCS, rendering, detector signature, FITS write of the
  raw, truth PSF model and summary;
- and its stages on their own: ``render`` (`render_detector`, sky + sources in electrons),
  ``signature`` (`apply_detector_signature`: flat, dark, Poisson, cosmic rays, bleed, readout),
  ``write`` (`write_raw`: the lean int32 RICE-compressed raw).

Peak memory: the process's peak RSS (``resource.getrusage``, includes ~0.3 GB of imports); the peak
RSS of a forked child that runs the worker once, as each ``diapipe simulate -j N`` process does
(VmHWM after resetting it at the start; the worker's own part is the peak minus the RSS at fork;
counts only pages touched); and, in a
separate traced run, the peak of Python/numpy allocations during the worker (``tracemalloc``; counts
allocations whether touched or not, e.g. the zero mask of an in-memory raw; the traced run is slower
and is not timed). Prints a table and writes JSON to
``benchmarks/results/simulate-<date>.json``.

    .venv/bin/python benchmarks/bench_simulate.py [--repeat 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import tempfile
import time
import tracemalloc

import numpy as np

from diapipe.exposure.exposure import Exposure
from diapipe.exposure.fits import write_raw
from diapipe.instrument.camera import Camera, detector_wcs
from diapipe.sim.observing import make_visits
from diapipe.sim.presets import get_preset
from diapipe.sim.render import DetectorPsfModel, render_detector
from diapipe.sim.signature import apply_detector_signature
from diapipe.sim.simulate import _simulate_detector_visit
from diapipe.sim.sky import BANDS, make_sky_catalog

DETECTOR = 94  # R22_S11


def _machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores_visible": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "note": "2 cores shared by several developers",
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _scene(seed: int = 1):
    """A full-size detector's preset, one g visit at the DC2 field and the sky around the detector."""
    preset = dataclasses.replace(get_preset("4patch_4431"), detectors=(DETECTOR,))
    visit = make_visits(
        1, "g", 56.65, -36.45, np.random.default_rng(seed), start_mjd=60250.0, dither_radius_deg=0.0
    )[0]
    half = 0.17  # deg: the detector's 0.23 x 0.23 deg plus rotation and margin
    cosd = np.cos(np.radians(visit.boresight_dec))
    sky = make_sky_catalog(
        visit.boresight_ra - half / cosd, visit.boresight_ra + half / cosd,
        visit.boresight_dec - half, visit.boresight_dec + half,
        np.random.default_rng(seed + 1), bands=BANDS, mjd_range=(60250.0, 60280.0),
        transients_per_deg2=preset.transients_per_deg2,
    )  # fmt: skip
    return preset, visit, sky


def _time_stages(preset, visit, sky, staging, seed):
    camera = Camera.lsstcam_imsim(amp_data_shape=preset.amp_data_shape)
    detector = camera[DETECTOR]
    rng = np.random.default_rng(seed)
    wcs = detector_wcs(detector, visit.boresight_ra, visit.boresight_dec, visit.rot_sky_pos_deg)
    psf_model = DetectorPsfModel(visit, pix_to_fp_mm=detector.pixel_to_focal_plane)
    t0 = time.perf_counter()
    rendered = render_detector(sky, visit, wcs, detector.shape, psf_model, rng, include_noise=False)
    t1 = time.perf_counter()
    raw = apply_detector_signature(rendered.image, detector, visit.exposure_time_s, rng)
    t2 = time.perf_counter()
    write_raw(Exposure(image=raw, wcs=wcs), os.path.join(staging, "stage_raw.fits"))
    t3 = time.perf_counter()
    n_drawn = int(rendered.truth["drawn"].sum())
    n_on = int((rendered.truth["drawn"] & rendered.truth["on_detector"]).sum())
    return {"render": t1 - t0, "signature": t2 - t1, "write": t3 - t2}, n_drawn, n_on, raw.shape


def _worker(preset, visit, sky, staging, seed):
    task = (preset, visit, DETECTOR, sky, seed, (visit.boresight_ra, visit.boresight_dec), staging)
    t0, c0 = time.perf_counter(), time.process_time()
    _, _, path, truth, _, _ = _simulate_detector_visit(task)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    size_mb = os.path.getsize(path) / 1e6
    os.remove(path)
    return seconds, len(truth), size_mb, cpu_seconds


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0  # kB


def _child_worker(preset, visit, sky, staging, seed, out_path):
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start = _status_mb("VmRSS")
    _worker(preset, visit, sky, staging, seed)
    with open(out_path, "w") as f:
        json.dump({"rss_at_start_mb": start, "peak_rss_mb": _status_mb("VmHWM")}, f)


def _forked_worker_rss_mb(preset, visit, sky, staging, seed) -> tuple[float, float]:
    """(peak RSS, peak RSS minus RSS at start) in MB of a forked child running the worker once,
    as a ``-j`` pool process does; the difference is what the worker itself adds."""
    import multiprocessing

    out_path = os.path.join(staging, "child_rss.json")
    child = multiprocessing.get_context("fork").Process(
        target=_child_worker, args=(preset, visit, sky, staging, seed, out_path)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"forked worker failed with exit code {child.exitcode}")
    with open(out_path) as f:
        data = json.load(f)
    return data["peak_rss_mb"], data["peak_rss_mb"] - data["rss_at_start_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--json", default=None, help="output file (default benchmarks/results/simulate-<date>.json)"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    preset, visit, sky = _scene()
    sky_seconds = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as staging:
        for k in range(args.repeat):
            stages, n_drawn, n_on, raw_shape = _time_stages(preset, visit, sky, staging, seed=10 + k)
            worker_s, n_truth, size_mb, worker_cpu_s = _worker(preset, visit, sky, staging, seed=10 + k)
            rows.append({"worker_s": worker_s, "worker_cpu_s": worker_cpu_s,
                         **{f"{k}_s": v for k, v in stages.items()}})  # fmt: skip
        rss_peak = _rss_mb()
        child_rss, child_added = _forked_worker_rss_mb(preset, visit, sky, staging, seed=98)
        tracemalloc.start()
        _worker(preset, visit, sky, staging, seed=99)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    load_after = os.getloadavg()

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
        "detector": DETECTOR,
        "image_shape": [4000, 4072],
        "raw_shape": list(raw_shape),
        "band": visit.band,
        "psf_fwhm_arcsec": visit.psf_fwhm_arcsec,
        "sky_objects_in_box": len(sky),
        "objects_drawn": n_drawn,
        "objects_drawn_on_detector": n_on,
        "truth_rows": n_truth,
        "raw_fits_mb": size_mb,
        "sky_catalog_s": sky_seconds,
        "runs": rows,
        "worker_s_median": float(np.median([r["worker_s"] for r in rows])),
        "worker_cpu_s_median": float(np.median([r["worker_cpu_s"] for r in rows])),
        "peak_rss_mb": rss_peak,
        "rss_after_imports_mb": rss_start,
        "forked_worker_peak_rss_mb": child_rss,
        "forked_worker_added_rss_mb": child_added,
        "tracemalloc_peak_mb_worker": traced_peak / 1e6,
    }
    print(f"full-size detector-visit ({result['image_shape'][1]} x {result['image_shape'][0]} px, raw "
          f"{raw_shape[1]} x {raw_shape[0]}), band {visit.band}, {n_drawn} objects drawn ({n_on} centred on "
          f"the detector), PSF FWHM {visit.psf_fwhm_arcsec:.2f}\"")  # fmt: skip
    print(f"{'run':>4} {'worker s':>9} {'worker CPU s':>13} {'render s':>9} {'signature s':>12} {'write s':>8}")
    for i, r in enumerate(rows):
        print(f"{i:>4} {r['worker_s']:9.2f} {r['worker_cpu_s']:13.2f} {r['render_s']:9.2f} "
              f"{r['signature_s']:12.2f} {r['write_s']:8.2f}")  # fmt: skip
    print(f"peak RSS {rss_peak:.0f} MB (after imports {rss_start:.0f} MB); forked worker peak RSS {child_rss:.0f} MB "
          f"({child_added:.0f} MB above its RSS at fork); "
          f"tracemalloc peak of one worker "
          f"{traced_peak / 1e6:.0f} MB; raw FITS {size_mb:.0f} MB; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")  # fmt: skip
    out = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"simulate-{result['date']}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
