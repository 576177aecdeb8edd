"""Acceptance tests of ``diapipe simulate``: the repository shaped like the guide's /repo/dc2.

Most tests read ONE simulation of the ``test`` preset (``sim_repo`` in conftest.py, ~30 s);
the write/rollback/determinism tests simulate a 400 x 200 px, 3-visit cut of it (``tiny``).
Numbers are checked against the truth the simulator stored, through the same ISR a pipeline
would run (`diapipe.isr.algorithms.run_isr`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import sep
from lsst.sphgeom import LonLat, UnitVector3d
from scipy import ndimage

from diapipe.exposure.fits import read_exposure, wcs_from_dict
from diapipe.exposure.masks import any_set, bit
from diapipe.instrument.camera import Camera, detector_wcs, focal_plane_to_sky
from diapipe.isr.algorithms import run_isr
from diapipe.sim import simulate as simulate_module
from diapipe.sim.render import MOFFAT_BETA, draw_point_source
from diapipe.sim.simulate import (
    CALIB_COLLECTION,
    DEFAULTS_COLLECTION,
    RAW_COLLECTION,
    REFCAT_NAME,
    TRUTH_COLLECTION,
    SimulationError,
    simulate_repo,
)

INSTRUMENT = "LSSTCam-imSim"
DETECTOR = 94
BUTLER = os.path.join(sys.prefix, "bin", "butler")
QUIET = {"progress": lambda message: None}


# --------------------------------------------------------------------------- helpers
def _butler_cli(*args) -> str:
    result = subprocess.run([BUTLER, *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"butler {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def _tree(output: str) -> list[tuple[int, str, str]]:
    """(indent, name, type) rows of ``butler query-collections --chains=tree`` output."""
    rows = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) != 2 or set(line.strip()) <= {"-", " "} or parts == ["Name", "Type"]:
            continue
        rows.append((len(line) - len(line.lstrip()), parts[0], parts[1]))
    return rows


def _calibs(butler, visit, physical_filter="g_sim_1.4"):
    data_id = {"instrument": INSTRUMENT, "detector": DETECTOR, "exposure": visit}
    return {
        "bias": butler.get("bias", data_id, collections=CALIB_COLLECTION).image,
        "dark": butler.get("dark", data_id, collections=CALIB_COLLECTION).image,
        "flat": butler.get(
            "flat", data_id, physical_filter=physical_filter, collections=CALIB_COLLECTION
        ).image,
        "defects": [
            tuple(int(v) for v in row) for row in butler.get("defects", data_id, collections=CALIB_COLLECTION)
        ],
    }


def _truth(butler, kind, visit):
    return butler.get(
        kind, instrument=INSTRUMENT, visit=visit, detector=DETECTOR, collections=TRUTH_COLLECTION
    )


def _overscan_corrected_assembled(raw, detector):
    """Assembled raw data in ADU minus each amplifier's median serial overscan (no other correction)."""
    out = np.empty(detector.shape)
    for amp in detector.amplifiers:
        data = detector.raw_segment(raw, amp, "data") - np.median(detector.raw_segment(raw, amp, "overscan"))
        out[amp.bbox[1] : amp.bbox[1] + amp.bbox[3], amp.bbox[0] : amp.bbox[0] + amp.bbox[2]] = (
            detector.raw_to_assembled(data, amp)
        )
    return out


def _robust_std(values):
    values = np.asarray(values, float)
    return 1.4826 * np.median(np.abs(values - np.median(values)))


def _blank_sky(p):
    """Unmasked ISR pixels within 3 sigma of the sky, away from anything brighter (sources)."""
    sigma = np.sqrt(np.median(p["variance"]))
    blank = (np.abs(p["image"] - np.median(p["image"])) < 3 * sigma) & (p["mask"] == 0)
    blank = ndimage.binary_erosion(blank, iterations=2)
    assert blank.mean() > 0.3
    return blank


@pytest.fixture(scope="module")
def detector(sim_repo):
    return Camera.lsstcam_imsim(amp_data_shape=sim_repo.preset.amp_data_shape)[DETECTOR]


