"""DiaObject summary: equal to a brute-force per-object recomputation."""

import numpy as np
import pandas as pd
import pytest

from diapipe.association.summary import BANDS, apdb_columns, dia_object_summary


def _make_sources(rng, n_obj=120, max_per_obj=14):
    rows = []
    sid = 1
    for k in range(n_obj):
        oid = 10_000 + 7 * k
        n = rng.integers(1, max_per_obj + 1)
        ra0, dec0 = rng.uniform(0, 360), rng.uniform(-80, 80)
        if k == 0:
            ra0 = 359.99999  # straddles RA = 0
        for _ in range(n):
            rows.append(
                {
                    "diaSourceId": sid, "diaObjectId": oid,
                    "ra": (ra0 + rng.normal(0, 1e-5)) % 360.0, "dec": dec0 + rng.normal(0, 1e-5),
                    "raErr": rng.uniform(1e-6, 3e-5), "decErr": rng.uniform(1e-6, 3e-5),
                    "ra_dec_Cov": rng.normal(0, 1e-11),
                    "midpointMjdTai": 60000 + np.round(rng.uniform(0, 300), 1),  # some equal times
                    "band": rng.choice(["g", "r", "i"]),
                    "psfFlux": rng.normal(500, 300), "psfFluxErr": rng.uniform(20, 80),
                    "scienceFlux": rng.normal(3000, 200), "scienceFluxErr": rng.uniform(20, 60),
                }
            )
            sid += 1
    df = pd.DataFrame(rows)
    # sprinkle missing values the way real tables have them
    df.loc[rng.random(len(df)) < 0.03, "psfFlux"] = np.nan
    df.loc[rng.random(len(df)) < 0.03, "psfFluxErr"] = np.nan
    df.loc[rng.random(len(df)) < 0.03, "scienceFluxErr"] = np.nan
    return df.sample(frac=1.0, random_state=3).reset_index(drop=True)  # unordered input


def _wmean(f, e):
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    if not ok.any():
        return np.nan, np.nan, 0
    w = 1 / e[ok] ** 2
    return np.sum(w * f[ok]) / np.sum(w), 1 / np.sqrt(np.sum(w)), int(ok.sum())


def _brute(group: pd.DataFrame) -> dict:
    out = {"nDiaSources": len(group)}
    v = np.array([[np.cos(np.deg2rad(d)) * np.cos(np.deg2rad(r)), np.cos(np.deg2rad(d)) * np.sin(np.deg2rad(r)),
                   np.sin(np.deg2rad(d))] for r, d in zip(group.ra, group.dec)]).sum(axis=0)
    out["ra"] = np.rad2deg(np.arctan2(v[1], v[0])) % 360
    out["dec"] = np.rad2deg(np.arcsin(v[2] / np.linalg.norm(v)))
    out["raErr"] = np.sqrt(np.sum(group.raErr**2)) / len(group)
    out["ra_dec_Cov"] = np.sum(group.ra_dec_Cov) / len(group) ** 2
    out["firstDiaSourceMjdTai"] = group.midpointMjdTai.min()
    out["lastDiaSourceMjdTai"] = group.midpointMjdTai.max()
    for b in BANDS:
        g = group[group.band == b]
        f, e = g.psfFlux.to_numpy(), g.psfFluxErr.to_numpy()
        mean, err, n = _wmean(f, e)
        out[f"{b}_psfFluxMean"], out[f"{b}_psfFluxMeanErr"], out[f"{b}_psfFluxNdata"] = mean, err, n
        ff = f[np.isfinite(f)]
        out[f"{b}_psfFluxSigma"] = np.std(ff, ddof=1) if len(ff) > 1 else np.nan
        out[f"{b}_psfFluxMin"] = ff.min() if len(ff) else np.nan
        out[f"{b}_psfFluxMax"] = ff.max() if len(ff) else np.nan
        ee = e[np.isfinite(e)]
        out[f"{b}_psfFluxErrMean"] = ee.mean() if len(ee) else np.nan
        ok = np.isfinite(f) & np.isfinite(e)
        out[f"{b}_psfFluxChi2"] = np.sum(((f[ok] - mean) / e[ok]) ** 2) if n else np.nan
        # max slope over time-consecutive finite points, equal times skipped
        gg = g[np.isfinite(g.psfFlux)]
        order = np.argsort(gg.midpointMjdTai.to_numpy(), kind="stable")
        t, fl = gg.midpointMjdTai.to_numpy()[order], gg.psfFlux.to_numpy()[order]
        slopes = [(fl[k + 1] - fl[k]) / (t[k + 1] - t[k]) for k in range(len(t) - 1) if t[k + 1] > t[k]]
        out[f"{b}_psfFluxMaxSlope"] = max(slopes) if slopes else np.nan
        sm, se, _ = _wmean(g.scienceFlux.to_numpy(), g.scienceFluxErr.to_numpy())
        out[f"{b}_scienceFluxMean"], out[f"{b}_scienceFluxMeanErr"] = sm, se
    return out


