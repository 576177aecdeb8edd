"""Tests of diapipe.calibrate.photometry: zero point against a known calibration, PhotoCalib."""

import numpy as np
import pytest

from diapipe.calibrate.photometry import (
    PhotoCalib,
    PhotometryError,
    fit_zero_point,
    mag_to_njy,
    njy_to_mag,
    reference_flux_column,
    reference_flux_err_column,
)

TRUE_CAL = 0.0531  # nJy per electron: 30 s g-band zero point ~ 31.4 - 2.5 log10(0.0531) = 34.59


def make_calibration_stars(rng, n=100, frac_variable=0.1, extra_scatter_mag=0.0):
    """Matched stars with S/N 20-500, 1 mmag reference errors and some variable stars."""
    mag = rng.uniform(16.5, 21.5, n)
    ref = mag_to_njy(mag)
    ref_err = ref * 0.001 * np.log(10) / 2.5
    ref_noisy = ref + rng.normal(0, ref_err)
    true_inst = ref / TRUE_CAL
    snr = np.clip(500 * 10 ** (-0.4 * (mag - 16.5)), 20, 500)
    inst_err = true_inst / snr
    inst = true_inst * 10 ** (-0.4 * rng.normal(0, extra_scatter_mag, n)) + rng.normal(0, inst_err)
    variable = rng.random(n) < frac_variable
    amplitude_mag = rng.choice([-1, 1], variable.sum()) * rng.uniform(0.1, 0.5, variable.sum())
    inst[variable] *= 10 ** (-0.4 * amplitude_mag)
    return inst, inst_err, ref_noisy, ref_err, variable


def test_zero_point_within_5_mmag_and_errors_honest():
    dmag, pulls = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        inst, inst_err, ref, ref_err, variable = make_calibration_stars(rng)
        cal, cal_err, stats = fit_zero_point(inst, inst_err, ref, ref_err)
        dmag.append(-2.5 * np.log10(cal / TRUE_CAL))
        pulls.append((cal - TRUE_CAL) / cal_err)
        # Variables are rejected once their offset exceeds 4x their measurement error.
        deviation = np.abs(np.log(ref / inst / TRUE_CAL)) / np.hypot(inst_err / inst, ref_err / ref)
        assert not stats["used"][variable & (deviation > 4)].any()
        assert stats["n_stars"] >= 0.85 * (~variable).sum()
    dmag = np.array(dmag) * 1e3
    assert np.max(np.abs(dmag)) < 5.0  # the acceptance number, every realisation
    assert np.sqrt(np.mean(dmag**2)) < 1.5
    assert 0.5 < np.std(pulls) < 1.6


def test_extra_scatter_is_measured_and_zero_point_unbiased():
    rng = np.random.default_rng(42)
    inst, inst_err, ref, ref_err, _ = make_calibration_stars(rng, n=300, frac_variable=0.0,
                                                             extra_scatter_mag=0.01)
    # a constant relative scatter (colour terms, flat-field residuals): the "log" model's case
    cal, cal_err, stats = fit_zero_point(inst, inst_err, ref, ref_err, scatter_model="log")
    assert stats["extra_scatter_mmag"] == pytest.approx(10.0, abs=2.5)
    assert abs(2.5 * np.log10(cal / TRUE_CAL)) < 0.003
    assert stats["zero_point_mag"] == pytest.approx(31.4 - 2.5 * np.log10(TRUE_CAL), abs=0.003)
    assert stats["zero_point_err_mag"] == pytest.approx(cal_err / cal * 2.5 / np.log(10), rel=1e-9)
    # Without extra scatter the term is (near) zero.
    inst, inst_err, ref, ref_err, _ = make_calibration_stars(rng, n=300, frac_variable=0.0)
    assert fit_zero_point(inst, inst_err, ref, ref_err, scatter_model="log")[2]["extra_scatter_mmag"] < 2.0
    assert fit_zero_point(inst, inst_err, ref, ref_err)[2]["extra_scatter_mmag"] < 2.0


def test_flux_scatter_model_resists_one_sided_contamination_of_faint_stars():
    """Faint calibration stars carry extra light (neighbours, galaxies in the PSF stamp: a
    flux, not a fraction, and never negative), as on the simulated DC2 detectors, where
    the bright stars agree to 1 mmag. A constant-fraction scatter term flattens the weights
    and lets the faint stars pull the zero point; the constant-flux term does not."""
    offsets = {"flux": [], "log": []}
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        inst, inst_err, ref, ref_err, _ = make_calibration_stars(rng, n=40, frac_variable=0.0)
        # half of the stars carry 0-40000 e- of extra light: up to ~5x the noise of the
        # faintest (S/N 20) stars, < 1 % of the brightest
        contaminated = rng.random(inst.size) < 0.5
        inst = inst + contaminated * rng.uniform(0, 40000.0, inst.size)
        for model, found in offsets.items():
            cal, _, _ = fit_zero_point(inst, inst_err, ref, ref_err, scatter_model=model)
            found.append(2500 * np.log10(cal / TRUE_CAL))
    flux, log = np.abs(offsets["flux"]), np.abs(offsets["log"])
    assert np.sqrt(np.mean(flux**2)) < 3.0 and np.median(flux) < 2.0
    assert np.sqrt(np.mean(log**2)) > np.sqrt(np.mean(flux**2)) + 1.0  # the regression this guards against
    with pytest.raises(ValueError, match="scatter_model"):
        fit_zero_point(inst, inst_err, ref, ref_err, scatter_model="linear")