@pytest.fixture(scope="module")
def processed(sim_repo, detector):
    """Per visit: raw, ISR (image, mask, variance), calibs, truth table, summary, PSF."""
    butler = sim_repo.butler
    out = {}
    for visit in sim_repo.summary.visits:
        raw = butler.get(
            "raw", instrument=INSTRUMENT, exposure=visit, detector=DETECTOR, collections=RAW_COLLECTION
        )
        calibs = _calibs(butler, visit)
        image, mask, variance = run_isr(
            raw.image, detector, exposure_time_s=raw.visit_info.exposure_time_s, **calibs
        )
        out[visit] = dict(
            raw=raw, image=image, mask=mask, variance=variance, calibs=calibs,
            truth=_truth(butler, "truth_source", visit), summary=_truth(butler, "truth_summary", visit),
            psf=_truth(butler, "truth_psf", visit),
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- 1. collections
def test_collection_tree(sim_repo):
    rows = _tree(_butler_cli("query-collections", sim_repo.path, "--chains=tree", DEFAULTS_COLLECTION))
    assert rows == [
        (0, "2.2i/defaults", "CHAINED"),
        (2, "2.2i/raw/all", "RUN"),
        (2, "2.2i/calib", "CALIBRATION"),
        (2, "skymaps", "RUN"),
        (2, "refcats", "CHAINED"),
        (4, f"refcats/{REFCAT_NAME}", "RUN"),
    ]
    # the preset's own chain (checked through the registry: one CLI start-up costs seconds)
    assert sim_repo.summary.collections["preset"] == "2.2i/defaults/test"
    registry = sim_repo.butler.registry
    assert str(registry.getCollectionType("2.2i/defaults/test").name) == "CHAINED"
    assert list(registry.getCollectionChain("2.2i/defaults/test")) == [DEFAULTS_COLLECTION]
    assert list(registry.getCollectionChain("refcats")) == [f"refcats/{REFCAT_NAME}"]
    assert str(registry.getCollectionType(TRUTH_COLLECTION).name) == "RUN"


def test_calibs_certified_for_every_visit_and_refcat_covers_the_stars(sim_repo):
    butler = sim_repo.butler
    for visit in sim_repo.summary.visits:
        calibs = _calibs(butler, visit)  # a lookup outside the validity range raises
        assert calibs["bias"].shape == calibs["flat"].shape == (800, 800)
        assert len(calibs["defects"]) >= 1
    refs = list(butler.registry.queryDatasets(REFCAT_NAME, collections="refcats"))
    assert refs and all(set(ref.dataId.dimensions.names) >= {"htm7"} for ref in refs)
    refcat = np.concatenate([np.asarray(butler.get(ref)["id"]) for ref in refs])
    assert len(refcat) == sim_repo.summary.n_refcat
    truth = _truth(butler, "truth_source", sim_repo.summary.visits[0])
    bright_stars = truth[(truth["type"] == "star") & truth["on_detector"] & (truth["mag"] < 22.0)]
    assert len(bright_stars) >= 3
    assert set(bright_stars["id"]) <= set(refcat)
    assert not set(truth.loc[truth["type"].isin(["galaxy", "transient"]), "id"]) & set(refcat)


# --------------------------------------------------------------------------- 2. the guide's query
def test_guide_query_lists_every_visit_in_patch_24(sim_repo):
    out = _butler_cli(
        "query-data-ids", sim_repo.path, "tract", "patch", "visit",
        "--collections=2.2i/defaults/test",
        "--where", "skymap='DC2' AND band='g' AND instrument='LSSTCam-imSim'",
        "--datasets", "raw",
    )  # fmt: skip
    lines = out.splitlines()
    header = lines[0].split()
    assert {"tract", "patch", "visit", "band"} <= set(header)
    rows = [dict(zip(header, line.split())) for line in lines[2:] if line.strip()]
    assert sorted(int(r["visit"]) for r in rows) == sorted(sim_repo.summary.visits)
    assert {(r["tract"], r["patch"], r["band"]) for r in rows} == {("3828", "24", "g")}
    assert len(sim_repo.summary.visits) == 9


# --------------------------------------------------------------------------- 3. truth vs pixels
def _moffat_aperture_correction(psf, x, y, radius):
    """Fraction of the truth PSF's flux inside ``radius`` around (x, y)."""
    kernel = psf.compute_image(x, y).astype(np.float64)
    half = kernel.shape[0] // 2
    inside, _, _ = sep.sum_circle(kernel, [half + x - np.round(x)], [half + y - np.round(y)], radius)
    return float(inside[0])


def test_aperture_flux_and_position_of_isolated_stars_match_truth(processed):
    ratios, pulls, dx, dy = [], [], [], []
    for p in processed.values():
        truth, summary = p["truth"], p["summary"]
        fwhm = summary["psf_fwhm_px"]
        radius, annulus = 3.0 * fwhm, (4.0 * fwhm, 6.0 * fwhm)
        flux = truth["flux_e"].to_numpy()
        xy = truth[["x", "y"]].to_numpy()
        dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(dist, np.inf)
        dist[:, ~truth["drawn"].to_numpy()] = np.inf
        # isolated: nothing above 1% of the star's flux within 3", above 10% within 6", above 50% within 12"
        crowded = np.zeros(len(truth), bool)
        for limit_px, fraction in ((15, 0.01), (30, 0.1), (60, 0.5)):
            crowded |= ((dist < limit_px) & (flux[None, :] > fraction * flux[:, None])).any(axis=1)
        noise_e2 = 2.266 * fwhm**2 * (summary["sky_level_e"] + 25.0)
        snr = flux / np.sqrt(flux + noise_e2)
        margin = annulus[1] + 2
        inside = (
            (xy[:, 0] > margin) & (xy[:, 0] < 799 - margin) & (xy[:, 1] > margin) & (xy[:, 1] < 799 - margin)
        )
        sel = (truth["type"] == "star").to_numpy() & (snr > 50) & ~crowded & inside
        x, y, flux_true = xy[sel, 0], xy[sel, 1], flux[sel]
        data = (p["image"] - summary["sky_level_e"]).astype(np.float64)
        measured, error, _ = sep.sum_circle(
            data, x, y, radius, var=p["variance"].astype(np.float64), bkgann=annulus
        )
        flagged = any_set(p["mask"], ["BAD", "SAT", "SUSPECT", "INTRP", "EDGE"]).astype(np.float64)
        clean = sep.sum_circle(flagged, x, y, annulus[1])[0] == 0
        apcorr = np.array([_moffat_aperture_correction(p["psf"], xi, yi, radius) for xi, yi in zip(x, y)])
        assert np.all((apcorr > 0.99) & (apcorr < 1.0))  # 3 FWHM of a beta = 4.8 Moffat
        ratios.extend((measured / apcorr / flux_true)[clean])
        pulls.extend(((measured / apcorr - flux_true) / (error / apcorr))[clean])
        wx, wy, _ = sep.winpos(data, x, y, np.full(len(x), fwhm / 2.3548))
        dx.extend((wx - x)[clean])
        dy.extend((wy - y)[clean])
    ratios, pulls = np.array(ratios), np.array(pulls)
    assert len(ratios) >= 10, f"only {len(ratios)} isolated S/N > 50 star measurements"
    assert abs(np.median(ratios) - 1.0) < 0.01, np.median(ratios)
    # measured ~1.5 (bright stars scatter ~0.3% more than their photon noise): see the report
    assert 0.6 < _robust_std(pulls) < 2.0, _robust_std(pulls)
    assert abs(np.median(pulls)) < 1.0
    # positions: the truth x, y come from the true WCS; windowed centroids agree to < 0.05 px
    assert abs(np.median(dx)) < 0.05 and abs(np.median(dy)) < 0.05
    assert np.percentile(np.hypot(dx, dy), 90) < 0.1


def test_truth_positions_follow_the_true_wcs_and_the_raw_wcs_carries_a_pointing_error(processed):
    for p in processed.values():
        truth, summary = p["truth"], p["summary"]
        true_wcs = wcs_from_dict(summary["true_wcs"])
        x, y = true_wcs.all_world2pix(truth["ra"], truth["dec"], 0)
        assert np.max(np.hypot(x - truth["x"], y - truth["y"])) < 1e-3
        # the raw's WCS is built from the reported boresight: off by the pointing error (~2" rms)
        xr, yr = p["raw"].wcs.all_world2pix(truth["ra"], truth["dec"], 0)
        offset_arcsec = 0.2 * np.median(np.hypot(xr - truth["x"], yr - truth["y"]))
        assert 0.01 < offset_arcsec < 15.0


# --------------------------------------------------------------------------- 4. determinism
def _one_detector_visit(preset, seed, staging, detector_id=DETECTOR, bright_star_mag=None):
    """Run the simulator's per-detector-visit worker on a small sky; returns (raw exposure, truth, summary)."""
    from diapipe.sim.observing import make_visits
    from diapipe.sim.sky import BANDS, SkyCatalog, make_sky_catalog

    detector = Camera.lsstcam_imsim(amp_data_shape=preset.amp_data_shape)[detector_id]
    visit = make_visits(
        1, "g", 56.65, -36.45, np.random.default_rng(11), start_mjd=60250.0, dither_radius_deg=0.0
    )[0]
    ra, dec = focal_plane_to_sky(detector.focal_plane_x_mm, detector.focal_plane_y_mm,
                                 visit.boresight_ra, visit.boresight_dec, visit.rot_sky_pos_deg)  # fmt: skip
    ra, dec = float(np.squeeze(ra)), float(np.squeeze(dec))
    half = 0.03
    sky = make_sky_catalog(ra - half / np.cos(np.radians(dec)), ra + half / np.cos(np.radians(dec)),
                           dec - half, dec + half, np.random.default_rng(12), bands=BANDS,
                           mjd_range=(60250.0, 60260.0), star_density_scale=4.0)  # fmt: skip
    if bright_star_mag is not None:
        table = sky.table.copy()
        row = np.flatnonzero(table["type"].to_numpy() == "star")[0]
        wcs = detector_wcs(detector, visit.boresight_ra, visit.boresight_dec, visit.rot_sky_pos_deg)
        cx, cy = (detector.nx - 1) / 2 + 0.3, (detector.ny - 1) / 2 - 0.2
        star_ra, star_dec = wcs.all_pix2world([cx], [cy], 0)
        table.loc[row, ["ra", "dec"]] = [float(star_ra[0]), float(star_dec[0])]
        for band in sky.bands:
            table.loc[row, f"mag_{band}"] = bright_star_mag
        sky = SkyCatalog(table, sky.bands, sky.region)
    task = (
        preset,
        visit,
        detector_id,
        sky,
        seed,
        (visit.boresight_ra, visit.boresight_dec),
        os.fspath(staging),
    )
    _, _, path, truth, summary, _ = simulate_module._simulate_detector_visit(task)
    raw = read_exposure(path)
    os.remove(path)
    return raw, truth, summary, detector


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_preset, tmp_path):
    raw_a, truth_a, summary_a, _ = _one_detector_visit(tiny_preset, 5, tmp_path)
    raw_b, truth_b, summary_b, _ = _one_detector_visit(tiny_preset, 5, tmp_path)
    raw_c, _, _, _ = _one_detector_visit(tiny_preset, 6, tmp_path)
    assert np.array_equal(raw_a.image, raw_b.image)
    assert truth_a.equals(truth_b)
    assert summary_a == summary_b
    differ = raw_a.image != raw_c.image
    assert differ.mean() > 0.5  # new noise everywhere, not a few pixels


