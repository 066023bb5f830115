"""Claims C1-C6 (mtpdiag/report/claims/): the interval rule, each claim's verdict on
hand-built jobs whose verdict is known, the claims report of a job that decides
every claim, and the Claim base (thresholds from the classes, too little data and
missing tables handled once)."""
import numpy as np
import pandas as pd
import pytest

from mtpdiag import schema
from mtpdiag.report import claims, load_job
from mtpdiag.report.claims import (CLAIMS, FAILS, HOLDS, INCONCLUSIVE, ConcaveQuadratic, CrossEntropyAtZero, EndToEnd,
                                   OCCTracking, PolicyDecay, SmoothBound)
from mtpdiag.report.claims.base import Claim, InsufficientData, Part, Threshold, at_least, at_most, combine, within
from mtpdiag.report.load import JobError

from .jobs import CE, DETACH, OCC_PAPER, POLICY, hand_built_job, sweep_rows

ORACLE = {"label": "oracle", "regime": "occ", "lam": None, "calibrator": "oracle"}


def test_interval_rules():
    assert at_least(0.95, 0.99, 0.9) == HOLDS and at_least(0.5, 0.8, 0.9) == FAILS
    assert at_least(0.8, 0.95, 0.9) == INCONCLUSIVE
    assert at_most(-0.5, -0.1, 0) == HOLDS and at_most(0.1, 0.5, 0) == FAILS and at_most(-0.1, 0.1, 0) == INCONCLUSIVE
    assert within(2.8, 3.2, 2.5, 3.5) == HOLDS and within(1.5, 2.0, 2.5, 3.5) == FAILS
    assert within(2.0, 3.0, 2.5, 3.5) == INCONCLUSIVE and at_least(np.nan, np.nan, 0) == INCONCLUSIVE
    parts = [Part("a", HOLDS), Part("b", INCONCLUSIVE)]
    assert combine(parts) == INCONCLUSIVE and combine(parts + [Part("c", FAILS)]) == FAILS
    assert combine(parts[:1]) == HOLDS and combine([]) == INCONCLUSIVE


# ----------------------------------------------------------------------------- the data each claim reads


def ce_rows(n_steps, c_offset, seed, noise):
    return [{"step": s, "c": c_offset + noise[seed, i], "cos": c_offset + noise[seed, i], "v2": 1.0, "h_mm": -1.0}
            for i, s in enumerate(range(2, 2 + 2 * n_steps, 2))]


def policy_rows(v2_late, c_slope, noise):
    return [{"step": s, "c": 10 + c_slope * s + noise[s], "v2": 1.0 if s < 6 else v2_late, "h_mm": -1.0,
             "harm_threshold": 0.1 * (12 - s)} for s in range(12)]


def smooth_rows(steps):
    return [{"step": s, "L": 10.0, "kappa_m": 1.0, "kappa_g": 2.0, "lambda_star_smooth": 0.5,
             "lambda_star_meas": 1.0, "a": 1.0, "b": 0.5, "lr": 0.1, "c": 10.0, "v2": 1.0} for s in steps]


def smooth_curves(steps, offset):
    return [{"step": s, "objective": "j_batch", "lambda": x, "delta_meas": x - x**2 / 2, "delta_taylor": x - x**2 / 2,
             "delta_smooth": x - x**2 / 2 + offset} for s in steps for x in np.linspace(-1, 3, 9)]


STARS = np.random.default_rng(2).uniform(1, 100, 30)


def occ_metrics(sign, final=0.5):
    return [{"step": 0, "j_true": 0.5, "pass1": 0.5}] + [
        {"step": s, "j_true": final, "pass1": 0.5, schema.lambda_column(0): sign * STARS[s] / 1000,
         schema.calib_column("lambda_plus"): 1.0} for s in range(1, 30)]


def star_rows():
    return [{"step": s, "lambda_star_taylor": STARS[s], "lambda_star_meas": STARS[s]} for s in range(1, 30)]


# ----------------------------------------------------------------------------- one claim at a time


