"""Figures, Table 1 and the claims report: a real micro job end to end (every file
exists, parses and traces to the run CSVs), the verdict logic of each claim on
hand-built jobs, and every bad-input message."""
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from mtpdiag import __version__
from mtpdiag.calibrators import WithShadows, make_calibrator
from mtpdiag.hook import CSVSink, DiagnosticsHook, every
from mtpdiag.diagnostics import Curve, Probe, ProbeRecord, default_forward
from mtpdiag.report import build_report, claims, figures, load_job, run_analysis, stats, table
from mtpdiag.report.claims import FAILS, HOLDS, INCONCLUSIVE, VERDICTS, at_least, at_most, combine, within
from mtpdiag.report.load import JobError
from mtpdiag import regimes
from mtpdiag.config import TrainConfig
from mtpdiag.rollout import rollout
from mtpdiag.train import load_run, train

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(
    task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2,
    sft_steps=200, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
    steps=6, prompts_per_step=8, group_size=4, lr=1e-3, eval_every=3, eval_prompts=12, eval_samples=2,
    checkpoint_every=6, dtype="float64",
)  # fmt: skip
ARMS = [
    {"label": "detach", "regime": "detach", "lam": None, "calibrator": None},
    {"label": "ce-0.5", "regime": "ce", "lam": 0.5, "calibrator": None},
    {"label": "policy-0.5", "regime": "policy", "lam": 0.5, "calibrator": None},
    {"label": "occ-paper", "regime": "occ", "lam": None, "calibrator": "occ-paper"},
]
SEEDS = (0, 1)
SWEEP_ETAS = np.geomspace(1e-3, 1e-1, 4)
OUTPUTS = [f"{name}.{ext}" for name in figures.NAMES.values() for ext in ("png", "pdf")] + [
    "table1.csv", "table1.md", "claims.csv", "claims.md"]


@pytest.fixture(scope="module", autouse=True)
def fewer_resamples():
    """200 bootstrap resamples instead of 2000: the same intervals to within noise, 10x faster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats, "N_RESAMPLES", 200)
        yield


def job_json(root: Path, arms, seeds=SEEDS, version=__version__) -> None:
    """job.json as `mtpdiag run` writes it (the fields the report reads)."""
    preset = {"name": root.name, "base": {}, "seeds": list(seeds), "arms": arms, "diag_every": 2}
    (root / "job.json").write_text(json.dumps({"mtpdiag_version": version, "preset": preset}))


@pytest.fixture(scope="module")
def micro_job(tmp_path_factory) -> Path:
    """A real job in the layout of `mtpdiag run`, built from the trainer, the hook and the
    Probe directly (fast and independent of the orchestration): 4 arms x 2 seeds of 6 RL
    steps on a tiny model, diagnostics every 2 steps with per-block rows (and the top
    curvature L, which costs most, on the policy arm only), shadows of the OCC readings,
    and an eta sweep on the final ce/policy models."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("micro-job")
    for arm in ARMS:
        for seed in SEEDS:
            run = root / "runs" / arm["label"] / f"seed{seed}"
            cfg = TrainConfig.from_dict({**MICRO, "regime": arm["regime"], "lam": arm["lam"], "seed": seed})
            calibrator = None
            if arm["calibrator"]:
                shadows = {"shadow_paper": make_calibrator("occ-paper"),
                           "shadow_reference": make_calibrator("occ-reference")}
                calibrator = WithShadows(make_calibrator(arm["calibrator"]), shadows)
            hook = DiagnosticsHook(schedule=every(2), sink=CSVSink(run), per_block=True,
                                   top_curvature=arm["regime"] == "policy",
                                   probe_options={"shared_forward": default_forward})
            train(cfg, run, calibrator=calibrator, callbacks=[hook], progress=False, cache_dir=root / "cache")
    rows = []
    for label in ("ce-0.5", "policy-0.5"):
        for seed in SEEDS:
            model, cfg, task = load_run(root / "runs" / label / f"seed{seed}")
            batch, _ = rollout(model, task, cfg, cfg.steps + 1)
            losses = regimes.get(cfg.regime).losses(cfg)
            probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward)
            for eta in SWEEP_ETAS:
                record = probe.measure(batch, eta, lambdas=[0.5, 1.0, 2.0], gg_curvature=False)
                rows += [{"arm": label, "seed": seed, "step": cfg.steps, "eta": eta, "lambda": r["lambda"],
                          "delta_meas": r["delta_meas"], "delta_taylor": r["delta_taylor"],
                          "residual": abs(r["delta_meas"] - r["delta_taylor"])} for r in record.curve_rows()]
    pd.DataFrame(rows).to_csv(root / "eta_sweep.csv", index=False)
    job_json(root, ARMS)
    return root


