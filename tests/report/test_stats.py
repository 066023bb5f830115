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


def test_bootstrap_ci_is_seeded_and_needs_three_values():
    values = np.arange(20.0)
    first, second = stats.bootstrap_ci(values), stats.bootstrap_ci(values)
    assert first == second and first[0] == 9.5 and first[1] < 9.5 < first[2] and first[3] == 20
    point, low, high, n = stats.bootstrap_ci([1.0, 2.0])
    assert (point, n) == (1.5, 2) and np.isnan(low) and np.isnan(high)


def test_proportion_ci_is_wilsons():
    frac, low, high = stats.proportion_ci(8, 10)
    z = scipy_stats.norm.ppf(0.975)
    centre, half = (0.8 + z**2 / 20) / (1 + z**2 / 10), z / (1 + z**2 / 10) * np.sqrt(0.8 * 0.2 / 10 + z**2 / 400)
    assert frac == 0.8 and low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert all(np.isnan(stats.proportion_ci(0, 0)))


def test_ratio_of_means_needs_a_positive_early_mean():
    ratio, low, high = stats.ratio_of_means_ci([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert ratio == 2.0 and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert all(np.isnan(stats.ratio_of_means_ci([-1.0, -1.0], [1.0, 1.0])))
    assert all(np.isnan(stats.ratio_of_means_ci([1.0], [1.0, 2.0])))


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
