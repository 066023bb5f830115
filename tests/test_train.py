"""The RL loop: a killed and resumed run repeats the uninterrupted one, callbacks
see the pre-update step and leave the trajectory alone, every regime's lambdas
and columns, the diagnostics as configured, config.json's calibrator record,
and every bad-input error of a run."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mtpdiag.cli import main as cli_main
from mtpdiag.calibrators import OCC, Calibration, Calibrator, FixedLambda, WithShadows
from mtpdiag.evaluation import exact_j_true
from mtpdiag.diagnostics import GRID_MULTIPLIERS
from mtpdiag.losses import NonFiniteLossError, token_logprobs
from mtpdiag.rundir import RunDirError, read_metrics
from mtpdiag.schema import shadow_label
from mtpdiag.resume import load_run
from mtpdiag.train import train

TIMING = ["rollout_time_s", "update_time_s", "step_time_s", "callback_time_s"]


def trainer_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c in TIMING])


class Killed(Exception):
    pass


class CountingCalibrator(Calibrator):
    """Stateful: lambda depends on how many mini-batches it has seen, so a resume
    that forgot its state would log different lambdas."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        return Calibration(torch.full((inputs.logprobs.mtp.size(0),), 0.1 * self.calls), {"calls": self.calls})

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_a_killed_and_resumed_run_repeats_the_uninterrupted_run(tiny, tmp_path, cache):
    cfg = tiny(regime="occ", minibatches=2)
    full = train(cfg, tmp_path / "full", calibrator=CountingCalibrator(), cache_dir=cache, progress=False)

    def kill_at_step_6(ctx):
        if ctx.step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", calibrator=CountingCalibrator(), callbacks=[kill_at_step_6], cache_dir=cache,
              progress=False)  # fmt: skip
    killed = tmp_path / "killed"
    assert (killed / ".incomplete").exists()
    assert read_metrics(killed)["step"].tolist() == [0, 1, 2, 3, 4, 5]  # steps after the checkpoint at 4 too

    resumed = train(cfg, killed, resume=True, calibrator=CountingCalibrator(), cache_dir=cache, progress=False)
    assert not (killed / ".incomplete").exists()
    pd.testing.assert_frame_equal(
        trainer_columns(read_metrics(killed)), trainer_columns(read_metrics(full.out)), check_exact=True
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(killed / "minibatch.csv"), pd.read_csv(full.out / "minibatch.csv"), check_exact=True
    )
    assert read_metrics(killed)["step"].tolist() == list(range(7))
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_callbacks_see_the_pre_update_step_and_leave_the_trajectory_alone(tiny, tmp_path, cache):
    cfg = tiny(regime="policy", lam=0.5)
    plain = train(cfg, tmp_path / "plain", cache_dir=cache, progress=False)

    def probe(ctx):
        out = ctx.losses.forward(ctx.model, ctx.batch)
        loss = ctx.losses.aux_loss(out, ctx.batch) - ctx.losses.objective(out, ctx.batch)
        grads = torch.autograd.grad(loss, list(ctx.model.parameters()), allow_unused=True)
        torch.randn(100)  # draws from the global RNG
        ctx.model.eval()  # leaves the model in another mode
        current = token_logprobs(out.main).detach()
        return {
            "probe_grad_norm": math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None)),
            "probe_pi_old_is_current": bool(torch.allclose(current, ctx.batch["old_logprobs"])),
            "probe_j_true": exact_j_true(ctx.model, ctx.j_true_batch),
        }

    probed = train(cfg, tmp_path / "probed", callbacks=[probe], cache_dir=cache, progress=False)
    metrics = probed.metrics
    assert metrics.loc[1:, "probe_pi_old_is_current"].all()
    # the policy gradient vanishes exactly on the steps where every group has uniform reward
    rl = metrics.loc[1:]
    assert ((rl["probe_grad_norm"] == 0) == (rl["uniform_group_frac"] == 1)).all()
    assert (rl["probe_grad_norm"] > 0).any()
    # the J_true a callback sees at step s is the one evaluated after step s - 1
    evaluated = metrics.dropna(subset=["j_true"]).set_index("step")["j_true"]
    for step, value in evaluated.items():
        if step + 1 in metrics["step"].values:
            assert metrics.set_index("step").loc[step + 1, "probe_j_true"] == pytest.approx(value, rel=1e-6)
    probe_columns = [c for c in metrics.columns if c.startswith("probe_")]
    pd.testing.assert_frame_equal(
        trainer_columns(metrics.drop(columns=probe_columns)), trainer_columns(plain.metrics), check_exact=True
    )


