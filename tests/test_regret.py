"""The regret experiment's rows (mtpdiag.regret): every calibrator's lambda on the detach
trajectory's states, Delta_true checked against an independent step in float64, the
trajectory untouched, the OCC reading 0 on the first mini-batch."""
import copy

import pandas as pd
import pytest
import torch

from mtpdiag import regimes
from mtpdiag.experiment import PRESETS, micro
from mtpdiag.hook import every
from mtpdiag.losses import j_true
from mtpdiag.regret import DETACH, ORACLE, TAYLOR_TRUE, RegretHook, occ_label
from mtpdiag.train import train

SCALES = (0.25, 4.0)


def _config():
    return micro(PRESETS["default"]).base.with_values(regime="detach", steps=2, diag_every=0, dtype="float64",
                                                     checkpoint_every=2)


@pytest.fixture(scope="module")
def regret_run(tmp_path_factory):
    """Two steps of a float64 micro detach run with the hook on step 2, and the same run without it."""
    torch.set_num_threads(1)
    root, cfg = tmp_path_factory.mktemp("regret"), _config()
    states = {}

    def keep_state(ctx):  # before the hook: the state the hook measures from
        if ctx.step == 2:
            states["model"] = copy.deepcopy(ctx.model)
            states["batch"], states["heldout"], states["lr"] = ctx.batch, ctx.j_true_batch, ctx.lr
        return None

    hook = RegretHook(cfg, None, every(2), eta_scales=SCALES)
    with_hook = train(cfg, root / "with", callbacks=[keep_state, hook], cache_dir=root / "cache", progress=False)
    without = train(cfg, root / "without", cache_dir=root / "cache", progress=False)
    return cfg, hook.sink.frame("steps"), with_hook, without, states


def test_the_hook_leaves_the_detach_trajectory_bit_for_bit(regret_run):
    _, rows, with_hook, without, _ = regret_run
    assert len(rows) > 0
    for a, b in zip(with_hook.model.parameters(), without.model.parameters(), strict=True):
        assert torch.equal(a, b)
    columns = ["step", "j_true", "reward_mean", "loss_mtp"]
    pd.testing.assert_frame_equal(with_hook.metrics[columns], without.metrics[columns])


def test_every_state_has_every_choice_and_no_choice_beats_the_measured_best(regret_run):
    cfg, rows, *_ = regret_run
    assert sorted(rows["eta_scale"].unique()) == list(SCALES)
    assert sorted(rows["minibatch"].unique()) == list(range(cfg.minibatches))
    for _, state in rows.groupby(["minibatch", "eta_scale"]):
        names = set(state["choice"])
        assert {DETACH, ORACLE, TAYLOR_TRUE, "fixed-0.5", "cosine", "occ-step"} <= names
        assert occ_label("occ-paper", int(state["minibatch"].iloc[0])) in names
        assert (state["regret"].dropna() >= 0).all()
        assert state.loc[state["choice"] == ORACLE, "regret"].item() == 0
        assert state.loc[state["choice"] == DETACH, "delta_true"].item() == 0
    first = rows[(rows["minibatch"] == 0) & rows["choice"].str.startswith("occ-paper")]
    assert (first["lambda"] == 0).all()  # pi_old is the policy itself on the first mini-batch


def _step(model, batch, eta, lam):
    """An independent SGD step on -J_batch + lam * L_CE (the joint CE-MTP loss) of ``batch``."""
    losses = regimes.CE.losses(_config().with_values(regime="ce", lam=1.0))
    stepped = copy.deepcopy(model)
    stepped.zero_grad(set_to_none=True)
    out = losses.forward(stepped, batch)
    (lam * losses.aux_loss(out, batch) - losses.objective(out, batch)).backward()
    with torch.no_grad():
        for p in stepped.parameters():
            if p.grad is not None:
                p -= eta * p.grad
    stepped.eval()
    return stepped


def test_delta_true_and_the_detach_gain_match_an_independent_step_in_float64(regret_run):
    cfg, rows, *_, states = regret_run
    model, heldout = states["model"], states["heldout"]
    model.eval()
    batch = {k: v[: v.size(0) // cfg.minibatches] for k, v in states["batch"].items()}  # mini-batch 0
    state = rows[(rows["step"] == 2) & (rows["minibatch"] == 0) & (rows["eta_scale"] == 4.0)]
    eta = states["lr"] * 4.0
    forward = regimes.CE.losses(cfg.with_values(regime="ce", lam=1.0)).forward

    def J(m):
        with torch.no_grad():
            return j_true(forward(m, heldout), heldout).item()

    base = J(_step(model, batch, eta, 0.0))
    assert state["gain_detach"].iloc[0] == pytest.approx(base - J(model), rel=1e-9, abs=1e-14)
    checked = state[state["choice"].isin(["fixed-0.5", "fixed-1", TAYLOR_TRUE])]
    assert len(checked) == 3
    for _, row in checked.iterrows():
        expected = J(_step(model, batch, eta, row["lambda"])) - base
        assert row["delta_true"] == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_the_regret_hook_refuses_what_its_theory_does_not_cover():
    with pytest.raises(ValueError, match="one MTP head trained with SGD"):
        RegretHook(_config().with_values(optimizer="adamw", lr=1e-4), None, every(1))
