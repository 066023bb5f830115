"""Claims C1-C8 (mtpdiag/report/claims/): the interval and equivalence rules, each
claim's verdict on hand-built jobs whose verdict is known (holds, does not hold,
inconclusive; C6 also equivalent), one seed and unreachable thresholds, the claims
report (claims.csv's columns and part rows, claims.md) of a job that decides every
claim, and the Claim base (thresholds from the classes, too little data and missing
tables handled once)."""
import numpy as np
import pandas as pd
import pytest

from mtpdiag import schema
from mtpdiag.report import claims, load_job
from mtpdiag.report.claims import (CLAIMS, CSV_COLUMNS, EQUIVALENT, FAILS, HOLDS, INCONCLUSIVE, REPORTED,
                                   CrossEntropyAtZero, EndToEnd, EtaScaling, OCCTracking, PolicyDecay,
                                   PreconditionedTracking, SmoothBound, TaylorAtTrainedEta)
from mtpdiag.report.claims.base import (ONE_SEED, Claim, Estimate, InsufficientData, Part, Threshold, at_least,
                                        at_most, combine, equivalent, within)
from mtpdiag.report.load import JobError
from mtpdiag.report.stats import over_seeds

from .jobs import CE, DETACH, OCC_PAPER, POLICY, hand_built_job, sweep_rows

ORACLE = {"label": "oracle", "regime": "occ", "lam": None, "calibrator": "oracle"}
SEEDS = (0, 1, 2, 3)


def test_interval_rules():
    assert at_least(0.95, 0.99, 0.9) == HOLDS and at_least(0.5, 0.8, 0.9) == FAILS
    assert at_least(0.8, 0.95, 0.9) == INCONCLUSIVE
    assert at_most(-0.5, -0.1, 0) == HOLDS and at_most(0.1, 0.5, 0) == FAILS and at_most(-0.1, 0.1, 0) == INCONCLUSIVE
    assert within(2.8, 3.2, 2.5, 3.5) == HOLDS and within(1.5, 2.0, 2.5, 3.5) == FAILS
    assert within(2.0, 3.0, 2.5, 3.5) == INCONCLUSIVE and at_least(np.nan, np.nan, 0) == INCONCLUSIVE
    parts = [Part("a", HOLDS), Part("b", INCONCLUSIVE)]
    assert combine(parts) == INCONCLUSIVE and combine(parts + [Part("c", FAILS)]) == FAILS
    assert combine(parts[:1]) == HOLDS and combine([]) == INCONCLUSIVE
    assert combine(parts[:1] + [Part("reported only", FAILS, decides=False)]) == HOLDS


def test_equivalence_is_tost_on_the_90_percent_interval():
    tight = over_seeds([0.01, 0.02, 0.00, 0.01])  # 90% and 95% both inside ±0.1
    assert equivalent(tight, -0.1, 0.1) == HOLDS
    far = over_seeds([0.5, 0.52, 0.49, 0.51])
    assert equivalent(far, -0.1, 0.1) == FAILS
    wide = over_seeds([0.0, 0.3, -0.3, 0.1])  # covers 0 and the margin: says nothing
    assert equivalent(wide, -0.1, 0.1) == INCONCLUSIVE
    # a 90% interval inside the margin whose 95% interval is not: TOST at alpha 0.05 still holds
    values = [0.0, 0.06, -0.06, 0.0, 0.03, -0.03]
    edge = over_seeds(values)
    assert edge.low < -0.04 < edge.low90 and equivalent(edge, -0.04, 0.04) == HOLDS
    assert equivalent(over_seeds([0.0]), -1, 1) == INCONCLUSIVE  # one seed: no interval


# ----------------------------------------------------------------------------- the data each claim reads


def star_rows(ratio, steps=range(2, 12, 2), lr=0.01):
    """C1: lambda*_taylor = ratio(seed) * lambda*_meas on J_true and J_batch rows of every step."""
    return [{"step": s, "minibatch": mb, "objective": objective, "lr": lr, "lambda_star_meas": 1.0 + s + mb,
             "lambda_star_taylor": ratio * (1.0 + s + mb)}
            for s in steps for mb in (0, 1) for objective in ("j_true", "j_batch")]


@pytest.mark.parametrize("ratio, power, seeds, expected", [
    (1.0, 3.0, SEEDS, HOLDS), (2.0, 3.0, SEEDS, FAILS), (1.0, 2.0, SEEDS, FAILS), (1.0, 3.0, (0,), INCONCLUSIVE)])
