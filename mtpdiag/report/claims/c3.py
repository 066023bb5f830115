"""C3: under the CE regime, c is indistinguishable from 0 and h_mm < 0 (docs/theory.md s.5)."""
from __future__ import annotations

import numpy as np

from ... import regimes
from ...schema import FIGURE_FILES
from ..data import diag_steps
from ..stats import bootstrap_ci, proportion_ci
from .base import FAILS, HOLDS, INCONCLUSIVE, Claim, InsufficientData, Part, Threshold, at_least, ci, numeric, within


class CrossEntropyAtZero(Claim):
    id = "C3"
    statement = "CE: c is indistinguishable from 0 and h_mm < 0"
    figure = FIGURE_FILES["F2"]
    statistic = "mean c (CE)"

    MIN_STEPS = Threshold(6, "measured CE steps needed")
    COS_MARGIN = Threshold(
        0.1, "c is indistinguishable from 0 when the CIs of mean c and mean cos(g, m) cover 0 and the cos CI lies "
             "within ±this"
    )
    MIN_CONCAVE_FRACTION = Threshold(0.9, "fraction of CE steps with h_mm < 0 (Wilson CI)")

    def test(self, job, details):
        arms = job.arms_of(regimes.CE)
        if not arms:
            raise InsufficientData("no CE arm in this job")
        steps = diag_steps(job, "claim C3", columns=("c", "cos", "h_mm", "v2"), arms=arms)
        rows = steps[np.isfinite(numeric(steps, "c")) & (numeric(steps, "v2") > 0)]
        if len(rows) < self.MIN_STEPS:
            raise InsufficientData(f"only {len(rows)} measured CE steps (need {self.MIN_STEPS})", len(rows))
        mean, low, high, n = bootstrap_ci(numeric(rows, "c"))
        cos, cos_low, cos_high, _ = bootstrap_ci(numeric(rows, "cos"))
        # c's scale changes from step to step, so cos (scale free) must agree: either excluding 0 refutes the claim
        c_covers, cos_covers = low <= 0 <= high, cos_low <= 0 <= cos_high
        narrow = within(cos_low, cos_high, -self.COS_MARGIN, self.COS_MARGIN) == HOLDS
        # covering 0 with a wide interval says nothing
        zero = FAILS if not (c_covers and cos_covers) else HOLDS if narrow else INCONCLUSIVE
        concave = int((numeric(rows, "h_mm") < 0).sum())
        frac, f_low, f_high = proportion_ci(concave, len(rows))
        parts = [
            Part(f"mean c {ci(mean, low, high)} covers 0: {c_covers}; mean cos {ci(cos, cos_low, cos_high)} covers 0: "
                 f"{cos_covers}, within ±{self.COS_MARGIN}: {narrow}", zero),
            Part(f"h_mm < 0 on {concave}/{len(rows)} = {ci(frac, f_low, f_high)} vs {self.MIN_CONCAVE_FRACTION}",
                 at_least(f_low, f_high, self.MIN_CONCAVE_FRACTION)),
        ]
        return self.result(parts, mean, low, high, n, "mean c over CE steps (bootstrap over steps and seeds)")