@pytest.fixture(scope="module")
def tiny_runs(tiny_preset, tmp_path_factory):
    """A failing simulation (render raises on the second visit, jobs=1), the rerun into the same
    repository, and a fresh run with two processes elsewhere; records what each left behind."""
    from lsst.daf.butler import Butler, MissingCollectionError

    import diapipe.sim.render as render_module

    root = tmp_path_factory.mktemp("tiny")
    repo, fresh = os.fspath(root / "repo"), os.fspath(root / "fresh")
    real_render = render_module.render_detector
    calls = []

    def failing_render(sky, visit, *args, **kwargs):
        calls.append(visit.visit)
        if len(set(calls)) == 2:
            raise RuntimeError("injected render failure")
        return real_render(sky, visit, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render_module, "render_detector", failing_render)
        with pytest.raises(SimulationError) as failure:
            simulate_repo(repo, tiny_preset, seed=3, jobs=1, **QUIET)
    butler = Butler.from_config(repo)
    left = {}
    for name in (
        RAW_COLLECTION,
        TRUTH_COLLECTION,
        DEFAULTS_COLLECTION,
        CALIB_COLLECTION,
        "refcats",
        tiny_preset.collection,
    ):
        try:
            left[name] = butler.registry.getCollectionType(name)
        except MissingCollectionError:
            pass
    fits_left = [f for _, _, files in os.walk(repo) for f in files if f.startswith("raw")]
    rerun = simulate_repo(repo, tiny_preset, seed=3, jobs=1, **QUIET)
    fresh_run = simulate_repo(fresh, tiny_preset, seed=3, jobs=2, **QUIET)
    return dict(error=failure.value, failed_visit=calls[-1], left=left, fits_left=fits_left,
                repo=repo, fresh=fresh, rerun=rerun, fresh_run=fresh_run)  # fmt: skip


