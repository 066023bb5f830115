"""C2: on lambda >= 0 (the paper's domain), the L-smooth expression with L the
curvature actually met along the step lower-bounds the measured Delta, and how far
its lambda*_smooth lies from lambda*_meas (docs/theory.md s.3, s.10)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...diagnostics.quantities import lambda_star_smooth, smooth_delta
from ...schema import FIGURE_FILES
from ..data import OBJECTIVE
from ..stats import over_seeds, per_seed
from .base import REPORTED, Claim, InsufficientData, Threshold, at_least, numeric, seed_ci

KEYS = ["arm", "seed", "step", "minibatch", "objective"]


def _optional(value):
    return None if value is None or not np.isfinite(value) else float(value)


def curvature_met(curve: pd.DataFrame, step: pd.Series) -> float:
    """The largest secant curvature of -Delta along the MTP displacement eta*lambda*m over
    the curve's lambda > 0 points, -2 (Delta(lambda) - a lambda) / (eta^2 lambda^2 v^2), with
    a = Delta'(0) the Taylor slope; floored at 0 (L-smoothness needs L >= 0)."""
    lam = curve["lambda"].to_numpy(float)
    delta = curve["delta_meas"].to_numpy(float)
    secant = -2 * (delta - step["a"] * lam) / (step["lr"] ** 2 * lam**2 * step["v2"])
    return float(max(np.nanmax(secant), 0.0)) if len(secant) else np.nan


def bounded_curves(steps: pd.DataFrame, curves: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per measured curve on lambda >= 0: the curvature met (L_met), whether the L-smooth
    expression with L = L_met lies below Delta_meas at every lambda >= 0 point (within
    ``tolerance`` times the curve's largest |Delta_meas|), and lambda*_smooth(L_met) / lambda*_meas."""
    rows = []
    merged = steps.set_index(KEYS)
    for key, curve in curves[curves["lambda"] >= 0].groupby(KEYS, sort=False):
        if key not in merged.index:
            continue
        step = merged.loc[key]
        positive = curve[curve["lambda"] > 0]
        L = curvature_met(positive, step)
        if not np.isfinite(L):
            continue
        c_eval = _optional(step.get("c_eval"))
        bound = np.array([smooth_delta(step["lr"], step["c"], c_eval, L, step["v2"], lam) for lam in curve["lambda"]])
        slack = tolerance * curve["delta_meas"].abs().max()
        star = lambda_star_smooth(step["lr"], step["c"], c_eval, L, step["v2"])
        rows.append({**dict(zip(KEYS, key, strict=True)), "L_met": L,
                     "bounded": bool((bound <= curve["delta_meas"].to_numpy(float) + slack).all()),
                     "smooth_over_meas": np.nan if star is None else star / step["lambda_star_meas"]})
    return pd.DataFrame(rows, columns=[*KEYS, "L_met", "bounded", "smooth_over_meas"])


class SmoothBound(Claim):
    id = "C2"
    statement = ("on λ ≥ 0, the L-smooth expression with L = the curvature met along the step lower-bounds Δ; "
                 "distance of λ*_smooth from λ*_meas")
    figure = FIGURE_FILES["F1"]
    statistic = "per-seed share of curves above the L-smooth bound (λ ≥ 0, L = curvature met)"

    MIN_CURVES = Threshold(3, "measured curves a seed needs for its share")
    REL_TOLERANCE = Threshold(1e-3, "slack of the bound per point, relative to the curve's largest |Δ_meas|")
    MIN_BOUNDED_SHARE = Threshold(
        0.9, "mean over seeds of each seed's share of curves lying above the L-smooth bound (95% t-interval)"
    )

    def test(self, job, details):
        steps = job.table("diag_steps", columns=("a", "c", "v2", "lambda_star_meas"), needed_for="claim C2")
        curves = job.table("diag_curves", needed_for="claim C2")
        steps, curves = steps[steps["objective"] == OBJECTIVE], curves[curves["objective"] == OBJECTIVE]
        for column in ("a", "c", "v2", "lr", "lambda_star_meas", *(["c_eval"] if "c_eval" in steps else [])):
            steps = steps.assign(**{column: numeric(steps, column)})
        steps = steps[np.isfinite(steps["a"]) & (steps["v2"] > 0)]
        table = bounded_curves(steps, curves, self.REL_TOLERANCE)
        if table.empty:
            raise InsufficientData("no measured curve on λ ≥ 0 with the Taylor slope a and v² > 0")
        share = over_seeds(per_seed(table, lambda r: r["bounded"].mean() if len(r) >= self.MIN_CURVES else np.nan))
        distance = over_seeds(per_seed(table, lambda r: r["smooth_over_meas"].median()))
        text = (f"{self.statistic} {seed_ci(share)} vs {self.MIN_BOUNDED_SHARE} "
                f"({int(table['bounded'].sum())}/{len(table)} curves, median L_met {table['L_met'].median():.3g})")
        parts = [
            self.seed_part(text, share, at_least(share.low, share.high, self.MIN_BOUNDED_SHARE),
                           statistic=self.statistic, margin=f"≥ {self.MIN_BOUNDED_SHARE}",
                           threshold="MIN_BOUNDED_SHARE"),
            self.seed_part(f"median λ*_smooth/λ*_meas {seed_ci(distance)}", distance, REPORTED, key="distance",
                           statistic="median λ*_smooth(L_met)/λ*_meas", decides=False),
        ]
        return self.result(parts)