def test_occ_with_a_fixed_lambda_follows_policy_with_that_lambda(tiny, tmp_path, cache):
    policy = train(tiny(regime="policy", lam=0.3), tmp_path / "policy", cache_dir=cache, progress=False)
    occ = train(tiny(regime="occ"), tmp_path / "occ", calibrator=FixedLambda(0.3), cache_dir=cache, progress=False)
    assert (occ.metrics.loc[1:, "calibrator"] == "fixed(0.3)").all()
    occ_rows = trainer_columns(occ.metrics.drop(columns="calibrator"))
    pd.testing.assert_frame_equal(occ_rows, trainer_columns(policy.metrics), check_exact=True)
    assert (policy.metrics.loc[1:, "lambda_0"] == np.float32(0.3)).all()  # the float32 weight the loss used


def test_detach_keeps_training_the_heads_and_logs_every_column(tiny, tmp_path, cache):
    result = train(tiny(), tmp_path / "run", cache_dir=cache, progress=False)
    m = result.metrics
    assert m["step"].tolist() == list(range(7))
    assert m.dropna(subset=["j_true"])["step"].tolist() == [0, 3, 6]
    rl = m.loc[1:]
    for column in ["reward_mean", "uniform_group_frac", "response_len_mean", "j_batch", "loss_mtp", "loss_total",
                   "grad_norm", "grad_norm_mtp_heads", "lr", *TIMING]:  # fmt: skip
        assert rl[column].notna().all(), column
    assert (rl["grad_norm_mtp_heads"] > 0).all() and (rl["loss_mtp"] > 0).all()
    assert "lambda_0" not in m.columns  # lambda does not apply to detach
    evaluated = m.dropna(subset=["pass1"])
    assert (evaluated["pass1_ci_low"] <= evaluated["pass1"]).all()
    assert (evaluated["pass1"] <= evaluated["pass1_ci_high"]).all()
    minibatches = pd.read_csv(result.out / "minibatch.csv")
    assert minibatches[["step", "minibatch"]].values.tolist() == [[s, b] for s in range(1, 7) for b in range(2)]
    model, cfg, _ = load_run(result.out)
    assert cfg == tiny(threads=torch.get_num_threads())  # config.json records the count it ran with
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_step_and_loss_and_keeps_the_last_good_checkpoint(tiny, tmp_path, cache):
    def poison_at_step_3(ctx):
        if ctx.step == 3:
            with torch.no_grad():
                ctx.model.lm_head.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"step 3, mini-batch 0: j_batch = nan is not finite.*checkpoint"):
        train(tiny(), tmp_path / "run", callbacks=[poison_at_step_3], cache_dir=cache, progress=False)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert read_metrics(tmp_path / "run")["step"].tolist() == [0, 1, 2]
    assert (tmp_path / "run" / ".incomplete").exists()


def test_run_directory_is_not_overwritten_and_resume_refuses_a_changed_config(tiny, tmp_path, cache):
    train(tiny(steps=2), tmp_path / "run", cache_dir=cache, progress=False)
    with pytest.raises(RunDirError, match="not empty: pass --resume.*or choose a new --out"):
        train(tiny(steps=2), tmp_path / "run", cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match=r"config differs in lr: 0.001 -> 0.002"):
        train(tiny(steps=2, lr=2e-3), tmp_path / "run", resume=True, cache_dir=cache, progress=False)
    longer = train(tiny(steps=4), tmp_path / "run", resume=True, cache_dir=cache, progress=False)
    assert longer.metrics["step"].tolist() == [0, 1, 2, 3, 4]


