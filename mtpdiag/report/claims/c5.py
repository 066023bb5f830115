"""C5: the lambda_t of each OCC reading tracks the measured lambda*_t (docs/theory.md
s.4-5): rank correlation and spread of lambda*_t / lambda_t, per step and, on the
oracle arm, per mini-batch."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ... import regimes, schema
from ...occ_analysis import minibatch_summary, tracking_summary
from ...schema import FIGURE_FILES
from .. import stats
from ..data import ORACLE_CALIBRATOR, STAR_COLUMNS, tracking_frame
from ..load import Job
from ..stats import over_seeds, per_seed, spearman
from .base import REPORTED, Claim, InsufficientData, Part, Threshold, at_least, numeric, seed_ci

ORACLE_STAR = schema.calib_column("lambda_star_taylor")  # the oracle arm's own lambda*, measured on each mini-batch


def tracking_details(frame: pd.DataFrame) -> pd.DataFrame:
    """occ_analysis.tracking_summary for every (reading, lambda* column), pooled over occ arms and seeds."""
    rows = []
    for proxy, rows_of in frame.groupby("proxy", sort=False):
        for star in STAR_COLUMNS:
            summary = tracking_summary(rows_of, "lambda_t", star, lambda_plus_col="lambda_plus", seed=stats.SEED,
                                       n_resamples=stats.N_RESAMPLES, confidence_level=stats.CONFIDENCE)
            rows.append({"proxy": proxy, **summary})
    return pd.DataFrame(rows)


def minibatch_details(job: Job) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per mini-batch index, on the oracle arm (which measures lambda*_Taylor on each
    mini-batch and logs every OCC reading on the same one as a shadow): how each
    reading tracks lambda*, and the distribution of each reading's lambda (the
    first-mini-batch effect, measured). Empty frames when no arm has such a calibrator."""
    oracle_arms = [a for a in job.arms if a.calibrator == ORACLE_CALIBRATOR]
    if not oracle_arms:
        return pd.DataFrame(), pd.DataFrame()
    frame = job.table("minibatch", columns=(ORACLE_STAR,), needed_for="the per-mini-batch C5 tables", arms=oracle_arms)
    readings = {reading: column for column in frame.columns
                if (reading := schema.parse_shadow_lambda_column(column)) is not None}
    tracking = pd.DataFrame([
        {"minibatch": index, "proxy": name,
         **tracking_summary(group, column, ORACLE_STAR, lambda_plus_col=schema.shadow_column(name, "lambda_plus"),
                            seed=stats.SEED, n_resamples=stats.N_RESAMPLES, confidence_level=stats.CONFIDENCE)}
        for index, group in frame.groupby("minibatch") for name, column in readings.items()
    ])
    effect = minibatch_summary(frame, columns=[*readings.values(), ORACLE_STAR])
    return tracking, effect


class OCCTracking(Claim):
    id = "C5"
    statement = "OCC: λ_t of each reading tracks λ*_t (rank correlation, spread of λ*_t/λ_t)"
    figure = FIGURE_FILES["F3"]
    statistic = "per-seed Spearman ρ(λ_t paper, λ*_Taylor)"
    detail_tables = ("c5_tracking", "c5_minibatch_tracking", "c5_minibatch_effect")
    READING = "paper"  # the reading the verdict is about: the paper's formula (docs/theory.md s.5)

    MIN_STEPS = Threshold(5, "steps with both λ_t (paper reading) and λ*_Taylor a seed needs for its ρ")
    MIN_RHO = Threshold(0.5, "mean over seeds of the per-seed Spearman ρ(λ_t paper, λ*_Taylor) for 'tracks'")

    def evaluate(self, job):
        result, details = super().evaluate(job)
        # the oracle arm's tables stand apart from the verdict: a missing column there is an error, not "no data"
        details["c5_minibatch_tracking"], details["c5_minibatch_effect"] = minibatch_details(job)
        return result, details

    def test(self, job, details):
        if not job.arms_of(regimes.OCC_REGIME):
            raise InsufficientData("no occ arm in this job")
        frame = tracking_frame(job, "claim C5")
        details["c5_tracking"] = tracked = tracking_details(frame)
        chosen = frame[frame["proxy"] == self.READING]
        if chosen.empty:
            raise InsufficientData(f"no '{self.READING}' OCC reading logged (arm or shadow)")
        paired = chosen[np.isfinite(numeric(chosen, "lambda_t")) & np.isfinite(numeric(chosen, "lambda_star_taylor"))]
        rho = over_seeds(per_seed(paired, lambda r: spearman(r["lambda_t"], r["lambda_star_taylor"])
                                  if len(r) >= self.MIN_STEPS else np.nan))
        parts = [self.seed_part(f"{self.statistic} {seed_ci(rho)} vs {self.MIN_RHO} (need {self.MIN_STEPS} steps "
                                f"a seed; {len(paired)} pairs)", rho, at_least(rho.low, rho.high, self.MIN_RHO),
                                statistic=self.statistic, margin=f"≥ {self.MIN_RHO}", threshold="MIN_RHO")]
        others = "; ".join(
            f"{r.proxy}: pooled ρ {r.spearman:.2f}, λ*/λ_t median {r.ratio_median:.3g} (IQR {r.ratio_iqr:.3g})"
            for r in tracked[tracked["star_col"] == "lambda_star_taylor"].itertuples()
        )
        parts.append(Part(f"all readings (pooled over seeds, descriptive): {others}", REPORTED, decides=False))
        return self.result(parts)
