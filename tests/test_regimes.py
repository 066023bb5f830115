"""Regimes as objects: a new regime is one subclass and one register() call (the
toy below trains through train() and reaches the CLI and the experiment with no
other file touched); what each built-in regime detaches, weighs, freezes and
validates, and the practitioners' regimes (kl, tv, frozen) as trainer and Probe see them."""
import copy
import math

import pandas as pd
import pytest
import torch

from mtpdiag import regimes
from mtpdiag.calibrators import FixedLambda
from mtpdiag.cli import build_parser, main
from mtpdiag.config import build_task
from mtpdiag.diagnostics import Probe
from mtpdiag.experiment import arm_config
from mtpdiag.losses import mtp_ce_loss, mtp_kl_loss, mtp_policy_loss, mtp_tv_loss
from mtpdiag.regimes import (CE, DETACH, FIXED, FROZEN, KL_REGIME, OCC_REGIME, POLICY, TV_REGIME, UNIT, Regime,
                             register, unregister)
from mtpdiag.rundir import read_metrics
from mtpdiag.rollout import rollout
from mtpdiag.schema import Arm
from mtpdiag.sft import warm_start
from mtpdiag.train import train

TIMING = ["rollout_time_s", "update_time_s", "step_time_s", "callback_time_s"]


class DoubledCE(Regime):
    """A toy regime: twice the MTP cross-entropy, with a fixed lambda. Scaling by 2
    is exact in floating point, so at lambda it takes ce's update at 2 lambda, bit
    for bit."""

    name = "toy-doubled-ce"
    description = "twice the MTP cross-entropy, fixed lambda"
    lambda_rule = FIXED
    display = "Doubled CE"
    family = "Oranges"

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return 2 * mtp_ce_loss(out, batch, head_weights)


@pytest.fixture
def toy():
    regime = register(DoubledCE())
    try:
        yield regime
    finally:
        unregister(regime.name)
    assert regime.name not in regimes.REGIMES


def test_a_registered_toy_regime_trains_through_train_and_reaches_the_cli_and_the_experiment(toy, tiny, cache, tmp_path):
    toy_run = train(tiny(regime=toy.name, lam=0.25, steps=2), tmp_path / "toy", cache_dir=cache, progress=False)
    ce_run = train(tiny(regime=CE.name, lam=0.5, steps=2), tmp_path / "ce", cache_dir=cache, progress=False)
    toy_mb, ce_mb = (pd.read_csv(run.out / "minibatch.csv") for run in (toy_run, ce_run))
    assert (toy_mb["lambda_0"] == 0.25).all() and (ce_mb["lambda_0"] == 0.5).all()
    assert (toy_mb["loss_mtp"] == 2 * ce_mb["loss_mtp"]).all() and (toy_mb["loss_mtp"] > 0).all()
    same = ["j_batch", "loss_mtp_weighted", "loss_total", "grad_norm", "grad_norm_mtp_heads"]
    pd.testing.assert_frame_equal(toy_mb[same], ce_mb[same], check_exact=True)
    pd.testing.assert_frame_equal(
        toy_run.metrics[["step", "reward_mean", "j_true", "pass1"]], ce_run.metrics[["step", "reward_mean", "j_true", "pass1"]],
        check_exact=True,
    )
    assert toy_run.metrics["step"].tolist() == [0, 1, 2]
    for a, b in zip(toy_run.model.parameters(), ce_run.model.parameters()):
        assert torch.equal(a, b)
    args = build_parser().parse_args(["train", "--regime", toy.name, "--lam", "0.25", "--out", str(tmp_path / "cli")])
    assert args.regime == toy.name
    arm = Arm.of(toy.name, 0.25)
    assert arm.label == "toy-doubled-ce-0.25" and arm_config(tiny(), arm, seed=3).regime == toy.name
    assert toy.display_name(0.25) == "Doubled CE (λ=0.25)" and toy.joint


