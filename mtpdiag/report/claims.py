"""Claims C1-C6 of THEORY.md s.6, each tested on a job's CSVs: a statistic, its
95% interval, and a verdict that comes from the data through the thresholds
below (never typed by hand).

The rule for every part of a claim: the part holds when its whole interval is on
the claimed side of its threshold, does not hold when the whole interval is on
the other side, and is inconclusive when the interval straddles the threshold or
there is too little data (fewer rows than the part's minimum). A claim holds when
all its parts hold, does not hold when any part does not, else is inconclusive.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..occ_analysis import correlation_ci, minibatch_summary, tracking_summary
from .data import STAR_COLUMNS, diag_steps, final_values, tracking_frame
from .figures import NAMES, SWEEP_SERIES
from .load import Job, JobError
from . import stats
from .stats import bootstrap_ci, loglog_slope, proportion_ci, ratio_of_means_ci, t_interval
from .table import display_name, fmt_ci, markdown_table, paired_difference

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE)

THRESHOLDS: dict[str, tuple[float, str]] = {}


def threshold(name: str, value: float, meaning: str) -> float:
    """A named threshold, listed with its meaning in the claims report."""
    THRESHOLDS[name] = (value, meaning)
    return value


C1_MIN_CURVES = threshold("C1_MIN_CURVES", 5, "measured Δ(λ) curves needed to judge the fits")
C1_MIN_MEDIAN_R2 = threshold(
    "C1_MIN_MEDIAN_R2", 0.9, "median R² of the quadratic fits of the measured curves (bootstrap CI)"
)
C1_MIN_CONCAVE_FRACTION = threshold(
    "C1_MIN_CONCAVE_FRACTION", 0.8, "fraction of measured curves whose fit is concave (Wilson CI)"
)
C1_MIN_SERIES = threshold("C1_MIN_SERIES", 3, "(arm, seed, step, λ) series of the η sweep needed for a slope CI")
C1_SLOPE_LOW = threshold("C1_SLOPE_LOW", 2.5, "lower end of the η log-log slope range read as 'near 3'")
C1_SLOPE_HIGH = threshold("C1_SLOPE_HIGH", 3.5, "upper end of that range (the slope CI must lie inside it)")
C2_MIN_CURVES = threshold("C2_MIN_CURVES", 5, "curves with the L-smooth expression needed to judge the bound")
C2_REL_TOLERANCE = threshold(
    "C2_REL_TOLERANCE", 1e-3, "slack of the bound per point, relative to the curve's largest |Δ_meas|"
)
C2_MIN_BOUNDED_FRACTION = threshold(
    "C2_MIN_BOUNDED_FRACTION", 0.9,
    "fraction of curves (with L ≥ the curvature met) lying above the L-smooth bound at every "
    "point (Wilson CI)",
)
C3_MIN_STEPS = threshold("C3_MIN_STEPS", 6, "measured CE steps needed")
C3_COS_MARGIN = threshold(
    "C3_COS_MARGIN", 0.1,
    "c is indistinguishable from 0 when the CIs of mean c and mean cos(g, m) cover 0 and the cos CI lies within ±this",
)
C3_MIN_CONCAVE_FRACTION = threshold("C3_MIN_CONCAVE_FRACTION", 0.9, "fraction of CE steps with h_mm < 0 (Wilson CI)")
C4_MIN_STEPS = threshold("C4_MIN_STEPS", 4, "distinct measured policy steps needed")
C4_MAX_DECAY_RHO = threshold(
    "C4_MAX_DECAY_RHO", 0.0, "Spearman ρ(step, c) over the policy arms must lie below this (c decays)"
)
C4_MIN_PERSIST_RATIO = threshold(
    "C4_MIN_PERSIST_RATIO", 0.5,
    "late/early ratio of mean v² and of mean −h_mm (last vs first third of the measured steps) "
    "for 'persists'",
)
C5_PROXY = "paper"  # the reading the verdict is about: the paper's formula (THEORY.md s.5)
C5_MIN_STEPS = threshold("C5_MIN_STEPS", 5, "steps with both λ_t (paper reading) and λ*_Taylor needed")
C5_MIN_RHO = threshold("C5_MIN_RHO", 0.5, "Spearman ρ(λ_t of the paper reading, λ*_Taylor) for 'tracks'")
C6_MIN_SEEDS = threshold("C6_MIN_SEEDS", 3, "seeds both OCC paper and Detach need")
C6_MIN_GAIN = threshold(
    "C6_MIN_GAIN", 0.0, "the CI of the paired final J_true difference OCC paper − Detach lies above this"
)


STATEMENTS = {
    "C1": "Δ_meas is a concave quadratic near 0, and the Taylor residual shrinks like η³",
    "C2": "the L-smooth expression lower-bounds Δ when L ≥ the curvature met; distance of λ*_smooth from λ*_meas",
    "C3": "CE: c is indistinguishable from 0 and h_mm < 0",
    "C4": "Policy: c decays over training while v² and −h_mm persist; step where 2λ*_t falls below each fixed λ",
    "C5": "OCC: λ_t of each reading tracks λ*_t (rank correlation, spread of λ*_t/λ_t)",
    "C6": "End to end: OCC (paper) ends above Detach in J_true",
}
FIGURE_OF = {"C1": f"{NAMES['F1']}, {NAMES['F4']}", "C2": NAMES["F1"], "C3": NAMES["F2"],
             "C4": f"{NAMES['F2']}, {NAMES['F6']}", "C5": NAMES["F3"], "C6": f"{NAMES['F5']}, table1"}


@dataclass
class ClaimResult:
    claim: str
    statement: str
    statistic: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    reason: str
    figure: str


@dataclass
class Part:
    """One tested part of a claim: what was measured and its verdict."""

    text: str
    verdict: str


def at_least(low: float, high: float, bound: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if low >= bound else FAILS if high < bound else INCONCLUSIVE


def at_most(low: float, high: float, bound: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if high <= bound else FAILS if low > bound else INCONCLUSIVE


def within(low: float, high: float, lo: float, hi: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if lo <= low and high <= hi else FAILS if high < lo or low > hi else INCONCLUSIVE


def combine(parts: list[Part]) -> str:
    verdicts = [p.verdict for p in parts]
    return FAILS if FAILS in verdicts else HOLDS if verdicts and all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def _result(claim: str, parts: list[Part], value, low, high, n, statistic: str) -> ClaimResult:
    reason = "; ".join(f"{p.text}: {p.verdict}" for p in parts)
    return ClaimResult(claim, STATEMENTS[claim], statistic, float(value), float(low), float(high), int(n),
                       combine(parts), reason, FIGURE_OF[claim])


def _missing(claim: str, err: Exception) -> ClaimResult:
    return _result(claim, [Part(f"no data ({err})", INCONCLUSIVE)], np.nan, np.nan, np.nan, 0, "n/a")


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def _ci(value, low, high) -> str:
    return fmt_ci(value, low, high, 3)


# ----------------------------------------------------------------------------- C1


def claim_c1(job: Job) -> ClaimResult:
    try:
        steps = diag_steps(job, "claim C1", columns=("fit_r2", "fit_a2"))
    except JobError as err:
        return _missing("C1", err)
    fits = steps[np.isfinite(_numeric(steps, "fit_r2"))]
    parts = []
    if len(fits) < C1_MIN_CURVES:
        parts.append(Part(f"only {len(fits)} measured curves (need {C1_MIN_CURVES})", INCONCLUSIVE))
    else:
        median, low, high, n = bootstrap_ci(_numeric(fits, "fit_r2"), np.median)
        parts.append(Part(f"median R² {_ci(median, low, high)} vs {C1_MIN_MEDIAN_R2} (n={n})",
                          at_least(low, high, C1_MIN_MEDIAN_R2)))
        concave = int((_numeric(fits, "fit_a2") < 0).sum())
        frac, low, high = proportion_ci(concave, len(fits))
        parts.append(Part(f"concave fits {concave}/{len(fits)} = {_ci(frac, low, high)} vs {C1_MIN_CONCAVE_FRACTION}",
                          at_least(low, high, C1_MIN_CONCAVE_FRACTION)))
    slope = {"slope": np.nan, "low": np.nan, "high": np.nan, "n_series": 0}
    try:
        slope = loglog_slope(job.eta_sweep("claim C1"), "eta", "residual", SWEEP_SERIES)
        if slope["n_series"] < C1_MIN_SERIES:
            parts.append(Part(f"η sweep has {slope['n_series']} usable series (need {C1_MIN_SERIES})", INCONCLUSIVE))
        else:
            parts.append(Part(f"η log-log slope {_ci(slope['slope'], slope['low'], slope['high'])} vs "
                              f"[{C1_SLOPE_LOW}, {C1_SLOPE_HIGH}] ({slope['n_series']} series)",
                              within(slope["low"], slope["high"], C1_SLOPE_LOW, C1_SLOPE_HIGH)))
    except JobError as err:
        parts.append(Part(f"no η sweep ({err})", INCONCLUSIVE))
    return _result("C1", parts, slope["slope"], slope["low"], slope["high"], slope["n_series"],
                   "η log-log slope of |Δ_meas − Δ_Taylor|")


# ----------------------------------------------------------------------------- C2


def claim_c2(job: Job) -> ClaimResult:
    try:
        steps = diag_steps(job, "claim C2", columns=("L", "kappa_m", "kappa_g", "lambda_star_smooth", *STAR_COLUMNS))
        curves = job.table("diag_curves", columns=("delta_smooth",), needed_for="claim C2")
    except JobError as err:
        return _missing("C2", err)
    keys = ["arm", "seed", "step", "objective"]
    sgd = curves[(curves["kind"] == "sgd") & np.isfinite(_numeric(curves, "delta_smooth"))]
    merged = sgd.merge(steps[[*keys, "L", "kappa_m", "kappa_g"]], on=keys)
    if merged.empty:
        return _result("C2", [Part("L was not measured (run the diagnostics with top_curvature=True)", INCONCLUSIVE)],
                       np.nan, np.nan, np.nan, 0, "fraction of curves above the L-smooth bound")
    met = merged[["kappa_m", "kappa_g"]].apply(pd.to_numeric, errors="coerce").max(axis=1)
    eligible = merged[_numeric(merged, "L") >= met]
    bounded = [
        bool((c["delta_smooth"] <= c["delta_meas"] + C2_REL_TOLERANCE * c["delta_meas"].abs().max()).all())
        for _, c in eligible.groupby(keys[:3], sort=False)
    ]
    parts = []
    frac, low, high = proportion_ci(sum(bounded), len(bounded))
    if len(bounded) < C2_MIN_CURVES:
        parts.append(Part(f"only {len(bounded)} curves with L ≥ the curvature met (need {C2_MIN_CURVES})",
                          INCONCLUSIVE))
    else:
        parts.append(Part(f"curves above the bound {sum(bounded)}/{len(bounded)} = {_ci(frac, low, high)} vs "
                          f"{C2_MIN_BOUNDED_FRACTION}", at_least(low, high, C2_MIN_BOUNDED_FRACTION)))
    ratio = _numeric(steps, "lambda_star_smooth") / _numeric(steps, "lambda_star_meas_search")
    median, r_low, r_high, r_n = bootstrap_ci(ratio, np.median)
    distance = f"median λ*_smooth/λ*_meas {_ci(median, r_low, r_high)} over {r_n} steps"
    return _result("C2", parts, frac, low, high, len(bounded),
                   f"fraction of curves above the L-smooth bound; {distance}")


# ----------------------------------------------------------------------------- C3


def claim_c3(job: Job) -> ClaimResult:
    arms = job.arms_of("ce")
    if not arms:
        return _result("C3", [Part("no CE arm in this job", INCONCLUSIVE)], np.nan, np.nan, np.nan, 0, "mean c (CE)")
    try:
        steps = diag_steps(job, "claim C3", columns=("c", "cos", "h_mm", "v2"), arms=arms)
    except JobError as err:
        return _missing("C3", err)
    rows = steps[np.isfinite(_numeric(steps, "c")) & (_numeric(steps, "v2") > 0)]
    if len(rows) < C3_MIN_STEPS:
        return _result("C3", [Part(f"only {len(rows)} measured CE steps (need {C3_MIN_STEPS})", INCONCLUSIVE)],
                       np.nan, np.nan, np.nan, len(rows), "mean c (CE)")
    mean, low, high, n = bootstrap_ci(_numeric(rows, "c"))
    cos, cos_low, cos_high, _ = bootstrap_ci(_numeric(rows, "cos"))
    # c's scale changes from step to step, so cos (scale free) must agree: either excluding 0 refutes the claim
    c_covers, cos_covers = low <= 0 <= high, cos_low <= 0 <= cos_high
    narrow = within(cos_low, cos_high, -C3_COS_MARGIN, C3_COS_MARGIN) == HOLDS
    # covering 0 with a wide interval says nothing
    zero = FAILS if not (c_covers and cos_covers) else HOLDS if narrow else INCONCLUSIVE
    concave = int((_numeric(rows, "h_mm") < 0).sum())
    frac, f_low, f_high = proportion_ci(concave, len(rows))
    parts = [
        Part(f"mean c {_ci(mean, low, high)} covers 0: {c_covers}; mean cos {_ci(cos, cos_low, cos_high)} covers 0: "
             f"{cos_covers}, within ±{C3_COS_MARGIN}: {narrow}", zero),
        Part(f"h_mm < 0 on {concave}/{len(rows)} = {_ci(frac, f_low, f_high)} vs {C3_MIN_CONCAVE_FRACTION}",
             at_least(f_low, f_high, C3_MIN_CONCAVE_FRACTION)),
    ]
    return _result("C3", parts, mean, low, high, n, "mean c over CE steps (bootstrap over steps and seeds)")


# ----------------------------------------------------------------------------- C4


def crossing_steps(steps: pd.DataFrame, arms) -> pd.DataFrame:
    """Per policy arm and seed, the first measured step where 2 lambda*_t (the
    harm threshold) falls below the arm's fixed lambda (NaN: never)."""
    rows = []
    for arm in arms:
        for seed, run in steps[steps["arm"] == arm.label].groupby("seed"):
            below = run[_numeric(run, "harm_threshold") < (1.0 if arm.lam is None else arm.lam)]
            rows.append({"arm": arm.label, "lambda": arm.lam, "seed": seed,
                         "crossing_step": below["step"].min() if len(below) else None,
                         "last_measured_step": run["step"].max()})
    frame = pd.DataFrame(rows, columns=["arm", "lambda", "seed", "crossing_step", "last_measured_step"])
    return frame.astype({"crossing_step": "Int64"})


