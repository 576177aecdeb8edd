"""Truth matching and binned fractions behind the report's plots, on hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from diapipe.analysis.dia_match import (
    binned_fraction,
    fraction_table,
    match_dia_objects_to_truth,
    match_dia_sources_to_truth,
)

ARCSEC = 1 / 3600.0


def _truth():
    # two visits; id 1 variable, 2 transient (zero flux at visit 10: not a truth variable
    # there), 3 static star, 4 variable off the detector
    rows = []
    for visit, mjd in ((10, 60000.0), (11, 60003.0)):
        rows += [
            {"id": 1, "type": "variable", "ra": 10.0, "diff_flux_njy": 500.0 * (visit - 9), "on_detector": True},
            {"id": 2, "type": "transient", "ra": 10.001, "diff_flux_njy": 0.0 if visit == 10 else 900.0,
             "on_detector": True},
            {"id": 3, "type": "star", "ra": 10.002, "diff_flux_njy": 0.0, "on_detector": True},
            {"id": 4, "type": "variable", "ra": 10.003, "diff_flux_njy": 100.0, "on_detector": False},
        ]
        for row in rows[-4:]:
            row.update({"dec": -30.0, "mjd": mjd})
    truth = pd.DataFrame(rows)
    truth["visit"] = [10] * 4 + [11] * 4
    truth["detector"] = 94
    return truth


def test_dia_sources_real_and_spurious():
    truth = _truth()
    cosd = np.cos(np.radians(30.0))
    src = pd.DataFrame({
        "visit": [10, 10, 10, 11, 11],
        "detector": 94,
        # 0.3" from id 1; on id 2 before it exploded; on the static star; 0.7" from id 1; on id 2
        "ra": [10.0 + 0.3 * ARCSEC / cosd, 10.001, 10.002, 10.0 + 0.7 * ARCSEC / cosd, 10.001],
        "dec": -30.0,
    })
    sources, variables = match_dia_sources_to_truth(src, truth, radius_arcsec=0.5)
    assert sources["real"].tolist() == [True, False, False, False, True]
    assert sources["truth_id"].tolist() == [1, -1, -1, -1, 2]
    # truth variables: id 1 at both visits, id 2 at visit 11 only; id 4 is off the detector
    assert sorted(zip(variables.visit, variables.id, variables.detected)) == [(10, 1, True), (11, 1, False),
                                                                               (11, 2, True)]


def test_dia_objects_prefer_variables():
    truth = _truth()
    cosd = np.cos(np.radians(30.0))
    objects = pd.DataFrame({"ra": [10.0 + 0.2 * ARCSEC / cosd, 10.002, 10.01], "dec": [-30.0, -30.0, -30.0]})
    assert match_dia_objects_to_truth(objects, truth).tolist() == [1, 3, -1]


def test_binned_fraction_counts_and_interval():
    table = binned_fraction([1, 2, 2.5, 5, 7, 8, 20], [0, 1, 0, 1, 1, 1, 1], [0, 3, 6, 10])
    assert table["n"].tolist() == [3, 1, 2]
    assert table["k"].tolist() == [1, 1, 2]
    assert np.allclose(table["fraction"], [1 / 3, 1.0, 1.0])
    # Wilson 68 % interval of 1/3 with z = 1: centre 0.375, half-width 0.2394
    assert np.isclose(table["fraction"][0] - table["err_lo"][0], 0.1357, atol=5e-4)
    assert np.isclose(table["fraction"][0] + table["err_hi"][0], 0.6144, atol=5e-4)
    empty = fraction_table([0], [1], [0], [0])
    assert np.isnan(empty["fraction"][0])
