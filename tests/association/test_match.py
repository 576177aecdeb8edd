"""Association: optimal one-to-one matching beats greedy; scales to 1e4 x 1e6."""

import itertools

import numpy as np
import pandas as pd
import pytest

from diapipe.association.match import assign_dia_object_ids, associate

ARCSEC = 1.0 / 3600.0


def _greedy(src, obj, radius):
    """The 2022 algorithm: pairs taken greedily by distance."""
    pairs = []
    for i, (ra, dec) in enumerate(zip(src.ra, src.dec)):
        for j, (ora, odec) in enumerate(zip(obj.ra, obj.dec)):
            d = np.hypot((ra - ora) * np.cos(np.deg2rad(dec)), dec - odec) * 3600
            if d <= radius:
                pairs.append((d, i, j))
    used_s, used_o, out = set(), set(), {}
    for d, i, j in sorted(pairs):
        if i not in used_s and j not in used_o:
            used_s.add(i)
            used_o.add(j)
            out[i] = j
    return out


def test_optimal_beats_greedy_total_distance():
    # S0-O0 0.20", S0-O1 0.30", S1-O0 0.25", S1-O1 0.90": greedy takes S0-O0
    # then S1-O1 (0.04 + 0.81 arcsec²); optimal crosses (0.09 + 0.0625).
    src = pd.DataFrame({"ra": [0.0, 0.0], "dec": [0.0, 0.45 * ARCSEC]})
    # place objects to realise the distances approximately, then check greedy differs
    obj = pd.DataFrame({"diaObjectId": [100, 101], "ra": [0.0, -0.3 * ARCSEC], "dec": [0.2 * ARCSEC, 0.0]})
    matches, unmatched = associate(src, obj, use_chi2=False)
    greedy = _greedy(src, obj, 1.0)
    optimal = dict(zip(matches.source_row, matches.object_row))
    assert greedy == {0: 0, 1: 1}
    assert optimal == {0: 1, 1: 0}
    total = lambda pairing: sum(  # noqa: E731
        ((src.ra[i] - obj.ra[j]) ** 2 + (src.dec[i] - obj.dec[j]) ** 2) * 3600**2 for i, j in pairing.items()
    )
    assert total(optimal) < total(greedy) - 0.1
    assert len(unmatched) == 0


def test_optimal_matches_more_than_greedy():
    # S1 can only reach O0; greedy gives O0 to the closer S0 and strands S1.
    src = pd.DataFrame({"ra": [0.0, 1.5 * ARCSEC], "dec": [0.0, 0.0]})
    obj = pd.DataFrame({"diaObjectId": [7, 8], "ra": [0.6 * ARCSEC, -0.8 * ARCSEC], "dec": [0.0, 0.0]})
    assert _greedy(src, obj, 1.0) == {0: 0}
    matches, unmatched = associate(src, obj, use_chi2=False)
    assert dict(zip(matches.source_row, matches.diaObjectId)) == {0: 8, 1: 7}
    assert unmatched.tolist() == []
    assert (matches.distance_arcsec <= 1.0).all()


def test_matches_brute_force_on_random_clusters():
    """Exhaustive search over all matchings of small dense clusters."""
    rng = np.random.default_rng(11)
    n_checked = 0
    for trial in range(40):
        ns, no = rng.integers(1, 5, size=2)
        src = pd.DataFrame({"ra": 30 + rng.uniform(-0.8, 0.8, ns) * ARCSEC, "dec": rng.uniform(-0.8, 0.8, ns) * ARCSEC})
        src["raErr"] = rng.uniform(0.01, 0.3, ns) * ARCSEC
        src["decErr"] = rng.uniform(0.01, 0.3, ns) * ARCSEC
        obj = pd.DataFrame(
            {"diaObjectId": np.arange(no) + 50, "ra": 30 + rng.uniform(-0.8, 0.8, no) * ARCSEC,
             "dec": rng.uniform(-0.8, 0.8, no) * ARCSEC}
        )
        res = associate(src, obj, radius_arcsec=1.0)
        # brute force: best (max cardinality, then min χ²) over all partial injections
        dx = (src.ra.values[:, None] - obj.ra.values[None]) * 3600 * np.cos(0.0)
        dy = (src.dec.values[:, None] - obj.dec.values[None]) * 3600
        ok = np.hypot(dx, dy) <= 1.0
        ex = np.maximum(src.raErr.values * 3600, 0.05)[:, None]
        ey = np.maximum(src.decErr.values * 3600, 0.05)[:, None]
        chi2 = (dx / ex) ** 2 + (dy / ey) ** 2
        best = (0, 0.0)
        for perm in itertools.product(range(-1, no), repeat=ns):
            used = [j for j in perm if j >= 0]
            if len(used) != len(set(used)) or any(j >= 0 and not ok[i, j] for i, j in enumerate(perm)):
                continue
            key = (-len(used), sum(chi2[i, j] for i, j in enumerate(perm) if j >= 0))
            if best == (0, 0.0) or key < best:
                best = key
        assert len(res.matches) == -best[0]
        assert res.matches.score.sum() == pytest.approx(best[1], rel=1e-6, abs=1e-9)
        n_checked += len(res.matches) > 1
    assert n_checked >= 10  # the test exercised real multi-pair components