@pytest.fixture(scope="module")
def report(micro_job):
    return build_report(micro_job)


def copy_job(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pt", "cache", "figures"))
    return target


# ----------------------------------------------------------------------------- the micro job end to end


def test_build_report_writes_every_figure_table_and_claim(micro_job, report):
    out = micro_job / "figures"
    assert report["out_dir"] == out and report["skipped"] == {}
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in figures.NAMES.values():
        image = imread(out / f"{name}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 300  # a real 150-dpi raster
        pdf = (out / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-1024:]
    claims_csv = pd.read_csv(out / "claims.csv")
    assert list(claims_csv["claim"]) == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert set(claims_csv["verdict"]) <= set(VERDICTS)
    assert claims_csv["reason"].str.len().min() > 0 and claims_csv["figure"].notna().all()
    markdown = (out / "claims.md").read_text()
    for row in claims_csv.itertuples():
        assert f"| {row.claim} |" in markdown and f"**{row.verdict}**" in markdown
    main = pd.read_csv(out / "table1.csv")
    assert list(main[main["table"] == "main"]["arm"]) == [a["label"] for a in ARMS]
    assert list(main[main["table"] == "fixed_lambda_sweep"]["arm"]) == ["policy-0.5"]
    assert "| Detach |" in (out / "table1.md").read_text()


def test_every_plotted_number_traces_to_the_run_csvs(micro_job, report):
    out = micro_job / "figures"
    seeds = SEEDS

    def run_csv(arm, seed, name):
        return pd.read_csv(micro_job / "runs" / arm / f"seed{seed}" / name)

    performance = pd.read_csv(out / "F5_performance_data.csv")
    for row in performance.sample(10, random_state=0).itertuples():
        values = [run_csv(row.arm, s, "metrics.csv").set_index("step").loc[row.step, row.quantity] for s in seeds]
        assert row.mean == pytest.approx(np.mean(values), rel=1e-12) and row.n == len(seeds)
    decomposition = pd.read_csv(out / "F2_decomposition_data.csv")
    for row in decomposition[decomposition["quantity"] == "c"].itertuples():
        steps = [run_csv(row.arm, s, "diag_steps.csv") for s in seeds]
        values = [f[(f["step"] == row.step) & (f["objective"] == "j_batch")]["c"].item() for f in steps]
        assert row.mean == pytest.approx(np.mean(values), rel=1e-12)
    curves = pd.read_csv(out / "F1_concave_curves_data.csv")
    assert len(curves) > 0
    for row in curves.to_dict("records"):
        source = run_csv(row["arm"], row["seed"], "diag_curves.csv")
        match = source[(source["step"] == row["step"]) & (source["objective"] == row["objective"])
                       & (source["kind"] == row["kind"]) & (source["lambda"] == row["lambda"])]
        assert match["delta_meas"].item() == row["delta_meas"]
    sweep = pd.read_csv(out / "F4_taylor_residual_data.csv")
    assert np.allclose(sweep["residual"], pd.read_csv(micro_job / "eta_sweep.csv")["residual"])
    tracking = pd.read_csv(out / "F3_occ_tracking_data.csv")
    own = {arm["label"]: arm["calibrator"].removeprefix("occ-") for arm in ARMS if arm["calibrator"]}
    assert set(tracking["proxy"]) == {"paper", "reference"}
    for row in tracking.itertuples():
        column = "lambda_0" if own[row.arm] == row.proxy else f"calib_shadow_{row.proxy}_lambda"
        assert row.lambda_t == run_csv(row.arm, row.seed, "metrics.csv").set_index("step").loc[row.step, column]
    blocks = pd.read_csv(out / "F6_per_block_data.csv")
    assert set(blocks["block"]) == set(run_csv("policy-0.5", 0, "diag_blocks.csv")["block"])


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
])  # fmt: skip
def test_analyses_scripts_write_their_files(micro_job, tmp_path, monkeypatch, script, outputs):
    monkeypatch.setattr(sys, "argv", [script, str(micro_job), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "analyses" / script), run_name="__main__")
    assert exit_.value.code == 0
    for name in outputs:
        assert (tmp_path / name).exists()