def test_calibrator_misuse_is_a_clear_error(tiny, tmp_path, cache):
    with pytest.raises(ValueError, match=r"a calibrator only applies to regimes \['occ'\], not 'policy'"):
        train(tiny(regime="policy"), tmp_path / "a", calibrator=FixedLambda(1.0), cache_dir=cache)

    class TwoLambdas(Calibrator):
        name = "two"

        def __call__(self, inputs):
            return Calibration(torch.ones(2))

    with pytest.raises(ValueError, match=r"returned lambdas \[1.0, 1.0\] at step 1, mini-batch 0: it must return 1"):
        train(tiny(regime="occ"), tmp_path / "b", calibrator=TwoLambdas(), cache_dir=cache, progress=False)


@pytest.mark.parametrize("column", ["reward_mean", "j_true"])
def test_callback_metrics_may_not_overwrite_trainer_columns(tiny, tmp_path, cache, column):
    with pytest.raises(ValueError, match=rf"callback metrics \['{column}'\] clash"):
        train(tiny(), tmp_path / "run", callbacks=[lambda ctx: {column: 1.0}], cache_dir=cache, progress=False)


def test_diag_every_on_detach_measures_zero_mtp_signal_on_the_joint_shared_set(tiny, tmp_path, cache):
    cfg = tiny(regime="detach", steps=1, diag_every=1)
    train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert (steps["v2"] == 0).all()
    assert steps["note"].str.contains("no MTP signal on shared parameters").all()




def test_diag_every_writes_the_decomposition_tables_and_metrics(tiny, tmp_path, cache):
    cfg = tiny(regime="policy", lam=0.5, steps=2, diag_every=2, optimizer="sgd")
    result = train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert steps[["step", "minibatch", "objective"]].values.tolist() == [
        [2, mb, o] for mb in range(cfg.minibatches) for o in ("j_batch", "j_true")
    ]
    assert (steps["optimizer"] == "sgd").all() and (steps["lambda_trained"] == 0.5).all()
    # a mini-batch whose groups all have uniform rewards has zero advantages, so m = 0 and no curve
    assert (steps["v2"] > 0).any() and set(pd.read_csv(tmp_path / "run" / "diag_curves.csv")["minibatch"]) == set(
        steps.loc[steps["v2"] > 0, "minibatch"])
    assert {"wte", "blocks.0"} <= set(pd.read_csv(tmp_path / "run" / "diag_blocks.csv")["block"])
    # the top curvature L on the only (so the first and the last) measured step, of J_batch's curve
    batch_rows = steps[steps["objective"] == "j_batch"]
    assert (batch_rows["L"] >= 0).all() and (batch_rows["L_source"] == "measured").all()
    curves = pd.read_csv(tmp_path / "run" / "diag_curves.csv")
    for (mb, objective), curve in curves.groupby(["minibatch", "objective"]):
        record = steps.set_index(["minibatch", "objective"]).loc[(mb, objective)]
        lam = curve["lambda"].to_numpy()
        assert (curve["step"] == 2).all() and len(curve) == len(GRID_MULTIPLIERS)
        scale = lam[list(GRID_MULTIPLIERS).index(1.0)]
        assert scale > 0 and np.allclose(lam, GRID_MULTIPLIERS * scale, rtol=1e-12, atol=0)  # the grid, scaled
        assert curve.loc[lam == 0, "delta_meas"].tolist() == [0.0]  # Delta(0): the detached step itself
        # the Taylor parabola a lambda - b lambda^2 of this mini-batch's own record (docs/theory.md s.2)
        np.testing.assert_allclose(curve["delta_taylor"], record["a"] * lam - record["b"] * lam**2, rtol=1e-12)
        assert curve["delta_precond"].isna().all()  # an SGD step has no frozen-preconditioner reading
        # the refined search starts at the best grid point and stays within one grid spacing of it
        best = lam[curve["delta_meas"].to_numpy().argmax()]
        assert abs(record["lambda_star_meas"] - best) <= scale * (GRID_MULTIPLIERS[1] - GRID_MULTIPLIERS[0])
    mb = curves["minibatch"].iloc[0]
    batch_curve, lr = curves[(curves["objective"] == "j_batch") & (curves["minibatch"] == mb)], cfg.lr
    c, v2, L = (batch_rows.set_index("minibatch").loc[mb, key] for key in ("c", "v2", "L"))
    # the L-smooth form on the gradient's own objective (c_e = c, docs/theory.md s.3); none on J_true, which has no L
    expected = lr * batch_curve["lambda"] * (c - L * lr * c) - L * lr**2 * batch_curve["lambda"] ** 2 * v2 / 2
    np.testing.assert_allclose(batch_curve["delta_smooth"], expected, rtol=1e-9)
    assert curves.loc[curves["objective"] == "j_true", "delta_smooth"].isna().all()
    # each mini-batch's row carries its summary; metrics.csv their mean over the step's mini-batches
    minibatches = pd.read_csv(tmp_path / "run" / "minibatch.csv").set_index(["step", "minibatch"])
    for row in batch_rows.itertuples():
        assert minibatches.loc[(2, row.minibatch), "diag_j_batch_v2"] == pytest.approx(row.v2, rel=1e-12)
    metrics = result.metrics.set_index("step")
    assert metrics.loc[2, "diag_j_batch_v2"] == pytest.approx(batch_rows["v2"].mean(), rel=1e-12)
    assert metrics.loc[2, "diag_time_s"] > 0 and pd.isna(metrics.loc[1, "diag_j_batch_v2"])


