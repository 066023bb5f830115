"""load_job (mtpdiag/report/load.py): job and run directories in the schema's layout,
their arms by regime object, and a one-line error naming the fix for each bad input."""
import json

import pandas as pd
import pytest

from mtpdiag import __version__, regimes, schema
from mtpdiag.report import load_job
from mtpdiag.report.load import JobError

from .jobs import CE, DETACH, OCC_PAPER, POLICY, hand_built_job, hand_built_run, job_json

ARMS = [DETACH, CE, POLICY, OCC_PAPER]


@pytest.fixture
def job_dir(tmp_path):
    return hand_built_job(tmp_path / "job", ARMS, (0, 1)).path


def test_a_job_directory_gives_its_arms_seeds_and_runs(job_dir):
    job = load_job(job_dir)
    assert job.kind == "job" and job.name == "job" and job.seeds == [0, 1] and job.version == __version__
    assert job.arms == [schema.Arm(**arm) for arm in ARMS]
    assert job.runs[("ce-0.5", 1)] == schema.run_dir(job_dir, "ce-0.5", 1) and job.incomplete_runs == []
    metrics = job.table("metrics", arms=[CE["label"]])
    assert set(metrics[["arm", "regime", "lam", "seed"]].itertuples(index=False, name=None)) == {
        ("ce-0.5", "ce", 0.5, 0), ("ce-0.5", "ce", 0.5, 1)}


def test_arms_of_a_regime_object(job_dir):
    job = load_job(job_dir)
    assert {r: [a.label for a in job.arms_of(r)] for r in regimes.REGIMES.values()} == {
        regimes.DETACH: ["detach"], regimes.CE: ["ce-0.5"], regimes.POLICY: ["policy-0.5"],
        regimes.OCC_REGIME: ["occ-paper"], regimes.KL_REGIME: [], regimes.TV_REGIME: [], regimes.FROZEN: []}
    assert job.regime_of(job.arm("occ-paper")) is regimes.OCC_REGIME


def test_a_job_of_an_unregistered_regime_names_it(tmp_path):
    root = tmp_path / "job"
    hand_built_job(root, [CE], (0,))
    job_json(root, [{**CE, "regime": "toy"}], (0,))
    with pytest.raises(JobError, match=r"names regime\(s\) \['toy'\] that this mtpdiag does not register.*register"):
        load_job(root)


def test_load_job_names_what_is_missing(job_dir, tmp_path):
    with pytest.raises(JobError, match="not a directory"):
        load_job(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="neither job.json.*config.json and metrics.csv"):
        load_job(tmp_path / "empty")
    (schema.run_dir(job_dir, "ce-0.5", 1) / schema.METRICS).unlink()
    with pytest.raises(JobError, match=r"runs/ce-0.5/seed1/metrics.csv.*[Rr]esume the job"):
        load_job(job_dir)


def test_load_job_rejects_other_versions_and_foreign_files(job_dir):
    job_json(job_dir, ARMS, (0, 1), version="9.3.0")
    with pytest.raises(JobError, match=f"mtpdiag 9.3.0, this is mtpdiag {__version__}"):
        load_job(job_dir)
    (job_dir / schema.JOB_FILE).write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        load_job(job_dir)
    (job_dir / schema.JOB_FILE).write_text(json.dumps({"preset": {"name": "x"}}))
    with pytest.raises(JobError, match=r"lacks \['mtpdiag_version', 'preset.seeds', 'preset.arms'\]"):
        load_job(job_dir)


def test_missing_columns_are_named(job_dir):
    metrics = schema.run_dir(job_dir, "detach", 0) / schema.METRICS
    pd.read_csv(metrics).drop(columns=["j_true"]).to_csv(metrics, index=False)
    with pytest.raises(JobError, match=r"detach/seed0/metrics.csv lacks \['j_true'\]"):
        load_job(job_dir)


