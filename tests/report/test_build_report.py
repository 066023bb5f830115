"""build_report and the analyses/ command lines (mtpdiag/report/__init__.py) on a real
micro job end to end: every file exists, parses and traces to the run CSVs; what a
single run directory or a job without diagnostics cannot give is said, not drawn."""
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from mtpdiag import schema
from mtpdiag.report import build_report, claims, figures, load_job, run_analysis, table
from mtpdiag.report.claims import INCONCLUSIVE
from mtpdiag.report.load import JobError

from .jobs import ARMS, DETACH, POLICY, SEEDS, copy_job

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = [f"{name}.{ext}" for name in schema.FIGURE_FILES.values() for ext in schema.FIGURE_FORMATS] + [
    schema.TABLE1_CSV, schema.TABLE1_MD, schema.CLAIMS_CSV, schema.CLAIMS_MD, schema.ACCEPTANCE_CSV,
    schema.ACCEPTANCE_MD, schema.REGRET_CSV, schema.REGRET_MD]


def test_build_report_writes_every_figure_table_and_claim(micro_job, report):
    out = micro_job / schema.FIGURES_DIR
    assert report["out_dir"] == out and report["skipped"] == {}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        OUTPUTS + [schema.figure_data_file(name) for name in schema.FIGURE_FILES.values()])  # no temporary file left
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in schema.FIGURE_FILES.values():
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 300  # a real 150-dpi raster
        pdf = (out / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-1024:]
    claims_csv = pd.read_csv(out / schema.CLAIMS_CSV)
    assert tuple(claims_csv.columns) == claims.CSV_COLUMNS
    assert [c for c in claims_csv["claim"] if "." not in c] == [f"C{i}" for i in range(1, 9)]
    assert set(claims_csv["unit"]) == {"seed"} and set(claims_csv["verdict"]) <= {*claims.VERDICTS, claims.REPORTED}
    # the verdicts are the claims' own on this job (their logic is tested on jobs of known verdict in test_claims)
    assert list(claims_csv["verdict"]) == list(report["claims_table"]["verdict"])
    assert report["claims_table"]["reason"].str.len().min() > 0 and report["claims_table"]["figure"].notna().all()
    markdown = (out / schema.CLAIMS_MD).read_text()
    for row in claims_csv.itertuples():
        assert f"| {row.claim} |" in markdown
        assert "." in row.claim or f"- **{row.claim}** ({row.verdict}): " in markdown
    main = pd.read_csv(out / schema.TABLE1_CSV)
    assert list(main[main["table"] == "main"]["arm"]) == [a["label"] for a in ARMS]
    assert list(main[main["table"] == "fixed_lambda_sweep"]["arm"]) == [POLICY["label"]]
    assert "| Detach |" in (out / schema.TABLE1_MD).read_text()