def test_the_trainer_measures_every_mini_batch_with_its_real_lambda_and_leaves_the_run_alone(tiny, tmp_path, cache):
    """The hook sees the calibrator's lambda of each mini-batch, at the parameters it starts
    from; with the Probe's own gradients (diag_reuse_gradients false) measuring changes no
    trainer number."""
    cfg = tiny(regime="occ", steps=2, minibatches=2)
    plain = train(cfg, tmp_path / "plain", calibrator=CountingCalibrator(), cache_dir=cache, progress=False)
    measured = train(cfg.with_values(diag_every=1, diag_top_curvature="none", diag_reuse_gradients=False),
                     tmp_path / "measured", calibrator=CountingCalibrator(), cache_dir=cache, progress=False)  # fmt: skip
    steps = pd.read_csv(tmp_path / "measured" / "diag_steps.csv")
    minibatches = pd.read_csv(tmp_path / "measured" / "minibatch.csv")
    trained = steps[steps["objective"] == "j_batch"][["step", "minibatch", "lambda_trained"]]
    assert trained.values.tolist() == minibatches[["step", "minibatch", "lambda_0"]].values.tolist()
    assert sorted(set(trained["lambda_trained"].round(6))) == [0.1, 0.2, 0.3, 0.4]  # one per mini-batch
    diag = [c for c in minibatches.columns if c.startswith("diag_")]
    pd.testing.assert_frame_equal(minibatches.drop(columns=diag), pd.read_csv(tmp_path / "plain" / "minibatch.csv"),
                                  check_exact=True)  # fmt: skip
    metrics = trainer_columns(measured.metrics).drop(columns=[c for c in measured.metrics.columns if c.startswith("diag_")])
    pd.testing.assert_frame_equal(metrics, trainer_columns(plain.metrics), check_exact=True)


