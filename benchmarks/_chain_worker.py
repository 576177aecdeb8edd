"""Subprocess worker of run_all.py: run pipeline tasks in-process on one core and time them.

    python benchmarks/_chain_worker.py SPEC.json      (prints one JSON line prefixed RESULT:)

SPEC: repo, pipeline (file or name, optional #labels), inputs, output, where, config_overrides,
reset_peak (bool: reset the peak-RSS counter after the imports so the peak is the tasks' own),
profile (path for cProfile stats or null).

Each task class's ``run`` is wrapped to record its wall time and the process's peak RSS
(/proc/self/status VmHWM, reset through /proc/self/clear_refs before each call when allowed),
so ``run_s`` is the algorithm time without butler I/O and ``quantum_s`` adds the I/O.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

TASK_CLASSES = {
    "isr": ("diapipe.isr.tasks", "IsrTask"),
    "characterizeImage": ("diapipe.calibrate.tasks", "CharacterizeImageTask"),
    "calibrate": ("diapipe.calibrate.tasks", "CalibrateTask"),
    "consolidateVisitSummary": ("diapipe.calibrate.tasks", "ConsolidateVisitSummaryTask"),
    "selectGoodSeeingVisits": ("diapipe.coadd.tasks", "SelectGoodSeeingVisitsTask"),
    "makeWarp": ("diapipe.coadd.tasks", "MakeWarpTask"),
    "assembleCoadd": ("diapipe.coadd.tasks", "AssembleCoaddTask"),
    "retrieveTemplate": ("diapipe.diffim.tasks", "RetrieveTemplateTask"),
    "subtractImages": ("diapipe.diffim.tasks", "SubtractImagesTask"),
    "detectAndMeasure": ("diapipe.diffim.tasks", "DetectAndMeasureTask"),
    "transformDiaSrcCat": ("diapipe.diffim.tasks", "TransformDiaSrcCatTask"),
    "diaPipe": ("diapipe.association.tasks", "DiaPipelineTask"),
}


def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM (peak) or VmRSS (current) of this process in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(spec_path: str) -> None:
    import importlib

    with open(spec_path) as fh:
        spec = json.load(fh)
    t_import = time.perf_counter()
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    from diapipe.pipelines import ap_pipe_dir, pipeline_path

    records: list[dict] = []
    can_reset = reset_peak()
    for label, (module, name) in TASK_CLASSES.items():
        cls = getattr(importlib.import_module(module), name)
        original = cls.run

        def wrapped(self, *args, _orig=original, _label=label, **kwargs):
            if can_reset and spec.get("per_task_peak", True):
                reset_peak()
            before = rss_mb("VmRSS")
            t0 = time.perf_counter()
            c0 = time.process_time()
            try:
                return _orig(self, *args, **kwargs)
            finally:
                records.append({"label": _label, "run_s": time.perf_counter() - t0,
                                "cpu_s": time.process_time() - c0,
                                "rss_before_mb": before, "peak_rss_mb": rss_mb("VmHWM")})

        cls.run = wrapped
    import_s = time.perf_counter() - t_import
    os.environ.setdefault("AP_PIPE_DIR", ap_pipe_dir())
    location, _, labels = spec["pipeline"].partition("#")
    path = location if os.path.exists(location) else pipeline_path(location)
    butler = SimplePipelineExecutor.prep_butler(spec["repo"], inputs=spec["inputs"], output=spec["output"])
    pipe = Pipeline.from_uri(f"{path}#{labels}" if labels else path)
    for label, fields in (spec.get("config_overrides") or {}).items():
        for field, value in fields.items():
            pipe.addConfigOverride(label, field, value)
    t0 = time.perf_counter()
    executor = SimplePipelineExecutor.from_pipeline(pipe, where=spec.get("where", ""), butler=butler)
    graph_s = time.perf_counter() - t0
    rss_after_setup = rss_mb("VmRSS")
    if spec.get("reset_peak") and can_reset:
        reset_peak()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    quanta = executor.run(register_dataset_types=True)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    out = {"wall_s": wall, "graph_s": graph_s, "import_s": import_s, "n_quanta": len(quanta),
           "rss_after_setup_mb": rss_after_setup, "peak_rss_mb": rss_mb("VmHWM"),
           "peak_reset_supported": can_reset, "tasks": records}
    print("RESULT:" + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