def test_c1_taylor_matches_the_measured_lambda_star_at_the_trained_eta(tmp_path, ratio, power, seeds, expected):
    job = hand_built_job(tmp_path / "j", [POLICY], seeds, sweep=sweep_rows(power, seeds=seeds),
                         diag=lambda arm, seed: star_rows(ratio * (1 + 0.01 * seed)))
    result, _ = TaylorAtTrainedEta().evaluate(job)
    assert result.verdict == expected and result.unit == "seed" and result.n_units == len(seeds)
    assert result.statistic == "median λ*_Taylor/λ*_meas on J_true at the trained η" and result.margin == "[0.8, 1.25]"
    rows = {row["claim"]: row for row in result.rows()}
    assert set(rows) == {"C1", "C1.batch", "C1.slope"}
    # the mean over seeds of each seed's median ratio
    assert rows["C1"]["estimate"] == pytest.approx(ratio * np.mean([1 + 0.01 * seed for seed in seeds]))
    if len(seeds) > 1:
        assert rows["C1.slope"]["estimate"] == pytest.approx(power) and "sign agreement 1.000" in result.reason
    else:
        assert f"η = 0.01: {ONE_SEED} (threshold C1_RATIO_LOW unreachable at n = 1)" in result.reason
        assert np.isnan(rows["C1"]["ci_low"])


def test_c1_slope_is_inconclusive_when_the_sweep_stays_below_the_trained_eta(tmp_path):
    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS, sweep=sweep_rows(3.0, seeds=SEEDS),
                         diag=lambda arm, seed: star_rows(1.0, lr=1.0))  # the sweep tops out at 0.1
    result, _ = TaylorAtTrainedEta().evaluate(job)
    assert result.verdict == INCONCLUSIVE
    assert "the η sweep tops out at η = 0.1, below the trained η = 1" in result.reason
    assert "on J_true at the trained η 1.000 [1.000, 1.000] over 4 seeds" in result.reason  # still judged: holds
    assert result.parts[0].verdict == HOLDS and result.parts[1].decides is False  # J_batch: reported


def smooth_rows(c, steps=range(2, 12, 2)):
    """C2: the measured curve lambda - lambda^2/8 at eta 0.5, v^2 1, Taylor slope a 1: the
    curvature met is 1, and the L-smooth expression 0.25 c lambda - lambda^2/8 lies below it iff c <= 4."""
    return [{"step": s, "lr": 0.5, "a": 1.0, "c": c, "v2": 1.0, "lambda_star_meas": 4.0} for s in steps]


def smooth_curves(steps=range(2, 12, 2)):
    return [{"step": s, "objective": "j_batch", "lambda": x, "delta_meas": x - x**2 / 8, "delta_taylor": x - x**2 / 8}
            for s in steps for x in np.linspace(-1, 3, 9)]


@pytest.mark.parametrize("c, seeds, expected", [(2.0, SEEDS, HOLDS), (8.0, SEEDS, FAILS), (2.0, (0,), INCONCLUSIVE)])
def test_c2_smooth_bound_with_the_curvature_met(tmp_path, c, seeds, expected):
    job = hand_built_job(tmp_path / "j", [POLICY], seeds, diag=lambda arm, seed: smooth_rows(c),
                         curves=lambda arm, seed: smooth_curves())
    result, _ = SmoothBound().evaluate(job)
    assert result.verdict == expected and result.n_units == len(seeds)
    assert "median L_met 1" in result.reason
    # lambda*_smooth = (c - L eta c) / (L eta v^2) = c against lambda*_meas = 4
    assert {r["claim"]: r for r in result.rows()}["C2.distance"]["estimate"] == pytest.approx(c / 4)
    if expected == INCONCLUSIVE:
        assert f"{ONE_SEED} (threshold C2_MIN_BOUNDED_SHARE unreachable at n = 1)" in result.reason


def test_c2_judges_lambda_at_least_0_only(tmp_path):
    """A curve that breaks the bound only at negative lambda satisfies the claim (the paper's domain is lambda >= 0)."""
    def curves(arm, seed):
        rows = smooth_curves()
        return [{**r, "delta_meas": -100.0} if r["lambda"] < 0 else r for r in rows]

    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS, diag=lambda arm, seed: smooth_rows(2.0), curves=curves)
    assert SmoothBound().evaluate(job)[0].verdict == HOLDS


