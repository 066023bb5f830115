"""How well an online lambda_t tracks the measured optimum lambda*_t (docs/theory.md s.6, C5).

Pure functions over a run's metrics (pandas DataFrames, one row per step or per
mini-batch). Column names are arguments; the defaults are the trainer's
(``lambda_0`` per head, ``calib_*`` from the calibrator's info) and the Probe's
(``lambda_star_taylor``, ``lambda_star_meas``, ...). Rows where either value
is missing or non-finite (steps the diagnostics did not run on, directions with no
lambda*) are left out, and every result says how many rows it used.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .schema import LAMBDA_PREFIX, calib_column, lambda_column


def _finite_pairs(frame: pd.DataFrame, x_col: str, y_col: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in (x_col, y_col) if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the frame; it has {sorted(frame.columns)}")
    x = pd.to_numeric(frame[x_col], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(frame[y_col], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def head_lambda_columns(frame: pd.DataFrame) -> list[str]:
    """The per-head lambda_t columns (``lambda_0``, ``lambda_1``, ...) of a trainer table."""
    return [c for c in frame.columns if c.startswith(LAMBDA_PREFIX) and c.removeprefix(LAMBDA_PREFIX).isdigit()]


CORRELATIONS = {"spearman": stats.spearmanr, "pearson": stats.pearsonr}


def correlation_ci(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "spearman",
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict:
    """The correlation of paired samples and a paired percentile-bootstrap CI.

    Resamples whose correlation is undefined (a constant resample, e.g. mostly
    lambda_t = 0 rows) are left out of the percentile and counted in
    ``n_degenerate``; fewer than 3 pairs give NaN throughout.
    """
    if method not in CORRELATIONS:
        raise ValueError(f"method={method!r}: choose one of {sorted(CORRELATIONS)}")
    corr = CORRELATIONS[method]
    nan = {method: np.nan, f"{method}_lo": np.nan, f"{method}_hi": np.nan, "n_degenerate": 0}
    if len(x) < 3:
        return nan
    with warnings.catch_warnings():  # constant inputs and degenerate resamples are counted, not warned
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        point = float(corr(x, y).statistic)
        result = stats.bootstrap(
            (x, y), lambda a, b: corr(a, b).statistic, paired=True, vectorized=False, n_resamples=n_resamples,
            confidence_level=confidence_level, method="percentile", rng=np.random.default_rng(seed),
        )
    distribution = result.bootstrap_distribution
    n_degenerate = int(np.isnan(distribution).sum())
    if n_degenerate == distribution.size:
        return {**nan, method: point, "n_degenerate": n_degenerate}
    tail = 100 * (1 - confidence_level) / 2
    lo, hi = np.nanpercentile(distribution, [tail, 100 - tail])
    return {method: point, f"{method}_lo": float(lo), f"{method}_hi": float(hi), "n_degenerate": n_degenerate}


def best_scale(lambda_t: np.ndarray, lambda_star: np.ndarray) -> tuple[float, float]:
    """The s minimising sum_t (lambda*_t - s * lambda_t)^2 (least squares through the
    origin): s = <lambda_t, lambda*> / |lambda_t|^2. Returns (s, R^2 about 0), where
    R^2 = 1 - residual / sum lambda*^2; NaN when every lambda_t is 0."""
    denominator = float(lambda_t @ lambda_t)
    if denominator == 0:
        return np.nan, np.nan
    scale = float(lambda_t @ lambda_star) / denominator
    total = float(lambda_star @ lambda_star)
    residual = float(((lambda_star - scale * lambda_t) ** 2).sum())
    return scale, (1 - residual / total if total > 0 else np.nan)


def tracking_summary(
    frame: pd.DataFrame,
    lambda_col: str = lambda_column(0),
    star_col: str = "lambda_star_taylor",
    lambda_plus: float | None = None,
    lambda_plus_col: str = calib_column("lambda_plus"),
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict:
    """How ``lambda_col`` tracks ``star_col`` over the rows that have both.

    * ``spearman`` / ``pearson`` with bootstrap CIs (``*_lo``, ``*_hi``);
    * ``ratio_median``, ``ratio_q25``, ``ratio_q75``, ``ratio_iqr`` of lambda* / lambda_t
      over rows with lambda_t != 0 (``n_ratio`` of them): since lambda_plus is one
      global scale, a proxy that tracks lambda* well has a narrow ratio;
    * ``sign_agreement``: the fraction of rows where sign(lambda_t) == sign(lambda*)
      (a lambda_t of exactly 0 agrees with nothing but a 0);
    * ``best_lambda_plus``: lambda_plus times the least-squares scale of
      :func:`best_scale` (minimising sum_t (lambda*_t - s lambda_t)^2), with its ``fit_r2``.
      It assumes lambda_t = lambda_plus * proxy_t, i.e. no clip and no EMA.
      lambda_plus comes from ``lambda_plus`` if given, else from ``lambda_plus_col``
      (the calibrator logs it), else 1.
    """
    lam, star = _finite_pairs(frame, lambda_col, star_col)
    if lambda_plus is None:
        used = frame[lambda_plus_col].dropna().unique() if lambda_plus_col in frame.columns else [1.0]
        if len(used) > 1:
            raise ValueError(f"{lambda_plus_col} takes several values {sorted(used)}: pass lambda_plus= explicitly")
        lambda_plus = float(used[0]) if len(used) else 1.0
    nonzero = lam != 0
    ratio = star[nonzero] / lam[nonzero]
    q25, median, q75 = np.percentile(ratio, [25, 50, 75]) if ratio.size else (np.nan,) * 3
    scale, fit_r2 = best_scale(lam, star)
    row = {
        "lambda_col": lambda_col,
        "star_col": star_col,
        "n": int(lam.size),
        "n_rows": int(len(frame)),
    }
    for method in ("spearman", "pearson"):
        ci = correlation_ci(lam, star, method, n_resamples, confidence_level, seed)
        row.update({k if k != "n_degenerate" else f"{method}_n_degenerate": v for k, v in ci.items()})
    row.update(
        ratio_median=float(median), ratio_q25=float(q25), ratio_q75=float(q75), ratio_iqr=float(q75 - q25),
        n_ratio=int(ratio.size),
        sign_agreement=float((np.sign(lam) == np.sign(star)).mean()) if lam.size else np.nan,
        lambda_plus=lambda_plus, best_lambda_plus=lambda_plus * scale, fit_r2=fit_r2,
    )
    return row


def tracking_table(
    frame: pd.DataFrame,
    lambda_cols: list[str] | None = None,
    star_cols: list[str] | None = None,
    **options,
) -> pd.DataFrame:
    """:func:`tracking_summary` for every (lambda column, lambda* column) pair: one row each.

    Defaults: every ``lambda_<k>`` head column, and every column starting with
    ``lambda_star`` (Taylor, measured, L-smooth, ...) that has a value somewhere.
    """
    if lambda_cols is None:
        lambda_cols = head_lambda_columns(frame)
    if star_cols is None:
        star_cols = [c for c in frame.columns if c.startswith("lambda_star") and frame[c].notna().any()]
    if not lambda_cols or not star_cols:
        raise ValueError(
            f"no lambda_t columns ({lambda_cols}) or no lambda* columns ({star_cols}) to compare: run the occ regime "
            "with the diagnostics hook on, or pass lambda_cols= / star_cols="
        )
    return pd.DataFrame([tracking_summary(frame, lc, sc, **options) for lc in lambda_cols for sc in star_cols])


def minibatch_summary(
    minibatches: pd.DataFrame,
    columns: list[str] | None = None,
    by: str = "minibatch",
    zero_tol: float = 1e-6,
) -> pd.DataFrame:
    """The distribution of each column per mini-batch index (long format: one row per
    (index, column)): count, mean, median, quartiles, median |value| and the fraction
    with |value| <= ``zero_tol``. Measures the mini-batch effect (delta_RL ~ 0, so
    lambda_t ~ 0, on the first mini-batch after pi_old is recomputed) instead of
    assuming it. Defaults: the ``lambda_<k>`` columns and the calibrator's ``c_hat``,
    ``r_hat2`` (|delta_RL|^2) and ``v_hat2`` columns.
    """
    if by not in minibatches.columns:
        raise KeyError(f"column {by!r} is not in the frame: pass the per-mini-batch table (its rows carry {by!r})")
    if columns is None:
        wanted = tuple(calib_column(key) for key in ("c_hat", "r_hat2", "v_hat2"))
        heads = head_lambda_columns(minibatches)
        columns = [c for c in minibatches.columns if c in heads or c.startswith(wanted)]
    rows = []
    for index, group in minibatches.groupby(by, sort=True):
        for column in columns:
            values = pd.to_numeric(group[column], errors="coerce").dropna().to_numpy(dtype=float)
            q25, median, q75 = np.percentile(values, [25, 50, 75]) if values.size else (np.nan,) * 3
            rows.append({
                by: index, "column": column, "n": int(values.size),
                "mean": float(values.mean()) if values.size else np.nan,
                "median": float(median), "q25": float(q25), "q75": float(q75),
                "median_abs": float(np.median(np.abs(values))) if values.size else np.nan,
                "frac_zero": float((np.abs(values) <= zero_tol).mean()) if values.size else np.nan,
            })
    return pd.DataFrame(rows)