def test_whole_repository_is_deterministic_across_process_counts(tiny_runs):
    from lsst.daf.butler import Butler

    a, b = Butler.from_config(tiny_runs["repo"]), Butler.from_config(tiny_runs["fresh"])
    assert tiny_runs["rerun"].visits == tiny_runs["fresh_run"].visits
    for visit in tiny_runs["rerun"].visits:
        data_id = dict(instrument=INSTRUMENT, exposure=visit, detector=DETECTOR, collections=RAW_COLLECTION)
        assert np.array_equal(a.get("raw", **data_id).image, b.get("raw", **data_id).image)
        truth_id = dict(instrument=INSTRUMENT, visit=visit, detector=DETECTOR, collections=TRUTH_COLLECTION)
        assert a.get("truth_source", **truth_id).equals(b.get("truth_source", **truth_id))


# --------------------------------------------------------------------------- 5. instrument signature
def test_overscan_bias_level_and_read_noise(processed, detector):
    raw = next(iter(processed.values()))["raw"].image
    for amp in detector.amplifiers:
        overscan = detector.raw_segment(raw, amp, "overscan").astype(float)
        assert 950.0 < np.median(overscan) < 1050.0
        assert abs(np.median(overscan) - amp.bias_level_adu) < 8.0  # per-exposure offset + slow drift
        # column differences remove the row-wise drift; rounding to integers adds 1/12 ADU^2
        noise = np.std(np.diff(overscan, axis=1)) / np.sqrt(2.0)
        assert noise == pytest.approx(np.sqrt(amp.read_noise_adu**2 + 1 / 12), rel=0.04)
        assert 6.0 < noise < 8.0


