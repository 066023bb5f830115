"""C1: at the eta the trainer used, the Taylor lambda* matches the measured one, and
the Taylor residual shrinks like eta^3 over a range reaching that eta (docs/theory.md
s.2, s.10)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...schema import ETA_SWEEP_SERIES, FIGURE_FILES
from ..data import trained_lrs
from ..load import JobError
from ..stats import loglog_slope, over_seeds, per_seed
from .base import INCONCLUSIVE, Claim, Estimate, Part, Threshold, equivalent, numeric, seed_ci, within

OBJECTIVES = {"j_true": "J_true", "j_batch": "J_batch"}  # the claim is judged on J_true; J_batch is reported


def star_ratios(steps: pd.DataFrame) -> pd.DataFrame:
    """lambda*_taylor / lambda*_meas and whether their signs agree, on every row with both."""
    taylor, meas = numeric(steps, "lambda_star_taylor"), numeric(steps, "lambda_star_meas")
    rows = steps[np.isfinite(taylor) & np.isfinite(meas) & (meas != 0)]
    return rows.assign(ratio=taylor[rows.index] / meas[rows.index],
                       agree=np.sign(taylor[rows.index]) == np.sign(meas[rows.index]))


class TaylorAtTrainedEta(Claim):
    id = "C1"
    statement = "at the trained η, λ*_Taylor matches λ*_meas on J_true; the Taylor residual shrinks like η³ up to that η"
    figure = f"{FIGURE_FILES['F1']}, {FIGURE_FILES['F4']}"
    statistic = "median λ*_Taylor/λ*_meas on J_true at the trained η"

    RATIO_LOW = Threshold(0.8, "lower end of the equivalence band of λ*_Taylor/λ*_meas (TOST: 90% interval inside)")
    RATIO_HIGH = Threshold(1.25, "upper end of that band (1/0.8: the band is symmetric on a log scale)")
    SLOPE_WINDOW = Threshold(10.0, "the η slope uses sweep points from (trained η)/this up to the sweep's top")
    MIN_ETAS = Threshold(3, "distinct η of a seed's sweep inside the window needed for its slope")
    SLOPE_LOW = Threshold(2.5, "lower end of the η log-log slope range read as 'near 3'")
    SLOPE_HIGH = Threshold(3.5, "upper end of that range (the slope's 95% interval over seeds must lie inside it)")

    def test(self, job, details):
        steps = job.table("diag_steps", columns=("lambda_star_taylor", "lambda_star_meas"), needed_for="claim C1")
        parts = [self._ratio_part(steps, objective) for objective in OBJECTIVES]
        parts.append(self._slope_part(job))
        return self.result(parts)

    def _ratio_part(self, steps: pd.DataFrame, objective: str) -> Part:
        name = OBJECTIVES[objective]
        key = None if objective == "j_true" else "batch"  # the J_true part is the claim's own row
        statistic = f"median λ*_Taylor/λ*_meas on {name} at the trained η"
        band = f"[{self.RATIO_LOW}, {self.RATIO_HIGH}]"
        rows = star_ratios(steps[steps["objective"] == objective])
        ratio = over_seeds(per_seed(rows, lambda r: r["ratio"].median()))
        agree = over_seeds(per_seed(rows, lambda r: r["agree"].mean()))
        text = (f"{statistic} {seed_ci(ratio)} vs {band}; sign agreement {seed_ci(agree)}; "
                f"η = {', '.join(f'{lr:g}' for lr in sorted(numeric(rows, 'lr').unique()))}")
        return self.seed_part(text, ratio, equivalent(ratio, self.RATIO_LOW, self.RATIO_HIGH), key=key,
                              statistic=statistic, margin=band, decides=objective == "j_true",
                              threshold="RATIO_LOW")

    def _slope_part(self, job) -> Part:
        statistic = "η log-log slope of |Δ_meas − Δ_Taylor| up to the trained η"
        band = f"[{self.SLOPE_LOW}, {self.SLOPE_HIGH}]"
        try:
            sweep = job.eta_sweep("claim C1")
        except JobError as err:
            return Part(f"no η sweep ({err})", INCONCLUSIVE, "slope", Estimate(statistic, margin=band))
        swept = [job.arm(label) for label in sweep["arm"].unique() if label in {a.label for a in job.arms}]
        try:  # the swept arm's own lr: it need not be a measured arm
            trained = trained_lrs(job, arms=swept)
        except JobError as err:
            return Part(f"no trained lr for the swept arm ({err})", INCONCLUSIVE, "slope",
                        Estimate(statistic, margin=band))
        sweep = sweep.merge(trained, on=["arm", "seed"], how="inner")
        top, lr = sweep["eta"].max(), sweep["trained_lr"].min()
        reaching = sweep.groupby("seed").filter(lambda s: s["eta"].max() >= s["trained_lr"].iloc[0])
        if reaching.empty:
            return Part(f"the η sweep tops out at η = {top:.3g}, below the trained η = {lr:.3g}: its slope says "
                        f"nothing about the trained step", INCONCLUSIVE, "slope", Estimate(statistic, margin=band))
        window = reaching[reaching["eta"] >= reaching["trained_lr"] / self.SLOPE_WINDOW]
        slopes = per_seed(window, lambda s: loglog_slope(s, "eta", "residual", ETA_SWEEP_SERIES)["slope"]
                          if s["eta"].nunique() >= self.MIN_ETAS else np.nan)
        slope = over_seeds(slopes)
        text = (f"{statistic} {seed_ci(slope)} vs {band} (η from trained/{self.SLOPE_WINDOW:g} to "
                f"{window['eta'].max():.3g})")
        return self.seed_part(text, slope, within(slope.low, slope.high, self.SLOPE_LOW, self.SLOPE_HIGH),
                              key="slope", statistic=statistic, margin=band, threshold="SLOPE_LOW")