def test_chi2_prefers_the_statistically_closer_object():
    # O0 is 0.3" east, O1 0.4" north; source error 0.05" E-W, 0.5" N-S:
    # χ² prefers O1 (0.64) over O0 (36) although O0 is nearer.
    src = pd.DataFrame({"ra": [0.0], "dec": [0.0], "raErr": [0.05 * ARCSEC], "decErr": [0.5 * ARCSEC]})
    obj = pd.DataFrame({"diaObjectId": [1, 2], "ra": [0.3 * ARCSEC, 0.0], "dec": [0.0, 0.4 * ARCSEC]})
    assert associate(src, obj).matches.diaObjectId.tolist() == [2]
    assert associate(src, obj, use_chi2=False).matches.diaObjectId.tolist() == [1]
    # The 0.05" floor: a tiny quoted error does not make a 0.1" offset 100σ.
    src_tiny = src.assign(raErr=1e-6 * ARCSEC, decErr=1e-6 * ARCSEC)
    m = associate(src_tiny, obj.iloc[:1].assign(ra=0.1 * ARCSEC)).matches
    assert m.score.iloc[0] == pytest.approx((0.1 / 0.05) ** 2, rel=1e-6)


def test_radius_ra_wrap_and_pole():
    src = pd.DataFrame({"ra": [359.9999, 45.0, 10.0], "dec": [10.0, 89.99995, 0.0]})
    obj = pd.DataFrame(
        {"diaObjectId": [1, 2, 3],
         "ra": [0.0001 - 0.5 * ARCSEC, 225.0, 10.0 + 1.01 * ARCSEC],  # 3: just outside 1"
         "dec": [10.0, 89.99995, 0.0]}
    )
    res = associate(src, obj)
    got = dict(zip(res.matches.source_row, res.matches.diaObjectId))
    assert got == {0: 1, 1: 2}  # pole: 0.36" across the pole between ra 45 and 225
    assert res.unmatched.tolist() == [2]
    assert res.matches.distance_arcsec.iloc[1] == pytest.approx(0.36, abs=1e-3)


def test_new_objects_take_the_source_id():
    src = pd.DataFrame({"diaSourceId": [9001, 9002], "ra": [1.0, 2.0], "dec": [0.0, 0.0]})
    obj = pd.DataFrame({"diaObjectId": [5], "ra": [1.0 + 0.2 * ARCSEC], "dec": [0.0]})
    ids, res = assign_dia_object_ids(src, obj)
    assert ids.tolist() == [5, 9002]
    assert res.unmatched.tolist() == [1]


def test_empty_inputs_and_bad_columns():
    src = pd.DataFrame({"ra": [1.0], "dec": [0.0]})
    empty_obj = pd.DataFrame({"diaObjectId": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0)})
    matches, unmatched = associate(src, empty_obj)
    assert len(matches) == 0 and unmatched.tolist() == [0]
    with pytest.raises(KeyError, match="diaObjectId"):
        associate(src, pd.DataFrame({"ra": [1.0], "dec": [0.0]}))


def test_scale_1e4_sources_against_1e6_objects_is_correct():
    """The 1e4 x 1e6 case of the timing target (timing itself: benchmarks/bench_association.py)."""
    rng = np.random.default_rng(5)
    n_obj, n_src = 1_000_000, 10_000
    # 1e6 objects on 16 deg²: 0.02 objects per arcsec², little confusion at 1".
    obj = pd.DataFrame({"diaObjectId": np.arange(n_obj, dtype=np.int64) + 10**9,
                        "ra": rng.uniform(150, 154, n_obj), "dec": rng.uniform(0, 4, n_obj)})
    truth = rng.choice(n_obj, n_src - 1000, replace=False)
    err = 0.1
    ra = np.concatenate([obj.ra.values[truth], rng.uniform(150, 154, 1000)])
    dec = np.concatenate([obj.dec.values[truth], rng.uniform(0, 4, 1000)])
    src = pd.DataFrame({"ra": ra + rng.normal(0, err, n_src) * ARCSEC / np.cos(np.deg2rad(dec)),
                        "dec": dec + rng.normal(0, err, n_src) * ARCSEC,
                        "raErr": err * ARCSEC, "decErr": err * ARCSEC})
    res = associate(src, obj)
    m = res.matches
    assert m.object_row.is_unique and m.source_row.is_unique
    assert (m.distance_arcsec <= 1.0).all()
    true_rows = m.source_row < n_src - 1000
    correct = m.object_row[true_rows].to_numpy() == truth[m.source_row[true_rows].to_numpy()]
    assert correct.mean() > 0.998
    assert true_rows.sum() >= 0.999 * (n_src - 1000)
    # random sources match only by chance coincidence (π·0.02 ≈ 6%)
    assert (~true_rows).sum() < 0.12 * 1000