def test_the_cli_trainer_writes_the_trained_step_columns_for_every_mini_batch(tmp_path, cache):
    """`mtpdiag train ... --optimizer adamw --minibatches 4 --diag-every 1` on a tiny config."""
    flags = ["--task-option", "digits=1", "--block-size", "8", "--d-model", "32", "--n-layer", "1", "--n-head", "2",
             "--sft-steps", "100", "--sft-target", "none", "--sft-batch-size", "32", "--sft-lr", "3e-3",
             "--steps", "2", "--prompts-per-step", "16", "--group-size", "4",
             "--eval-prompts", "8", "--eval-samples", "1", "--regime", "policy", "--lam", "0.5", "--optimizer", "adamw",
             "--lr", "1e-3", "--minibatches", "4", "--diag-every", "1", "--diag-top-curvature", "none",
             "--diag-objectives", "j_batch,j_true,j_unclipped", "--no-progress"]  # fmt: skip
    cli_main(["train", *flags, "--out", str(tmp_path / "run"), "--sft-cache", str(cache)])
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    keys = [[s, mb, o] for s in (1, 2) for mb in range(4) for o in ("j_batch", "j_unclipped", "j_true")]
    assert steps[["step", "minibatch", "objective"]].values.tolist() == keys
    for column in ("minibatch", "optimizer", "lambda_trained", "clip_fraction", "c_crossfit", "c_true"):
        assert steps[column].notna().all(), column  # 4 prompt groups per mini-batch: both halves have two
    assert (steps["optimizer"] == "adamw").all() and (steps["lambda_trained"] == 0.5).all()
    assert steps["clip_fraction"].between(0, 1).all() and steps["cos_crossfit"].dropna().between(-1, 1).all()
    assert steps["cos_crossfit"].notna().any()  # None where a half's groups all have uniform rewards (g = 0 there)
    signal = steps[steps["v2"] > 0]  # a mini-batch whose groups all have uniform rewards has m = 0 and no curve
    assert len(signal) > 0
    for column in ("delta_trained", "lambda_star_meas", "delta_jonly", "fit_r2", "fit_origin_r2", "fit_origin_a2"):
        assert signal[column].notna().all(), column
    assert signal["precond_new_share"].between(0, 1).all() and signal["a_precond"].notna().all()
    concave = signal[signal["b_precond"] > 0]
    np.testing.assert_allclose(concave["lambda_star_precond"], concave["a_precond"] / (2 * concave["b_precond"]), rtol=1e-12)
    assert (steps[steps["v2"] == 0]["note"].str.contains("no MTP signal")).all()


def test_the_diagnostics_flags_reach_the_run(tiny, tmp_path, cache):
    cfg = tiny(regime="policy", lam=0.5, steps=2, diag_every=1, diag_per_block=False, diag_top_curvature="none",
               diag_objectives=("j_batch",))  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert steps[["step", "minibatch", "objective"]].values.tolist() == [[s, mb, "j_batch"] for s in (1, 2) for mb in (0, 1)]
    assert steps["L"].isna().all()  # no top curvature on any step
    assert not (tmp_path / "run" / "diag_blocks.csv").exists()
    assert "diag_j_true_v2" not in result.metrics.columns
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (saved["diag_per_block"], saved["diag_top_curvature"], saved["diag_objectives"]) == (False, "none", ["j_batch"])
    assert load_run(tmp_path / "run")[1] == cfg.with_values(threads=torch.get_num_threads())


def test_occ_calibrator_by_name_is_logged(tiny, tmp_path, cache):
    cfg = tiny(regime="occ", calibrator="occ-reference", steps=1)
    result = train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["calibrator"], saved["shadows"], saved["config"]["calibrator"]) == ("occ-reference", {}, "occ-reference")
    assert result.metrics.loc[1:, "calibrator"].tolist() == ["occ-reference"]
    minibatches = pd.read_csv(tmp_path / "run" / "minibatch.csv")
    assert (minibatches["calib_lambda_plus"] == 0.1).all()  # the reference reading: 0.1 / num_heads
    assert minibatches["lambda_0"].tolist() == minibatches["calib_lambda_raw"].tolist()  # the lambda it chose, used
    # on mini-batch 0 pi_old is the current policy, so the ratio proxy sees delta_RL = 0
    assert minibatches.loc[0, ["calib_c_hat", "lambda_0"]].tolist() == [0.0, 0.0]
    assert minibatches.loc[1, "calib_c_hat"] != 0


