"""DIA and association figures on hand-made tables with known answers."""

import numpy as np
import pandas as pd
import pytest

from diapipe.analysis.dia import association_metrics, dia_source_metrics

ARCSEC = 1 / 3600


def _truth():
    # two variables at visit 1 (one bright, one faint), one at visit 2; one static star
    return pd.DataFrame(
        {
            "id": [10, 11, 10, 12],
            "type": ["transient", "variable", "transient", "star"],
            "ra": [60.0, 60.01, 60.0, 60.02],
            "dec": [-36.0, -36.0, -36.0, -36.0],
            "diff_flux_njy": [10 ** ((31.4 - 21.0) / 2.5), 10 ** ((31.4 - 25.0) / 2.5), 5000.0, 0.0],
            "on_detector": [True, True, True, True],
            "visit": [1, 1, 2, 1],
            "detector": [5, 5, 5, 5],
        }
    )


def test_dia_source_counts_completeness_and_spurious_density():
    dia = pd.DataFrame(
        {
            "diaSourceId": [1, 2, 3],
            "visit": [1, 1, 2],
            "detector": [5, 5, 5],
            "ra": [60.0 + 0.2 * ARCSEC, 60.03, 60.0],  # real, spurious (far from all), real
            "dec": [-36.0, -36.0, -36.0],
        }
    )
    m = dia_source_metrics(dia, _truth(), area_deg2=0.5)
    assert (m["n_dia_sources"], m["n_real"], m["n_spurious"]) == (3, 2, 1)
    assert m["spurious_per_deg2"] == pytest.approx(2.0)
    assert m["n_truth_variables"] == 3 and m["completeness"] == pytest.approx(2 / 3)
    bins = {(b["lo"], b["hi"]): (b["k"], b["n"]) for b in m["completeness_vs_mag"]}
    assert bins[(20.0, 22.0)] == (1, 1)  # the bright transient at visit 1
    assert bins[(24.0, 26.0)] == (0, 1)  # the faint variable missed


def test_association_purity_and_completeness():
    truth = _truth()
    sources = pd.DataFrame(
        {
            "diaSourceId": [1, 2, 3, 4],
            "diaObjectId": [100, 100, 200, 300],
            "visit": [1, 2, 1, 1],
            "detector": [5, 5, 5, 5],
            "ra": [60.0, 60.0, 60.01, 60.03],
            "dec": [-36.0, -36.0, -36.0, -36.0],
        }
    )
    objects = pd.DataFrame({"diaObjectId": [100, 200, 300], "nDiaSources": [2, 1, 1]})
    m = association_metrics(objects, sources, truth)
    assert m["association_purity"] == 1.0 and m["association_completeness"] == 1.0
    assert m["totalUnassociatedDiaObjects"] == 2
    # the same truth object split over two DiaObjects: completeness drops to 0
    split = sources.assign(diaObjectId=[100, 400, 200, 300])
    assert association_metrics(objects, split, truth)["association_completeness"] == 0.0
    # two truth objects merged into one DiaObject: purity drops
    merged = sources.assign(diaObjectId=[100, 100, 100, 300])
    assert association_metrics(objects, merged, truth)["association_purity"] == 0.0
    assert np.isfinite(m["fracUpdatedDiaObjects"])


# ---------------------------------------------------------------------------
# issue 5's difference-imaging figures (dia_match.score_dia_sources / difference_quality)
# ---------------------------------------------------------------------------
def test_truth_snr_and_nearest_sky_match():
    from diapipe.analysis.dia_match import truth_snr
    from diapipe.analysis.truth_match import nearest_sky

    snr = truth_snr([-600.0, 600.0, 600.0, 600.0], [100.0, 200.0, np.nan, 0.0])
    assert snr[:2].tolist() == [6.0, 3.0] and np.isnan(snr[2:]).all()
    # two sources 0.1" and 0.3" from one truth position: both find it, it finds the nearer
    cosd = np.cos(np.radians(36.0))
    src_ra = [60.0 + 0.3 * ARCSEC / cosd, 60.0 + 0.1 * ARCSEC / cosd, 60.0 + 0.6 * ARCSEC / cosd]
    assert nearest_sky(src_ra, [-36.0] * 3, [60.0], [-36.0], 0.5).tolist() == [0, 0, -1]
    assert nearest_sky([60.0], [-36.0], src_ra, [-36.0] * 3, 0.5).tolist() == [1]


