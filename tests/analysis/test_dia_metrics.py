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
