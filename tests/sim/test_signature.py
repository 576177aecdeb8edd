"""Forward detector model: bias, read noise, dark, flat, cosmic rays, bleed trails, calibs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diapipe.instrument.camera import Camera, box_slices
from diapipe.sim.signature import (
    DARK_CURRENT_E_PER_S,
    add_cosmic_rays,
    apply_detector_signature,
    bias_pattern_adu,
    bleed_saturation,
    make_defects,
    make_flat,
    make_master_bias,
    make_master_dark,
    true_flat,
)


@pytest.fixture(scope="module")
def camera():
    return Camera.lsstcam_imsim(amp_data_shape=(128, 64))


def test_bias_and_read_noise_in_overscan(camera):
    det = camera[94]
    raw = apply_detector_signature(np.zeros(det.shape), det, 30.0, np.random.default_rng(1),
                                   cosmic_ray_rate_per_s=0.0)  # fmt: skip
    assert raw.dtype == np.float32 and raw.shape == det.raw_shape
    assert np.all(raw == np.rint(raw))  # digitised
    for amp in det.amplifiers:
        overscan = det.raw_segment(raw, amp, "overscan").astype(float)
        # bias level (+ per-exposure offset and a few-ADU drift)
        assert abs(overscan.mean() - amp.bias_level_adu) < 6.0
        # read noise: scatter about each row's mean (removes the drift), corrected for the dof
        resid = overscan - overscan.mean(axis=1, keepdims=True)
        rn = resid.std() * np.sqrt(overscan.shape[1] / (overscan.shape[1] - 1))
        assert rn == pytest.approx(amp.read_noise_adu, rel=0.05)
        # parallel overscan and prescan sit at the same bias
        assert abs(det.raw_segment(raw, amp, "parallel").mean() - overscan.mean()) < 6.0


def test_bias_drift_visible_in_overscan():
    det = Camera.lsstcam_imsim(amp_data_shape=(2000, 8))[94]  # full-height, narrow amplifiers
    scatter = {}
    for drift in (0.0, 30.0):
        raw = apply_detector_signature(np.zeros(det.shape), det, 30.0, np.random.default_rng(7),
                                       cosmic_ray_rate_per_s=0.0, bias_drift_adu=drift)  # fmt: skip
        scatter[drift] = np.array([det.raw_segment(raw, a, "overscan").mean(axis=1).std() / (a.read_noise_adu / np.sqrt(32))
                                   for a in det.amplifiers])  # fmt: skip
    assert np.median(scatter[0.0]) == pytest.approx(1.0, abs=0.2)  # row means scatter only by read noise
    assert np.median(scatter[30.0]) > 3.0 and np.all(scatter[30.0] > 1.5)  # a slow drift the overscan sees


def test_dark_level(camera):
    det = camera[94]
    exposure = 2000.0
    raw = apply_detector_signature(np.zeros(det.shape), det, exposure, np.random.default_rng(2),
                                   flat=np.ones(det.shape), cosmic_ray_rate_per_s=0.0)  # fmt: skip
    dark_e = []
    for amp in det.amplifiers:
        level = det.raw_segment(raw, amp, "overscan").mean(axis=1, keepdims=True)
        dark_e.append((det.raw_segment(raw, amp, "data") - level) * amp.gain)
    # median is robust to the hot pixels / hot columns; bias-pattern mean is ~0.2 ADU
    assert np.median(np.concatenate([d.ravel() for d in dark_e])) == pytest.approx(DARK_CURRENT_E_PER_S * exposure,
                                                                                    abs=1.5)  # fmt: skip


def test_cosmic_ray_count_and_shape(camera):
    det = camera[94]
    rng = np.random.default_rng(3)
    exposure = 25000.0  # expected count = 0.2 * 25000 * (512 * 256) / (4072 * 4000) = 40.2
    expected = 0.2 * exposure * det.nx * det.ny / (4072 * 4000)
    counts, charges, sizes = [], [], []
    for _ in range(5):
        image, tracks = add_cosmic_rays(np.zeros(det.shape), det, exposure, rng)
        counts.append(len(tracks))
        charges.append(image.sum() / max(len(tracks), 1))
        labels, _n = ndimage.label(image > 50.0)
        sizes.extend(np.bincount(labels.ravel())[1:])
    assert np.mean(counts) == pytest.approx(expected, rel=0.2)
    assert 2000 < np.mean(charges) < 4500  # a few thousand e- per track
    assert 1 <= np.median(sizes) <= 30 and max(sizes) < 200  # tracks of a few pixels


def test_bleed_trail_conserves_charge():
    image = np.full((200, 20), 100.0)
    image[100, 10] = 1.5e6  # 14 full wells of excess
    cap = np.full(image.shape, 1e5)
    out = bleed_saturation(image, cap)
    assert out.sum() == pytest.approx(image.sum())
    assert out.max() <= 1e5
    trail = np.flatnonzero(out[:, 10] >= 1e5)
    assert trail.size == 15 and np.all(np.diff(trail) == 1) and 100 in trail
    np.testing.assert_array_equal(np.delete(out, 10, axis=1), np.delete(image, 10, axis=1))  # columns only
    # charge bleeding off the detector edge is lost, nothing else
    edge = np.full((10, 3), 100.0)
    edge[0, 1] = 5e5
    out = bleed_saturation(edge, np.full(edge.shape, 1e5))
    assert out[:, 1].sum() < edge[:, 1].sum() and out[:, 1].max() == 1e5


def test_saturated_star_makes_trail_in_raw(camera):
    det = camera[94]
    image = np.full(det.shape, 500.0)
    y, x = np.mgrid[0 : det.ny, 0 : det.nx]
    image += 3e7 * np.exp(-((x - 100.3) ** 2 + (y - 60.7) ** 2) / (2 * 2.0**2)) / (2 * np.pi * 4.0)
    raw = apply_detector_signature(image, det, 30.0, np.random.default_rng(4), cosmic_ray_rate_per_s=0.0)
    amp = det.amplifiers[int(det.amp_index_image()[60, 100])]
    corrected = det.assemble(raw)[box_slices(amp.bbox)] - amp.bias_level_adu
    sat_rows = np.flatnonzero(corrected.max(axis=1) > 0.99 * amp.saturation_adu)
    assert sat_rows.size > 20  # a bleed trail much longer than the star core


def test_flat_structure(camera):
    centre, corner = camera["R22_S11"], camera["R43_S22"]
    flat_c, flat_e = true_flat(centre), true_flat(corner)
    bad = [b[0] for b in make_defects(centre)]
    good = np.ones(centre.shape, bool)
    good[:, bad] = False
    assert np.median(flat_c) == pytest.approx(1.0, abs=0.01)
    assert 0.008 < np.std(flat_c[good] / np.median(flat_c)) < 0.015  # ~1% pixel response + amp steps
    assert np.median(flat_e) < 0.93  # vignetted at r ~ 345 mm
    master = make_flat(centre, np.random.default_rng(5))
    assert master.dtype == np.float32
    assert np.std(master[good] / flat_c[good] - 1) == pytest.approx(5e-4, rel=0.1)


def test_defects_deterministic(camera):
    for det in (camera[0], camera[94], camera[188]):
        defects = make_defects(det)
        assert 2 <= len(defects) <= 4 and defects == make_defects(det)
        assert all(h == det.ny and w == 1 for _, _, w, h in defects)
    assert make_defects(camera[0]) != make_defects(camera[1])


def test_master_bias_and_dark_units(camera):
    det = camera[42]
    rng = np.random.default_rng(6)
    bias = make_master_bias(det, rng)
    expected = bias_pattern_adu(det) * det.amp_value_image("gain")
    assert np.std(bias - expected) == pytest.approx(
        np.mean(det.amp_value_image("read_noise_e")) / 10, rel=0.1
    )
    dark = make_master_dark(det, rng)
    assert np.median(dark) == pytest.approx(DARK_CURRENT_E_PER_S, abs=0.005)
    hot_columns = [x for x, _, _, _ in make_defects(det) if np.median(dark[:, x]) > 1.0]
    dead_columns = [x for x, _, _, _ in make_defects(det) if np.median(true_flat(det)[:, x]) < 0.1]
    assert len(hot_columns) + len(dead_columns) == len(make_defects(det))


# --------------------------------------------------------------------------- memory-lean chain
def test_poisson_by_row_blocks_equals_one_draw():
    from diapipe.sim.signature import poisson_inplace

    mean = np.random.default_rng(2).uniform(0.0, 5000.0, (300, 70)).astype(np.float32)
    expected = np.random.default_rng(9).poisson(mean)
    out = poisson_inplace(mean.copy(), np.random.default_rng(9), rows_per_block=17)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(TypeError, match="float image"):
        poisson_inplace(np.zeros((3, 3), dtype=np.int64), np.random.default_rng(1))


def test_signature_chain_overwrites_input_same_pixels_and_few_frames():
    """The chain runs in float32 in place: a handful of frames at peak, not the dozen float64
    frames of the first version (~22 float32-frame equivalents, 1.4 GB on a full detector)."""
    import tracemalloc

    det = Camera.lsstcam_imsim(amp_data_shape=(400, 100))[94]  # 800 x 800
    image = np.full(det.shape, 800.0, dtype=np.float32)
    image[400, 400] = 3e6  # a saturated star: bleed trail
    kept = apply_detector_signature(image, det, 30.0, np.random.default_rng(4))
    assert image[400, 400] == 3e6  # input untouched by default
    frame_bytes = image.nbytes
    tracemalloc.start()
    try:
        lean = apply_detector_signature(image, det, 30.0, np.random.default_rng(4), overwrite_input=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(lean, kept)
    # measured 2.3 frames (flat + its random frame at peak; raw is 1.1 frames); float64 copies would be > 6
    assert peak < 3.5 * frame_bytes, peak / frame_bytes
    assert lean.dtype == np.float32 and lean.shape == det.raw_shape
