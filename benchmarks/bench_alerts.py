"""Alert production cost per DiaSource: 3 FITS cutouts + packet + validation + Avro write.

    .venv/bin/python benchmarks/bench_alerts.py [--n 200] [--json OUT] [--packets-module FILE]

A full-size (4000 x 4072) parent image with a TAN-SIP WCS and a PixelPsf; ``--n`` DiaSources.
``--packets-module`` loads another copy of diapipe/alerts/packets.py (e.g. the version before an
optimisation, from ``git show REV:src/diapipe/alerts/packets.py``) for before/after numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--packets-module", default=None)
    a = p.parse_args(argv)
    if a.packets_module:
        import importlib.util

        import diapipe.exposure.masks  # noqa: F401  (the module's relative imports)

        spec = importlib.util.spec_from_file_location("diapipe.alerts.packets", a.packets_module)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["diapipe.alerts.packets"] = mod
        spec.loader.exec_module(mod)
    import pandas as pd
    from astropy.wcs import WCS, Sip

    from diapipe.alerts.packets import build_alert_packet, load_alert_schema, make_cutout, write_alerts
    from diapipe.association.summary import apdb_columns
    from diapipe.exposure.psf import PixelPsf

    rng = np.random.default_rng(2)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [56.6, -36.3]
    w.wcs.crpix = [2036.5, 2000.5]
    w.wcs.cd = np.array([[-5.55e-5, 1e-8], [2e-8, 5.55e-5]])
    sa, sb = np.zeros((4, 4)), np.zeros((4, 4))
    sa[2, 0], sb[0, 2] = 2e-8, -1e-8
    w.sip = Sip(sa, sb, None, None, w.wcs.crpix)
    w.wcs.set()
    shape = (4000, 4072)
    img = rng.normal(size=shape).astype(np.float32)
    var = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.int32)
    psf = PixelPsf.gaussian(1.8, 25, (0, 0, shape[1] - 1, shape[0] - 1))
    xs, ys = rng.uniform(0, shape[1], a.n), rng.uniform(0, shape[0], a.n)
    cols = apdb_columns("DiaSource")
    schema = load_alert_schema()
    src = pd.DataFrame({c: np.nan for c in cols}, index=range(a.n))
    for c, v in (("diaSourceId", np.arange(1, a.n + 1)), ("visit", 1), ("detector", 94), ("midpointMjdTai", 60300.0),
                 ("ra", 56.6), ("dec", -36.3), ("x", xs), ("y", ys), ("psfNdata", 0), ("dipoleNdata", 0),
                 ("trailNdata", 0), ("timeProcessedMjdTai", 60300.01), ("bboxSize", 10), ("band", "g"),
                 ("diaObjectId", np.arange(1, a.n + 1)), ("reliability", 0.5)):
        if c in src.columns:
            src[c] = v
    t0 = time.perf_counter()
    cut = [[make_cutout(img, var, w, psf, x, y, mask=mask) for _ in range(3)] for x, y in zip(xs, ys)]
    t_cut = time.perf_counter() - t0
    t0 = time.perf_counter()
    packets = [build_alert_packet(src.iloc[i], None, None, None, cutout_difference=c[0], cutout_science=c[1],
                                  cutout_template=c[2], schema=schema) for i, c in enumerate(cut)]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_alerts(packets, f"{tmp}/alerts.avro", schema)
    t_write = time.perf_counter() - t0
    out = {"n_sources": a.n, "ms_per_cutout": 1e3 * t_cut / (3 * a.n), "ms_per_packet_build": 1e3 * t_build / a.n,
           "ms_per_packet_validate_write": 1e3 * t_write / a.n,
           "ms_per_dia_source_total": 1e3 * (t_cut + t_build + t_write) / a.n,
           "packets_module": a.packets_module or "installed"}
    for k, v in out.items():
        print(f"{k:>30}: {v:.3f}" if isinstance(v, float) else f"{k:>30}: {v}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