def test_a_single_run_directory_gives_its_figures_and_says_what_it_cannot(micro_job, tmp_path, capsys):
    run = micro_job / "runs" / "policy-0.5" / "seed1"
    job = load_job(run)
    assert job.kind == "run" and [a.label for a in job.arms] == ["policy-0.5"] and job.seeds == [1]
    figures.performance(job, tmp_path)
    assert (pd.read_csv(tmp_path / "F5_performance_data.csv")["n"] == 1).all()  # drawn as "1 seed, no band"
    figures.occ_tracking(job, tmp_path)  # states that there is no occ arm
    with pytest.raises(JobError, match="eta_sweep.csv.*single trainer run directory"):
        figures.taylor_residual(job, tmp_path)
    assert run_analysis(figures.taylor_residual, "F4", [str(run), "--out", str(tmp_path)]) == 2
    assert "single trainer run directory" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="F4 not made"):
        result = build_report(run, tmp_path)
    assert "F4" in result["skipped"] and "F4" in (tmp_path / "claims.md").read_text()
    assert result["claims_table"].set_index("claim").loc["C1", "verdict"] == INCONCLUSIVE


# ----------------------------------------------------------------------------- bad input


def test_load_job_names_what_is_missing(micro_job, tmp_path):
    with pytest.raises(JobError, match="not a directory"):
        load_job(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="neither job.json.*config.json and metrics.csv"):
        load_job(tmp_path / "empty")
    job = copy_job(micro_job, tmp_path / "job")
    (job / "runs" / "ce-0.5" / "seed1" / "metrics.csv").unlink()
    with pytest.raises(JobError, match=r"runs/ce-0.5/seed1/metrics.csv.*[Rr]esume the job"):
        load_job(job)


def test_unfinished_runs_are_named_in_the_claims_report(micro_job, tmp_path):
    job = copy_job(micro_job, tmp_path / "job")
    (job / "runs" / "ce-0.5" / "seed0" / ".incomplete").touch()
    claims.write_claims(load_job(job), tmp_path)
    assert "**Incomplete**" in (tmp_path / "claims.md").read_text()
    assert "runs/ce-0.5/seed0" in (tmp_path / "claims.md").read_text()


def test_load_job_rejects_other_versions_and_foreign_files(micro_job, tmp_path):
    job = copy_job(micro_job, tmp_path / "job")
    job_json(job, ARMS, version="9.3.0")
    with pytest.raises(JobError, match=f"mtpdiag 9.3.0, this is mtpdiag {__version__}"):
        load_job(job)
    (job / "job.json").write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        load_job(job)
    (job / "job.json").write_text(json.dumps({"preset": {"name": "x"}}))
    with pytest.raises(JobError, match=r"lacks \['mtpdiag_version', 'preset.seeds', 'preset.arms'\]"):
        load_job(job)


