"""C7: under AdamW, the frozen-preconditioner lambda*_precond tracks the
optimizer-faithful lambda*_meas of the update actually taken (docs/theory.md s.6, s.10)."""
from __future__ import annotations

import numpy as np

from ...schema import FIGURE_FILES
from ..data import ADAMW, OBJECTIVE
from ..stats import over_seeds, per_seed, spearman
from .base import REPORTED, Claim, InsufficientData, Threshold, at_least, numeric, seed_ci



class PreconditionedTracking(Claim):
    id = "C7"
    statement = "AdamW: λ*_precond tracks λ*_meas of the update taken (rank correlation over mini-batches)"
    figure = FIGURE_FILES["F3"]
    statistic = "per-seed Spearman ρ(λ*_precond, λ*_meas) over AdamW mini-batches"

    MIN_ROWS = Threshold(5, "AdamW mini-batch updates with both λ*_precond and λ*_meas a seed needs for its ρ")
    MIN_RHO = Threshold(0.5, "mean over seeds of the per-seed Spearman ρ(λ*_precond, λ*_meas) for 'tracks'")

    def test(self, job, details):
        steps = job.table("diag_steps", columns=("optimizer", "lambda_star_precond", "lambda_star_meas"),
                          needed_for="claim C7")
        adamw = steps[(steps["optimizer"].astype(str).str.lower() == ADAMW) & (steps["objective"] == OBJECTIVE)]
        if adamw.empty:
            raise InsufficientData(f"no AdamW arm in this job (optimizers: {sorted(steps['optimizer'].dropna().unique())})")
        precond, meas = numeric(adamw, "lambda_star_precond"), numeric(adamw, "lambda_star_meas")
        rows = adamw[np.isfinite(precond) & np.isfinite(meas)].assign(
            precond=precond, meas=meas, ratio=precond / meas.where(meas != 0))
        rho = over_seeds(per_seed(rows, lambda r: spearman(r["precond"], r["meas"])
                                  if len(r) >= self.MIN_ROWS else np.nan))
        ratio = over_seeds(per_seed(rows, lambda r: r["ratio"].median()))
        parts = [
            self.seed_part(f"{self.statistic} {seed_ci(rho)} vs {self.MIN_RHO} ({len(rows)} updates)", rho,
                           at_least(rho.low, rho.high, self.MIN_RHO), statistic=self.statistic,
                           margin=f"≥ {self.MIN_RHO}", threshold="MIN_RHO"),
            self.seed_part(f"per-seed median λ*_precond/λ*_meas {seed_ci(ratio)}", ratio, REPORTED, key="ratio",
                           statistic="per-seed median λ*_precond/λ*_meas (AdamW)", decides=False),
        ]
        return self.result(parts)