def test_a_toy_regime_is_validated_like_the_built_in_ones(toy, tiny):
    with pytest.raises(ValueError, match="calibrator applies only to regimes \\['occ'\\], not 'toy-doubled-ce'"):
        tiny(regime=toy.name, calibrator="occ-paper")
    with pytest.raises(ValueError, match="detach_mode applies only to a detached regime, not 'toy-doubled-ce'"):
        tiny(regime=toy.name, detach_mode="trunk_only")


def test_regime_forward_detaches_as_configured(sft_model):
    model, task, cfg = sft_model
    batch, _ = rollout(model, task, cfg, step=1)
    batch = dict(batch, advantages=torch.linspace(-1, 1, len(batch["advantages"]), dtype=torch.float64))
    shared = {name: p for name, p in model.named_parameters() if not name.startswith("mtp_heads.")}
    for detach_mode, leaks in (("full", False), ("trunk_only", True)):
        losses = DETACH.losses(cfg.with_values(detach_mode=detach_mode))
        grads = torch.autograd.grad(losses.aux_loss(losses.forward(model, batch), batch), list(shared.values()),
                                    allow_unused=True)  # fmt: skip
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == leaks
    for regime in (CE, POLICY, OCC_REGIME, KL_REGIME, TV_REGIME, FROZEN):
        assert regime.losses(cfg).mtp_detach == "none" and regime.joint
    assert not DETACH.joint


def test_each_regime_has_its_mtp_loss(sft_model):
    model, task, cfg = sft_model
    batch, _ = rollout(model, task, cfg, step=2)
    out = model(batch["input_ids"])
    weights = torch.tensor([0.3], dtype=torch.float64)
    for regime, expected in ((DETACH, mtp_ce_loss(out, batch, weights)), (CE, mtp_ce_loss(out, batch, weights)),
                             (POLICY, mtp_policy_loss(out, batch, weights, 0.1, 0.4)),
                             (OCC_REGIME, mtp_policy_loss(out, batch, weights, 0.1, 0.4)),
                             (KL_REGIME, mtp_kl_loss(out, batch, weights)), (TV_REGIME, mtp_tv_loss(out, batch, weights)),
                             (FROZEN, mtp_ce_loss(out, batch, weights))):  # fmt: skip
        assert torch.equal(regime.losses(cfg.with_values(eps_low=0.1, eps_high=0.4)).aux_loss(out, batch, weights), expected)


def test_lambda_is_one_for_detach_the_fixed_lam_for_ce_and_policy_and_a_calibrators_for_occ(tiny):
    assert torch.equal(DETACH.lambdas(None, 2), torch.ones(2))
    assert torch.equal(CE.lambdas(None, 2), torch.full((2,), regimes.DEFAULT_LAMBDA))
    assert torch.equal(POLICY.lambdas(0.3, 1, torch.float64), torch.tensor([0.3], dtype=torch.float64))
    assert torch.equal(KL_REGIME.lambdas(0.3, 2), torch.full((2,), 0.3)) and TV_REGIME.lambda_rule == FIXED
    assert torch.equal(FROZEN.lambdas(None, 2), torch.zeros(2))  # measured, never trained
    with pytest.raises(ValueError, match="lam does not apply to regime 'frozen'"):
        tiny(regime="frozen", lam=0.5)
    with pytest.raises(ValueError, match="chooses lambda with a calibrator"):
        OCC_REGIME.lambdas(0.3, 1)
    assert OCC_REGIME.calibrator(tiny(regime="occ", lam=0.3)).name == "fixed(0.3)"
    assert OCC_REGIME.calibrator(tiny(regime="occ")).name == f"fixed({regimes.DEFAULT_LAMBDA:g})"
    assert OCC_REGIME.calibrator(tiny(regime="occ", calibrator="occ-paper")).name == "occ-paper"
    given = FixedLambda(0.7)
    assert OCC_REGIME.calibrator(tiny(regime="occ", calibrator="occ-paper"), given) is given
    assert POLICY.calibrator(tiny(regime="policy")) is None
    with pytest.raises(ValueError, match=r"a calibrator only applies to regimes \['occ'\], not 'policy'"):
        POLICY.calibrator(tiny(regime="policy"), given)