def ce_rows(cos, seed, noise, n_steps=10, h_mm=-1.0):
    """C3: c_true's cosine (c_eval on the J_true rows, |grad J_true| = |m| = 1) and cos_crossfit both cos + noise."""
    rows = []
    for i, s in enumerate(range(2, 2 + 2 * n_steps, 2)):
        value = cos + noise[seed, i]
        rows += [{"step": s, "objective": "j_true", "c_eval": value, "eval_grad_norm": 1.0, "m_norm": 1.0, "v2": 1.0},
                 {"step": s, "objective": "j_batch", "cos_crossfit": value, "v2": 1.0, "h_mm": h_mm}]
    return rows


@pytest.mark.parametrize("cos, h_mm, seeds, expected", [
    (0.0, -1.0, SEEDS, HOLDS), (0.5, -1.0, SEEDS, FAILS), (0.0, 1.0, SEEDS, FAILS), (0.0, -1.0, (0,), INCONCLUSIVE)])
def test_c3_ce_correlation_is_about_zero(tmp_path, cos, h_mm, seeds, expected):
    noise = np.random.default_rng(0).normal(0, 0.01, (len(SEEDS), 10))
    job = hand_built_job(tmp_path / "j", [CE], seeds, diag=lambda arm, seed: ce_rows(cos, seed, noise, h_mm=h_mm))
    result, _ = CrossEntropyAtZero().evaluate(job)
    assert result.verdict == expected and result.margin == "±0.1"
    assert [r["claim"] for r in result.rows()] == ["C3", "C3.crossfit", "C3.h_mm"]
    if expected == INCONCLUSIVE:  # one seed: the margin cannot be reached, said by the part
        assert f"{ONE_SEED} (threshold C3_COS_MARGIN unreachable at n = 1)" in result.reason
        assert result.n_units == 1 and np.isnan(result.ci_low)


def policy_rows(v2_late, c_slope, noise):
    return [{"step": s, "c": 10 + c_slope * s + noise[s], "v2": 1.0 if s < 6 else v2_late, "h_mm": -1.0,
             "harm_threshold": 0.1 * (12 - s)} for s in range(12)]


@pytest.mark.parametrize("v2_late, c_slope, expected", [
    (1.0, -1.0, HOLDS), (0.01, -1.0, FAILS), (1.0, 0.0, INCONCLUSIVE)])
def test_c4_policy_correlation_decays_and_penalty_persists(tmp_path, v2_late, c_slope, expected):
    noise = np.random.default_rng(1).normal(0, 0.01, (len(SEEDS), 12))
    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS,
                         diag=lambda arm, seed: policy_rows(v2_late, c_slope, noise[seed]))
    result, details = PolicyDecay().evaluate(job)
    assert result.verdict == expected and result.n_units == len(SEEDS)
    assert set(details["c4_crossings"]["crossing_step"]) == {8}  # 2 lambda* = 0.1 (12 - s) < 0.5 from step 8


STARS = np.random.default_rng(2).uniform(1, 100, 30)


def occ_metrics(sign, final=0.5):
    return [{"step": 0, "j_true": 0.5, "pass1": 0.5}] + [
        {"step": s, "j_true": final, "pass1": 0.5, schema.lambda_column(0): sign * STARS[s] / 1000,
         schema.calib_column("lambda_plus"): 1.0} for s in range(1, 30)]


def taylor_rows():
    return [{"step": s, "lambda_star_taylor": STARS[s], "lambda_star_meas": STARS[s]} for s in range(1, 30)]


@pytest.mark.parametrize("sign, seeds, expected", [(1.0, SEEDS, HOLDS), (-1.0, SEEDS, FAILS),
                                                   (1.0, (0,), INCONCLUSIVE)])
def test_c5_occ_tracking_per_seed(tmp_path, sign, seeds, expected):
    job = hand_built_job(tmp_path / "j", [OCC_PAPER], seeds, metrics=lambda arm, seed: occ_metrics(sign),
                         diag=lambda arm, seed: taylor_rows())
    result, details = OCCTracking().evaluate(job)
    assert result.verdict == expected and result.n_units == len(seeds)
    assert result.estimate == pytest.approx(sign)
    assert set(details["c5_tracking"]["star_col"]) == {"lambda_star_taylor", "lambda_star_meas"}
    assert details["c5_minibatch_tracking"].empty  # no oracle arm


def test_c5_per_minibatch_tables_of_the_oracle_arm(tmp_path):
    job = hand_built_job(tmp_path / "j", [ORACLE], (0,), metrics=lambda arm, seed: occ_metrics(1.0),
                         diag=lambda arm, seed: taylor_rows())
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