def claim_c4(job: Job) -> tuple[ClaimResult, pd.DataFrame]:
    arms = job.arms_of("policy")
    if not arms:
        return _result("C4", [Part("no policy arm in this job", INCONCLUSIVE)], np.nan, np.nan, np.nan, 0,
                       "Spearman ρ(step, c)"), pd.DataFrame()
    try:
        steps = diag_steps(job, "claim C4", columns=("c", "v2", "h_mm", "harm_threshold"), arms=arms)
    except JobError as err:
        return _missing("C4", err), pd.DataFrame()
    rows = steps[np.isfinite(_numeric(steps, "c"))]
    crossings = crossing_steps(rows, arms)
    measured = np.sort(rows["step"].unique())
    if len(measured) < C4_MIN_STEPS:
        return _result("C4", [Part(f"only {len(measured)} measured policy steps (need {C4_MIN_STEPS})", INCONCLUSIVE)],
                       np.nan, np.nan, np.nan, len(rows), "Spearman ρ(step, c)"), crossings
    rho = correlation_ci(rows["step"].to_numpy(float), _numeric(rows, "c").to_numpy(), "spearman", stats.N_RESAMPLES,
                         stats.CONFIDENCE, stats.SEED)
    third = max(len(measured) // 3, 1)
    early, late = rows[rows["step"].isin(measured[:third])], rows[rows["step"].isin(measured[-third:])]
    parts = [Part(f"Spearman ρ(step, c) {_ci(rho['spearman'], rho['spearman_lo'], rho['spearman_hi'])} vs "
                  f"{C4_MAX_DECAY_RHO}", at_most(rho["spearman_lo"], rho["spearman_hi"], C4_MAX_DECAY_RHO))]
    for column, name, sign in (("v2", "v²", 1.0), ("h_mm", "−h_mm", -1.0)):
        ratio, low, high = ratio_of_means_ci(sign * _numeric(early, column), sign * _numeric(late, column))
        parts.append(Part(f"late/early mean {name} {_ci(ratio, low, high)} vs {C4_MIN_PERSIST_RATIO}",
                          at_least(low, high, C4_MIN_PERSIST_RATIO)))
    crossing_text = ", ".join(
        f"{arm}: {group.notna().sum()}/{len(group)} seeds"
        + (f" (median step {group.median():g})" if group.notna().any() else "")
        for arm, group in crossings.groupby("arm", sort=False)["crossing_step"]
    )
    result = _result("C4", parts, rho["spearman"], rho["spearman_lo"], rho["spearman_hi"], len(rows),
                     f"Spearman ρ(step, c) over policy steps; seeds where 2λ*_t falls below λ: {crossing_text}")
    return result, crossings


# ----------------------------------------------------------------------------- C5


def tracking_details(frame: pd.DataFrame) -> pd.DataFrame:
    """occ_analysis.tracking_summary for every (reading, lambda* column), pooled over occ arms and seeds."""
    rows = []
    for proxy, rows_of in frame.groupby("proxy", sort=False):
        for star in STAR_COLUMNS:
            summary = tracking_summary(rows_of, "lambda_t", star, lambda_plus_col="lambda_plus", seed=stats.SEED,
                                       n_resamples=stats.N_RESAMPLES, confidence_level=stats.CONFIDENCE)
            rows.append({"proxy": proxy, **summary})
    return pd.DataFrame(rows)


ORACLE_STAR = "calib_lambda_star_taylor"  # the oracle arm's own lambda*, measured on each mini-batch


def minibatch_details(job: Job) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per mini-batch index, on the oracle arm (which measures lambda*_Taylor on each
    mini-batch and logs every OCC reading on the same one as a shadow): how each
    reading tracks lambda*, and the distribution of each reading's lambda (the
    first-mini-batch effect, measured). Empty frames when no arm has such a calibrator."""
    oracle_arms = [a for a in job.arms if a.calibrator == "oracle"]
    if not oracle_arms:
        return pd.DataFrame(), pd.DataFrame()
    frame = job.table("minibatch", columns=(ORACLE_STAR,), needed_for="the per-mini-batch C5 tables", arms=oracle_arms)
    readings = {c.removeprefix("calib_shadow_").removesuffix("_lambda"): c
                for c in frame.columns if c.startswith("calib_shadow_") and c.endswith("_lambda")}
    tracking = pd.DataFrame([
        {"minibatch": index, "proxy": name,
         **tracking_summary(group, column, ORACLE_STAR, lambda_plus_col=f"{column}_plus", seed=stats.SEED,
                            n_resamples=stats.N_RESAMPLES, confidence_level=stats.CONFIDENCE)}
        for index, group in frame.groupby("minibatch") for name, column in readings.items()
    ])
    effect = minibatch_summary(frame, columns=[*readings.values(), ORACLE_STAR])
    return tracking, effect


def claim_c5(job: Job) -> tuple[ClaimResult, pd.DataFrame]:
    if not job.arms_of("occ"):
        return _result("C5", [Part("no occ arm in this job", INCONCLUSIVE)], np.nan, np.nan, np.nan, 0,
                       "Spearman ρ(λ_t, λ*_Taylor)"), pd.DataFrame()
    try:
        details = tracking_details(tracking_frame(job, "claim C5"))
    except JobError as err:
        return _missing("C5", err), pd.DataFrame()
    chosen = details[(details["proxy"] == C5_PROXY) & (details["star_col"] == "lambda_star_taylor")]
    if chosen.empty:
        return _result("C5", [Part(f"no '{C5_PROXY}' OCC reading logged (arm or shadow)", INCONCLUSIVE)],
                       np.nan, np.nan, np.nan, 0, "Spearman ρ(λ_t, λ*_Taylor)"), details
    row = chosen.iloc[0]
    if row["n"] < C5_MIN_STEPS:
        parts = [Part(f"only {row['n']} steps with λ_t and λ*_Taylor (need {C5_MIN_STEPS})", INCONCLUSIVE)]
    else:
        parts = [Part(f"ρ {_ci(row['spearman'], row['spearman_lo'], row['spearman_hi'])} vs {C5_MIN_RHO}",
                      at_least(row["spearman_lo"], row["spearman_hi"], C5_MIN_RHO))]
    others = "; ".join(
        f"{r.proxy}: ρ {r.spearman:.2f}, λ*/λ_t median {r.ratio_median:.3g} (IQR {r.ratio_iqr:.3g})"
        for r in details[details["star_col"] == "lambda_star_taylor"].itertuples()
    )
    return _result("C5", parts, row["spearman"], row["spearman_lo"], row["spearman_hi"], row["n"],
                   f"Spearman ρ(λ_t {C5_PROXY}, λ*_Taylor); all readings: {others}"), details


# ----------------------------------------------------------------------------- C6


def claim_c6(job: Job) -> ClaimResult:
    detach = next((a for a in job.arms if a.regime == "detach"), None)
    occ = next((a for a in job.arms if a.calibrator == "occ-paper"), None)
    if detach is None or occ is None:
        return _result("C6", [Part("the job needs a detach arm and an occ-paper arm", INCONCLUSIVE)],
                       np.nan, np.nan, np.nan, 0, "paired final J_true, OCC paper − Detach")
    try:
        finals = final_values(job, "j_true", "claim C6")
    except JobError as err:
        return _missing("C6", err)
    mean, low, high, n = paired_difference(finals, occ.label, detach.label)
    if n < C6_MIN_SEEDS:
        parts = [Part(f"only {n} seeds with both arms (need {C6_MIN_SEEDS})", INCONCLUSIVE)]
    else:
        parts = [Part(f"OCC paper − Detach {_ci(mean, low, high)} vs {C6_MIN_GAIN}", at_least(low, high, C6_MIN_GAIN))]
    per_arm = "; ".join(
        f"{display_name(arm)} {_ci(*t_interval(finals[finals['arm'] == arm.label]['value'])[:3])}" for arm in job.arms
    )
    return _result("C6", parts, mean, low, high, n, f"paired final J_true, OCC paper − Detach; final J_true: {per_arm}")


# ----------------------------------------------------------------------------- report


def claims(job: Job) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The claims table (one row per claim) and the detail tables (C4 crossings, C5 tracking)."""
    c4, crossings = claim_c4(job)
    c5, tracking = claim_c5(job)
    mb_tracking, mb_effect = minibatch_details(job)
    results = [claim_c1(job), claim_c2(job), claim_c3(job), c4, c5, claim_c6(job)]
    details = {"c4_crossings": crossings, "c5_tracking": tracking, "c5_minibatch_tracking": mb_tracking,
               "c5_minibatch_effect": mb_effect}
    return pd.DataFrame([asdict(r) for r in results]), details