@pytest.mark.parametrize("c_offset, n_steps, expected", [(0.0, 20, HOLDS), (1.0, 20, FAILS), (0.0, 2, INCONCLUSIVE)])
def test_c3_ce_correlation_at_zero(tmp_path, c_offset, n_steps, expected):
    noise = np.random.default_rng(0).normal(0, 0.01, (2, n_steps))
    job = hand_built_job(tmp_path / "j", [CE], (0, 1), diag=lambda arm, seed: ce_rows(n_steps, c_offset, seed, noise))
    result, _ = CrossEntropyAtZero().evaluate(job)
    assert result.verdict == expected
    if expected == INCONCLUSIVE:  # too little data: said once, by the base
        assert result.reason == "only 4 measured CE steps (need 6): inconclusive" and np.isnan(result.value)
        assert result.n == 4 and result.statistic == CrossEntropyAtZero.statistic


@pytest.mark.parametrize("v2_late, c_slope, expected", [
    (1.0, -1.0, HOLDS), (0.01, -1.0, FAILS), (1.0, 0.0, INCONCLUSIVE)])
def test_c4_policy_correlation_decays_and_penalty_persists(tmp_path, v2_late, c_slope, expected):
    noise = np.random.default_rng(1).normal(0, 0.01, 12)
    job = hand_built_job(tmp_path / "j", [POLICY], (0, 1), diag=lambda arm, seed: policy_rows(v2_late, c_slope, noise))
    result, details = PolicyDecay().evaluate(job)
    assert result.verdict == expected
    assert set(details["c4_crossings"]["crossing_step"]) == {8}  # 2 lambda* = 0.1 (12 - s) < 0.5 from step 8


@pytest.mark.parametrize("gain, seeds, expected", [(0.1, (0, 1, 2, 3), HOLDS), (-0.1, (0, 1, 2, 3), FAILS),
                                                   (0.1, (0, 1), INCONCLUSIVE)])
def test_c6_occ_against_detach(tmp_path, gain, seeds, expected):
    def final_j_true(arm, seed):
        return 0.5 + 0.01 * seed + (gain + 0.001 * seed if arm == "occ-paper" else 0)

    job = hand_built_job(tmp_path / "j", [DETACH, OCC_PAPER], seeds, final_j_true=final_j_true)
    result, _ = EndToEnd().evaluate(job)
    assert result.verdict == expected and "Detach " in result.statistic and "OCC paper " in result.statistic


@pytest.mark.parametrize("power, expected", [(3.0, HOLDS), (2.0, FAILS)])
def test_c1_quadratic_law(tmp_path, power, expected):
    job = hand_built_job(tmp_path / "j", [POLICY], (0, 1), sweep=sweep_rows(power), diag=lambda arm, seed: [
        {"step": s, "fit_r2": 0.999, "fit_a2": -1.0} for s in range(2, 42, 2)])
    result, _ = ConcaveQuadratic().evaluate(job)
    assert result.verdict == expected and result.value == pytest.approx(power)


def test_c1_without_sweep_is_inconclusive(tmp_path):
    job = hand_built_job(tmp_path / "j", [POLICY], (0, 1), diag=lambda arm, seed: [
        {"step": s, "fit_r2": 0.999, "fit_a2": -1.0} for s in range(2, 12, 2)])
    result, _ = ConcaveQuadratic().evaluate(job)
    assert result.verdict == INCONCLUSIVE and "no η sweep" in result.reason
    assert "median R² 0.999" in result.reason  # the fits are still judged


@pytest.mark.parametrize("smooth_offset, expected", [(-0.1, HOLDS), (0.1, FAILS)])
def test_c2_smooth_bound(tmp_path, smooth_offset, expected):
    steps = range(2, 42, 2)
    job = hand_built_job(tmp_path / "j", [POLICY], (0, 1), diag=lambda arm, seed: smooth_rows(steps),
                         curves=lambda arm, seed: smooth_curves(steps, smooth_offset))
    result, _ = SmoothBound().evaluate(job)
    assert result.verdict == expected and "λ*_smooth/λ*_meas 0.500" in result.statistic


