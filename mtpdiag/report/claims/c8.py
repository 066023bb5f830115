"""C8: OCC's ratio lambda_t grows like eta^1 while lambda*_taylor shrinks like
eta^-1 (docs/theory.md s.5, s.10): log-log slopes against eta from an eta sweep that
records both on shared states, per seed, with an interval over seeds."""
from __future__ import annotations

import pandas as pd

from ...schema import FIGURE_FILES
from ..stats import loglog_slope, over_seeds, per_seed
from .base import Claim, InsufficientData, Threshold, numeric, seed_ci, within

# the eta_sweep.csv columns this claim reads beside eta: lambda*_taylor and the paper reading's OCC lambda_t,
# both measured at each eta on the same state (one state: an (arm, seed, step) series)
SWEEP_STAR, SWEEP_OCC = "lambda_star_taylor", "lambda_occ_paper"
STATE = ("arm", "seed", "step")


class EtaScaling(Claim):
    id = "C8"
    statement = "OCC's ratio λ_t scales as η¹ while λ*_Taylor scales as η⁻¹"
    figure = FIGURE_FILES["F4"]
    statistic = "η log-log slope of |λ_t| (OCC paper)"

    MIN_ETAS = Threshold(3, "distinct η of one state needed for its slope")
    SLOPE_TOLERANCE = Threshold(0.5, "a slope 'is' p when its 95% interval over seeds lies inside p ± this")

    def test(self, job, details):
        sweep = job.eta_sweep("claim C8")
        missing = [c for c in (SWEEP_STAR, SWEEP_OCC) if c not in sweep]
        if missing:
            raise InsufficientData(f"the η sweep does not record {missing} (eta_sweep.csv columns: "
                                   f"{list(sweep.columns)}), so neither slope can be measured")
        # lambda* and lambda_t are per state and eta: one row each, whatever lambda grid the sweep also has
        states = sweep.drop_duplicates([*STATE, "eta"]).assign(
            star=lambda f: numeric(f, SWEEP_STAR).abs(), occ=lambda f: numeric(f, SWEEP_OCC).abs())
        if states.groupby(list(STATE))["eta"].nunique().max() < self.MIN_ETAS:
            raise InsufficientData(f"no state of the η sweep has {self.MIN_ETAS} distinct η")
        parts = [self._slope(states, "occ", 1.0, None, self.statistic),
                 self._slope(states, "star", -1.0, "taylor", "η log-log slope of |λ*_Taylor|")]
        return self.result(parts)

    def _slope(self, states: pd.DataFrame, column: str, power: float, key, statistic: str):
        slopes = per_seed(states, lambda s: loglog_slope(s, "eta", column, STATE)["slope"])
        slope = over_seeds(slopes)
        lo, hi = power - self.SLOPE_TOLERANCE, power + self.SLOPE_TOLERANCE
        band = f"[{lo:g}, {hi:g}]"
        return self.seed_part(f"{statistic} {seed_ci(slope)} vs {band}", slope,
                              within(slope.low, slope.high, lo, hi), key=key, statistic=statistic, margin=band,
                              threshold="SLOPE_TOLERANCE")
