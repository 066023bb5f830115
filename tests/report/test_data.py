"""The shared tables of mtpdiag/report/data.py: which lambda_t column is which OCC
reading, the early/middle/late steps, the final values, the diagnostics rows."""
import numpy as np
import pytest

from mtpdiag import schema
from mtpdiag.report import data
from mtpdiag.report.load import JobError

from .jobs import CE, OCC_PAPER, hand_built_job

ORACLE = {"label": "oracle", "regime": "occ", "lam": None, "calibrator": "oracle"}


def occ_metrics(arm, seed):
    """lambda_0 is the arm's own calibrator; shadows log theirs under their readings."""
    rows = [{"step": 0, "j_true": 0.5, "pass1": 0.5}]
    for step in (1, 2, 3):
        row = {"step": step, "j_true": 0.5, "pass1": 0.5, schema.lambda_column(0): 10 * step + seed,
               schema.calib_column("lambda_plus"): 1.0,
               schema.shadow_column("reference", "lambda"): 100 * step,
               schema.shadow_column("reference", "lambda_plus"): 2.0,
               schema.shadow_column("empty", "lambda"): np.nan}
        if arm == "oracle":  # the oracle shadows the paper reading as well
            row[schema.shadow_column("paper", "lambda")] = 1000 * step
        rows.append(row)
    return rows


def diag(arm, seed):
    return [{"step": s, "lambda_star_taylor": 0.1 * s, "lambda_star_meas": 0.2 * s} for s in (2, 3)]


@pytest.fixture
def occ_job(tmp_path):
    return hand_built_job(tmp_path / "j", [CE, OCC_PAPER, ORACLE], (0,), metrics=occ_metrics, diag=diag)


def test_tracking_names_each_lambda_by_its_reading(occ_job):
    frame = data.tracking_frame(occ_job)
    assert set(frame["arm"]) == {"occ-paper", "oracle"}  # the CE arm has no lambda_t
    readings = {arm: sorted(set(rows["proxy"])) for arm, rows in frame.groupby("arm")}
    # a shadow that logged nothing ("empty") is not a reading of the arm
    assert readings == {"occ-paper": ["paper", "reference"], "oracle": ["oracle", "paper", "reference"]}
    own = frame[(frame["arm"] == "occ-paper") & (frame["proxy"] == "paper")].set_index("step")
    assert list(own["lambda_t"]) == [10, 20, 30] and (own["lambda_plus"] == 1.0).all()
    shadow = frame[(frame["arm"] == "oracle") & (frame["proxy"] == "reference")].set_index("step")
    assert list(shadow["lambda_t"]) == [100, 200, 300] and (shadow["lambda_plus"] == 2.0).all()
    assert list(own["lambda_star_taylor"].fillna(-1)) == [-1, 0.2, pytest.approx(0.3)]  # step 1 was not measured


def test_a_reading_logged_by_the_arm_and_a_shadow_keeps_the_arms_own(tmp_path):
    def metrics(arm, seed):
        return [{"step": 1, "j_true": 0.5, "pass1": 0.5, schema.lambda_column(0): 1.0,
                 schema.shadow_column("paper", "lambda"): 2.0}]

    job = hand_built_job(tmp_path / "j", [OCC_PAPER], (0,), metrics=metrics, diag=diag)
    frame = data.tracking_frame(job)
    assert list(frame["proxy"]) == ["paper"] and list(frame["lambda_t"]) == [1.0]
    assert np.isnan(frame["lambda_plus"]).all()  # no lambda_plus logged: NaN, not a guess


def test_reading_of_a_calibrator():
    assert [data.reading_of(c) for c in ("occ-paper", "occ-reference", "oracle")] == ["paper", "reference", "oracle"]


@pytest.mark.parametrize("steps, picked", [
    ([4, 0, 2, 6, 8], [("early", 0), ("middle", 4), ("late", 8)]),
    ([2, 4], [("early", 2), ("middle", 4)]),  # the middle of two is the later one, also the last
    ([3, 3], [("early", 3)]),
])  # fmt: skip
def test_checkpoints(steps, picked):
    assert data.checkpoints(steps) == picked


def test_final_values_are_the_last_finite_row_of_each_run(tmp_path):
    def metrics(arm, seed):
        return [{"step": 0, "j_true": 0.1, "pass1": 0.5}, {"step": 4, "j_true": 0.2 + seed, "pass1": 0.5},
                {"step": 6, "j_true": np.nan, "pass1": 0.5}]

    finals = data.final_values(hand_built_job(tmp_path / "j", [CE], (0, 1), metrics=metrics), "j_true")
    assert finals.to_dict("list") == {"arm": ["ce-0.5", "ce-0.5"], "seed": [0, 1], "step": [4, 4], "value": [0.2, 1.2]}


def test_diag_steps_of_an_objective_that_was_not_measured_names_those_that_were(occ_job):
    assert set(data.diag_steps(occ_job, "F0")["step"]) == {2, 3}
    with pytest.raises(JobError, match=r"F0 needs diagnostics of objective 'j_true'.*only have \['j_batch'\]"):
        data.diag_steps(occ_job, "F0", objective="j_true")