def finals(gain, spread):
    """Final J_true: seed-dependent, OCC paper above Detach by gain + spread * (seed - 1.5)."""
    def final_j_true(arm, seed):
        return 0.5 + 0.01 * seed + (gain + spread * (seed - 1.5) if arm == "occ-paper" else 0)
    return final_j_true


@pytest.mark.parametrize("gain, spread, seeds, expected", [
    (0.1, 0.001, SEEDS, HOLDS), (-0.1, 0.001, SEEDS, FAILS),
    (0.0, 0.002, SEEDS, EQUIVALENT),  # |gap| far below the paper's 0.028: contradicts its gain
    (0.0, 0.05, SEEDS, INCONCLUSIVE),  # too noisy to tell a paper-sized gain from none
    (0.1, 0.001, (0,), INCONCLUSIVE)])
def test_c6_occ_against_detach_with_the_papers_margin(tmp_path, gain, spread, seeds, expected):
    job = hand_built_job(tmp_path / "j", [DETACH, OCC_PAPER], seeds, final_j_true=finals(gain, spread))
    result, _ = EndToEnd().evaluate(job)
    assert result.verdict == expected and result.margin == "±0.028" and result.n_units == len(seeds)
    assert "Detach " in result.reason and "OCC paper " in result.reason
    if expected == EQUIVALENT:
        assert "contradicts its reported effect" in result.reason
    if len(seeds) == 1:
        assert f"{ONE_SEED} (threshold C6_MIN_GAIN unreachable at n = 1)" in result.reason


def adamw_rows(factor, optimizer="adamw"):
    return [{"step": s, "minibatch": mb, "optimizer": optimizer, "lambda_star_meas": STARS[2 * s + mb],
             "lambda_star_precond": factor * STARS[2 * s + mb]} for s in range(5) for mb in (0, 1)]


@pytest.mark.parametrize("factor, optimizer, expected", [(1.1, "adamw", HOLDS), (-1.0, "adamw", FAILS),
                                                         (1.1, "sgd", INCONCLUSIVE)])
def test_c7_preconditioned_lambda_star_tracks_the_measured_one_under_adamw(tmp_path, factor, optimizer, expected):
    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS, diag=lambda arm, seed: adamw_rows(factor, optimizer))
    result, _ = PreconditionedTracking().evaluate(job)
    assert result.verdict == expected
    if optimizer == "adamw":
        assert result.estimate == pytest.approx(np.sign(factor)) and result.n_units == len(SEEDS)
        assert {r["claim"]: r for r in result.rows()}["C7.ratio"]["estimate"] == pytest.approx(factor)
    else:
        assert "no AdamW arm in this job (optimizers: ['sgd'])" in result.reason


def scaling_sweep(star_power, occ_power, seeds=SEEDS):
    eta = np.geomspace(1e-3, 1e-1, 5)
    return pd.DataFrame([{"arm": POLICY["label"], "seed": seed, "step": 10, "eta": e, "lambda": lam, "delta_meas": 0.0,
                          "delta_taylor": 0.0, "residual": e**3, "lambda_star_taylor": (1 + seed) * e**star_power,
                          "lambda_occ_paper": (2 + seed) * e**occ_power}
                         for seed in seeds for lam in (0.5, 1.0) for e in eta])


@pytest.mark.parametrize("star_power, occ_power, expected", [(-1.0, 1.0, HOLDS), (-1.0, -1.0, FAILS)])
def test_c8_eta_scaling_of_occ_and_taylor_lambdas(tmp_path, star_power, occ_power, expected):
    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS, sweep=scaling_sweep(star_power, occ_power))
    result, _ = EtaScaling().evaluate(job)
    rows = {r["claim"]: r for r in result.rows()}
    assert result.verdict == expected and result.estimate == pytest.approx(occ_power)
    assert rows["C8.taylor"]["estimate"] == pytest.approx(star_power) and rows["C8.taylor"]["verdict"] == HOLDS


def test_c8_names_what_the_sweep_does_not_record(tmp_path):
    job = hand_built_job(tmp_path / "j", [POLICY], SEEDS, sweep=sweep_rows(3.0, seeds=SEEDS))
    result, _ = EtaScaling().evaluate(job)
    assert result.verdict == INCONCLUSIVE
    assert "the η sweep does not record ['lambda_star_taylor', 'lambda_occ_paper']" in result.reason