def test_completeness_vs_snr_and_the_50_percent_point():
    from diapipe.analysis.dia_match import SNR_BINS, completeness_vs_snr, snr_at_completeness

    # 10 truth variables per bin at the bin's lower edge, k of them detected
    snr, detected = [], []
    for lo, k in ((3.0, 1), (4.0, 3), (5.0, 7), (5.5, 8), (6.0, 9), (7.0, 9), (30.0, 10)):
        snr += [lo + 0.01] * 10
        detected += [True] * k + [False] * (10 - k)
    snr += [2.0, np.nan]  # below the first edge / not measured: left out
    detected += [True, True]
    table = completeness_vs_snr(snr, detected)
    assert table["lo"].tolist() == list(SNR_BINS[:-1]) and np.isinf(table["hi"].iloc[-1])
    assert table["n"].sum() == 70 and table["k"].sum() == 47
    assert table.set_index("lo").loc[30.0, "k"] == 10
    # 0.3 at S/N 4.5 (centre of 4-5) and 0.7 at 5.25 (centre of 5-5.5): 50 % at 4.875
    assert snr_at_completeness(table, 0.5) == pytest.approx(4.875)
    # 90 % first reached in 6-7 (0.9), after 0.8 at 5.75: exactly the centre 6.5
    assert snr_at_completeness(table, 0.9) == pytest.approx(6.5)
    # the open bin [30, inf) counts at S/N 30: 0.9 -> 1.0 between 7.5 and 30 (empty bins skipped)
    assert snr_at_completeness(table, 0.95) == pytest.approx(7.5 + 0.5 * 22.5)
    assert np.isnan(snr_at_completeness(completeness_vs_snr([3.5, 8.0], [False, False]), 0.5))
    # the lowest non-empty bin already at 50 %: its centre, an upper limit
    assert snr_at_completeness(completeness_vs_snr([4.2, 4.4, 9.0], [True, False, True]), 0.5) == 4.5


def _scored_tables():
    """Visit 1, detector 5: five bright variables (S/N 10-50) each with a DiaSource whose
    pulls are -2, -1, 0, 1, 2; a faint one (S/N 2) undetected; one whose forced error is NaN
    (not a usable truth variable) with a DiaSource on it; a duplicate DiaSource 0.2" from
    variable 0; a flagged spurious DiaSource far from all."""
    cosd = np.cos(np.radians(-36.0))
    ra = 60.0 + np.arange(7) * 10 * ARCSEC / cosd
    truth = pd.DataFrame({
        "id": np.arange(7), "type": ["variable"] * 4 + ["transient", "moving", "variable"],
        "ra": ra, "dec": -36.0, "diff_flux_njy": [1000.0, -2000.0, 3000.0, 4000.0, 5000.0, 200.0, 800.0],
        "sigma_njy": [100.0, 100.0, 100.0, 100.0, 100.0, 100.0, np.nan], "on_detector": True,
        "visit": 1, "detector": 5,
    })
    pulls = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    err = np.array([110.0, 120.0, 130.0, 140.0, 150.0])
    flux = truth["diff_flux_njy"].to_numpy()[:5] + pulls * err
    n = 8
    src = pd.DataFrame({
        "visit": 1, "detector": 5,
        "ra": np.r_[ra[:5], ra[6], ra[0] + 0.2 * ARCSEC / cosd, 61.0], "dec": -36.0,
        "psfFlux": np.r_[flux, 700.0, 990.0, 300.0], "psfFluxErr": np.r_[err, 100.0, 100.0, 100.0],
    })
    for name in ("pixelFlags_saturated", "pixelFlags_bad", "pixelFlags_edge", "pixelFlags_nodataCenter",
                 "pixelFlags_saturatedCenter", "psfFlux_flag"):
        src[name] = np.zeros(n, bool)
    src.loc[7, "pixelFlags_edge"] = True
    return src, truth, pulls


