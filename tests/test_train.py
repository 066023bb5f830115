"""The trainer: sampling and rewards agree with exact J_true, rollout batches,
resume, callbacks, the SFT cache and every bad-input error."""
import dataclasses
import json
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chisquare

from mtpdiag.calibrators import Calibration, Calibrator, FixedLambda
from mtpdiag.evaluation import (
    completion_rewards,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from mtpdiag.losses import token_logprobs
from mtpdiag.rundir import RunDirError, read_metrics
from mtpdiag.train import (
    NonFiniteLossError,
    TrainConfig,
    build_task,
    load_run,
    regime_losses,
    rollout,
    run_sft,
    sft_cache_file,
    train,
    warm_start,
)

TINY = dict(
    task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2,
    sft_steps=100, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
    steps=6, prompts_per_step=4, group_size=4, lr=1e-3, eval_every=3, eval_prompts=12, eval_samples=2,
    checkpoint_every=2,
)  # fmt: skip
TIMING = ["rollout_time_s", "update_time_s", "step_time_s", "callback_time_s"]


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**(TINY | overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft-cache")


@pytest.fixture(scope="module")
def sft_model():
    """A briefly trained float64 model on 1-digit addition and its task."""
    cfg = tiny(dtype="float64")
    task = build_task(cfg)
    model, _ = run_sft(cfg, task, progress=False)
    return model.eval(), task, cfg


def all_completions(task, length):
    """Every completion the sampler can return: tokens up to a first EOS, padding
    after it, or ``length`` tokens without EOS."""
    tok = task.tokenizer
    others = [i for i in range(tok.vocab_size) if i != tok.eos_id]
    rows = [list(body) + [tok.eos_id] + [tok.pad_id] * (length - n - 1)
            for n in range(length) for body in itertools.product(others, repeat=n)]  # fmt: skip
    rows += [list(body) for body in itertools.product(others, repeat=length)]
    return torch.tensor(rows)


def test_j_true_equals_the_expected_reward_over_all_completions(sft_model):
    model, task, cfg = sft_model
    problems = task.heldout_problems(3)
    completions = all_completions(task, task.max_completion_len)
    expected_rewards = []
    for problem in problems:
        prompt = task.encode_prompts([problem]).expand(len(completions), -1)
        ids = torch.cat([prompt, completions], dim=1)
        with torch.no_grad():
            logp = token_logprobs(model(ids, with_mtp=False).main)
        mask = rollout_mask(task.prompt_len, completions, task.tokenizer.eos_id)
        probs = (logp * mask).sum(1).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)  # the enumeration is complete
        rewards = completion_rewards(task, [problem] * len(completions), completions)
        assert rewards.sum() == 1.0  # exactly one completion is rewarded
        expected_rewards.append((probs * rewards).sum().item())
    exact = exact_j_true(model, j_true_batch(task, problems))
    assert 0.01 < exact < 0.99  # a model with something to learn, not a degenerate one
    assert exact == pytest.approx(np.mean(expected_rewards), rel=1e-12)


def test_sampled_pass_at_1_interval_covers_the_exact_j_true(sft_model):
    model, task, cfg = sft_model
    problems = task.heldout_problems(20)
    exact = exact_j_true(model, j_true_batch(task, problems))
    result = sampled_pass_at_1(model, task, problems, 200, 3, generator=torch.Generator().manual_seed(0))
    assert result.n_samples == 4000
    assert result.ci_low <= exact <= result.ci_high
    assert result.ci_high - result.ci_low < 0.04


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit, with cells expected below 1% pooled so every cell expects >= 30."""
    common = probs > 0.01
    observed = torch.cat([counts[common], counts[~common].sum(0, keepdim=True)])
    expected = torch.cat([probs[common], probs[~common].sum(0, keepdim=True)]) * counts.sum()
    keep = expected > 0
    return chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue


@pytest.mark.parametrize("temperature, other", [(1.0, 2.5), (2.5, 1.0)])
def test_sampler_draws_the_first_token_from_the_tempered_model(sft_model, temperature, other):
    model, task, cfg = sft_model
    prompt = task.encode_prompts(task.heldout_problems(1)).expand(3000, -1)
    tok = task.tokenizer
    first = sample_completions(model, prompt, 1, tok.eos_id, tok.pad_id, temperature, torch.Generator().manual_seed(1))
    counts = torch.bincount(first[:, 0], minlength=tok.vocab_size).double()
    with torch.no_grad():
        logits = model(prompt[:1]).last_logits[0]
    assert chi_square_pvalue(counts, torch.softmax(logits / temperature, -1)) > 1e-3
    assert chi_square_pvalue(counts, torch.softmax(logits / other, -1)) < 1e-6  # the test can tell temperatures apart


def test_completion_rewards_need_the_exact_target_then_eos():
    task = build_task(tiny())
    problem = task.heldout_problems(1)[0]
    tok = task.tokenizer
    target = tok.encode(problem.target)
    wrong = tok.encode(task.solve("9+9=" if problem.prompt != "9+9=" else "1+1="))
    rows = [
        target + [tok.eos_id],  # correct
        target + [tok.pad_id],  # no EOS: truncated
        [target[0], tok.pad_id, tok.eos_id],  # a padding token sampled mid-answer
        wrong + [tok.eos_id],
    ]
    rewards = completion_rewards(task, [problem] * 4, torch.tensor(rows))
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rollout_batch_is_consistent_and_a_function_of_seed_and_step(sft_model):
    model, task, cfg = sft_model
    batch, rewards = rollout(model, task, cfg, step=3)
    again, _ = rollout(model, task, cfg, step=3)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    other, _ = rollout(model, task, cfg, step=4)
    assert not torch.equal(batch["input_ids"], other["input_ids"])

    B = cfg.prompts_per_step * cfg.group_size
    ids, mask = batch["input_ids"], batch["response_mask"]
    assert ids.shape[0] == B and mask.shape == (B, ids.shape[1] - 1)
    tok = task.tokenizer
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        completion = row[task.prompt_len :]
        end = completion.index(tok.eos_id) + 1 if tok.eos_id in completion else len(completion)
        assert row_mask == [0.0] * (task.prompt_len - 1) + [1.0] * end + [0.0] * (len(completion) - end)
    with torch.no_grad():
        torch.testing.assert_close(batch["old_logprobs"], token_logprobs(model(ids, with_mtp=False).main))
    groups = rewards.view(cfg.prompts_per_step, cfg.group_size)
    advantages = batch["advantages"].view_as(groups)
    uniform = (groups == groups[:, :1]).all(1)
    assert uniform.any() and (~uniform).any()  # this seed exercises both kinds of group
    assert torch.equal(advantages[uniform], torch.zeros_like(advantages[uniform]))
    assert torch.allclose(advantages[~uniform].mean(1), torch.zeros(int((~uniform).sum()), dtype=torch.float64))


def test_regime_forward_detaches_as_configured(sft_model):
    model, task, cfg = sft_model
    batch, _ = rollout(model, task, cfg, step=1)
    batch = dict(batch, advantages=torch.linspace(-1, 1, len(batch["advantages"]), dtype=torch.float64))
    shared = {name: p for name, p in model.named_parameters() if not name.startswith("mtp_heads.")}
    for detach_mode, leaks in (("full", False), ("trunk_only", True)):
        losses = regime_losses(dataclasses.replace(cfg, detach_mode=detach_mode))
        grads = torch.autograd.grad(losses.aux_loss(losses.forward(model, batch), batch), list(shared.values()),
                                    allow_unused=True)  # fmt: skip
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == leaks
    policy = regime_losses(dataclasses.replace(cfg, regime="policy"))
    assert policy.mtp_detach == "none"


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


def test_a_killed_and_resumed_run_repeats_the_uninterrupted_run(tmp_path, cache):
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


def test_callbacks_see_the_pre_update_step_and_leave_the_trajectory_alone(tmp_path, cache):
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


def test_occ_with_a_fixed_lambda_follows_policy_with_that_lambda(tmp_path, cache):
    policy = train(tiny(regime="policy", lam=0.3), tmp_path / "policy", cache_dir=cache, progress=False)
    occ = train(tiny(regime="occ"), tmp_path / "occ", calibrator=FixedLambda(0.3), cache_dir=cache, progress=False)
    assert (occ.metrics.loc[1:, "calibrator"] == "fixed(0.3)").all()
    occ_rows = trainer_columns(occ.metrics.drop(columns="calibrator"))
    pd.testing.assert_frame_equal(occ_rows, trainer_columns(policy.metrics), check_exact=True)
    assert (policy.metrics.loc[1:, "lambda_0"] == np.float32(0.3)).all()  # the float32 weight the loss used


def test_detach_keeps_training_the_heads_and_logs_every_column(tmp_path, cache):
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
    assert cfg == tiny()
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_sft_cache_is_shared_by_every_regime_and_keyed_by_the_sft_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPDIAG_CACHE", str(tmp_path / "env-cache"))
    cfg = tiny(sft_steps=5)
    task = build_task(cfg)
    first, info = warm_start(cfg, task, progress=False)
    assert info["sft_cache_file"].startswith(str(tmp_path / "env-cache" / "sft"))
    rl_only = dataclasses.replace(cfg, regime="policy", lam=0.2, steps=99, lr=0.5, eval_every=7)
    assert sft_cache_file(rl_only) == sft_cache_file(cfg)
    second, _ = warm_start(rl_only, task)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    for change in ({"sft_lr": 1e-3}, {"seed": 1}, {"d_model": 16}, {"n_mtp": 2}, {"dtype": "float64"}):
        assert sft_cache_file(dataclasses.replace(cfg, **change)) != sft_cache_file(cfg), change
    assert sft_cache_file(cfg, tmp_path / "flag").parent == tmp_path / "flag" / "sft"


def test_sft_stops_once_validation_j_true_reaches_the_target():
    cfg = tiny(sft_steps=400, sft_target=0.2, sft_eval_every=10, sft_lr=1e-2)
    _, summary = run_sft(cfg, build_task(cfg), progress=False)
    assert summary["sft_val_j_true"] >= 0.2
    assert summary["sft_steps_run"] < 400 and summary["sft_steps_run"] % 10 == 0
    with pytest.warns(UserWarning, match="SFT ran all sft_steps=20 .* short of sft_target=0.9: raise --sft-steps"):
        run_sft(tiny(sft_steps=20, sft_target=0.9, sft_eval_every=10), build_task(cfg), progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "sorting"}, "unknown task 'sorting'"),
        ({"regime": "joint"}, r"unknown regime 'joint': choose one of \['detach', 'ce', 'policy', 'occ'\]"),
        ({"lam": 0.5}, "lam does not apply to regime 'detach'.*drop --lam"),
        ({"regime": "policy", "detach_mode": "trunk_only"}, "detach_mode applies only to regime 'detach'"),
        ({"optimizer": "lion"}, "unknown optimizer"),
        ({"minibatches": 17}, "lower --minibatches"),
        ({"temperature": 0.0}, "temperature"),
        ({"sft_target": 1.5}, r"sft_target=1.5 is a J_true in \(0, 1\]"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_block_size_too_small_for_the_task_names_the_fix():
    with pytest.raises(ValueError, match="block_size=6 is too small for task 'addition'.*--block-size 7"):
        build_task(tiny(block_size=6))
    with pytest.raises(ValueError, match="raise --max-new-tokens"):
        build_task(tiny(max_new_tokens=2))


def test_non_finite_loss_stops_with_step_and_loss_and_keeps_the_last_good_checkpoint(tmp_path, cache):
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


def test_run_directory_is_not_overwritten_and_resume_refuses_a_changed_config(tmp_path, cache):
    train(tiny(steps=2), tmp_path / "run", cache_dir=cache, progress=False)
    with pytest.raises(RunDirError, match="not empty: pass --resume.*or choose a new --out"):
        train(tiny(steps=2), tmp_path / "run", cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match=r"config differs in lr: 0.001 -> 0.002"):
        train(tiny(steps=2, lr=2e-3), tmp_path / "run", resume=True, cache_dir=cache, progress=False)
    longer = train(tiny(steps=4), tmp_path / "run", resume=True, cache_dir=cache, progress=False)
    assert longer.metrics["step"].tolist() == [0, 1, 2, 3, 4]


def test_calibrator_misuse_is_a_clear_error(tmp_path, cache):
    with pytest.raises(ValueError, match="a calibrator only applies to regime 'occ'"):
        train(tiny(regime="policy"), tmp_path / "a", calibrator=FixedLambda(1.0), cache_dir=cache)

    class TwoLambdas(Calibrator):
        name = "two"

        def __call__(self, inputs):
            return Calibration(torch.ones(2))

    with pytest.raises(ValueError, match=r"returned lambdas \[1.0, 1.0\] at step 1, mini-batch 0: it must return 1"):
        train(tiny(regime="occ"), tmp_path / "b", calibrator=TwoLambdas(), cache_dir=cache, progress=False)


@pytest.mark.parametrize("column", ["reward_mean", "j_true"])
def test_callback_metrics_may_not_overwrite_trainer_columns(tmp_path, cache, column):
    with pytest.raises(ValueError, match=rf"callback metrics \['{column}'\] clash"):
        train(tiny(), tmp_path / "run", callbacks=[lambda ctx: {column: 1.0}], cache_dir=cache, progress=False)


def test_diag_every_writes_the_decomposition_tables_and_metrics(tmp_path, cache):
    cfg = tiny(regime="policy", lam=0.5, steps=2, diag_every=2)
    result = train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert sorted(steps["objective"]) == ["j_batch", "j_true"]
    assert (steps["step"] == 2).all() and (steps["v2"] > 0).all()
    assert {"wte", "blocks.0"} <= set(pd.read_csv(tmp_path / "run" / "diag_blocks.csv")["block"])
    assert len(pd.read_csv(tmp_path / "run" / "diag_curves.csv")) > 0
    row = result.metrics.set_index("step").loc[2]
    assert row["diag_j_batch_v2"] == pytest.approx(steps.set_index("objective").loc["j_batch", "v2"])
    assert pd.isna(result.metrics.set_index("step").loc[1].get("diag_j_batch_v2"))


def test_diag_every_on_detach_measures_zero_mtp_signal_on_the_joint_shared_set(tmp_path, cache):
    cfg = tiny(regime="detach", steps=1, diag_every=1)
    train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    steps = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert (steps["v2"] == 0).all()
    assert steps["note"].str.contains("no MTP signal on shared parameters").all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"regime": "policy", "calibrator": "occ-paper"}, "drop --calibrator"),
        ({"regime": "occ", "calibrator": "nope"}, "unknown calibrator"),
        ({"regime": "occ", "calibrator": "occ-paper", "lam": 0.5}, "drop --lam"),
        ({"diag_every": -1}, "diag_every"),
    ],
)
def test_bad_calibrator_and_diagnostics_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_occ_calibrator_by_name_is_logged(tmp_path, cache):
    cfg = tiny(regime="occ", calibrator="occ-reference", steps=1)
    result = train(cfg, tmp_path / "run", progress=False, cache_dir=cache)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["calibrator"].startswith("occ")
    assert "calib_c_hat" in result.metrics.columns and np.isfinite(result.metrics["lambda_0"].iloc[-1])
