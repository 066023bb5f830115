"""C2: the L-smooth expression lower-bounds Delta where L is at least the curvature
met, and how far lambda*_smooth lies from lambda*_meas (docs/theory.md s.3)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...schema import FIGURE_FILES
from ..data import STAR_COLUMNS, diag_steps, first_minibatch
from ..stats import bootstrap_ci, proportion_ci
from .base import INCONCLUSIVE, Claim, InsufficientData, Part, Threshold, at_least, ci, numeric


class SmoothBound(Claim):
    id = "C2"
    statement = "the L-smooth expression lower-bounds Δ when L ≥ the curvature met; distance of λ*_smooth from λ*_meas"
    figure = FIGURE_FILES["F1"]
    statistic = "fraction of curves above the L-smooth bound"

    MIN_CURVES = Threshold(5, "curves with the L-smooth expression needed to judge the bound")
    REL_TOLERANCE = Threshold(1e-3, "slack of the bound per point, relative to the curve's largest |Δ_meas|")
    MIN_BOUNDED_FRACTION = Threshold(
        0.9, "fraction of curves (with L ≥ the curvature met) lying above the L-smooth bound at every point (Wilson CI)"
    )

    def test(self, job, details):
        steps = diag_steps(job, "claim C2", columns=("L", "kappa_m", "kappa_g", "lambda_star_smooth", *STAR_COLUMNS))
        curves = job.table("diag_curves", columns=("delta_smooth",), needed_for="claim C2")
        keys = ["arm", "seed", "step", "objective"]
        curves = first_minibatch(curves)
        smooth = curves[np.isfinite(numeric(curves, "delta_smooth"))]
        merged = smooth.merge(steps[[*keys, "L", "kappa_m", "kappa_g"]], on=keys)
        if merged.empty:
            raise InsufficientData("L was not measured (run the diagnostics with top_curvature=True)")
        met = merged[["kappa_m", "kappa_g"]].apply(pd.to_numeric, errors="coerce").max(axis=1)
        eligible = merged[numeric(merged, "L") >= met]
        bounded = [
            bool((c["delta_smooth"] <= c["delta_meas"] + self.REL_TOLERANCE * c["delta_meas"].abs().max()).all())
            for _, c in eligible.groupby(keys[:3], sort=False)
        ]
        parts = []
        frac, low, high = proportion_ci(sum(bounded), len(bounded))
        if len(bounded) < self.MIN_CURVES:
            parts.append(Part(f"only {len(bounded)} curves with L ≥ the curvature met (need {self.MIN_CURVES})",
                              INCONCLUSIVE))
        else:
            parts.append(Part(f"curves above the bound {sum(bounded)}/{len(bounded)} = {ci(frac, low, high)} vs "
                              f"{self.MIN_BOUNDED_FRACTION}", at_least(low, high, self.MIN_BOUNDED_FRACTION)))
        ratio = numeric(steps, "lambda_star_smooth") / numeric(steps, "lambda_star_meas")
        median, r_low, r_high, r_n = bootstrap_ci(ratio, np.median)
        distance = f"median λ*_smooth/λ*_meas {ci(median, r_low, r_high)} over {r_n} steps"
        return self.result(parts, frac, low, high, len(bounded), f"{self.statistic}; {distance}")