def test_score_dia_sources_and_difference_quality():
    from diapipe.analysis.dia_match import difference_quality, score_dia_sources

    src, truth, pulls = _scored_tables()
    sources, variables = score_dia_sources(src, truth)
    # the NaN-sigma variable is dropped before matching: its DiaSource (row 5) is spurious;
    # the duplicate on variable 0 (row 6) is real
    assert variables["id"].tolist() == [0, 1, 2, 3, 4, 5]
    assert sources["real"].tolist() == [True] * 5 + [False, True, False]
    assert sources["clean"].tolist() == [True] * 7 + [False]
    assert variables["snr"].tolist() == [10.0, 20.0, 30.0, 40.0, 50.0, 2.0]
    assert variables["detected"].tolist() == [True] * 5 + [False]
    assert variables["dia_source_row"].tolist() == [0, 1, 2, 3, 4, -1]  # the nearer DiaSource of variable 0
    assert np.isnan(variables["psfFlux"].iloc[5]) and not variables["clean"].iloc[5]

    q = difference_quality(sources, variables, area_deg2=0.01)
    assert (q["n_dia_sources"], q["n_real"], q["n_spurious"], q["n_spurious_unflagged"]) == (8, 6, 2, 1)
    assert q["spurious_per_deg2"] == pytest.approx(200.0)
    assert q["unflagged_spurious_per_deg2"] == pytest.approx(100.0)
    assert q["completeness"] == pytest.approx(5 / 6)
    assert (q["n_snr_ge_6"], q["completeness_snr_ge_6"]) == (5, 1.0)
    # S/N 2 is below the first bin; the lowest non-empty bin (10-15) is complete: its centre
    assert q["snr_at_50pct_completeness"] == 12.5
    bins = {b["lo"]: (b["k"], b["n"]) for b in q["completeness_vs_snr"]}
    assert bins[10.0] == (1, 1) and bins[15.0] == (1, 1) and bins[30.0] == (3, 3) and bins[3.0] == (0, 0)
    flux = q["psf_flux"]
    assert flux["n"] == 5
    assert flux["pull_median"] == pytest.approx(0.0)
    assert flux["pull_iqr_width"] == pytest.approx(2.0 / 1.349)  # quartiles of -2..2 are -1 and 1
    expected = np.median((truth["diff_flux_njy"].to_numpy()[:5] + pulls * [110, 120, 130, 140, 150])
                         / truth["diff_flux_njy"].to_numpy()[:5])
    assert flux["flux_ratio_median"] == pytest.approx(expected)
    # a flagged DiaSource is not used for the flux figures
    src.loc[2, "psfFlux_flag"] = True
    assert difference_quality(*score_dia_sources(src, truth), 0.01)["psf_flux"]["n"] == 4
    with pytest.raises(ValueError, match="sigma_njy"):
        score_dia_sources(src, truth.drop(columns="sigma_njy"))


def test_forced_sigma_on_a_flat_difference():
    from diapipe.analysis.dia import forced_sigma_njy, usable_area_deg2
    from diapipe.exposure import masks
    from diapipe.exposure.exposure import Exposure
    from diapipe.exposure.photo_calib import PhotoCalib
    from diapipe.exposure.psf import PixelPsf

    shape, sigma_pix, variance = (60, 80), 2.0, 25.0
    mask = np.zeros(shape, np.int32)
    mask[:, 60:] = masks.bit("NO_DATA")
    diff = Exposure(image=np.zeros(shape), variance=np.full(shape, variance), mask=mask,
                    psf=PixelPsf.gaussian(sigma_pix), photo_calib=PhotoCalib(calibration_mean=2.0), xy0=(1000, 500))
    sig = forced_sigma_njy(diff, [1030.0, 1030.4, 2000.0], [530.0, 525.0, 530.0])
    # uniform variance v: sqrt(v / sum(P²)), sum(P²) = 1 / (4 pi sigma²) for a Gaussian; times 2 nJy/e
    expected = 2.0 * np.sqrt(variance * 4 * np.pi * sigma_pix**2)
    assert sig[:2] == pytest.approx([expected] * 2, rel=0.02)
    assert np.isnan(sig[2])  # off the image
    assert usable_area_deg2(mask) == pytest.approx(60 * 60 * (0.2 / 3600) ** 2)


