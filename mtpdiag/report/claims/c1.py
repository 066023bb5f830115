"""C1: the measured Delta(lambda) is a concave quadratic near 0, and the Taylor
residual shrinks like eta^3 (docs/theory.md s.2)."""
from __future__ import annotations

import numpy as np

from ...schema import ETA_SWEEP_SERIES, FIGURE_FILES
from ..data import diag_steps
from ..load import JobError
from ..stats import bootstrap_ci, loglog_slope, proportion_ci
from .base import INCONCLUSIVE, Claim, Part, Threshold, at_least, ci, numeric, within


class ConcaveQuadratic(Claim):
    id = "C1"
    statement = "Δ_meas is a concave quadratic near 0, and the Taylor residual shrinks like η³"
    figure = f"{FIGURE_FILES['F1']}, {FIGURE_FILES['F4']}"
    statistic = "η log-log slope of |Δ_meas − Δ_Taylor|"

    MIN_CURVES = Threshold(5, "measured Δ(λ) curves needed to judge the fits")
    MIN_MEDIAN_R2 = Threshold(0.9, "median R² of the quadratic fits of the measured curves (bootstrap CI)")
    MIN_CONCAVE_FRACTION = Threshold(0.8, "fraction of measured curves whose fit is concave (Wilson CI)")
    MIN_SERIES = Threshold(3, "(arm, seed, step, λ) series of the η sweep needed for a slope CI")
    SLOPE_LOW = Threshold(2.5, "lower end of the η log-log slope range read as 'near 3'")
    SLOPE_HIGH = Threshold(3.5, "upper end of that range (the slope CI must lie inside it)")

    def test(self, job, details):
        steps = diag_steps(job, "claim C1", columns=("fit_r2", "fit_a2"))
        fits = steps[np.isfinite(numeric(steps, "fit_r2"))]
        parts = []
        if len(fits) < self.MIN_CURVES:
            parts.append(Part(f"only {len(fits)} measured curves (need {self.MIN_CURVES})", INCONCLUSIVE))
        else:
            median, low, high, n = bootstrap_ci(numeric(fits, "fit_r2"), np.median)
            parts.append(Part(f"median R² {ci(median, low, high)} vs {self.MIN_MEDIAN_R2} (n={n})",
                              at_least(low, high, self.MIN_MEDIAN_R2)))
            concave = int((numeric(fits, "fit_a2") < 0).sum())
            frac, low, high = proportion_ci(concave, len(fits))
            parts.append(Part(f"concave fits {concave}/{len(fits)} = {ci(frac, low, high)} vs "
                              f"{self.MIN_CONCAVE_FRACTION}", at_least(low, high, self.MIN_CONCAVE_FRACTION)))
        slope = {"slope": np.nan, "low": np.nan, "high": np.nan, "n_series": 0}
        try:  # the eta sweep is one part of the claim: without it the fits are still judged
            slope = loglog_slope(job.eta_sweep("claim C1"), "eta", "residual", ETA_SWEEP_SERIES)
            if slope["n_series"] < self.MIN_SERIES:
                parts.append(Part(f"η sweep has {slope['n_series']} usable series (need {self.MIN_SERIES})",
                                  INCONCLUSIVE))
            else:
                parts.append(Part(f"η log-log slope {ci(slope['slope'], slope['low'], slope['high'])} vs "
                                  f"[{self.SLOPE_LOW}, {self.SLOPE_HIGH}] ({slope['n_series']} series)",
                                  within(slope["low"], slope["high"], self.SLOPE_LOW, self.SLOPE_HIGH)))
        except JobError as err:
            parts.append(Part(f"no η sweep ({err})", INCONCLUSIVE))
        return self.result(parts, slope["slope"], slope["low"], slope["high"], slope["n_series"])