def test_missing_columns_and_diagnostics_are_named(micro_job, tmp_path):
    job = copy_job(micro_job, tmp_path / "job")
    metrics = job / "runs" / "detach" / "seed0" / "metrics.csv"
    pd.read_csv(metrics).drop(columns=["j_true"]).to_csv(metrics, index=False)
    with pytest.raises(JobError, match=r"detach/seed0/metrics.csv lacks \['j_true'\]"):
        load_job(job)
    shutil.copy(micro_job / "runs" / "detach" / "seed0" / "metrics.csv", metrics)
    for path in job.glob("runs/*/*/diag_steps.csv"):
        path.unlink()
    loaded = load_job(job)
    with pytest.raises(JobError, match="F2 .*needs diag_steps.csv.*DiagnosticsHook"):
        figures.decomposition(loaded, tmp_path)
    (job / "eta_sweep.csv").unlink()
    with pytest.raises(JobError, match="F4 .*eta_sweep.csv.*eta sweep"):
        figures.taylor_residual(loaded, tmp_path)
    table_, _ = claims.claims(loaded)
    verdicts = table_.set_index("claim")
    assert (verdicts.loc[["C1", "C2", "C3", "C4", "C5"], "verdict"] == INCONCLUSIVE).all()
    assert "diag_steps.csv" in verdicts.loc["C3", "reason"]
    with pytest.warns(UserWarning) as warned:
        result = build_report(job)
    assert set(result["skipped"]) == {"F1", "F2", "F3", "F4"}
    assert sorted(str(w.message)[:2] for w in warned) == ["F1", "F2", "F3", "F4"]


def test_a_job_without_occ_or_policy_arms_says_so(micro_job, tmp_path):
    job = copy_job(micro_job, tmp_path / "job")
    job_json(job, [ARMS[0], ARMS[1]])
    loaded = load_job(job)
    figures.occ_tracking(loaded, tmp_path)
    figures.per_block(loaded, tmp_path)
    assert (tmp_path / "F3_occ_tracking.png").exists() and (tmp_path / "F6_per_block.png").exists()
    assert pd.read_csv(tmp_path / "F3_occ_tracking_data.csv").empty
    verdicts = claims.claims(loaded)[0].set_index("claim")
    assert "no occ arm" in verdicts.loc["C5", "reason"] and "no policy arm" in verdicts.loc["C4", "reason"]
    assert "occ-paper arm" in verdicts.loc["C6", "reason"]
    assert (verdicts.loc[["C4", "C5", "C6"], "verdict"] == INCONCLUSIVE).all()


# ----------------------------------------------------------------------------- verdict logic


def test_interval_rules():
    assert at_least(0.95, 0.99, 0.9) == HOLDS and at_least(0.5, 0.8, 0.9) == FAILS
    assert at_least(0.8, 0.95, 0.9) == INCONCLUSIVE
    assert at_most(-0.5, -0.1, 0) == HOLDS and at_most(0.1, 0.5, 0) == FAILS and at_most(-0.1, 0.1, 0) == INCONCLUSIVE
    assert within(2.8, 3.2, 2.5, 3.5) == HOLDS and within(1.5, 2.0, 2.5, 3.5) == FAILS
    assert within(2.0, 3.0, 2.5, 3.5) == INCONCLUSIVE and at_least(np.nan, np.nan, 0) == INCONCLUSIVE
    parts = [claims.Part("a", HOLDS), claims.Part("b", INCONCLUSIVE)]
    assert combine(parts) == INCONCLUSIVE and combine(parts + [claims.Part("c", FAILS)]) == FAILS
    assert combine(parts[:1]) == HOLDS and combine([]) == INCONCLUSIVE


RECORD = dict(lr=1e-3, dtype="float64", hvp_mode="fwd_rev", n_shared=1, n_shared_tensors=1, objective_value=0.0,
              c=0.0, g_norm=1.0, m_norm=1.0, v2=1.0, cos=0.0)
STEP_COLUMNS = list(ProbeRecord(**RECORD).as_row())
CURVE = Curve("sgd", np.zeros(1), np.zeros(1), np.zeros(3), None, None, None, 1)
CURVE_COLUMNS = ["step", "objective", *ProbeRecord(**RECORD, curves=[CURVE]).curve_rows()[0]]