def test_config_json_records_the_primary_calibrator_and_its_shadows_and_resume_checks_both(tiny, tmp_path, cache):
    def shadowed(shadows=("reference",)):
        return WithShadows(OCC.paper(), {shadow_label(s): OCC.reference(1) for s in shadows})

    cfg = tiny(regime="occ", steps=1)
    result = train(cfg, tmp_path / "run", calibrator=shadowed(), cache_dir=cache, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["calibrator"], saved["shadows"]) == ("occ-paper", {"shadow_reference": "occ-reference"})
    # metrics.csv keeps the calibrator's own name
    assert result.metrics.loc[1:, "calibrator"].tolist() == ["occ-paper+shadows(shadow_reference=occ-reference)"]
    assert "calib_shadow_reference_lambda" in pd.read_csv(tmp_path / "run" / "minibatch.csv").columns
    with pytest.raises(ValueError, match=r"it ran calibrator 'occ-paper' with shadows \{'shadow_reference'"):
        train(cfg.with_values(steps=2), tmp_path / "run", resume=True, calibrator=shadowed(("other",)), cache_dir=cache)
    longer = train(cfg.with_values(steps=2), tmp_path / "run", resume=True, calibrator=shadowed(), cache_dir=cache,
                   progress=False)  # fmt: skip
    assert longer.metrics["step"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- issue 10: reliability


def test_a_collapsed_run_or_a_lambda_out_of_range_is_flagged_from_the_rows():
    """health_flags on hand-built rows: J_true below a fraction of the post-SFT value, a zero
    reward on consecutive steps, a lambda outside the sane range; a healthy run is not flagged."""
    from mtpdiag.health import COLLAPSE_FRACTION, LAMBDA_RANGE, ZERO_REWARD_STEPS, health_flags

    sft = {"step": 0, "j_true": 0.5, "reward_mean": 0.4}
    healthy = [sft, *({"step": s, "j_true": math.nan, "reward_mean": 0.3} for s in range(1, 10))]
    assert health_flags(healthy, [{"minibatch": 0, "lambda_0": 1.0}]) == {"collapsed": None,
                                                                         "lambda_out_of_range": None}
    fallen = [sft, {"step": 1, "j_true": 0.5 * COLLAPSE_FRACTION * 0.9, "reward_mean": 0.1}]
    assert "below 0.25 x its post-SFT value 0.5000" in health_flags(fallen, [])["collapsed"]
    # between evaluations the last evaluated J_true keeps the flag on
    assert health_flags([*fallen, {"step": 2, "j_true": math.nan, "reward_mean": 0.1}], [])["collapsed"]
    silent = [sft, *({"step": s, "reward_mean": 0.0} for s in range(1, ZERO_REWARD_STEPS + 1))]
    assert health_flags(silent, [])["collapsed"] == f"the reward was 0 on the last {ZERO_REWARD_STEPS} steps"
    assert health_flags(silent[:-1], [])["collapsed"] is None
    why = health_flags(healthy, [{"minibatch": 1, "lambda_0": -1.5 * LAMBDA_RANGE}])["lambda_out_of_range"]
    assert why == f"lambda_0 = -30 on mini-batch 1 is outside [-{LAMBDA_RANGE:g}, {LAMBDA_RANGE:g}]"


def test_a_lambda_out_of_the_sane_range_is_flagged_in_metrics_and_warned(tiny, tmp_path, cache):
    with pytest.warns(UserWarning, match=r"step 1: lambda_0 = 50 on mini-batch 0 is outside .*lambda_out_of_range"):
        result = train(tiny(regime="policy", lam=50.0, steps=2), tmp_path / "run", cache_dir=cache, progress=False)
    assert result.metrics["lambda_out_of_range"].tolist() == [False, True, True]
    healthy = train(tiny(regime="policy", lam=0.5, steps=2), tmp_path / "ok", cache_dir=cache, progress=False)
    assert not healthy.metrics[["collapsed", "lambda_out_of_range"]].to_numpy().any()


def test_a_nan_parameter_is_named_not_blamed_on_the_loss(tiny, tmp_path, cache):
    def poison_at_step_1(ctx):
        if ctx.step == 1:
            with torch.no_grad():
                ctx.model.get_parameter("blocks.0.attn.proj.weight")[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"step 1, mini-batch 0: j_batch = nan is not finite because "
                                                 r"parameters \['blocks.0.attn.proj.weight'\] hold inf/nan") as err:
        train(tiny(steps=2), tmp_path / "run", callbacks=[poison_at_step_1], cache_dir=cache, progress=False)
    assert "log of 0" not in str(err.value) and "float16" not in str(err.value)


def test_an_interrupt_leaves_the_run_incomplete_and_a_run_without_a_checkpoint_takes_a_corrected_config(
        tiny, tmp_path, cache):
    def interrupt_at_step_1(ctx):
        if ctx.step == 1:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(steps=2, lr=2e-3), out, callbacks=[interrupt_at_step_1], cache_dir=cache, progress=False)
    assert (out / ".incomplete").exists() and not (out / "checkpoint.pt").exists()
    assert not (out / ".lock").exists()  # released: a restart is not refused
    # no step was completed, so there is no state to continue: the corrected lr is taken
    resumed = train(tiny(steps=2), out, resume=True, cache_dir=cache, progress=False)
    assert resumed.metrics["step"].tolist() == [0, 1, 2] and not (out / ".incomplete").exists()
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 1e-3