def test_every_plotted_number_traces_to_the_run_csvs(micro_job, report):
    out = micro_job / schema.FIGURES_DIR

    def run_csv(arm, seed, name):
        return pd.read_csv(schema.run_dir(micro_job, arm, seed) / name)

    def figure_data(figure):
        return pd.read_csv(out / schema.figure_data_file(schema.FIGURE_FILES[figure]))

    performance = figure_data("F5")
    for row in performance.sample(10, random_state=0).itertuples():
        values = [run_csv(row.arm, s, schema.METRICS).set_index("step").loc[row.step, row.quantity] for s in SEEDS]
        assert row.mean == pytest.approx(np.mean(values), rel=1e-12) and row.n == len(SEEDS)
    decomposition = figure_data("F2")
    for row in decomposition[decomposition["quantity"] == "c"].itertuples():
        steps = [run_csv(row.arm, s, schema.diag_file("steps")) for s in SEEDS]
        values = [f[(f["step"] == row.step) & (f["minibatch"] == 0) & (f["objective"] == "j_batch")]["c"].item()
                  for f in steps]  # the report reads each step's first mini-batch
        assert row.mean == pytest.approx(np.mean(values), rel=1e-12)
    curves = figure_data("F1")
    assert len(curves) > 0
    for row in curves.to_dict("records"):
        source = run_csv(row["arm"], row["seed"], schema.diag_file("curves"))
        match = source[(source["step"] == row["step"]) & (source["objective"] == row["objective"])
                       & (source["minibatch"] == row["minibatch"]) & (source["lambda"] == row["lambda"])]
        assert match["delta_meas"].item() == row["delta_meas"]
    sweep = figure_data("F4")
    assert np.allclose(sweep["residual"], pd.read_csv(micro_job / schema.ETA_SWEEP)["residual"])
    tracking = figure_data("F3")
    own = {arm["label"]: arm["calibrator"].removeprefix("occ-") for arm in ARMS if arm["calibrator"]}
    assert set(tracking["proxy"]) == {"paper", "reference"}
    for row in tracking.itertuples():
        column = schema.lambda_column(0) if own[row.arm] == row.proxy else schema.shadow_column(row.proxy, "lambda")
        assert row.lambda_t == run_csv(row.arm, row.seed, schema.METRICS).set_index("step").loc[row.step, column]
    blocks = figure_data("F6")
    assert set(blocks["block"]) == set(run_csv(POLICY["label"], 0, schema.diag_file("blocks"))["block"])
    tradeoff = figure_data("F8")
    seeds = tradeoff[tradeoff["point"] == "seed"]
    assert len(seeds) == len(ARMS) * len(SEEDS)  # every arm of the micro job logs acceptance
    for row in seeds.itertuples():
        final = run_csv(row.arm, int(row.seed), schema.METRICS).set_index("step").loc[row.step]
        assert (row.accept_tv_1, row.j_true) == (final["accept_tv_1"], final["j_true"])
    means = tradeoff[tradeoff["point"] == "arm mean"].set_index("arm")
    for arm in ARMS:
        assert means.loc[arm["label"], "accept_tv_1"] == pytest.approx(seeds[seeds["arm"] == arm["label"]][
            "accept_tv_1"].mean(), rel=1e-12)
    regret = pd.read_csv(out / schema.REGRET_CSV)
    assert list(regret.columns[:7]) == ["calibrator", "eta_scale", "regret_median", "ci_low", "ci_high",
                                        "cost_over_detach", "proposed"]
    pd.testing.assert_frame_equal(figure_data("F7"), regret)
    rows = {seed: run_csv(DETACH["label"], seed, schema.diag_file("steps", prefix=schema.REGRET_PREFIX))
            for seed in SEEDS}
    assert {"occ-paper", "occ-paper[mb0]", "amortised-taylor"} <= set(regret["calibrator"])
    assert set(regret.loc[regret["proposed"], "calibrator"]) == set(schema.REGRET_PROPOSED)
    for row in pd.concat([regret.sample(5, random_state=0), regret[regret["calibrator"] == "occ-paper"]]).itertuples():
        medians = []
        for frame in rows.values():  # the per-seed median of regret over the seed's mean |detach gain|
            at = frame[frame["eta_scale"] == row.eta_scale]
            gain = at.loc[at["choice"] == "detach", "gain_detach"].abs().mean()
            # an OCC reading on every state: its per-mini-batch choices together
            chosen = (at["choice"] == row.calibrator) | at["choice"].str.startswith(f"{row.calibrator}[mb")
            medians.append((at.loc[chosen, "regret"] / gain).median())
        assert row.regret_median == pytest.approx(np.mean(medians), rel=1e-12)
    assert "## mtpdiag's own calibrators against their goals" in (out / schema.REGRET_MD).read_text()
    assert f"({schema.ACCEPTANCE_MD})" in (out / schema.CLAIMS_MD).read_text()


SCRIPTS = sorted(p.name for p in (ROOT / "analyses").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_analyses_script_explains_bad_input(tmp_path, monkeypatch, capsys, script):
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "analyses" / script), run_name="__main__")
    assert exit_.value.code == 2
    assert "neither job.json" in capsys.readouterr().err