def test_c2_without_l_says_how_to_measure_it(tmp_path):
    job = hand_built_job(tmp_path / "j", [POLICY], (0,), diag=lambda arm, seed: [{"step": 2}],
                         curves=lambda arm, seed: [{"step": 2, "objective": "j_batch", "lambda": 1.0, "delta_meas": 0.0, "delta_taylor": 0.0,
                                                   "delta_smooth": np.nan}])
    result, _ = SmoothBound().evaluate(job)
    assert result.verdict == INCONCLUSIVE and "top_curvature=True" in result.reason
    assert result.statistic == "fraction of curves above the L-smooth bound" and result.n == 0


@pytest.mark.parametrize("sign, expected", [(1.0, HOLDS), (-1.0, FAILS)])
def test_c5_occ_tracking(tmp_path, sign, expected):
    job = hand_built_job(tmp_path / "j", [OCC_PAPER], (0,), metrics=lambda arm, seed: occ_metrics(sign),
                         diag=lambda arm, seed: star_rows())
    result, details = OCCTracking().evaluate(job)
    assert result.verdict == expected and result.n == 29
    assert set(details["c5_tracking"]["star_col"]) == {"lambda_star_taylor", "lambda_star_meas"}
    assert details["c5_minibatch_tracking"].empty  # no oracle arm


def test_c5_per_minibatch_tables_of_the_oracle_arm(tmp_path):
    job = hand_built_job(tmp_path / "j", [ORACLE], (0,), metrics=lambda arm, seed: occ_metrics(1.0),
                         diag=lambda arm, seed: star_rows())
    stars = np.random.default_rng(3).uniform(1, 10, (20, 2))
    pd.DataFrame([{"step": s, "minibatch": mb, schema.calib_column("lambda_star_taylor"): stars[s, mb],
                   schema.shadow_column("paper", "lambda"): stars[s, mb] / 10 if mb else 0.0,
                   schema.shadow_column("paper", "lambda_plus"): 1.0}
                  for s in range(20) for mb in (0, 1)]).to_csv(job.runs[("oracle", 0)] / schema.MINIBATCH, index=False)
    result, details = OCCTracking().evaluate(job)
    assert result.verdict == INCONCLUSIVE and "no 'paper' OCC reading" in result.reason  # the oracle reads "oracle"
    tracking = details["c5_minibatch_tracking"].set_index("minibatch")
    assert list(tracking["proxy"]) == ["paper", "paper"] and tracking.loc[1, "spearman"] == pytest.approx(1.0)
    effect = details["c5_minibatch_effect"]
    zero = effect[(effect["minibatch"] == 0) & (effect["column"] == schema.shadow_column("paper", "lambda"))]
    assert zero["frac_zero"].item() == 1.0  # the first-mini-batch effect, measured


def test_a_job_without_the_arms_of_a_claim_says_which(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH], (0,))
    reasons = {claim.id: claim.evaluate(job)[0].reason for claim in CLAIMS}
    assert reasons["C3"] == "no CE arm in this job: inconclusive"
    assert reasons["C4"] == "no policy arm in this job: inconclusive"
    assert reasons["C5"] == "no occ arm in this job: inconclusive"
    assert reasons["C6"] == "the job needs a detach arm and an occ-paper arm: inconclusive"


# ----------------------------------------------------------------------------- every claim in one report