def write_claims(job: Job, out_dir, skipped: dict[str, str] | None = None) -> tuple[list[Path], pd.DataFrame]:
    """``claims.csv`` and ``claims.md``; ``skipped`` lists figures that could not be made, and why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, details = claims(job)
    csv = out_dir / "claims.csv"
    table.to_csv(csv, index=False)
    md = out_dir / "claims.md"
    md.write_text(_markdown(job, table, details, skipped or {}))
    return [csv, md], table


def _markdown(job: Job, table: pd.DataFrame, details: dict, skipped: dict[str, str]) -> str:
    arms = [a.label for a in job.arms]
    lines = [f"# Claims report: {job.name}", "",
             f"Job `{job.path}` ({job.kind}), mtpdiag {job.version}; arms {arms}; seeds {job.seeds}."]
    if job.incomplete_runs:
        lines.append(f"\n**Incomplete**: these runs have not finished (still running, or stopped): "
                     f"{job.incomplete_runs}.")
    lines += ["", __doc__.split("\n\n", 1)[1].strip(), ""]
    shown = pd.DataFrame({
        "Claim": table["claim"], "Statement": table["statement"], "Statistic": table["statistic"],
        "Value [95% CI]": [fmt_ci(v, lo, hi) for v, lo, hi in table[["value", "ci_low", "ci_high"]].to_numpy()],
        "n": table["n"], "Verdict": "**" + table["verdict"] + "**", "Figure": table["figure"],
    })
    lines += [markdown_table(shown), "", "## Why each verdict", ""]
    lines += [f"- **{r.claim}** ({r.verdict}): {r.reason}" for r in table.itertuples()]
    crossings = details["c4_crossings"]
    if len(crossings):
        lines += ["", "## C4: first measured step where 2λ*_t < λ (per policy arm and seed; empty: never)", "",
                  markdown_table(crossings.astype(object).where(crossings.notna(), ""))]
    tracking = details["c5_tracking"]
    if len(tracking):
        columns = ["proxy", "star_col", "n", "spearman", "spearman_lo", "spearman_hi", "ratio_median", "ratio_iqr",
                   "sign_agreement", "lambda_plus", "best_lambda_plus"]
        lines += ["", "## C5: tracking of λ*_t by each OCC reading (pooled over occ arms and seeds)", "",
                  markdown_table(tracking[columns].round(4))]
    mb_tracking = details["c5_minibatch_tracking"]
    if len(mb_tracking):
        columns = ["minibatch", "proxy", "n", "spearman", "spearman_lo", "spearman_hi", "ratio_median", "ratio_iqr",
                   "sign_agreement", "best_lambda_plus"]
        lines += ["", "## C5 per mini-batch: each OCC reading against λ*_Taylor of the same mini-batch (oracle arm)", "",
                  "On mini-batch 0 π_old has just been recomputed, so the ratio readings' δ_RL is 0 there.", "",
                  markdown_table(mb_tracking[columns].round(4))]
        effect = details["c5_minibatch_effect"]
        columns = ["minibatch", "column", "n", "median", "q25", "q75", "median_abs", "frac_zero"]
        lines += ["", "## The first-mini-batch effect: λ of each reading per mini-batch index (oracle arm)", "",
                  markdown_table(effect[columns].round(4))]
    lines += ["", "## Thresholds (mtpdiag/report/claims.py)", "",
              markdown_table(pd.DataFrame([(k, f"{v:g}", m) for k, (v, m) in THRESHOLDS.items()],
                                          columns=["name", "value", "meaning"]))]
    if skipped:
        lines += ["", "## Figures not made", ""] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"