def test_progress_off_a_terminal_prints_plain_lines_that_never_show_a_nan_j_true(tiny, tmp_path, cache, capsys,
                                                                                  monkeypatch):
    from mtpdiag import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line per step (30 s apart otherwise)
    train(tiny(steps=3, eval_every=3), tmp_path / "run", cache_dir=cache)  # progress None: capsys is no terminal
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rl ")]
    assert lines[0].startswith("rl detach seed 0: 1/3 steps, reward ") and ", J_true 0." in lines[0]
    assert len(lines) >= 3 and lines[-1].startswith("rl detach seed 0: 3/3 steps")
    assert not any("nan" in line for line in lines)
    assert lines[-1] != lines[-2]  # the closing line is not the last periodic one again


def test_a_measured_mini_batch_trains_on_the_split_backward_it_hands_to_the_probe(tiny, tmp_path, cache):
    """diag_reuse_gradients (the default): the Probe reads g and m from the trainer's backward
    passes; until the first measured mini-batch's update the run is the unmeasured one bit for
    bit, and that update is the one backward over the sum to float32 rounding."""
    cfg = tiny(regime="policy", lam=0.5, steps=2, minibatches=2)
    plain = train(cfg, tmp_path / "plain", cache_dir=cache, progress=False)
    measured = train(cfg.with_values(diag_every=2, diag_minibatches=(1,), diag_top_curvature="none"),
                     tmp_path / "measured", cache_dir=cache, progress=False)  # fmt: skip
    steps = pd.read_csv(tmp_path / "measured" / "diag_steps.csv")
    assert (steps["gradients_from"] == "trainer").all() and set(zip(steps.step, steps.minibatch)) == {(2, 1)}
    rows = {name: pd.read_csv(tmp_path / name / "minibatch.csv").set_index(["step", "minibatch"])
            for name in ("plain", "measured")}  # fmt: skip
    before = [(1, 0), (1, 1), (2, 0)]
    columns = [c for c in rows["plain"].columns]
    pd.testing.assert_frame_equal(rows["measured"].loc[before, columns], rows["plain"].loc[before], check_exact=True)
    at = rows["measured"].loc[(2, 1)]
    assert (at[["j_batch", "loss_total"]] == rows["plain"].loc[(2, 1), ["j_batch", "loss_total"]]).all()
    assert at["grad_norm"] == pytest.approx(rows["plain"].loc[(2, 1), "grad_norm"], rel=1e-5)

    dropout = train(cfg.with_values(dropout=0.1, diag_every=2, diag_minibatches=(1,), diag_top_curvature="none"),
                    tmp_path / "dropout", cache_dir=cache, progress=False)  # fmt: skip
    assert (pd.read_csv(dropout.out / "diag_steps.csv")["gradients_from"] == "probe").all()


def test_a_gradient_reading_calibrator_gets_the_trainers_g_and_m_and_the_run_steps_on_them(tiny, tmp_path, cache):
    class Reading(CountingCalibrator):
        reads_gradients = True

        def __call__(self, inputs):
            assert inputs.gradients.source == "trainer" and inputs.gradients.aux.keys() == inputs.gradients.g.keys()
            return super().__call__(inputs)

    cfg = tiny(regime="occ", steps=2)
    plain = train(cfg, tmp_path / "plain", calibrator=CountingCalibrator(), cache_dir=cache, progress=False)
    reading = train(cfg, tmp_path / "reading", calibrator=Reading(), cache_dir=cache, progress=False)
    first = [pd.read_csv(run.out / "minibatch.csv").iloc[0] for run in (reading, plain)]  # the same forward
    assert (first[0][["j_batch", "loss_total", "lambda_0"]] == first[1][["j_batch", "loss_total", "lambda_0"]]).all()
    assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-5)