def test_the_claims_report_states_the_known_verdict_of_every_claim(tmp_path):
    """A job built so that each claim's verdict is known, mixed holds and fails: claims.csv
    and claims.md must carry exactly those verdicts, in claim order."""
    seeds = (0, 1, 2, 3)
    ce_noise = np.random.default_rng(0).normal(0, 0.01, (len(seeds), 20))
    policy_noise = np.random.default_rng(1).normal(0, 0.01, 12)
    fit = {"fit_r2": 0.999, "fit_a2": -1.0}

    def diag(arm, seed):
        rows = {"ce-0.5": lambda: ce_rows(20, 0.0, seed, ce_noise),  # C3 holds
                # C4 fails (v² collapses late), C2 fails (the L-smooth curve lies above the measured one)
                "policy-0.5": lambda: [{**smooth, **decay} for smooth, decay in zip(
                    smooth_rows(range(12)), policy_rows(0.01, -1.0, policy_noise), strict=True)],
                "occ-paper": star_rows, "detach": lambda: [{"step": 1}]}[arm]()
        return [{**row, **fit} for row in rows]  # C1: concave fits everywhere

    def metrics(arm, seed):  # C5 holds (lambda_t tracks lambda*); C6 fails (OCC ends 0.1 below Detach)
        final = 0.5 + 0.01 * seed
        if arm == "occ-paper":
            return occ_metrics(1.0, final - 0.1 + 0.001 * seed)
        return [{"step": 0, "j_true": 0.5, "pass1": 0.5}, {"step": 29, "j_true": final, "pass1": 0.5}]

    job = hand_built_job(tmp_path / "j", [DETACH, CE, POLICY, OCC_PAPER], seeds, diag=diag, metrics=metrics,
                         sweep=sweep_rows(3.0, seeds=seeds),  # C1 holds
                         curves=lambda arm, seed: smooth_curves(range(12), 0.1) if arm == "policy-0.5" else None)
    expected = [HOLDS, FAILS, HOLDS, FAILS, HOLDS, FAILS]
    (csv, md), table = claims.write_claims(job, tmp_path / "out")
    written = pd.read_csv(csv)
    assert list(written["claim"]) == ["C1", "C2", "C3", "C4", "C5", "C6"] and list(written["verdict"]) == expected
    assert list(table["verdict"]) == expected
    text = md.read_text()
    for claim, verdict in zip(written["claim"], expected, strict=True):
        row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
        assert row.split(" | ")[-2] == f"**{verdict}**"
        assert f"- **{claim}** ({verdict}): " in text
    assert "## C4: first measured step where 2λ*_t < λ" in text and "## C5: tracking of λ*_t" in text
    assert "**Incomplete**" not in text
    reasons = table.set_index("claim")["reason"]
    assert "curves above the bound 0/48" in reasons["C2"] and "late/early mean v² 0.010" in reasons["C4"]
    assert "OCC paper − Detach -0.09" in reasons["C6"]


def test_unfinished_runs_are_named_in_the_claims_report(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, CE], (0,))
    (job.runs[("ce-0.5", 0)] / schema.INCOMPLETE).touch()
    _, md = claims.write_claims(load_job(job.path), tmp_path)[0]
    assert "**Incomplete**" in md.read_text() and "runs/ce-0.5/seed0" in md.read_text()


# ----------------------------------------------------------------------------- the Claim base

THRESHOLD_ORDER = [
    "C1_MIN_CURVES", "C1_MIN_MEDIAN_R2", "C1_MIN_CONCAVE_FRACTION", "C1_MIN_SERIES", "C1_SLOPE_LOW", "C1_SLOPE_HIGH",
    "C2_MIN_CURVES", "C2_REL_TOLERANCE", "C2_MIN_BOUNDED_FRACTION", "C3_MIN_STEPS", "C3_COS_MARGIN",
    "C3_MIN_CONCAVE_FRACTION", "C4_MIN_STEPS", "C4_MAX_DECAY_RHO", "C4_MIN_PERSIST_RATIO", "C5_MIN_STEPS",
    "C5_MIN_RHO", "C6_MIN_SEEDS", "C6_MIN_GAIN",
]


