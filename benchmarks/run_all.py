"""diapipe benchmark suite: ONE command, a printed table, a JSON record.

    .venv/bin/python benchmarks/run_all.py [--quick] [--name NAME] [--repeat N] [--only SECTIONS]

Sections (``--only chain,startup,...``; default all):

- ``chain``    per-task wall time and peak memory for one FULL-SIZE detector-visit (4072 x 4000 px)
               through isr -> characterizeImage -> calibrate -> retrieveTemplate -> subtractImages
               -> detectAndMeasure -> transformDiaSrcCat -> diaPipe (APDB + alerts), in-process on
               one core, repeated ``--repeat`` times (medians), plus makeWarp + assembleCoadd of the
               template. ``--quick`` uses the 800 x 800 test-preset detector instead.
- ``startup``  import time of each task module on top of the middleware; per-quantum overhead of
               ``pipetask run -j 2`` versus ``-j 1``.
- ``scaling``  ``pipetask run`` of ApPipe.yaml#diffim on 1, 2, 4, 8 detector-visits (800 x 800 px
               cropped detectors) at -j 1 and -j 2.
- ``subtract`` benchmarks/bench_subtract.py (synthetic 4096² pair; 2048² with --quick).
- ``association`` benchmarks/bench_association.py (1e4 DiaSources vs 1e3..1e6 DiaObjects).
- ``apdb``     benchmarks/bench_apdb.py (sqlite, PostgreSQL via diapipe.apdb.postgres_server).
- ``peers``    sfft and properimage ZOGY on the chain's own science/template pair
               (benchmarks/peers/, separate venv from benchmarks/peers/setup.sh).

Data are simulated once into benchmarks/.data/ (minutes; not timed). Results:
benchmarks/results/<name>-<YYYY-MM-DD>.json. Every number is wall time on this machine; the load
average is sampled around each section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           PYTHONWARNINGS="ignore")
SCIENCE_LABELS = ["isr", "characterizeImage", "calibrate", "retrieveTemplate", "subtractImages",
                  "detectAndMeasure", "transformDiaSrcCat", "diaPipe"]
SINGLE_FRAME = ["isr", "characterizeImage", "calibrate"]
GOALS = {"chain_s": 15.0, "chain_mb": 2048.0, "single_frame_s": 10.0, "import_s": 0.5, "subtract_s": 4.0,
         "assoc_1e6_s": 1.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = open("/proc/meminfo").readline().split(":", 1)[1].strip()
    except OSError:
        pass
    import numpy

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    return {"cpu": cpu, "cpus_visible": os.cpu_count(), "mem_total": mem, "python": platform.python_version(),
            "numpy": numpy.__version__, "platform": platform.platform(), "git": commit + ("+dirty" if dirty else ""),
            "loadavg_start": loadavg()}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run benchmarks/_chain_worker.py with ``spec``; its RESULT line as a dict."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, str(HERE / "_chain_worker.py"), fh.name], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)
    os.unlink(fh.name)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT:"):
            out = json.loads(line[7:])
            out["process_s"] = time.perf_counter() - t0
            return out
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
def section_chain(args, data_dir) -> dict:
    from _repo import ensure_repo

    from diapipe.apdb import create_apdb

    repo = ensure_repo("small" if args.quick else "full", data_dir, log=log)
    visit, det = repo.science_visits[0], repo.detector
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = {"repo": str(repo.path), "size": "800x800 (test preset)" if args.quick else "4072x4000 (full LSSTCam detector)",
           "visit": visit, "detector": det, "repeats": [], "loadavg": []}
    where = f"instrument='LSSTCam-imSim' AND skymap='DC2' AND visit={visit} AND detector={det}"
    for rep in range(args.repeat):
        db = Path(tempfile.mkdtemp(prefix="bench_chain_apdb")) / "apdb.db"
        create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
        spec = {"repo": str(repo.path), "pipeline": "ApPipe.yaml", "inputs": repo.inputs,
                "output": f"bench/chain/{stamp}/{rep}", "where": where, "reset_peak": True,
                "config_overrides": {"diaPipe": {"apdb.db_url": f"sqlite:///{db}",
                                                 "apdb.isolation_level": "READ_UNCOMMITTED"}},
                "profile": str(HERE / "results" / f"chain-{'quick' if args.quick else 'full'}.prof") if rep == 0 and args.profile else None}
        la = loadavg()
        res = run_worker(spec)
        res["loadavg"] = [la, loadavg()]
        out["repeats"].append(res)
        tot = sum(t["run_s"] for t in res["tasks"])
        log(f"  chain repeat {rep + 1}/{args.repeat}: tasks {tot:.1f} s, wall incl. I/O {res['wall_s']:.1f} s, "
            f"peak RSS {res['peak_rss_mb']:.0f} MB, load {la}")
    # template building: makeWarp (every template visit) + assembleCoadd
    la = loadavg()
    tmpl = run_worker({"repo": str(repo.path), "pipeline": "ApTemplate.yaml#makeWarp,assembleCoadd",
                       "inputs": repo.inputs, "output": f"bench/template/{stamp}", "where": repo.template_where,
                       "reset_peak": True})
    tmpl["loadavg"] = [la, loadavg()]
    out["template"] = tmpl
    # summary per task
    rows = []
    for label in SCIENCE_LABELS + ["makeWarp", "assembleCoadd"]:
        src = [tmpl] if label in ("makeWarp", "assembleCoadd") else out["repeats"]
        times = [sum(t["run_s"] for t in r["tasks"] if t["label"] == label) for r in src]
        cpus = [sum(t["cpu_s"] for t in r["tasks"] if t["label"] == label) for r in src]
        peaks = [max((t["peak_rss_mb"] for t in r["tasks"] if t["label"] == label), default=0.0) for r in src]
        n = sum(1 for t in src[0]["tasks"] if t["label"] == label)
        rows.append({"task": label, "n_quanta": n, "seconds_median": statistics.median(times),
                     "seconds_all": times, "cpu_seconds_median": statistics.median(cpus),
                     "peak_rss_mb": max(peaks)})
    sci = [r for r in rows if r["task"] in SCIENCE_LABELS]
    chain_s = [sum(t["run_s"] for t in r["tasks"]) for r in out["repeats"]]
    sf_s = [sum(t["run_s"] for t in r["tasks"] if t["label"] in SINGLE_FRAME) for r in out["repeats"]]
    out["rows"] = rows
    out["chain_cpu_seconds_median"] = statistics.median(
        [sum(t["cpu_s"] for t in r["tasks"]) for r in out["repeats"]])
    out["single_frame_cpu_seconds_median"] = statistics.median(
        [sum(t["cpu_s"] for t in r["tasks"] if t["label"] in SINGLE_FRAME) for r in out["repeats"]])
    out["chain_seconds_median"] = statistics.median(chain_s)
    out["chain_wall_incl_io_median"] = statistics.median(r["wall_s"] for r in out["repeats"])
    out["single_frame_seconds_median"] = statistics.median(sf_s)
    out["chain_peak_rss_mb"] = max(r["peak_rss_mb"] for r in out["repeats"])
    out["rss_after_imports_mb"] = out["repeats"][0]["rss_after_setup_mb"]
    log(f"\n  {'task':<20} {'quanta':>6} {'median s':>9} {'cpu s':>7} {'peak RSS MB':>12}")
    for r in rows:
        log(f"  {r['task']:<20} {r['n_quanta']:>6} {r['seconds_median']:>9.2f} {r['cpu_seconds_median']:>7.2f} "
            f"{r['peak_rss_mb']:>12.0f}")
    log(f"  {'single frame':<20} {'':>6} {out['single_frame_seconds_median']:>9.2f} "
        f"{out['single_frame_cpu_seconds_median']:>7.2f}   (goal <= 10 s)")
    log(f"  {'chain (no template)':<20} {'':>6} {out['chain_seconds_median']:>9.2f} {out['chain_cpu_seconds_median']:>7.2f} "
        f"{out['chain_peak_rss_mb']:>12.0f}"
        f"   (goal <= 15 s, <= 2048 MB; wall incl. butler I/O {out['chain_wall_incl_io_median']:.1f} s)")
    del sci
    return out


# ---------------------------------------------------------------------------------------------
IMPORT_MODULES = ["diapipe.isr.tasks", "diapipe.calibrate.tasks", "diapipe.coadd.tasks", "diapipe.diffim.tasks",
                  "diapipe.association.tasks"]


def _import_delta(module: str) -> float:
    code = ("import time, lsst.pipe.base, lsst.daf.butler, lsst.pex.config\n"
            f"t=time.perf_counter(); import {module}; print(time.perf_counter()-t)")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    return float(proc.stdout.strip().splitlines()[-1])


def _importtime_top(module: str, n: int = 8) -> list:
    code = "import lsst.pipe.base, lsst.daf.butler, lsst.pex.config\nimport sys; sys.stderr.write('--mark--\\n')\n" \
           f"import {module}"
    proc = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    lines = proc.stderr.split("--mark--", 1)[-1].splitlines()
    parsed = []
    for line in lines:
        if line.startswith("import time:") and "|" in line:
            parts = line[len("import time:"):].split("|")
            try:
                parsed.append((int(parts[0]), int(parts[1]), parts[2].rstrip()))
            except ValueError:
                continue
    parsed.sort(key=lambda p: -p[0])
    return [{"self_us": s, "cumulative_us": c, "module": m.strip()} for s, c, m in parsed[:n]]


def _pipetask(repo, n_visits, jobs, data_dir, tag) -> dict:
    visits = repo.science_visits[:n_visits]
    where = (f"instrument='LSSTCam-imSim' AND skymap='DC2' AND detector={repo.detector} "
             f"AND visit IN ({','.join(map(str, visits))})")
    out = f"bench/pipetask/{tag}/{time.strftime('%Y%m%dT%H%M%S')}/j{jobs}n{n_visits}"
    pipetask = str(Path(PY).parent / "pipetask")
    env = dict(ENV, AP_PIPE_DIR=str(ROOT / "src" / "diapipe" / "ap_pipe"))
    cmd = [pipetask, "run", "-j", str(jobs), "-b", str(repo.path), "-i", ",".join(repo.inputs), "-o", out,
           "-p", str(ROOT / "src/diapipe/ap_pipe/pipelines/LsstCamImSim/ApPipe.yaml") + "#diffim", "-d", where,
           "--register-dataset-types"]
    la = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pipetask failed: {proc.stderr[-2000:]}")
    return {"n_visits": n_visits, "jobs": jobs, "n_quanta": 7 * n_visits, "wall_s": wall,
            "loadavg": [la, loadavg()]}


def section_startup(args, data_dir) -> dict:
    from _repo import ensure_repo

    rows = []
    for module in IMPORT_MODULES:
        times = [_import_delta(module) for _ in range(args.repeat)]
        rows.append({"module": module, "import_s_median": statistics.median(times), "import_s_all": times,
                     "top_imports": _importtime_top(module)})
        log(f"  import {module:<28} {statistics.median(times):6.3f} s   (goal < 0.5 s)")
    base = [float(subprocess.run([PY, "-c", "import time;t=time.perf_counter();import lsst.pipe.base, lsst.daf.butler;"
                                  "print(time.perf_counter()-t)"], capture_output=True, text=True, env=ENV)
                  .stdout.strip().splitlines()[-1]) for _ in range(args.repeat)]
    log(f"  middleware itself (lsst.pipe.base + daf.butler) {statistics.median(base):.2f} s")
    repo = ensure_repo("small", data_dir, log=log)
    n = 2 if args.quick else 4
    j1 = _pipetask(repo, n, 1, data_dir, "startup")
    j2 = _pipetask(repo, n, 2, data_dir, "startup")
    q = j1["n_quanta"]
    # -j 2 spends 2 x wall core-seconds (if both cores work throughout); -j 1 runs in one process
    overhead = (2 * j2["wall_s"] - j1["wall_s"]) / q
    log(f"  pipetask ApPipe#diffim, {n} detector-visits ({q} quanta): -j 1 {j1['wall_s']:.1f} s, "
        f"-j 2 {j2['wall_s']:.1f} s -> overhead ~{overhead:.2f} core-s per quantum at -j 2")
    return {"imports": rows, "middleware_import_s": statistics.median(base), "pipetask_j1": j1,
            "pipetask_j2": j2, "per_quantum_overhead_core_s": overhead}


def section_scaling(args, data_dir) -> dict:
    from _repo import ensure_repo

    repo = ensure_repo("small", data_dir, log=log)
    rows = []
    for n in ((1, 2, 4) if args.quick else (1, 2, 4, 8)):
        for jobs in (1, 2):
            r = _pipetask(repo, n, jobs, data_dir, "scaling")
            rows.append(r)
            log(f"  {n} detector-visits -j {jobs}: {r['wall_s']:6.1f} s  ({r['wall_s'] / n:5.1f} s each)  load {r['loadavg'][0]}")
    return {"detector": "800 x 800 px cropped (test preset)", "rows": rows}


def _script(name, argv, timeout=3600) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    la = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([PY, str(HERE / name), *argv, *(["--json", path] if "bench_subtract" not in name else
                                                         ["--out", path])],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
    log("\n".join("  " + ln for ln in proc.stdout.splitlines() if not ln.startswith("{")))
    out = json.load(open(path))
    os.unlink(path)
    return {"result": out, "wall_s": time.perf_counter() - t0, "loadavg": [la, loadavg()]}


def section_subtract(args, data_dir) -> dict:
    return _script("bench_subtract.py", ["--size", "2048" if args.quick else "4096"])


def section_association(args, data_dir) -> dict:
    return _script("bench_association.py", ["--repeat", "1" if args.quick else str(args.repeat)])


def section_apdb(args, data_dir) -> dict:
    return _script("bench_apdb.py", ["--steps", "4" if args.quick else "10", "--postgres"])


def section_peers(args, data_dir) -> dict:
    from _repo import ensure_repo

    venv_py = HERE / "peers" / ".venv" / "bin" / "python"
    repo = ensure_repo("small" if args.quick else "full", data_dir, log=log)
    pair = Path(data_dir) / f"pair-{'small' if args.quick else 'full'}"
    # export our chain's pair (calexp + warped template) and truth; run ours on it in the project venv
    subprocess.run([PY, str(HERE / "peers" / "export_pair.py"), str(repo.path), str(pair),
                    "--visit", str(repo.science_visits[0]), "--detector", str(repo.detector)],
                   check=True, env=ENV, cwd=ROOT)
    rows = []
    ours = subprocess.run([PY, str(HERE / "peers" / "run_peers.py"), str(pair), "--method", "diapipe"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    rows += [json.loads(ln[7:]) for ln in ours.stdout.splitlines() if ln.startswith("RESULT:")]
    if not venv_py.exists():
        rows.append({"method": "sfft/properimage", "error": "peers venv missing: run bash benchmarks/peers/setup.sh"})
    else:
        for method in ("sfft", "zogy"):
            try:
                proc = subprocess.run([str(venv_py), str(HERE / "peers" / "run_peers.py"), str(pair), "--method",
                                       method], capture_output=True, text=True, env=ENV, cwd=ROOT,
                                      timeout=args.peer_timeout)
                got = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
                # a peer killed by the kernel (OOM) leaves no stderr: say so with its exit status
                why = f"exit status {proc.returncode}" + (" (killed by a signal: out of memory?)"
                                                          if proc.returncode < 0 else "")
                rows += got or [{"method": method, "error": f"{why}: {proc.stderr[-1500:]}"}]
            except subprocess.TimeoutExpired:
                rows.append({"method": method, "error": f"timed out after {args.peer_timeout} s"})
    log(f"  {'method':<12} {'s':>8} {'peak MB':>8} {'complete':>9} {'spurious':>9} {'n truth':>8}")
    for r in rows:
        if "error" in r:
            log(f"  {r['method']:<12} ERROR {r['error'][-300:]}")
        else:
            log(f"  {r['method']:<12} {r['seconds']:>8.1f} {r['peak_rss_mb']:>8.0f} {r['completeness']:>9.3f} "
                f"{r['n_spurious']:>9d} {r['n_truth']:>8d}")
    return {"pair": str(pair), "rows": rows,
            "literature": {"HOTPANTS_4096_cpu_s": 43, "ZOGY_4096_cpu_s": 37, "SFFT_A100_s": 1.4,
                           "source": "Hu et al. 2022 (SFFT paper), Table/Sec. on timing"}}


SECTIONS = {"chain": section_chain, "startup": section_startup, "scaling": section_scaling,
            "subtract": section_subtract, "association": section_association, "apdb": section_apdb,
            "peers": section_peers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small detectors and fewer repeats (a few minutes)")
    p.add_argument("--name", default=None, help="results/<name>-<date>.json (default: full or quick)")
    p.add_argument("--repeat", type=int, default=None, help="repeats for medians (default 3, quick 1)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--data", default=str(HERE / ".data"), help="where benchmark repositories are built")
    p.add_argument("--profile", action="store_true", help="cProfile the first chain repeat (results/chain-*.prof)")
    p.add_argument("--peer-timeout", type=float, default=1200.0)
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    sys.path.insert(0, str(HERE))
    name = args.name or ("quick" if args.quick else "full")
    (HERE / "results").mkdir(exist_ok=True)
    out_path = HERE / "results" / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick, "repeat": args.repeat,
              "machine": machine(), "goals": GOALS, "sections": {}}
    log(f"diapipe benchmarks ({'quick' if args.quick else 'full'}), {record['machine']['cpu']}, "
        f"{record['machine']['cpus_visible']} CPUs, load {loadavg()}")
    for sec in args.only.split(","):
        log(f"\n== {sec} ==")
        t0 = time.perf_counter()
        try:
            record["sections"][sec] = SECTIONS[sec](args, args.data)
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
            record["sections"][sec] = {"error": f"{type(err).__name__}: {err}"}
            log(f"  FAILED: {type(err).__name__}: {str(err)[-1500:]}")
        record["sections"][sec]["section_s"] = time.perf_counter() - t0
        out_path.write_text(json.dumps(record, indent=1, default=str))
    record["machine"]["loadavg_end"] = loadavg()
    out_path.write_text(json.dumps(record, indent=1, default=str))
    log(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