@pytest.mark.parametrize("script, outputs", [
    ("performance.py", ["F5_performance.png", "F5_performance.pdf", "table1.md", "table1.csv"]),
    ("claims_report.py", ["claims.md", "claims.csv"]),
    ("acceptance.py", ["F8_acceptance_tradeoff.png", "F8_acceptance_tradeoff_data.csv", "acceptance.md"]),
    ("regret.py", ["F7_regret.png", "F7_regret_data.csv", "regret.csv", "regret.md"]),
])  # fmt: skip
def test_analyses_scripts_write_their_files(micro_job, tmp_path, monkeypatch, script, outputs):
    monkeypatch.setattr(sys, "argv", [script, str(micro_job), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "analyses" / script), run_name="__main__")
    assert exit_.value.code == 0
    for name in outputs:
        assert (tmp_path / name).exists()


def test_a_single_run_directory_gives_its_figures_and_says_what_it_cannot(micro_job, tmp_path, capsys):
    run = schema.run_dir(micro_job, POLICY["label"], 1)
    job = load_job(run)
    assert job.kind == "run" and [a.label for a in job.arms] == [POLICY["label"]] and job.seeds == [1]
    figures.performance(job, tmp_path)
    assert (pd.read_csv(tmp_path / "F5_performance_data.csv")["n"] == 1).all()  # drawn as "1 seed, no band"
    figures.occ_tracking(job, tmp_path)  # states that there is no occ arm
    with pytest.raises(JobError, match="eta_sweep.csv.*single trainer run directory"):
        figures.taylor_residual(job, tmp_path)
    assert run_analysis(figures.taylor_residual, "F4", [str(run), "--out", str(tmp_path)]) == 2
    assert "single trainer run directory" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="F4 not made"):
        result = build_report(run, tmp_path)
    assert "F4" in result["skipped"] and "F4" in (tmp_path / schema.CLAIMS_MD).read_text()
    assert result["claims_table"].set_index("claim").loc["C1", "verdict"] == INCONCLUSIVE


def test_a_job_without_diagnostics_skips_their_figures_and_says_why(micro_job, tmp_path):
    job = copy_job(micro_job, tmp_path / "job")
    for path in job.glob(f"{schema.RUNS_DIR}/*/*/{schema.diag_file('steps')}"):
        path.unlink()
    loaded = load_job(job)
    with pytest.raises(JobError, match="F2 .*needs diag_steps.csv.*DiagnosticsHook"):
        figures.decomposition(loaded, tmp_path)
    (job / schema.ETA_SWEEP).unlink()
    with pytest.raises(JobError, match="F4 .*eta_sweep.csv.*eta sweep"):
        figures.taylor_residual(loaded, tmp_path)
    verdicts = claims.claims(loaded)[0].set_index("claim")
    assert (verdicts.loc[["C1", "C2", "C3", "C4", "C5"], "verdict"] == INCONCLUSIVE).all()
    assert "diag_steps.csv" in verdicts.loc["C3", "reason"] and verdicts.loc["C3", "statistic"] == "n/a"
    with pytest.warns(UserWarning) as warned:
        result = build_report(job)
    assert set(result["skipped"]) == {"F1", "F2", "F3", "F4"}
    assert sorted(str(w.message)[:2] for w in warned) == ["F1", "F2", "F3", "F4"]
    assert "## Figures not made" in (job / schema.FIGURES_DIR / schema.CLAIMS_MD).read_text()


def test_a_report_does_not_overwrite_with_half_a_file(micro_job, tmp_path, monkeypatch):
    """Every file is written to a temporary sibling and renamed: a failing write leaves the old file whole."""
    job = copy_job(micro_job, tmp_path / "job")
    shutil.copytree(micro_job / schema.FIGURES_DIR, job / schema.FIGURES_DIR)
    before = (job / schema.FIGURES_DIR / schema.TABLE1_MD).read_text()

    def full_disk(self, *args, **kwargs):
        self.open("w").write("half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        table.write_table1(load_job(job), job / schema.FIGURES_DIR)
    monkeypatch.undo()
    assert (job / schema.FIGURES_DIR / schema.TABLE1_MD).read_text() == before
    assert not list((job / schema.FIGURES_DIR).glob("*.tmp"))