def hand_built_job(root: Path, arms, seeds, diag=None, final_j_true=None, curves=None, sweep=None, metrics=None):
    """Write a job directory from hand-built rows, with the trainer's and the Probe's
    column names, and load it. ``diag(arm, seed)`` gives diag_steps rows (step +
    overrides), ``curves(arm, seed)`` diag_curves rows, ``metrics(arm, seed)`` the
    metrics rows, or ``final_j_true(arm, seed)`` the J_true after the last step."""
    root.mkdir()
    job_json(root, arms, seeds)
    for arm in arms:
        for seed in seeds:
            run = root / "runs" / arm["label"] / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"config": {}, "versions": {"mtpdiag": __version__}}))
            final = final_j_true(arm["label"], seed) if final_j_true else 0.5
            rows = [{"step": 0, "j_true": 0.5, "pass1": 0.5}, {"step": 10, "j_true": final, "pass1": final}]
            if metrics:
                rows = metrics(arm["label"], seed)
            pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
            if diag:
                frame = pd.DataFrame([{**dict.fromkeys(STEP_COLUMNS), "objective": "j_batch", **row}
                                      for row in diag(arm["label"], seed)])
                frame.to_csv(run / "diag_steps.csv", index=False)
            if curves:
                frame = pd.DataFrame(curves(arm["label"], seed), columns=CURVE_COLUMNS)
                frame.to_csv(run / "diag_curves.csv", index=False)
    if sweep is not None:
        sweep.to_csv(root / "eta_sweep.csv", index=False)
    return load_job(root)


CE = [{"label": "ce-0.5", "regime": "ce", "lam": 0.5, "calibrator": None}]
POLICY = [{"label": "policy-0.5", "regime": "policy", "lam": 0.5, "calibrator": None}]
OCC = [{"label": "occ-paper", "regime": "occ", "lam": None, "calibrator": "occ-paper"}]
DETACH = [ARMS[0]]


def verdict_of(result) -> str:
    return (result[0] if isinstance(result, tuple) else result).verdict


@pytest.mark.parametrize("c_offset, n_steps, expected", [(0.0, 20, HOLDS), (1.0, 20, FAILS), (0.0, 2, INCONCLUSIVE)])
def test_c3_ce_correlation_at_zero(tmp_path, c_offset, n_steps, expected):
    noise = np.random.default_rng(0).normal(0, 0.01, (2, n_steps))
    job = hand_built_job(tmp_path / "j", CE, (0, 1), diag=lambda arm, seed: [
        {"step": s, "c": c_offset + noise[seed, i], "cos": c_offset + noise[seed, i], "v2": 1.0, "h_mm": -1.0}
        for i, s in enumerate(range(2, 2 + 2 * n_steps, 2))])
    assert claims.claim_c3(job).verdict == expected


@pytest.mark.parametrize("v2_late, c_slope, expected", [
    (1.0, -1.0, HOLDS), (0.01, -1.0, FAILS), (1.0, 0.0, INCONCLUSIVE)])
def test_c4_policy_correlation_decays_and_penalty_persists(tmp_path, v2_late, c_slope, expected):
    noise = np.random.default_rng(1).normal(0, 0.01, 12)
    job = hand_built_job(tmp_path / "j", POLICY, (0, 1), diag=lambda arm, seed: [
        {"step": s, "c": 10 + c_slope * s + noise[s], "v2": 1.0 if s < 6 else v2_late, "h_mm": -1.0,
         "harm_threshold": 0.1 * (12 - s)} for s in range(12)])
    result, crossings = claims.claim_c4(job)
    assert result.verdict == expected
    assert set(crossings["crossing_step"]) == {8}  # 2 lambda* = 0.1 (12 - s) < 0.5 from step 8


@pytest.mark.parametrize("gain, seeds, expected", [(0.1, (0, 1, 2, 3), HOLDS), (-0.1, (0, 1, 2, 3), FAILS),
                                                   (0.1, (0, 1), INCONCLUSIVE)])
def test_c6_occ_against_detach(tmp_path, gain, seeds, expected):
    def final_j_true(arm, seed):
        return 0.5 + 0.01 * seed + (gain + 0.001 * seed if arm == "occ-paper" else 0)

    job = hand_built_job(tmp_path / "j", DETACH + OCC, seeds, final_j_true=final_j_true)
    assert claims.claim_c6(job).verdict == expected


