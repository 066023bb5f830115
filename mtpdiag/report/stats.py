"""Intervals the figures and claims share: t-intervals over seeds, percentile
bootstrap over steps (seeded), Wilson intervals for fractions and the log-log
slope of the Taylor residual. Each returns NaN bounds, never a made-up
interval, when the data cannot give one."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # bootstrap resamples (module global, read at call time: a caller may lower it for speed)
SEED = 0


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``: Student t over independent
    replicates (seeds). Fewer than 2 values: NaN bounds."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, np.nan, np.nan, n
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return mean, float(mean - half), float(mean + half), n


def seed_bands(frame: pd.DataFrame, value: str, by=("arm", "step")) -> pd.DataFrame:
    """Mean over seeds and its 95% t-interval for each ``by`` group: columns
    ``*by, mean, low, high, n`` (``n`` seeds with a finite value)."""
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        mean, low, high, n = t_interval(pd.to_numeric(group[value], errors="coerce"))
        if n:
            keys = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
            rows.append({**keys, "mean": mean, "low": low, "high": high, "n": n})
    return pd.DataFrame(rows, columns=[*by, "mean", "low", "high", "n"])


def bootstrap_ci(values, statistic=np.mean, confidence: float = CONFIDENCE,
                 seed: int = SEED) -> tuple[float, float, float, int]:
    """(statistic, low, high, n): percentile bootstrap over the finite ``values``
    with a seeded generator. Fewer than 3 values: NaN bounds."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    point = float(statistic(x))
    if n < 3:
        return point, np.nan, np.nan, n
    with warnings.catch_warnings():  # a constant sample gives a zero-width interval, which is right here
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((x,), statistic, n_resamples=N_RESAMPLES, confidence_level=confidence,
                                 method="percentile", rng=np.random.default_rng(seed))
    return point, float(result.confidence_interval.low), float(result.confidence_interval.high), n


def ratio_of_means_ci(early, late, confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float, float]:
    """mean(late) / mean(early) with a two-sample percentile bootstrap interval;
    NaN when either sample has fewer than 2 values or the early mean is not positive."""
    a = np.asarray(early, dtype=float)
    b = np.asarray(late, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 2 or b.size < 2 or not a.mean() > 0:
        return np.nan, np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with early mean 0 gives inf, kept out below
        result = stats.bootstrap((a, b), lambda x, y: y.mean() / x.mean(), n_resamples=N_RESAMPLES,
                                 confidence_level=confidence, method="percentile", vectorized=False,
                                 rng=np.random.default_rng(seed))
    return float(b.mean() / a.mean()), float(result.confidence_interval.low), float(result.confidence_interval.high)


def proportion_ci(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(fraction, low, high), Wilson interval; NaN for n = 0."""
    if n == 0:
        return np.nan, np.nan, np.nan
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return successes / n, float(ci.low), float(ci.high)


def loglog_slope(frame: pd.DataFrame, x: str, y: str, series, confidence: float = CONFIDENCE,
                 seed: int = SEED) -> dict:
    """The common slope of log y on log x across series, each with its own intercept
    (within-series least squares), and a cluster bootstrap interval that resamples
    whole series (``series``: the columns that name one). Rows with non-positive or
    non-finite x or y are left out and counted.

    Returns ``slope, low, high, n_series, n_points, n_dropped`` and ``intercept`` (the
    pooled line through the mean of log x and log y, for plotting).
    """
    series = list(series)
    values = frame[[*series, x, y]].copy()
    values[x] = pd.to_numeric(values[x], errors="coerce")
    values[y] = pd.to_numeric(values[y], errors="coerce")
    usable = (values[x] > 0) & (values[y] > 0) & np.isfinite(values[x]) & np.isfinite(values[y])
    kept = values[usable].assign(lx=lambda f: np.log(f[x]), ly=lambda f: np.log(f[y]))
    groups = [g for _, g in kept.groupby(series, sort=True) if g["lx"].nunique() >= 2]
    result = {"slope": np.nan, "low": np.nan, "high": np.nan, "intercept": np.nan, "n_series": len(groups),
              "n_points": int(sum(len(g) for g in groups)), "n_dropped": int((~usable).sum())}
    if not groups:
        return result
    # per series: sum of centred x*y and x*x, so a resample of series is a weighted sum
    sxy = np.array([((g.lx - g.lx.mean()) * (g.ly - g.ly.mean())).sum() for g in groups])
    sxx = np.array([((g.lx - g.lx.mean()) ** 2).sum() for g in groups])
    slope = float(sxy.sum() / sxx.sum())
    pooled = pd.concat(groups)
    result.update(slope=slope, intercept=float(pooled.ly.mean() - slope * pooled.lx.mean()))
    if len(groups) >= 3:
        n = len(groups)
        counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), N_RESAMPLES)  # series drawn per resample
        resampled = (counts @ sxy) / (counts @ sxx)
        tail = 100 * (1 - confidence) / 2
        result["low"], result["high"] = (float(v) for v in np.percentile(resampled, [tail, 100 - tail]))
    return result
