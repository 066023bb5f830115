"""C3: under the CE regime, c is about 0 (judged on the held-out c_true and on the
cross-fitted c, which carry no same-sample covariance) and h_mm < 0 (docs/theory.md
s.5, s.8, s.10)."""
from __future__ import annotations

import numpy as np

from ... import regimes
from ...schema import FIGURE_FILES
from ..stats import over_seeds, per_seed
from .base import Claim, InsufficientData, Threshold, at_least, equivalent, numeric, seed_ci


class CrossEntropyAtZero(Claim):
    id = "C3"
    statement = "CE: c is about 0 (held-out and cross-fitted) and h_mm < 0"
    figure = FIGURE_FILES["F2"]
    statistic = "mean cos(∇J_true, m) (CE)"

    COS_MARGIN = Threshold(
        0.1, "equivalence margin on the cosine: 'c is about 0' when the 90% interval over seeds of the mean cosine "
             "lies inside ±this (TOST)"
    )
    MIN_CONCAVE_SHARE = Threshold(
        0.9, "mean over seeds of each seed's share of CE rows with h_mm < 0 (95% t-interval)"
    )

    def test(self, job, details):
        arms = job.arms_of(regimes.CE)
        if not arms:
            raise InsufficientData("no CE arm in this job")
        steps = job.table("diag_steps", columns=("h_mm", "v2"), needed_for="claim C3", arms=arms)
        steps = steps[(numeric(steps, "v2") > 0)]
        margin = f"±{self.COS_MARGIN}"
        parts = []
        # c_true is c_eval on the J_true rows (against the held-out gradient); c_crossfit is on the J_batch rows
        held_out = steps[steps["objective"] == "j_true"]
        batch = steps[steps["objective"] == "j_batch"]
        cosines = (
            (None, self.statistic, held_out.assign(cosine=self._cos_true(held_out))),
            ("crossfit", "mean cos_crossfit (CE)",
             batch.assign(cosine=numeric(batch, "cos_crossfit") if "cos_crossfit" in batch else np.nan)),
        )
        for key, statistic, rows in cosines:
            interval = over_seeds(per_seed(rows, lambda r: r["cosine"].mean()))
            parts.append(self.seed_part(f"{statistic} {seed_ci(interval)} (90%: [{interval.low90:.3g}, "
                                        f"{interval.high90:.3g}]) vs {margin}", interval,
                                        equivalent(interval, -self.COS_MARGIN, self.COS_MARGIN), key=key,
                                        statistic=statistic, margin=margin, threshold="COS_MARGIN"))
        curved = batch[np.isfinite(numeric(batch, "h_mm"))]
        share = over_seeds(per_seed(curved, lambda r: (numeric(r, "h_mm") < 0).mean()))
        statistic = "per-seed share of CE rows with h_mm < 0"
        parts.append(self.seed_part(f"{statistic} {seed_ci(share)} vs {self.MIN_CONCAVE_SHARE}", share,
                                    at_least(share.low, share.high, self.MIN_CONCAVE_SHARE), key="h_mm",
                                    statistic=statistic, margin=f"≥ {self.MIN_CONCAVE_SHARE}",
                                    threshold="MIN_CONCAVE_SHARE"))
        return self.result(parts)

    @staticmethod
    def _cos_true(rows):
        """cos(∇J_true, m) = c_true / (|∇J_true| |m|) of each J_true row."""
        if "c_eval" not in rows or "eval_grad_norm" not in rows:
            return np.nan
        return numeric(rows, "c_eval") / (numeric(rows, "eval_grad_norm") * numeric(rows, "m_norm"))
