"""DiaSource PSF flux against injected truth: fake point sources in the test preset's
independent calexps, through subtractImages and detectAndMeasure as ApPipe runs them.

The preset's own transients give a pull width known only to about ±0.15 (54 sources of 22 objects;
``test_diffim_quality.test_psf_flux_pull_width``); some 400 injected sources measure
it to a few per cent.

(About 400 fit the blank sky of three 800 x 800 px visits at 25 px spacing.) Sources go on blank sky (no template object within 12 px),
with S/N 6-150 spread evenly in log, Poisson noise and the science PSF model
(`diapipe.sim.inject`).
"""

from __future__ import annotations

import numpy as np
import pytest

COLLECTION = "u/test/diffim"
DETECTOR = 94
N_PER_VISIT = 220


@pytest.fixture(scope="module")
def injected(diffim_repo):
    import pandas as pd
    from lsst.daf.butler import Butler
    from scipy.ndimage import maximum_filter

    from diapipe.analysis.dia_match import clean_dia_sources
    from diapipe.diffim.tasks import DetectAndMeasureTask, SubtractImagesTask
    from diapipe.diffim.template_residual import template_significance
    from diapipe.exposure import masks
    from diapipe.exposure.exposure import Exposure
    from diapipe.sim.inject import blank_positions, flux_for_snr, inject_point_sources

    butler = Butler(str(diffim_repo), collections=[COLLECTION, "u/test/templates", "2.2i/defaults/test"],
                    instrument="LSSTCam-imSim")
    selected = {int(v) for v in butler.get("goodSeeingVisits", skymap="DC2", tract=3828, patch=24, band="g")}
    visits = sorted({int(r.dataId["visit"]) for r in butler.registry.queryDatasets(
        "goodSeeingDiff_diaSrcTable", collections=COLLECTION)} - selected)
    subtract, detect = SubtractImagesTask(), DetectAndMeasureTask()
    rows = []
    for visit in visits:
        science = butler.get("calexp", visit=visit, detector=DETECTOR)
        template = butler.get("goodSeeingDiff_templateExp", visit=visit, detector=DETECTOR)
        sources = butler.get("src", visit=visit, detector=DETECTOR)
        rng = np.random.default_rng([visit, 17])
        x0, y0 = science.xy0
        ny, nx = science.shape
        z = template_significance(template.image, template.variance,
                                  template.psf.compute_kernel_image(x0 + nx / 2, y0 + ny / 2))
        busy = maximum_filter(np.abs(z), 25) > 3
        busy |= maximum_filter(masks.any_set(science.mask, ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP"))
                               | masks.any_set(template.mask, "NO_DATA"), 25)
        x, y = blank_positions(busy, N_PER_VISIT, rng, xy0=science.xy0)
        snr = np.exp(rng.uniform(np.log(6.0), np.log(150.0), x.size))
        sky_sigma = float(np.sqrt(np.median(science.variance)))
        flux_e = flux_for_snr(snr, sky_sigma, science.psf.sigma())
        image, variance = inject_point_sources(science.image, science.variance, science.psf, x, y, flux_e, rng,
                                               xy0=science.xy0)
        fake = Exposure(image=image, mask=science.mask.copy(), variance=variance, wcs=science.wcs, psf=science.psf,
                        photo_calib=science.photo_calib, visit_info=science.visit_info,
                        metadata=dict(science.metadata), xy0=science.xy0)
        sub = subtract.run(template=template, science=fake, sources=sources)
        det = detect.run(science=fake, matchedTemplate=sub.matchedTemplate, difference=sub.difference,
                         visit=visit, detector=DETECTOR, scoreExposure=getattr(sub, "scoreExposure", None))
        cat = det.diaSources.to_pandas()
        cat = cat[~cat["sky_source"].astype(bool)].reset_index(drop=True)
        clean = clean_dia_sources(cat)
        flux_njy = flux_e * science.photo_calib.calibration_mean
        for xi, yi, f in zip(x, y, flux_njy, strict=True):
            d = np.hypot(cat["x"].to_numpy() - xi, cat["y"].to_numpy() - yi)
            j = int(np.argmin(d)) if len(d) else -1
            hit = j >= 0 and d[j] < 2.5  # 0.5"
            rows.append((visit, f, hit, hit and bool(clean[j]), cat["psfFlux"].iloc[j] if hit else np.nan,
                         cat["psfFluxErr"].iloc[j] if hit else np.nan))
    return pd.DataFrame(rows, columns=["visit", "flux", "detected", "clean", "psfFlux", "psfFluxErr"])


def test_injected_sources_are_found(injected):
    print(f"injected {len(injected)}, detected {injected.detected.mean():.3f}")
    assert len(injected) >= 350
    assert injected.detected.mean() >= 0.95  # S/N >= 6 on blank sky


def test_injected_psf_flux_bias_and_pulls(injected):
    ok = injected[injected.clean]
    ratio = ok.psfFlux / ok.flux
    pulls = (ok.psfFlux - ok.flux) / ok.psfFluxErr
    q25, q75 = np.percentile(pulls, [25, 75])
    width = (q75 - q25) / 1.349
    snr = ok.flux / ok.psfFluxErr
    for lo, hi in ((6, 20), (20, 50), (50, np.inf)):
        s = (snr >= lo) & (snr < hi)
        a, b = np.percentile(pulls[s], [25, 75])
        print(f"  S/N {lo}-{hi}: n {s.sum()}, pull IQR width {(b - a) / 1.349:.3f}, median {np.median(pulls[s]):+.3f}")
    print(f"clean {len(ok)}: flux ratio median {np.median(ratio):.4f}, pulls median {np.median(pulls):+.3f} "
          f"IQR width {width:.3f}")
    assert abs(np.median(ratio) - 1.0) < 0.02
    assert abs(width - 1.0) <= 0.15
    assert abs(np.median(pulls)) < 0.3