def test_a_job_without_the_arms_of_a_claim_says_which(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH], (0,))
    reasons = {claim.id: claim.evaluate(job)[0].reason for claim in CLAIMS}
    assert reasons["C3"] == "no CE arm in this job: inconclusive"
    assert reasons["C4"] == "no policy arm in this job: inconclusive"
    assert reasons["C5"] == "no occ arm in this job: inconclusive"
    assert reasons["C6"] == "the job needs a detach arm and an occ-paper arm: inconclusive"


# ----------------------------------------------------------------------------- every claim in one report


def test_the_claims_report_states_the_known_verdict_of_every_claim(tmp_path):
    """A job built so that each claim's verdict is known (holds, does not hold, equivalent,
    inconclusive): claims.csv has exactly its columns, a row per claim and per part, and
    claims.md carries the same verdicts."""
    ce_noise = np.random.default_rng(0).normal(0, 0.01, (len(SEEDS), 10))
    policy_noise = np.random.default_rng(1).normal(0, 0.01, (len(SEEDS), 12))

    def diag(arm, seed):
        if arm == "ce-0.5":
            return ce_rows(0.0, seed, ce_noise)  # C3 holds
        if arm == "occ-paper":
            return taylor_rows()  # C5 holds
        if arm == "detach":
            return [{"step": 1}]
        # the policy arm: C1 holds (ratio 1 on J_true), C4 holds (c decays, v² and −h_mm persist), C7 holds
        # (AdamW, λ*_precond = 1.1 λ*_meas), C2 does not hold (c = 10 − s > 4 on half the curves)
        rows = [{**decay, "lr": 0.5, "a": 1.0, "optimizer": "adamw", "lambda_star_meas": 1.0 + s,
                 "lambda_star_taylor": 1.0 + s, "lambda_star_precond": 1.1 * (1.0 + s)}
                for s, decay in enumerate(policy_rows(1.0, -1.0, policy_noise[seed]))]
        return rows + [{**row, "lr": 0.5} for row in star_rows(1.0, steps=range(12)) if row["objective"] == "j_true"
                       and row["minibatch"] == 0]

    def metrics(arm, seed):  # C6: OCC ends within ±0.002 of Detach on every seed: equivalent
        final = 0.5 + 0.01 * seed
        if arm == "occ-paper":
            return occ_metrics(1.0, final + 0.002 * (seed - 1.5))
        return [{"step": 0, "j_true": 0.5, "pass1": 0.5}, {"step": 29, "j_true": final, "pass1": 0.5}]

    sweep = scaling_sweep(-1.0, 1.0)
    sweep["eta"] *= 10  # the sweep reaches the trained eta 0.5 (C1's slope: residual = eta^3 holds); C8 holds
    sweep["residual"] = sweep["eta"] ** 3
    job = hand_built_job(tmp_path / "j", [DETACH, CE, POLICY, OCC_PAPER], SEEDS, diag=diag, metrics=metrics,
                         sweep=sweep, curves=lambda arm, seed: smooth_curves(range(12)) if arm == "policy-0.5" else None)
    expected = {"C1": HOLDS, "C2": FAILS, "C3": HOLDS, "C4": HOLDS, "C5": HOLDS, "C6": EQUIVALENT, "C7": HOLDS,
                "C8": HOLDS, "C1.slope": HOLDS, "C3.h_mm": HOLDS, "C4.v2": HOLDS, "C8.taylor": HOLDS,
                "C2.distance": REPORTED, "C7.ratio": REPORTED}
    (csv, md), table = claims.write_claims(job, tmp_path / "out")
    written = pd.read_csv(csv, keep_default_na=False)
    assert tuple(written.columns) == CSV_COLUMNS and list(written["claim"]) == list(table["claim"])
    assert [c for c in written["claim"] if "." not in c] == [f"C{i}" for i in range(1, 9)]
    verdicts = written.set_index("claim")["verdict"]
    assert {claim: verdicts[claim] for claim in expected} == expected
    assert set(written["unit"]) == {"seed"} and (written.set_index("claim").loc[list(expected), "n_units"] == 4).all()
    assert written.set_index("claim").loc["C6", "margin"] == "±0.028"
    text = md.read_text()
    for claim, verdict in verdicts.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
        assert row.split(" | ")[-2] == f"**{verdict}**"
    for claim in (f"C{i}" for i in range(1, 9)):
        assert f"- **{claim}** ({verdicts[claim]}): " in text
    assert "TOST at alpha 0.05" in text and "## C4: first measured step where 2λ*_t < λ" in text
    assert "**Incomplete**" not in text
    reasons = table.set_index("claim")["reason"]
    # c = 10 - step > 4, where the bound fails, on steps 0-5 of 12 (step 6 is c = 4 + noise)
    assert "/48 curves, median L_met 1)" in reasons["C2"] and "L = curvature met) 0.4" in reasons["C2"]