def test_gain_steps_in_raw_removed_by_isr(processed, detector):
    p = next(iter(processed.values()))
    raw_adu = _overscan_corrected_assembled(p["raw"].image, detector)
    blank = _blank_sky(p)
    raw_level, isr_level, gains = [], [], []
    for amp in detector.amplifiers:
        sl = (
            slice(amp.bbox[1] + 5, amp.bbox[1] + amp.bbox[3] - 5),
            slice(amp.bbox[0] + 5, amp.bbox[0] + amp.bbox[2] - 5),
        )
        raw_level.append(np.median(raw_adu[sl][blank[sl]]))
        isr_level.append(np.median(p["image"][sl][blank[sl]]))
        gains.append(amp.gain)
    raw_level, isr_level, gains = map(np.array, (raw_level, isr_level, gains))
    assert np.std(raw_level / np.mean(raw_level)) > 0.008  # ~3% gain spread: visible steps
    assert np.corrcoef(raw_level, 1.0 / gains)[0, 1] > 0.8  # ... and they are the gains
    assert np.max(np.abs(isr_level / np.median(isr_level) - 1.0)) < 0.004
    assert np.median(isr_level) == pytest.approx(p["summary"]["sky_level_e"], rel=0.005)


def test_bad_columns_in_raw_interpolated_by_isr(processed, detector):
    p = next(iter(processed.values()))
    raw_adu = _overscan_corrected_assembled(p["raw"].image, detector)
    sky_adu = np.median(raw_adu)
    defects = p["calibs"]["defects"]
    assert 2 <= len(defects) <= 4
    for x0, _, width, height in defects:
        assert width == 1 and height == detector.ny
        neighbours = np.median(raw_adu[:, [x0 - 3, x0 - 2, x0 + 2, x0 + 3]])
        column = np.median(raw_adu[:, x0])
        # dead (~2% response) or hot (+3 e-/s): tens of sigma away from its neighbours
        assert abs(column - neighbours) > 0.1 * sky_adu
        assert np.all(p["mask"][:, x0] & bit("INTRP"))
        assert abs(np.median(p["image"][:, x0]) - np.median(p["image"][:, [x0 - 2, x0 + 2]])) < 3.0