def test_detach_modes_map_onto_the_models_forward_and_others_are_an_error():
    assert [DETACH.mtp_detach(mode) for mode in ("full", "trunk_only")] == ["detach", "detach_trunk_only"]
    with pytest.raises(ValueError, match=r"unknown detach_mode 'half': choose one of \['full', 'trunk_only'\]"):
        DETACH.mtp_detach("half")


def test_display_names_and_colour_families():
    assert DETACH.display_name() == "Detach" and CE.display_name(0.1) == "CE (λ=0.1)"
    assert POLICY.display_name() == f"Policy (λ={regimes.DEFAULT_LAMBDA:g})"
    assert OCC_REGIME.display_name(calibrator="oracle") == "Oracle"
    assert OCC_REGIME.display_name(calibrator="occ-step") == "OCC occ-step"
    assert OCC_REGIME.display_name(lam=0.2) == "OCC (fixed λ=0.2)"
    assert OCC_REGIME.colour_family("oracle") == "Purples" and OCC_REGIME.colour_family("occ-paper") == "Greens"
    assert [r.colour_family() for r in (DETACH, CE, POLICY)] == ["Greys", "Reds", "Blues"]
    assert [r.display_name(0.5) for r in (KL_REGIME, TV_REGIME)] == ["KL (λ=0.5)", "TV (λ=0.5)"]
    assert FROZEN.display_name() == "Frozen"
    families = [r.colour_family() for r in regimes.REGIMES.values()] + [OCC_REGIME.colour_family("oracle")]
    assert len(set(families)) == len(families)  # every regime has a family of its own


def test_the_registry_lists_the_regimes_in_order_and_rejects_what_is_not_a_regime():
    assert regimes.names() == ["detach", "ce", "policy", "occ", "kl", "tv", "frozen"]
    assert regimes.names(regimes.FIXED, regimes.CALIBRATED) == ["ce", "policy", "occ", "kl", "tv"]
    assert regimes.get("policy") is POLICY and regimes.get(POLICY) is POLICY
    with pytest.raises(ValueError, match=r"unknown regime 'joint': choose one of \['detach', 'ce', 'policy', 'occ', 'kl', "):
        regimes.get("joint")
    with pytest.raises(TypeError, match="register\\(\\) takes a Regime instance, got str"):
        register("joint")

    class NoRule(DoubledCE):
        name, lambda_rule = "no-rule", "sometimes"

    with pytest.raises(ValueError, match="lambda_rule 'sometimes' is not one of"):
        register(NoRule())
    assert "no-rule" not in regimes.REGIMES


# ----------------------------------------------------------------------------- kl, tv, frozen


def mtp_parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("mtp_heads.")}


def test_frozen_heads_stay_bit_identical_and_the_rest_follows_the_detach_trajectory(tiny, cache, tmp_path):
    """Frozen: the heads keep their SFT weights bit for bit; their loss reaches nothing, so every
    other parameter moves exactly as under detach (whose MTP loss is cut from them), while
    detach's heads do learn. The heads' cross-entropy is still logged."""
    frozen = train(tiny(regime="frozen", steps=3), tmp_path / "frozen", cache_dir=cache, progress=False)
    detach = train(tiny(regime="detach", steps=3), tmp_path / "detach", cache_dir=cache, progress=False)
    start, _ = warm_start(tiny(), build_task(tiny()), cache, progress=False)
    for name, value in mtp_parameters(start).items():
        assert torch.equal(dict(frozen.model.named_parameters())[name], value), name
    assert any(not torch.equal(dict(detach.model.named_parameters())[n], v) for n, v in mtp_parameters(start).items())
    others = [(n, p) for n, p in frozen.model.named_parameters() if not n.startswith("mtp_heads.")]
    for (name, a), b in zip(others, (p for n, p in detach.model.named_parameters() if not n.startswith("mtp_heads."))):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, dict(start.named_parameters())[n]) for n, a in others)  # training did move them
    mb = pd.read_csv(frozen.out / "minibatch.csv")
    assert (mb["loss_mtp"] > 0).all() and (mb["loss_mtp_weighted"] == 0).all()
    assert (mb["grad_norm_mtp_heads"] == 0).all()
    pd.testing.assert_series_equal(frozen.metrics["j_true"], detach.metrics["j_true"])
    assert FROZEN.frozen_parameters(frozen.model) == list(frozen.model.mtp_heads.parameters())
    assert DETACH.frozen_parameters(frozen.model) == []