def test_a_table_no_run_has_names_the_hook(job_dir):
    with pytest.raises(JobError, match=r"F9 needs diag_blocks.csv in the run directories, and none of 8 has it.*"
                                       r"DiagnosticsHook"):
        load_job(job_dir).table("diag_blocks", needed_for="F9")
    with pytest.raises(ValueError, match=r"table 'blocks': choose one of"):
        load_job(job_dir).table("blocks")


def test_unfinished_runs_are_listed(job_dir):
    (schema.run_dir(job_dir, "ce-0.5", 0) / schema.INCOMPLETE).touch()
    assert load_job(job_dir).incomplete_runs == ["runs/ce-0.5/seed0"]


# ----------------------------------------------------------------------------- a run directory of `mtpdiag train`


def test_a_run_with_a_calibrator_and_shadows_is_the_calibrators_arm(tmp_path):
    """config.json names the primary calibrator and the shadows apart: the arm is the primary's."""
    run = hand_built_run(tmp_path / "run", {"regime": "occ", "lam": None, "calibrator": None, "seed": 3},
                         calibrator="oracle", shadows={"shadow_paper": "occ-paper"})
    job = load_job(run)
    assert job.kind == "run" and job.seeds == [3] and job.runs == {("oracle", 3): run}
    assert job.arms == [schema.Arm("oracle", "occ", None, "oracle")]


def test_a_run_of_the_config_calibrator(tmp_path):
    run = hand_built_run(tmp_path / "run", {"regime": "occ", "lam": None, "calibrator": "occ-paper", "seed": 0},
                         calibrator="occ-paper", shadows={"shadow_reference": "occ-reference"})
    assert load_job(run).arms == [schema.Arm("occ-paper", "occ", None, "occ-paper")]


@pytest.mark.parametrize("regime, lam, arm", [
    ("detach", None, schema.Arm("detach", "detach")),
    ("policy", 0.5, schema.Arm("policy-0.5", "policy", 0.5)),
    # a fixed-lambda run without lam trained with the default, and is labelled as `mtpdiag run` labels that arm
    ("ce", None, schema.Arm(f"ce-{regimes.DEFAULT_LAMBDA}", "ce", regimes.DEFAULT_LAMBDA)),
    ("occ", None, schema.Arm("occ", "occ")),
])  # fmt: skip
def test_a_run_without_calibrator_is_labelled_as_its_job_arm(tmp_path, regime, lam, arm):
    run = hand_built_run(tmp_path / "run", {"regime": regime, "lam": lam, "calibrator": None, "seed": 0})
    assert load_job(run).arms == [arm]


def test_a_run_directory_that_is_not_one_says_so(tmp_path):
    run = hand_built_run(tmp_path / "run", {"regime": "ce"})
    (run / schema.CONFIG).write_text(json.dumps({"versions": {"mtpdiag": __version__}}))
    with pytest.raises(JobError, match="has no 'config' entry: it is not a run directory of `mtpdiag train`"):
        load_job(run)
    (run / schema.CONFIG).write_text(json.dumps({"config": {"regime": "toy"}, "versions": {"mtpdiag": __version__}}))
    with pytest.raises(JobError, match=r"config.json names regime\(s\) \['toy'\]"):
        load_job(run)
    (run / schema.CONFIG).write_text(json.dumps({"config": {"regime": "ce"}, "versions": {"mtpdiag": "9.3.0"}}))
    with pytest.raises(JobError, match="mtpdiag 9.3.0"):
        load_job(run)


def test_a_damaged_csv_or_config_json_is_named(job_dir):
    run = job_dir / "runs" / "detach" / "seed0"
    (run / schema.CONFIG).write_text("{not json")
    with pytest.raises(JobError, match=f"{run / schema.CONFIG} is damaged, not valid JSON"):
        load_job(job_dir)
    (run / schema.CONFIG).write_text(json.dumps({"config": {}, "versions": {"mtpdiag": __version__}}))
    (run / schema.METRICS).write_bytes(b"")
    with pytest.raises(JobError, match=f"{run / schema.METRICS} is damaged .*re-run that run, or restore the file"):
        load_job(job_dir).table("metrics")