@pytest.mark.parametrize("power, expected", [(3.0, HOLDS), (2.0, FAILS)])
def test_c1_quadratic_law(tmp_path, power, expected):
    eta = np.geomspace(1e-3, 1e-1, 5)
    sweep = pd.DataFrame([{"arm": "policy-0.5", "seed": seed, "step": 10, "eta": e, "lambda": lam,
                           "delta_meas": 0.0, "delta_taylor": 0.0, "residual": lam * (1 + 0.01 * seed) * e ** power}
                          for seed in (0, 1) for lam in (0.5, 1.0, 2.0) for e in eta])
    job = hand_built_job(tmp_path / "j", POLICY, (0, 1), sweep=sweep, diag=lambda arm, seed: [
        {"step": s, "fit_r2": 0.999, "fit_a2": -1.0} for s in range(2, 42, 2)])
    assert claims.claim_c1(job).verdict == expected
    assert claims.claim_c1(job).value == pytest.approx(power)


def test_c1_without_sweep_is_inconclusive(tmp_path):
    job = hand_built_job(tmp_path / "j", POLICY, (0, 1), diag=lambda arm, seed: [
        {"step": s, "fit_r2": 0.999, "fit_a2": -1.0} for s in range(2, 12, 2)])
    result = claims.claim_c1(job)
    assert result.verdict == INCONCLUSIVE and "no η sweep" in result.reason


@pytest.mark.parametrize("smooth_offset, expected", [(-0.1, HOLDS), (0.1, FAILS)])
def test_c2_smooth_bound(tmp_path, smooth_offset, expected):
    lam = np.linspace(-1, 3, 9)
    job = hand_built_job(
        tmp_path / "j", POLICY, (0, 1),
        diag=lambda arm, seed: [{"step": s, "L": 10.0, "kappa_m": 1.0, "kappa_g": 2.0, "lambda_star_smooth": 0.5,
                                 "lambda_star_meas_search": 1.0, "a": 1.0, "b": 0.5, "lr": 0.1, "c": 10.0,
                                 "v2": 1.0} for s in range(2, 42, 2)],
        curves=lambda arm, seed: [[s, "j_batch", "sgd", x, x - x**2 / 2, x - x**2 / 2, x - x**2 / 2 + smooth_offset]
                                  for s in range(2, 42, 2) for x in lam])
    result = claims.claim_c2(job)
    assert result.verdict == expected and "λ*_smooth/λ*_meas 0.500" in result.statistic
    figures.concave_curves(job, tmp_path)  # with L measured, F1 draws the L-smooth expression
    assert (pd.read_csv(tmp_path / "F1_concave_curves_data.csv")["L"] == 10.0).all()


@pytest.mark.parametrize("sign, expected", [(1.0, HOLDS), (-1.0, FAILS)])
def test_c5_occ_tracking(tmp_path, sign, expected):
    stars = np.random.default_rng(2).uniform(1, 100, 30)

    def metrics(arm, seed):
        return [{"step": 0, "j_true": 0.5, "pass1": 0.5}] + [
            {"step": s, "lambda_0": sign * stars[s] / 1000, "calib_lambda_plus": 1.0} for s in range(1, 30)]

    job = hand_built_job(tmp_path / "j", OCC, (0,), metrics=metrics, diag=lambda arm, seed: [
        {"step": s, "lambda_star_taylor": stars[s], "lambda_star_meas_search": stars[s]} for s in range(1, 30)])
    result, details = claims.claim_c5(job)
    assert result.verdict == expected and result.n == 29
    assert set(details["star_col"]) == {"lambda_star_taylor", "lambda_star_meas_search"}


def test_table1_pairs_seeds_against_detach(tmp_path):
    job = hand_built_job(tmp_path / "j", DETACH + POLICY, (0, 1, 2),
                         final_j_true=lambda arm, seed: 0.3 + 0.1 * seed + (0.05 if arm == "policy-0.5" else 0))
    main, sweep = table.table1(job)
    policy = main.set_index("arm").loc["policy-0.5"]
    # the seeds differ by 0.1 each, the arms by 0.05 on every seed: the paired difference has no spread
    assert policy["delta_vs_detach"] == pytest.approx(0.05)
    assert policy["delta_vs_detach_high"] - policy["delta_vs_detach_low"] == pytest.approx(0, abs=1e-12)
    assert policy["j_true_high"] - policy["j_true_low"] > 0.1
    assert list(sweep["name"]) == ["Policy (λ=0.5)"]
