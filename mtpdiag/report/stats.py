"""Intervals the figures and claims share: t-intervals over seeds (with the 90%
interval of a TOST equivalence test beside the 95% one), per-seed statistics,
Spearman correlations and the log-log slope of the Taylor residual (and of
lambda against eta) with a seeded cluster bootstrap. Each returns NaN bounds,
never a made-up interval, when the data cannot give one."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
# TOST at alpha 0.05: two one-sided tests at 0.05 each are one (1 - 2 alpha) = 90% interval inside the margin
EQUIVALENCE_CONFIDENCE = 0.90
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


@dataclass(frozen=True)
class SeedInterval:
    """A statistic computed once per seed and its t-intervals over the seeds:
    ``estimate`` (mean over seeds), the 95% ``low, high``, the 90% ``low90, high90``
    (the TOST interval) and ``n`` seeds with a finite value. NaN bounds below 2 seeds."""

    estimate: float
    low: float
    high: float
    low90: float
    high90: float
    n: int


def over_seeds(per_seed) -> SeedInterval:
    """The t-intervals over the finite per-seed values ``per_seed`` (one value per seed)."""
    mean, low, high, n = t_interval(per_seed, CONFIDENCE)
    _, low90, high90, _ = t_interval(per_seed, EQUIVALENCE_CONFIDENCE)
    return SeedInterval(mean, low, high, low90, high90, n)


def per_seed(frame: pd.DataFrame, statistic) -> pd.Series:
    """``statistic(rows)`` of each seed's rows (all its arms, steps and mini-batches: one
    unit), indexed by seed; seeds where it is not finite are left out."""
    values = {seed: float(statistic(rows)) for seed, rows in frame.groupby("seed", sort=True)}
    series = pd.Series(values, dtype=float, name="value").rename_axis("seed")
    return series[np.isfinite(series)]


def paired_seeds_needed(sd: float, gap: float, power: float = 0.8, alpha: float = 0.05, most: int = 1000) -> float:
    """The fewest paired seeds at which a two-sided paired t-test at ``alpha`` detects a
    true mean difference ``gap`` with probability ``power``, when the per-seed differences
    have standard deviation ``sd`` (the noncentral t distribution; NaN for a non-finite or
    non-positive sd or gap, inf past ``most``)."""
    if not (np.isfinite(sd) and np.isfinite(gap) and sd > 0 and gap > 0):
        return np.nan
    for n in range(2, most + 1):
        df, shift = n - 1, gap / (sd / np.sqrt(n))
        critical = stats.t.ppf(1 - alpha / 2, df)
        wrong_side = stats.nct.cdf(-critical, df, shift)  # scipy gives NaN where it underflows far in the tail
        if stats.nct.sf(critical, df, shift) + np.nan_to_num(wrong_side) >= power:
            return float(n)
    return np.inf


def spearman(x, y) -> float:
    """Spearman rank correlation of the finite pairs; NaN below 3 pairs or on a constant input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return np.nan
    return float(stats.spearmanr(x[keep], y[keep]).statistic)


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