def test_colour_term_hook():
    rng = np.random.default_rng(3)
    inst, inst_err, ref, ref_err, _ = make_calibration_stars(rng, frac_variable=0.0)
    colour = rng.uniform(0.0, 1.5, len(inst))
    inst_coloured = inst * 10 ** (-0.4 * 0.05 * colour)  # instrument 0.05 mag/mag fainter for red stars
    cal_plain, _, st_plain = fit_zero_point(inst_coloured, inst_err, ref, ref_err)
    cal, _, st = fit_zero_point(inst_coloured, inst_err, ref, ref_err, ref_colour_mag=colour,
                                colour_term_coeffs=[0.0, 0.05])
    assert abs(2.5 * np.log10(cal / TRUE_CAL)) < 0.003
    assert abs(2.5 * np.log10(cal_plain / TRUE_CAL)) > 0.02  # ~0.05 x mean colour 0.75 uncorrected
    assert st["scatter_mmag"] < st_plain["scatter_mmag"]
    with pytest.raises(ValueError, match="ref_colour_mag"):
        fit_zero_point(inst, inst_err, ref, ref_err, colour_term_coeffs=[0.0, 0.05])


def test_bad_inputs_are_ignored_or_raise():
    rng = np.random.default_rng(4)
    inst, inst_err, ref, ref_err, _ = make_calibration_stars(rng, frac_variable=0.0)
    inst[:5] = np.nan
    inst[5:10] = -1.0
    ref[10:15] = 0.0
    cal, _, stats = fit_zero_point(inst, inst_err, ref, ref_err)
    assert not stats["used"][:15].any()
    assert abs(2.5 * np.log10(cal / TRUE_CAL)) < 0.005
    with pytest.raises(PhotometryError, match="only 3 usable") as info:
        fit_zero_point(inst[20:23], inst_err[20:23], ref[20:23], ref_err[20:23])
    assert info.value.n_stars == 3 and info.value.threshold == 5
    with pytest.raises(ValueError, match="same shape"):
        fit_zero_point(inst, inst_err[:-1], ref, ref_err)


def test_photocalib_conversions_and_round_trip():
    pc = PhotoCalib(calibration_mean=0.05, calibration_err=0.0005)
    flux, err = pc.inst_flux_to_njy(np.array([1000.0, 0.0]), np.array([10.0, 10.0]))
    np.testing.assert_allclose(flux, [50.0, 0.0])
    # sqrt((c sigma_f)^2 + (f sigma_c)^2): 1% of the flux from the calibration, and finite at f = 0.
    np.testing.assert_allclose(err, [np.hypot(0.5, 0.5), 0.5])
    _, err_nocal = pc.inst_flux_to_njy(np.array([1000.0]), np.array([10.0]), include_calibration_error=False)
    np.testing.assert_allclose(err_nocal, [0.5])
    mag, mag_err = pc.inst_flux_to_mag(np.array([1000.0]), np.array([10.0]))
    np.testing.assert_allclose(mag, 31.4 - 2.5 * np.log10(50.0))
    np.testing.assert_allclose(mag_err, 2.5 / np.log(10) * np.hypot(0.5, 0.5) / 50.0)
    assert pc.instrumental_zero_point_mag == pytest.approx(31.4 - 2.5 * np.log10(0.05))
    np.testing.assert_allclose(pc.njy_to_inst_flux(flux), [1000.0, 0.0])
    assert PhotoCalib.from_dict(pc.to_dict()) == pc
    with pytest.raises(ValueError, match="calibration_mean"):
        PhotoCalib(calibration_mean=-1.0)
    with pytest.raises(ValueError, match="lacks"):
        PhotoCalib.from_dict({"calibration_err": 0.1})


def test_magnitudes_and_filter_map():
    assert float(njy_to_mag(3631e9)) == pytest.approx(0.0, abs=1e-4)  # AB zero point 3631 Jy
    np.testing.assert_allclose(njy_to_mag(mag_to_njy([20.0, 25.0])), [20.0, 25.0])
    assert np.isnan(njy_to_mag(-5.0))
    assert reference_flux_column("g") == "lsst_g_smeared_flux"
    assert reference_flux_err_column("r") == "lsst_r_smeared_fluxErr"
    assert reference_flux_column("i", {"i": "lsst_i"}) == "lsst_i_flux"
    with pytest.raises(KeyError, match="not in the filter map"):
        reference_flux_column("y", {"g": "lsst_g"})
