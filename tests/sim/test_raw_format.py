"""Raws through the butler: a ``raw`` put by the formatter is lean and reads back exactly,
and a simulated raw keeps the instrument signatures after the lean round trip."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from diapipe.exposure.exposure import Exposure
from diapipe.exposure.fits import RAW_LAYOUT, read_exposure, write_raw
from diapipe.instrument.camera import Camera, detector_corners_sky
from diapipe.sim import simulate as simulate_module
from diapipe.sim.observing import make_visits
from diapipe.sim.signature import apply_detector_signature, true_flat

INSTRUMENT = "LSSTCam-imSim"


def test_formatter_writes_raw_datasets_lean_and_other_exposures_in_full(tmp_path):
    from lsst.daf.butler import DatasetType

    from diapipe.butler.repo import make_repo

    butler = make_repo(tmp_path / "repo", tract_ids=[3828])
    detector = Camera.lsstcam_imsim(amp_data_shape=(40, 20))[94]
    visit = make_visits(1, "g", 56.65, -36.45, np.random.default_rng(1), start_mjd=60250.0)[0]
    reported = {visit.visit: (visit.boresight_ra, visit.boresight_dec)}
    corners = detector_corners_sky(detector, visit.boresight_ra, visit.boresight_dec, visit.rot_sky_pos_deg)
    simulate_module._insert_observation_records(butler, [visit], {(visit.visit, 94): np.asarray(corners)}, reported)
    for dataset_type in simulate_module._dataset_types(butler.dimensions):
        butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerDatasetType(
        DatasetType("notRaw", ["instrument", "exposure", "detector"], "DiapipeExposure", universe=butler.dimensions)
    )
    raw_adu = apply_detector_signature(np.full(detector.shape, 700.0), detector, 30.0, np.random.default_rng(2))
    info = simulate_module.visit_info_for(visit, 94, reported[visit.visit])
    raw = Exposure(image=raw_adu, visit_info=info, metadata={"DETNAME": detector.name})
    data_id = {"instrument": INSTRUMENT, "exposure": visit.visit, "detector": 94}
    butler.registry.registerRun("test/raws")
    butler.put(raw, "raw", data_id, run="test/raws")
    butler.put(raw, "notRaw", data_id, run="test/raws")

    with fits.open(butler.getURI("raw", data_id, collections="test/raws").ospath) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "ARCHIVE"]
        assert hdul[0].header["DPLAYOUT"] == RAW_LAYOUT and hdul[0].header["DETNAME"] == detector.name
    with fits.open(butler.getURI("notRaw", data_id, collections="test/raws").ospath) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "ARCHIVE"]
    back = butler.get("raw", data_id, collections="test/raws")
    np.testing.assert_array_equal(back.image, raw.image)
    assert back.visit_info == info
    cut = butler.get("raw", data_id, collections="test/raws", parameters={"bbox": (3, 4, 10, 12)})
    np.testing.assert_array_equal(cut.image, raw.image[4:16, 3:13])


def test_signatures_survive_the_lean_round_trip(tmp_path):
    """Bias/overscan level, read noise, flat pattern and saturation are still in the raw read back."""
    detector = Camera.lsstcam_imsim(amp_data_shape=(200, 100))[94]
    electrons = np.full(detector.shape, 2000.0, dtype=np.float32)
    electrons[150, 300] = 5e6  # saturates and bleeds
    raw_adu = apply_detector_signature(electrons, detector, 30.0, np.random.default_rng(3),
                                       cosmic_ray_rate_per_s=0.0, overwrite_input=True)  # fmt: skip
    path = tmp_path / "raw.fits"
    write_raw(Exposure(image=raw_adu), path)
    raw = read_exposure(path).image
    np.testing.assert_array_equal(raw, raw_adu)
    gain = detector.amp_value_image("gain")
    data_e = np.empty(detector.shape)
    for amp in detector.amplifiers:
        overscan = detector.raw_segment(raw, amp, "overscan").astype(float)
        assert abs(np.median(overscan) - amp.bias_level_adu) < 8.0  # bias level (+ offset, drift)
        noise = np.std(overscan - np.median(overscan, axis=1, keepdims=True))
        assert abs(noise / amp.read_noise_adu - 1.0) < 0.15  # read noise
        x0, y0, w, h = amp.bbox
        data = detector.raw_segment(raw, amp, "data").astype(float) - np.median(overscan)
        data_e[y0 : y0 + h, x0 : x0 + w] = detector.raw_to_assembled(data, amp)
    data_e *= gain
    # flat-field response: the raw follows the true flat (1% pixel pattern vs 2.2% Poisson at 2000 e-)
    flat = true_flat(detector)
    good = (flat > 0.5) & (data_e < 3000.0)  # not the dead columns nor the star and its bleed trail
    assert np.corrcoef(data_e[good], flat[good])[0, 1] > 0.3
    # saturation: a column of pixels at the amplifier's full well, far longer than wide
    full_well_adu = max(amp.saturation_adu for amp in detector.amplifiers)
    sat_rows, sat_cols = np.nonzero(data_e >= 0.98 * full_well_adu * gain.min())
    assert len(sat_rows) > 20 and np.ptp(sat_rows) > 10 * (np.ptp(sat_cols) + 1)