def test_summary_equals_brute_force():
    rng = np.random.default_rng(42)
    src = _make_sources(rng)
    got = dia_object_summary(src, include_extra=True).set_index("diaObjectId")
    assert got.index.is_monotonic_increasing and got.index.is_unique
    assert len(got) == src.diaObjectId.nunique()
    expected = pd.DataFrame({oid: _brute(group) for oid, group in src.groupby("diaObjectId")}).T
    expected = expected.loc[got.index]
    n_compared = 0
    for col in expected.columns:
        want = expected[col].to_numpy(dtype=float)
        have = got[col].to_numpy(dtype=float)
        if col.endswith("Ndata") or col == "nDiaSources":
            np.testing.assert_array_equal(have, want, err_msg=col)
        else:
            # exact up to float rounding (different summation order); NaN where brute force has NaN
            np.testing.assert_allclose(have, want, rtol=1e-11, atol=1e-13, equal_nan=True, err_msg=col)
        n_compared += int(np.isfinite(want).sum())
    assert n_compared > 2000
    # bands without data: Ndata 0 (NOT NULL), means null
    assert (got["u_psfFluxNdata"] == 0).all() and got["u_psfFluxMean"].isna().all()
    assert got["r_psfFluxNdata"].dtype == np.int64 and got["nDiaSources"].dtype == np.int64


def test_columns_are_schema_columns_in_schema_order():
    rng = np.random.default_rng(1)
    src = _make_sources(rng, n_obj=5)
    out = dia_object_summary(src, validity_start_mjd_tai=60400.5)
    schema = apdb_columns("DiaObject")
    assert all(c in schema for c in out.columns)
    assert list(out.columns) == [c for c in schema if c in out.columns]
    # everything the schema has, except the forced-photometry means (no forced sources given)
    missing = set(schema) - set(out.columns)
    assert missing == {f"{b}_fpFluxMean" for b in BANDS} | {f"{b}_fpFluxMeanErr" for b in BANDS}
    assert (out.validityStartMjdTai == 60400.5).all() and out.validityEndMjdTai.isna().all()
    assert "g_psfFluxChi2" not in out.columns  # not in APDB 10.0.0


def test_forced_source_means():
    src = pd.DataFrame({"diaObjectId": [1, 2], "ra": [1.0, 2.0], "dec": [0.0, 0.0],
                        "midpointMjdTai": [60000.0, 60000.0], "band": ["r", "r"],
                        "psfFlux": [10.0, 20.0], "psfFluxErr": [1.0, 1.0]})
    forced = pd.DataFrame({"diaObjectId": [1, 1, 1, 2, 99], "band": ["r", "r", "g", "g", "r"],
                           "psfFlux": [10.0, 40.0, 5.0, 7.0, 1e9], "psfFluxErr": [1.0, 2.0, 1.0, 2.0, 1.0]})
    out = dia_object_summary(src, forced).set_index("diaObjectId")
    assert out.at[1, "r_fpFluxMean"] == pytest.approx((10 + 40 / 4) / (1 + 1 / 4))
    assert out.at[1, "r_fpFluxMeanErr"] == pytest.approx(1 / np.sqrt(1.25))
    assert out.at[2, "g_fpFluxMean"] == pytest.approx(7.0)
    assert np.isnan(out.at[2, "r_fpFluxMean"])  # object 99 has no DiaSource: ignored
    assert len(out) == 2


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match="midpointMjdTai"):
        dia_object_summary(pd.DataFrame({"diaObjectId": [1], "ra": [1.0], "dec": [0.0]}))
    bad = pd.DataFrame({"diaObjectId": [1, None], "ra": [1.0, 1.0], "dec": [0.0, 0.0],
                        "midpointMjdTai": [1.0, 2.0]})
    with pytest.raises(ValueError, match="null diaObjectId"):
        dia_object_summary(bad)


def test_large_input_is_vectorised():
    """1e5 rows: checks consistency at scale (equal-sized groups sum correctly)."""
    rng = np.random.default_rng(7)
    n = 100_000
    src = pd.DataFrame({"diaObjectId": rng.integers(0, 20_000, n), "ra": rng.uniform(0, 1, n),
                        "dec": rng.uniform(0, 1, n), "midpointMjdTai": rng.uniform(60000, 60300, n),
                        "band": rng.choice(list("ugrizy"), n), "psfFlux": rng.normal(0, 1, n),
                        "psfFluxErr": np.ones(n)})
    out = dia_object_summary(src)
    assert out.nDiaSources.sum() == n
    assert sum(out[f"{b}_psfFluxNdata"].sum() for b in BANDS) == n
    # with unit errors the weighted mean is the plain mean
    plain = src[src.band == "g"].groupby("diaObjectId").psfFlux.mean()
    got = out.set_index("diaObjectId").loc[plain.index, "g_psfFluxMean"]
    np.testing.assert_allclose(got.to_numpy(), plain.to_numpy(), rtol=1e-10, atol=1e-12)


def test_no_dia_sources_with_forced_sources():
    """A visit whose difference image has no DiaSource still forced-photometers the known
    DiaObjects; the summary of no DiaSources is empty (it used to index an empty array:
    diaPipe failed on two quiet ci_imsim visits)."""
    src = pd.DataFrame({"diaObjectId": np.array([], np.int64), "ra": [], "dec": [], "midpointMjdTai": [],
                        "band": [], "psfFlux": [], "psfFluxErr": []})
    forced = pd.DataFrame({"diaObjectId": [1, 2], "band": ["g", "g"], "psfFlux": [10.0, 20.0],
                           "psfFluxErr": [1.0, 1.0]})
    out = dia_object_summary(src, forced)
    assert len(out) == 0