def test_cosmic_rays_in_raw(processed):
    """Sharp single-pixel excursions far above the (smooth, PSF-convolved) sky image."""
    n_hits = 0
    for p in processed.values():
        image = p["image"].astype(float) - p["summary"]["sky_level_e"]
        sigma = np.sqrt(np.median(p["variance"]))
        local = ndimage.median_filter(image, size=3)
        hits = (
            (image > 20 * sigma)
            & (image - local > 0.5 * image)
            & ~any_set(p["mask"], ["BAD", "INTRP", "EDGE"])
        )
        n_hits += ndimage.label(hits)[1]
    assert n_hits >= 1


def test_flat_response_in_raw_removed_by_isr(processed, detector):
    p = next(iter(processed.values()))
    flat = p["calibs"]["flat"].astype(float)
    gain = detector.amp_value_image("gain")
    raw_e = _overscan_corrected_assembled(p["raw"].image, detector) * gain
    blank = _blank_sky(p)
    # the 1% pixel-response pattern of the flat is in the raw sky (expected corr ~ 0.01 sky / sigma ~ 0.2) ...
    pixel_flat = flat / ndimage.uniform_filter(flat, 9)
    corr_raw = np.corrcoef(raw_e[blank], pixel_flat[blank])[0, 1]
    corr_isr = np.corrcoef(p["image"][blank], pixel_flat[blank])[0, 1]
    assert corr_raw > 0.1
    assert abs(corr_isr) < 0.03
    # ... and after ISR the blank sky scatters as the noise model says
    assert _robust_std(p["image"][blank]) / np.sqrt(np.median(p["variance"][blank])) == pytest.approx(
        1.0, abs=0.04
    )


def test_vignetting_and_bleed_trails_from_the_worker(tiny_preset, tmp_path):
    from diapipe.sim.signature import make_defects, make_flat, make_master_bias, make_master_dark

    # detector 0 (R01_S00) sits at r ~ 340 mm: strongly vignetted
    raw, _, summary, det = _one_detector_visit(tiny_preset, 5, tmp_path, detector_id=0)
    sky = summary["sky_level_e"]
    raw_e = _overscan_corrected_assembled(raw.image, det) * det.amp_value_image("gain")
    assert np.median(raw_e) / sky < 0.9
    rng = np.random.default_rng(0)
    calibs = dict(bias=make_master_bias(det, rng), dark=make_master_dark(det, rng), flat=make_flat(det, rng),
                  defects=make_defects(det))  # fmt: skip
    image, mask, _ = run_isr(raw.image, det, exposure_time_s=30.0, **calibs)
    assert np.median(image[mask == 0]) / sky == pytest.approx(1.0, abs=0.005)

    # a 13th-magnitude star saturates and bleeds along its column
    raw, _, summary, det = _one_detector_visit(tiny_preset, 5, tmp_path, bright_star_mag=13.0)
    image, mask, _ = run_isr(raw.image, det, exposure_time_s=30.0, bias=make_master_bias(det, rng))
    sat = any_set(mask, ["SAT"])
    labels, n = ndimage.label(sat)
    assert n >= 1
    ys, xs = np.nonzero(labels == labels[int(det.ny / 2), int(det.nx / 2)])
    assert len(ys) > 0
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert height > 3 * width  # a vertical trail, not a round blob


def test_raws_in_the_repository_are_lean_and_isr_reads_them_like_three_plane_raws(sim_repo, processed, detector,
                                                                                  tmp_path):
    """Raws hold an int32 RICE-compressed image and a header only (no mask/variance planes), are
    ~1 byte per pixel, and ISR of the lean file equals ISR of the same pixels in the old layout."""
    from astropy.io import fits

    from diapipe.exposure.fits import RAW_LAYOUT, write_exposure

    visit = sim_repo.summary.visits[0]
    uri = sim_repo.butler.getURI(
        "raw", instrument=INSTRUMENT, exposure=visit, detector=DETECTOR, collections=RAW_COLLECTION
    )
    raw = processed[visit]["raw"]
    with fits.open(uri.ospath) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "ARCHIVE"]
        assert isinstance(hdul["IMAGE"], fits.CompImageHDU) and hdul["IMAGE"].data.dtype.kind == "i"
        header = hdul[0].header
        assert header["DPLAYOUT"] == RAW_LAYOUT
        assert header["DETNAME"] == detector.name and header["DETECTOR"] == DETECTOR
        assert header["EXPTIME"] == raw.visit_info.exposure_time_s and header["FILTER"] == "g_sim_1.4"
    # ~17 MB for a full-size raw instead of 214 MB: under 1.5 bytes per pixel (3 planes took 12)
    assert os.path.getsize(uri.ospath) < 1.5 * raw.image.size
    assert raw.image.shape == detector.raw_shape and np.all(raw.image == np.rint(raw.image))
    old_path = tmp_path / "three_planes.fits"
    write_exposure(raw, old_path)
    old = read_exposure(old_path)
    calibs = processed[visit]["calibs"]
    for lean_plane, old_plane in zip(
        (processed[visit]["image"], processed[visit]["mask"], processed[visit]["variance"]),
        run_isr(old.image, detector, exposure_time_s=old.visit_info.exposure_time_s, **calibs),
    ):
        np.testing.assert_array_equal(lean_plane, old_plane)