@pytest.mark.parametrize("regime", [KL_REGIME, TV_REGIME, FROZEN], ids=lambda r: r.name)
def test_the_probe_measures_each_new_regimes_mtp_direction_on_the_shared_parameters(sft_model, regime):
    """m = -grad_S of the regime's aux loss, reaching S through the MTP heads' joint graph; for
    frozen, with the heads frozen as the trainer freezes them: the direction they would pull S in."""
    model, task, cfg = sft_model
    model = copy.deepcopy(model)
    for param in regime.frozen_parameters(model):
        param.requires_grad_(False)
    batch, _ = rollout(model, task, cfg, step=1)
    batch = dict(batch, advantages=torch.linspace(-1, 1, len(batch["advantages"]), dtype=torch.float64))
    losses = regime.losses(cfg)
    probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward)
    record = probe.measure(batch, 0.01, gg_curvature=False, line_search=False)
    shared = [p for n, p in model.named_parameters() if n in probe.shared_names]
    assert not any(n.startswith("mtp_heads.") for n in probe.shared_names) and shared
    out = losses.forward(model, batch)
    g = torch.autograd.grad(losses.objective(out, batch), shared, retain_graph=True)
    m = [-grad for grad in torch.autograd.grad(losses.aux_loss(out, batch), shared)]
    assert record.v2 == pytest.approx(sum((x * x).sum().item() for x in m), rel=1e-9) and record.v2 > 0
    assert record.c == pytest.approx(sum((a * b).sum().item() for a, b in zip(g, m)), rel=1e-9)
    assert record.h_mm is not None


@pytest.mark.parametrize("regime", ["kl", "tv", "frozen"])
def test_mtpdiag_train_runs_each_new_regime_and_logs_acceptance_and_entropy(regime, tiny, tmp_path, cache):
    out = tmp_path / regime
    flags = ["--lam", "0.5"] if regime != "frozen" else []
    main(["train", "--task-option", "digits=1", "--block-size", "8", "--d-model", "32", "--n-layer", "1", "--n-head",
          "2", "--sft-steps", "100", "--sft-target", "none", "--sft-batch-size", "32", "--sft-lr", "3e-3",
          "--prompts-per-step", "4", "--group-size", "4", "--eval-prompts", "12", "--eval-samples", "2",
          "--eval-every", "2", "--steps", "2", "--no-progress", "--regime", regime, *flags, "--out", str(out),
          "--sft-cache", str(cache)])
    metrics = read_metrics(out)
    evaluated = metrics.dropna(subset=["j_true"])
    assert evaluated["step"].tolist() == [0, 2]
    assert evaluated["accept_tv_1"].between(0, 1).all() and evaluated["accept_greedy_1"].between(0, 1).all()
    assert evaluated["entropy"].between(0, math.log(build_task(tiny()).tokenizer.vocab_size)).all()
    stepped = metrics[metrics["step"] > 0]
    for column in ("rollout_accept_tv_1", "rollout_accept_greedy_1", "rollout_entropy"):
        assert stepped[column].notna().all(), column
    assert regimes.get(regime).lambda_rule == (UNIT if regime == "frozen" else FIXED)
