"""C4: under the policy regime, c decays over training while v^2 and -h_mm persist;
the step where the harm threshold 2 lambda*_t falls below each fixed lambda
(docs/theory.md s.5)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ... import regimes
from ...occ_analysis import correlation_ci
from ...regimes import fixed_lambda
from ...schema import FIGURE_FILES
from .. import stats
from ..data import diag_steps
from ..stats import ratio_of_means_ci
from .base import Claim, InsufficientData, Part, Threshold, at_least, at_most, ci, numeric


def crossing_steps(steps: pd.DataFrame, arms) -> pd.DataFrame:
    """Per policy arm and seed, the first measured step where 2 lambda*_t (the
    harm threshold) falls below the arm's fixed lambda (NaN: never)."""
    rows = []
    for arm in arms:
        for seed, run in steps[steps["arm"] == arm.label].groupby("seed"):
            below = run[numeric(run, "harm_threshold") < fixed_lambda(arm.lam)]
            rows.append({"arm": arm.label, "lambda": arm.lam, "seed": seed,
                         "crossing_step": below["step"].min() if len(below) else None,
                         "last_measured_step": run["step"].max()})
    frame = pd.DataFrame(rows, columns=["arm", "lambda", "seed", "crossing_step", "last_measured_step"])
    return frame.astype({"crossing_step": "Int64"})


class PolicyDecay(Claim):
    id = "C4"
    statement = "Policy: c decays over training while v² and −h_mm persist; step where 2λ*_t falls below each fixed λ"
    figure = f"{FIGURE_FILES['F2']}, {FIGURE_FILES['F6']}"
    statistic = "Spearman ρ(step, c)"
    detail_tables = ("c4_crossings",)

    MIN_STEPS = Threshold(4, "distinct measured policy steps needed")
    MAX_DECAY_RHO = Threshold(0.0, "Spearman ρ(step, c) over the policy arms must lie below this (c decays)")
    MIN_PERSIST_RATIO = Threshold(
        0.5, "late/early ratio of mean v² and of mean −h_mm (last vs first third of the measured steps) for 'persists'"
    )

    def test(self, job, details):
        arms = job.arms_of(regimes.POLICY)
        if not arms:
            raise InsufficientData("no policy arm in this job")
        steps = diag_steps(job, "claim C4", columns=("c", "v2", "h_mm", "harm_threshold"), arms=arms)
        rows = steps[np.isfinite(numeric(steps, "c"))]
        details["c4_crossings"] = crossings = crossing_steps(rows, arms)
        measured = np.sort(rows["step"].unique())
        if len(measured) < self.MIN_STEPS:
            raise InsufficientData(f"only {len(measured)} measured policy steps (need {self.MIN_STEPS})", len(rows))
        rho = correlation_ci(rows["step"].to_numpy(float), numeric(rows, "c").to_numpy(), "spearman",
                             stats.N_RESAMPLES, stats.CONFIDENCE, stats.SEED)
        third = max(len(measured) // 3, 1)
        early, late = rows[rows["step"].isin(measured[:third])], rows[rows["step"].isin(measured[-third:])]
        parts = [Part(f"Spearman ρ(step, c) {ci(rho['spearman'], rho['spearman_lo'], rho['spearman_hi'])} vs "
                      f"{self.MAX_DECAY_RHO}", at_most(rho["spearman_lo"], rho["spearman_hi"], self.MAX_DECAY_RHO))]
        for column, name, sign in (("v2", "v²", 1.0), ("h_mm", "−h_mm", -1.0)):
            ratio, low, high = ratio_of_means_ci(sign * numeric(early, column), sign * numeric(late, column))
            parts.append(Part(f"late/early mean {name} {ci(ratio, low, high)} vs {self.MIN_PERSIST_RATIO}",
                              at_least(low, high, self.MIN_PERSIST_RATIO)))
        crossing_text = ", ".join(
            f"{arm}: {group.notna().sum()}/{len(group)} seeds"
            + (f" (median step {group.median():g})" if group.notna().any() else "")
            for arm, group in crossings.groupby("arm", sort=False)["crossing_step"]
        )
        return self.result(parts, rho["spearman"], rho["spearman_lo"], rho["spearman_hi"], len(rows),
                           f"Spearman ρ(step, c) over policy steps; seeds where 2λ*_t falls below λ: {crossing_text}")