# --------------------------------------------------------------------------- 6. observation metadata
def test_exposure_and_visit_records_match_raw_visit_info(sim_repo, processed):
    registry = sim_repo.butler.registry
    exposures = {r.id: r for r in registry.queryDimensionRecords("exposure", instrument=INSTRUMENT)}
    visits = {r.id: r for r in registry.queryDimensionRecords("visit", instrument=INSTRUMENT)}
    assert set(exposures) == set(visits) == set(sim_repo.summary.visits)
    for visit_id, p in processed.items():
        info, exposure, visit = p["raw"].visit_info, exposures[visit_id], visits[visit_id]
        assert info.exposure_time_s == exposure.exposure_time == visit.exposure_time == 30.0
        assert info.physical_filter == exposure.physical_filter == visit.physical_filter == "g_sim_1.4"
        assert info.band == "g"
        midpoint = 0.5 * (exposure.timespan.begin.tai.mjd + exposure.timespan.end.tai.mjd)
        assert abs(midpoint - info.mjd_tai) * 86400 < 0.01
        assert (exposure.timespan.end - exposure.timespan.begin).sec == pytest.approx(30.0, abs=0.01)
        assert visit.timespan == exposure.timespan
        assert exposure.tracking_ra == pytest.approx(info.boresight_ra_deg, abs=1e-9)
        assert exposure.tracking_dec == pytest.approx(info.boresight_dec_deg, abs=1e-9)
        assert exposure.sky_angle == pytest.approx(info.rot_sky_pos_deg, abs=1e-9)
        assert visit.zenith_angle == exposure.zenith_angle
        assert 1.0 <= info.airmass < 2.5
        assert info.airmass == pytest.approx(1.0 / np.cos(np.radians(exposure.zenith_angle)), rel=0.01)
        # cropped R22_S11 sits at the focal-plane centre: the visit region holds the boresight
        assert visit.region.contains(
            UnitVector3d(LonLat.fromDegrees(info.boresight_ra_deg, info.boresight_dec_deg))
        )
        assert p["summary"]["mjd_tai"] == info.mjd_tai


def test_seeing_varies_and_truth_psf_matches_summary(processed):
    fwhm = np.array([p["summary"]["psf_fwhm_arcsec"] for p in processed.values()])
    assert np.all((fwhm > 0.4) & (fwhm < 2.0))
    assert fwhm.max() / fwhm.min() > 1.2
    assert np.allclose([p["summary"]["psf_fwhm_px"] * 0.2 for p in processed.values()], fwhm, rtol=0.01)
    from scipy.optimize import least_squares

    for p in processed.values():
        psf, summary = p["psf"], p["summary"]
        kernel = psf.compute_kernel_image(399.5, 399.5)
        half = kernel.shape[0] // 2

        def residual(params, kernel=kernel, half=half):
            q11, q12, q22, x, y = params
            model = np.zeros_like(kernel)
            draw_point_source(
                model, half + x, half + y, 1.0, np.array([[q11, q12], [q12, q22]]), MOFFAT_BETA, half=half
            )
            return (model - kernel).ravel()

        alpha0 = summary["psf_fwhm_px"] / (2 * np.sqrt(2 ** (1 / MOFFAT_BETA) - 1))
        fit = least_squares(residual, [alpha0**2 * 1.1, 0.0, alpha0**2 * 0.9, 0.1, -0.1])
        q11, q12, q22 = fit.x[:3]
        fitted_fwhm = 2 * np.sqrt(2 ** (1 / MOFFAT_BETA) - 1) * (q11 * q22 - q12**2) ** 0.25
        assert fitted_fwhm == pytest.approx(summary["psf_fwhm_px"], rel=0.01)
        assert np.max(np.abs(fit.fun)) < 0.01 * kernel.max()


