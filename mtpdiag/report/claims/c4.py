"""C4: under the policy regime, c decays over training while v^2 and -h_mm persist;
the step where the harm threshold 2 lambda*_t falls below each fixed lambda
(docs/theory.md s.5)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ... import regimes
from ...regimes import fixed_lambda
from ...schema import FIGURE_FILES
from ..data import diag_steps
from ..stats import over_seeds, per_seed, spearman
from .base import REPORTED, Claim, InsufficientData, Part, Threshold, at_least, at_most, numeric, seed_ci


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


def late_over_early(rows: pd.DataFrame, column: str, sign: float) -> float:
    """mean(sign * column) over the last third of the measured steps over that of the first
    third; NaN when the early mean is not positive."""
    measured = np.sort(rows["step"].unique())
    third = max(len(measured) // 3, 1)
    early = (sign * numeric(rows[rows["step"].isin(measured[:third])], column)).mean()
    late = (sign * numeric(rows[rows["step"].isin(measured[-third:])], column)).mean()
    return late / early if early > 0 else np.nan


class PolicyDecay(Claim):
    id = "C4"
    statement = "Policy: c decays over training while v² and −h_mm persist; step where 2λ*_t falls below each fixed λ"
    figure = f"{FIGURE_FILES['F2']}, {FIGURE_FILES['F6']}"
    statistic = "per-seed Spearman ρ(step, c) (policy)"
    detail_tables = ("c4_crossings",)

    MIN_STEPS = Threshold(4, "distinct measured policy steps a seed needs")
    MAX_DECAY_RHO = Threshold(0.0, "mean over seeds of the per-seed Spearman ρ(step, c) must lie below this (decays)")
    MIN_PERSIST_RATIO = Threshold(
        0.5, "per-seed late/early ratio of mean v² and of mean −h_mm (last vs first third of the measured steps), "
             "mean over seeds, for 'persists'"
    )

    def test(self, job, details):
        arms = job.arms_of(regimes.POLICY)
        if not arms:
            raise InsufficientData("no policy arm in this job")
        steps = diag_steps(job, "claim C4", columns=("c", "v2", "h_mm", "harm_threshold"), arms=arms)
        rows = steps[np.isfinite(numeric(steps, "c"))]
        details["c4_crossings"] = crossings = crossing_steps(rows, arms)
        # a seed's policy arms (and their steps) are one unit
        enough = rows.groupby("seed").filter(lambda r: r["step"].nunique() >= self.MIN_STEPS)
        if enough.empty:
            raise InsufficientData(f"no seed has {self.MIN_STEPS} measured policy steps "
                                   f"(most: {rows.groupby('seed')['step'].nunique().max() if len(rows) else 0})")
        rho = over_seeds(per_seed(enough, lambda r: spearman(r["step"], numeric(r, "c"))))
        parts = [self.seed_part(f"{self.statistic} {seed_ci(rho)} vs {self.MAX_DECAY_RHO}", rho,
                                at_most(rho.low, rho.high, self.MAX_DECAY_RHO), statistic=self.statistic,
                                margin=f"< {self.MAX_DECAY_RHO}", threshold="MAX_DECAY_RHO")]
        for column, name, sign in (("v2", "v²", 1.0), ("h_mm", "−h_mm", -1.0)):
            ratio = over_seeds(per_seed(enough, lambda r, c=column, s=sign: late_over_early(r, c, s)))
            statistic = f"per-seed late/early mean {name}"
            parts.append(self.seed_part(f"{statistic} {seed_ci(ratio)} vs {self.MIN_PERSIST_RATIO}", ratio,
                                        at_least(ratio.low, ratio.high, self.MIN_PERSIST_RATIO),
                                        key=column, statistic=statistic, margin=f"≥ {self.MIN_PERSIST_RATIO}",
                                        threshold="MIN_PERSIST_RATIO"))
        crossing_text = ", ".join(
            f"{arm}: {group.notna().sum()}/{len(group)} seeds"
            + (f" (median step {group.median():g})" if group.notna().any() else "")
            for arm, group in crossings.groupby("arm", sort=False)["crossing_step"]
        )
        parts.append(Part(f"seeds where 2λ*_t falls below λ: {crossing_text}", REPORTED, decides=False))
        return self.result(parts)
