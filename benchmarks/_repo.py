"""Benchmark data: simulated butler repositories with templates already built.

``full``: ONE full-size LSSTCam-imSim detector (94 = R22_S11, 4072 x 4000 px) of the
``4patch_4431`` preset, 6 template-epoch visits and 2 science visits, g band.
``small``: the unit-test preset (800 x 800 px cropped detector, 6 + 3 visits), for scaling and
start-up measurements where many quanta are needed.

Each repository is built once under ``benchmarks/.data/`` (or ``--data DIR``) and reused; a
``<name>.ready.json`` marker records what it holds. Building costs minutes (simulation plus
ApTemplate.yaml on the template visits), not part of any timed number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

__all__ = ["BenchRepo", "ensure_repo", "TEMPLATE_COLLECTION"]

TEMPLATE_COLLECTION = "bench/templates"


@dataclasses.dataclass
class BenchRepo:
    path: Path
    preset: object
    defaults: str
    science_visits: list[int]
    template_visits: list[int]
    detector: int
    tract: int
    template_where: str
    build_seconds: float

    @property
    def inputs(self) -> list[str]:
        return [TEMPLATE_COLLECTION, self.defaults]


def _preset(name: str):
    from diapipe.sim.presets import get_preset

    if name == "full":
        return dataclasses.replace(get_preset("4patch_4431"), name="bench_full", detectors=(94,),
                                   n_template_visits=6, n_science_visits=2)
    if name == "small":
        return dataclasses.replace(get_preset("test"), name="bench_small", n_template_visits=6,
                                   n_science_visits=8)
    raise ValueError(f"unknown benchmark repository {name!r} (full, small)")


def ensure_repo(name: str, data_dir: str | os.PathLike, *, jobs: int = 2, log=print) -> BenchRepo:
    """Simulate and build templates for benchmark repository ``name`` unless already done."""
    from lsst.daf.butler import Butler

    preset = _preset(name)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    marker = data_dir / f"{name}.ready.json"
    template_where = (f"skymap='DC2' AND tract={preset.tract} AND band='g' "
                      f"AND day_obs < {preset.template_season_day_obs}")
    if not marker.exists():
        from diapipe.pipelines import run_pipeline
        from diapipe.sim.simulate import simulate_repo

        t0 = time.perf_counter()
        log(f"[data] simulating {name} ({preset.n_template_visits}+{preset.n_science_visits} visits, "
            f"detectors {preset.detectors}, amp {preset.amp_data_shape}) into {path} ...")
        summary = simulate_repo(path, preset, seed=1, jobs=jobs, progress=lambda m: None)
        log(f"[data] simulated in {time.perf_counter() - t0:.0f} s; building templates (ApTemplate.yaml) ...")
        run_pipeline(path, "ApTemplate.yaml", inputs=[preset.collection], output=TEMPLATE_COLLECTION,
                     where=template_where)
        marker.write_text(json.dumps({"preset": dataclasses.asdict(preset), "visits": summary.visits,
                                      "build_seconds": time.perf_counter() - t0}))
        log(f"[data] {name} ready in {time.perf_counter() - t0:.0f} s")
    info = json.loads(marker.read_text())
    butler = Butler(str(path))
    cut = preset.template_season_day_obs
    recs = butler.query_dimension_records("visit", where=f"instrument='LSSTCam-imSim'", explain=False)
    sci = sorted(int(r.id) for r in recs if int(r.day_obs) >= cut)
    tmpl = sorted(int(r.id) for r in recs if int(r.day_obs) < cut)
    return BenchRepo(path=path, preset=preset, defaults=preset.collection, science_visits=sci,
                     template_visits=tmpl, detector=int(preset.detectors[0]), tract=int(preset.tract),
                     template_where=template_where, build_seconds=float(info["build_seconds"]))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="build a benchmark repository")
    p.add_argument("name", choices=["full", "small"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parent / ".data"))
    p.add_argument("-j", "--jobs", type=int, default=2)
    a = p.parse_args()
    print(ensure_repo(a.name, a.data, jobs=a.jobs))