class _Ref:
    def __init__(self, name, data_id):
        self.datasetType, self.dataId = name, data_id


class _FakeButler:
    """Just enough of a Butler for `dia_metrics_for`: ``datasets`` maps a dataset type to
    ``{data-ID tuple: object}`` (keys ``(visit, detector)`` or ``(patch,)``)."""

    def __init__(self, datasets):
        self.datasets = datasets
        self.registry = self
        self.collections = type("C", (), {"defaults": ["run"]})()

    def queryDatasetTypes(self, *args):
        return [type("T", (), {"name": name})() for name in self.datasets]

    def queryDatasets(self, name, **kwargs):
        keys = ("visit", "detector") if name != "goodSeeingVisits" else ("patch",)
        return [_Ref(name, {"instrument": "X", **dict(zip(keys, key, strict=True))}) for key in self.datasets[name]]

    def get(self, what, data_id=None, collections=None):
        if isinstance(what, _Ref):
            what, data_id = what.datasetType, what.dataId
        if what == "calexp.bbox":
            return (0, 0, 100, 50)
        key = (data_id["patch"],) if "patch" in data_id else (int(data_id["visit"]), int(data_id["detector"]))
        try:
            return self.datasets[what][key]
        except KeyError as err:
            raise LookupError(f"{what} {key}") from err


def test_dia_metrics_for_scores_only_visits_outside_the_template():
    from diapipe.analysis.dia import dia_metrics_for
    from diapipe.exposure.exposure import Exposure
    from diapipe.exposure.photo_calib import PhotoCalib
    from diapipe.exposure.psf import PixelPsf

    shape = (50, 100)
    diff = Exposure(image=np.zeros(shape), variance=np.full(shape, 4.0), psf=PixelPsf.gaussian(1.5),
                    photo_calib=PhotoCalib(calibration_mean=1.0))
    truth = pd.DataFrame({"id": [7], "type": ["transient"], "ra": [60.0], "dec": [-36.0], "x": [50.0], "y": [25.0],
                          "diff_flux_njy": [500.0], "on_detector": [True]})
    src = pd.DataFrame({"visit": [0], "detector": [5], "ra": [60.0], "dec": [-36.0], "psfFlux": [510.0],
                        "psfFluxErr": [50.0]})
    visits = (1, 2, 3)
    datasets = {
        "goodSeeingDiff_diaSrcTable": {(v, 5): src.assign(visit=v) for v in visits},
        "truth_source": {(v, 5): truth for v in visits},
        "goodSeeingDiff_differenceExp": {(1, 5): diff, (2, 5): diff},  # visit 3's is missing
        "goodSeeingVisits": {(24,): {1: True}},
    }
    block = dia_metrics_for(_FakeButler(datasets))["dia_sources"]
    assert block["n_dia_sources"] == 3 and block["n_real"] == 3  # all visits
    assert [(d["visit"], d["in_template"], d["scored"]) for d in block["detector_visits"]] == [
        (1, True, False), (2, False, True), (3, False, False)]
    assert block["template_visits"] == [1] and block["independent_visits"] == [2]
    assert any("visit 3" in note for note in block["notes"])
    ind = block["independent"]
    assert (ind["n_dia_sources"], ind["n_truth_variables"], ind["completeness_snr_ge_6"]) == (1, 1, 1.0)
    assert ind["area_deg2"] == pytest.approx(5000 * (0.2 / 3600) ** 2)
    # truth S/N = 500 / (2 sqrt(4 pi 1.5²)) = 47: counted in the open [30, inf) bin
    assert [b["n"] for b in ind["completeness_vs_snr"]][-1] == 1
    assert ind["psf_flux"]["flux_ratio_median"] == pytest.approx(1.02)
    # without goodSeeingVisits the template inputs are unknown: no independent figures, and a note
    del datasets["goodSeeingVisits"]
    block = dia_metrics_for(_FakeButler(datasets))["dia_sources"]
    assert block["independent"] is None and "goodSeeingVisits" in block["notes"][0]
    assert block["n_dia_sources"] == 3