def test_the_report_lists_every_claims_thresholds_in_declaration_order(tmp_path):
    assert [claim.id for claim in CLAIMS] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert [name for claim in CLAIMS for name, _ in claim.thresholds()] == THRESHOLD_ORDER
    _, md = claims.write_claims(hand_built_job(tmp_path / "j", [DETACH], (0,)), tmp_path)[0]
    listed = md.read_text().split("## Thresholds", 1)[1]
    assert [line.split(" | ")[0].removeprefix("| ") for line in listed.splitlines()[4:]] == THRESHOLD_ORDER
    assert "| C3_MIN_STEPS | 6 | measured CE steps needed |" in listed
    assert "| C2_REL_TOLERANCE | 0.001 |" in listed


class Toy(Claim):
    id, statement, figure, statistic = "C9", "a toy claim", "F9", "mean x"
    MIN_ROWS = Threshold(3, "rows needed")
    detail_tables = ("c9_rows",)

    def __init__(self, outcome):
        self.outcome = outcome

    def test(self, job, details):
        details["c9_rows"] = pd.DataFrame({"x": [1]})
        if self.outcome == "short":
            raise InsufficientData(f"only 2 rows (need {self.MIN_ROWS})", n=2)
        if self.outcome == "missing":
            raise JobError("claim C9 needs x.csv")
        return self.result([Part("x", HOLDS)], 1.0, 0.5, 1.5, 10, "mean x over 10 rows")


def test_a_claim_is_its_class_attributes_and_its_test():
    assert Toy.MIN_ROWS == 3 and Toy("done").MIN_ROWS == 3
    assert [(name, t.value, t.meaning) for name, t in Toy.thresholds()] == [("C9_MIN_ROWS", 3, "rows needed")]
    result, details = Toy("done").evaluate(None)
    assert (result.claim, result.statement, result.figure, result.verdict, result.value, result.n) == (
        "C9", "a toy claim", "F9", HOLDS, 1.0, 10)
    assert result.statistic == "mean x over 10 rows" and list(details["c9_rows"]["x"]) == [1]


def test_too_little_data_and_a_missing_table_are_inconclusive_with_nan_statistics():
    short, details = Toy("short").evaluate(None)
    assert (short.verdict, short.reason, short.n, short.statistic) == (
        INCONCLUSIVE, "only 2 rows (need 3): inconclusive", 2, "mean x")
    assert np.isnan([short.value, short.ci_low, short.ci_high]).all() and len(details["c9_rows"]) == 1
    missing, details = Toy("missing").evaluate(None)
    assert (missing.verdict, missing.reason, missing.n, missing.statistic) == (
        INCONCLUSIVE, "no data (claim C9 needs x.csv): inconclusive", 0, "n/a")
    with pytest.raises(NotImplementedError):
        Claim().test(None, {})


def test_the_claims_report_lists_a_collapsed_run_and_c6_reports_with_and_without_it(tmp_path):
    from .jobs import collapsed_job

    job = collapsed_job(tmp_path / "j")
    result, _ = EndToEnd().evaluate(job)
    assert "with the collapsed run(s) of seeds [0]; without them" in result.reason
    assert "over 3 seeds" in result.reason and "OCC paper " in result.statistic and "(seed 0 collapsed)" in result.statistic
    _, md = claims.write_claims(job, tmp_path)[0]
    text = md.read_text()
    assert "**Flagged runs** (1)" in text
    assert "- occ-paper seed 0: collapsed, λ out of range from step 5 (J_true 0.5000 after SFT, 0.0010 at the end)" \
        in text


def test_a_run_that_fell_back_to_rev_rev_says_so_in_the_claims_report(tmp_path):
    def diag(arm, seed):
        fell = "Trying to use forward AD with foo that does not support it" if arm == "ce-0.5" else None
        return [{"step": 2, "hvp_mode": "fwd_rev"}, {"step": 4, "hvp_mode": "rev_rev" if fell else "fwd_rev",
                                                    "hvp_fallback": fell}]

    job = hand_built_job(tmp_path / "j", [DETACH, CE], (0,), diag=diag)
    _, md = claims.write_claims(job, tmp_path)[0]
    text = md.read_text()
    assert "**HVP fallback**" in text
    assert "- ce-0.5 seed 0: from step 4: Trying to use forward AD with foo" in text and "- detach" not in text
