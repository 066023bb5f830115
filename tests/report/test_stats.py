"""The intervals of mtpdiag/report/stats.py against their textbook values, and NaN
(never a made-up interval) where the data cannot give one."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mtpdiag.report import stats
from mtpdiag.schema import ETA_SWEEP_SERIES


def test_t_interval_is_students_over_the_finite_values():
    mean, low, high, n = stats.t_interval([1.0, 2.0, 3.0, np.nan])
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sample sd of 1, 2, 3 is 1
    assert (mean, n) == (2.0, 3) and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    mean, low, high, n = stats.t_interval([5.0])
    assert (mean, n) == (5.0, 1) and np.isnan(low) and np.isnan(high)
    mean, _, _, n = stats.t_interval([])
    assert n == 0 and np.isnan(mean)


def test_seed_bands_average_over_seeds_per_group():
    frame = pd.DataFrame({"arm": ["a"] * 4, "step": [1, 1, 2, 2], "seed": [0, 1, 0, 1], "x": [1.0, 3.0, 5.0, np.nan]})
    bands = stats.seed_bands(frame, "x")
    assert bands[["arm", "step", "mean", "n"]].to_dict("list") == {"arm": ["a", "a"], "step": [1, 2],
                                                                   "mean": [2.0, 5.0], "n": [2, 1]}
    assert np.isnan(bands["low"].iloc[1])  # one seed: no band


def test_over_seeds_gives_the_95_and_the_tost_90_percent_t_intervals():
    interval = stats.over_seeds([1.0, 2.0, 3.0, np.nan])
    half95, half90 = (scipy_stats.t.ppf(q, 2) / np.sqrt(3) for q in (0.975, 0.95))
    assert (interval.estimate, interval.n) == (2.0, 3)
    assert (interval.low, interval.high) == (pytest.approx(2 - half95), pytest.approx(2 + half95))
    assert (interval.low90, interval.high90) == (pytest.approx(2 - half90), pytest.approx(2 + half90))
    one = stats.over_seeds([4.0])
    assert one.n == 1 and np.isnan([one.low, one.high, one.low90, one.high90]).all()


def test_per_seed_is_one_value_per_seed_and_drops_non_finite_ones():
    frame = pd.DataFrame({"seed": [0, 0, 1, 1, 2], "arm": ["a", "b", "a", "b", "a"], "x": [1.0, 3.0, 5.0, 7.0, np.nan]})
    values = stats.per_seed(frame, lambda rows: rows["x"].mean())
    assert values.to_dict() == {0: 2.0, 1: 6.0}  # seed 2 has no finite value


def test_spearman_needs_three_finite_pairs_and_a_varying_input():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert np.isnan(stats.spearman([1, 2, np.nan], [1, 2, 3])) and np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_loglog_slope_recovers_the_power_across_series_with_their_own_intercepts():
    eta = np.geomspace(1e-3, 1e-1, 5)
    rows = [{"arm": "p", "seed": seed, "step": 1, "lambda": lam, "eta": e, "residual": lam * (1 + seed) * e**3}
            for seed in (0, 1) for lam in (0.5, 1.0, 2.0) for e in eta]
    rows.append({"arm": "p", "seed": 0, "step": 1, "lambda": 9.0, "eta": 0.01, "residual": 0.0})  # left out, counted
    fit = stats.loglog_slope(pd.DataFrame(rows), "eta", "residual", ETA_SWEEP_SERIES)
    assert fit["slope"] == pytest.approx(3.0) and fit["low"] == pytest.approx(3.0) and fit["high"] == pytest.approx(3.0)
    assert (fit["n_series"], fit["n_points"], fit["n_dropped"]) == (6, 30, 1)
    two = stats.loglog_slope(pd.DataFrame(rows[:10]), "eta", "residual", ETA_SWEEP_SERIES)
    assert two["n_series"] == 2 and two["slope"] == pytest.approx(3.0) and np.isnan(two["low"])  # < 3 series: no CI


def test_paired_seeds_needed_matches_the_textbook_one_sample_t_test():
    from mtpdiag.report.stats import paired_seeds_needed

    assert paired_seeds_needed(1.0, 1.0) == 10  # Cohen's d = 1, two-sided 0.05, 80% power: n = 10
    assert paired_seeds_needed(1.0, 0.5) == 34  # d = 0.5: n = 34
    assert paired_seeds_needed(0.004, 0.028) == 3  # d = 7, where scipy's far tail of the wrong side is NaN
    assert paired_seeds_needed(0.0, 0.1) != paired_seeds_needed(0.0, 0.1)  # NaN: no spread, no estimate
    assert paired_seeds_needed(1.0, 1e-3, most=50) == float("inf")