# --------------------------------------------------------------------------- 7. bad input
def test_unknown_preset_and_band_raise_before_writing(tmp_path):
    target = tmp_path / "never"
    with pytest.raises(ValueError, match="nonesuch"):
        simulate_repo(target, "nonesuch", **QUIET)
    with pytest.raises(ValueError, match="'q'"):
        simulate_repo(target, "test", bands=["g", "q"], **QUIET)
    with pytest.raises(ValueError, match="jobs"):
        simulate_repo(target, "test", jobs=0, **QUIET)
    assert not target.exists()


def test_cli_rejects_unknown_preset(tmp_path):
    result = subprocess.run([os.path.join(sys.prefix, "bin", "diapipe"), "simulate", os.fspath(tmp_path / "r"),
                             "--preset", "nonesuch"], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode != 0 and "nonesuch" in result.stderr


def test_simulating_into_a_repository_with_raws_is_refused(sim_repo):
    butler = sim_repo.butler
    before = sorted(str(ref.id) for ref in butler.registry.queryDatasets("raw", collections=RAW_COLLECTION))
    visit = sim_repo.summary.visits[0]
    pixels = butler.get(
        "raw", instrument=INSTRUMENT, exposure=visit, detector=DETECTOR, collections=RAW_COLLECTION
    ).image
    with pytest.raises(SimulationError, match="already holds raws"):
        simulate_repo(sim_repo.path, "test", seed=99, **QUIET)
    from lsst.daf.butler import Butler

    again = Butler.from_config(sim_repo.path)
    assert (
        sorted(str(ref.id) for ref in again.registry.queryDatasets("raw", collections=RAW_COLLECTION))
        == before
    )
    after = again.get(
        "raw", instrument=INSTRUMENT, exposure=visit, detector=DETECTOR, collections=RAW_COLLECTION
    )
    assert np.array_equal(after.image, pixels)
    assert next(iter(again.registry.getCollectionChain(DEFAULTS_COLLECTION))) == RAW_COLLECTION


def test_failing_worker_rolls_back_and_rerun_completes(tiny_runs, tiny_preset):
    error = tiny_runs["error"]
    assert str(tiny_runs["failed_visit"]) in str(error)
    assert "injected render failure" in str(error)
    assert tiny_runs["left"] == {}, f"half-written collections left behind: {tiny_runs['left']}"
    assert tiny_runs["fits_left"] == []
    rerun = tiny_runs["rerun"]
    assert rerun.n_raws == tiny_preset.n_visits_per_band == len(rerun.visits)
    assert tiny_runs["failed_visit"] in rerun.visits
    from lsst.daf.butler import Butler

    butler = Butler.from_config(tiny_runs["repo"])
    assert len(list(butler.registry.queryDatasets("raw", collections=tiny_preset.collection))) == rerun.n_raws
    assert (
        len(list(butler.registry.queryDatasets("truth_source", collections=TRUTH_COLLECTION))) == rerun.n_raws
    )


def test_refcat_filter_map_matches_calibrate_default(sim_repo):
    """The repository's filter map (physical filter -> refcat filter) is what calibrate uses by band."""
    from lsst.daf.butler import Butler

    from diapipe.calibrate.tasks import CalibrateConfig
    from diapipe.instrument import PHYSICAL_FILTERS

    butler = Butler.from_config(sim_repo.path, collections="2.2i/defaults")
    stored = butler.get("cal_ref_cat_2_2_filterMap", {})
    defaults = CalibrateConfig().filterMap
    assert set(stored) == set(PHYSICAL_FILTERS)
    for physical_filter, band in PHYSICAL_FILTERS.items():
        assert stored[physical_filter] == defaults[band]
    refcat_ref = next(iter(butler.registry.queryDatasets("cal_ref_cat_2_2", collections="refcats")))
    assert f"{stored['g_sim_1.4']}_flux" in butler.get(refcat_ref).colnames