def test_unfinished_runs_are_named_in_the_claims_report(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, CE], (0,))
    (job.runs[("ce-0.5", 0)] / schema.INCOMPLETE).touch()
    _, md = claims.write_claims(load_job(job.path), tmp_path)[0]
    assert "**Incomplete**" in md.read_text() and "runs/ce-0.5/seed0" in md.read_text()


# ----------------------------------------------------------------------------- the Claim base

THRESHOLD_ORDER = [
    "C1_RATIO_LOW", "C1_RATIO_HIGH", "C1_SLOPE_WINDOW", "C1_MIN_ETAS", "C1_SLOPE_LOW", "C1_SLOPE_HIGH",
    "C2_MIN_CURVES", "C2_REL_TOLERANCE", "C2_MIN_BOUNDED_SHARE", "C3_COS_MARGIN", "C3_MIN_CONCAVE_SHARE",
    "C4_MIN_STEPS", "C4_MAX_DECAY_RHO", "C4_MIN_PERSIST_RATIO", "C5_MIN_STEPS", "C5_MIN_RHO", "C6_PAPER_GAIN",
    "C6_MIN_GAIN", "C7_MIN_ROWS", "C7_MIN_RHO", "C8_MIN_ETAS", "C8_SLOPE_TOLERANCE",
]


def test_the_report_lists_every_claims_thresholds_in_declaration_order(tmp_path):
    assert [claim.id for claim in CLAIMS] == [f"C{i}" for i in range(1, 9)]
    assert [name for claim in CLAIMS for name, _ in claim.thresholds()] == THRESHOLD_ORDER
    _, md = claims.write_claims(hand_built_job(tmp_path / "j", [DETACH], (0,)), tmp_path)[0]
    listed = md.read_text().split("## Thresholds", 1)[1]
    assert [line.split(" | ")[0].removeprefix("| ") for line in listed.splitlines()[4:]] == THRESHOLD_ORDER
    assert "| C6_PAPER_GAIN | 0.028 | equivalence margin" in listed
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
        return self.result([Part("x", HOLDS, estimate=Estimate("mean x over 10 seeds", 1.0, 0.5, 1.5, 10))])


def test_a_claim_is_its_class_attributes_and_its_test():
    assert Toy.MIN_ROWS == 3 and Toy("done").MIN_ROWS == 3
    assert [(name, t.value, t.meaning) for name, t in Toy.thresholds()] == [("C9_MIN_ROWS", 3, "rows needed")]
    result, details = Toy("done").evaluate(None)
    assert (result.claim, result.statement, result.figure, result.verdict, result.estimate, result.n_units) == (
        "C9", "a toy claim", "F9", HOLDS, 1.0, 10)
    assert result.statistic == "mean x over 10 seeds" and list(details["c9_rows"]["x"]) == [1]
    assert result.rows() == [{"claim": "C9", "statistic": "mean x over 10 seeds", "estimate": 1.0, "ci_low": 0.5,
                              "ci_high": 1.5, "unit": "seed", "n_units": 10, "margin": "", "verdict": HOLDS}]


def test_too_little_data_and_a_missing_table_are_inconclusive_with_nan_statistics():
    short, details = Toy("short").evaluate(None)
    assert (short.verdict, short.reason, short.n_units, short.statistic) == (
        INCONCLUSIVE, "only 2 rows (need 3): inconclusive", 2, "mean x")
    assert np.isnan([short.estimate, short.ci_low, short.ci_high]).all() and len(details["c9_rows"]) == 1
    missing, details = Toy("missing").evaluate(None)
    assert (missing.verdict, missing.reason, missing.n_units, missing.statistic) == (
        INCONCLUSIVE, "no data (claim C9 needs x.csv): inconclusive", 0, "n/a")
    with pytest.raises(NotImplementedError):
        Claim().test(None, {})


def test_the_claims_report_lists_a_collapsed_run_and_c6_reports_with_and_without_it(tmp_path):
    from .jobs import collapsed_job

    job = collapsed_job(tmp_path / "j")
    result, _ = EndToEnd().evaluate(job)
    assert "with the collapsed run(s) of seeds [0]; without them" in result.reason
    assert "over 3 seeds" in result.reason and "OCC paper 0.429" in result.reason and "(seed 0 collapsed)" in result.reason
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
