"""AmortisedTaylor: lambda*_taylor with curvatures measured every k-th call and carried.

Float64 against hand formulas on an exactly quadratic problem (where lambda*_taylor is the
true argmax of Delta), against Oracle("taylor") on a tiny GPT on the measuring calls,
exact resume, non-mutation and option errors."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from mtpdiag.calibrators import AmortisedTaylor, CalibrationInputs, Oracle, make_calibrator
from mtpdiag.diagnostics import Probe
from mtpdiag.losses import AlignedLogprobs, aligned_logprobs, mtp_policy_loss, rl_objective, token_logprobs
from mtpdiag.model import GPT, GPTConfig

F64 = torch.float64
N, K = 4, 2


# ---------------------------------------------------------------------------
# An exactly quadratic problem: J(theta) = b.theta - theta^T A theta / 2 (A SPD, so
# H = -A everywhere), head k's MTP loss (theta + phi_k - t_k)^T B_k (theta + phi_k - t_k) / 2.
# S = {theta}; phi are MTP-only parameters. Delta(lambda) is exactly the Taylor
# quadratic, so lambda*_taylor is the true argmax.
# ---------------------------------------------------------------------------


def spd(gen, scale):
    Q = torch.randn(N, N, generator=gen, dtype=F64)
    return scale * (Q @ Q.T / N + 0.5 * torch.eye(N, dtype=F64))


class QuadraticModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(N, generator=gen, dtype=F64))
        self.phi = nn.Parameter(0.1 * torch.randn(K, N, generator=gen, dtype=F64))


def quadratic_batch(seed: int) -> dict:
    gen = torch.Generator().manual_seed(100 + seed)
    return {
        "A": spd(gen, 1.0), "b": torch.randn(N, generator=gen, dtype=F64),
        "B": torch.stack([spd(gen, 0.5) for _ in range(K)]), "t": torch.randn(K, N, generator=gen, dtype=F64),
        "A_eval": spd(gen, 2.0), "b_eval": torch.randn(N, generator=gen, dtype=F64),
    }


def parameters(model, batch):
    return model.theta, model.phi


def objective(out, batch):
    theta, _ = out
    return batch["b"] @ theta - theta @ batch["A"] @ theta / 2


def eval_objective(out, batch):
    theta, _ = out
    return batch["b_eval"] @ theta - theta @ batch["A_eval"] @ theta / 2


def aux_loss(out, batch, head_weights=None):
    theta, phi = out
    weights = torch.ones(K, dtype=F64) if head_weights is None else torch.as_tensor(head_weights, dtype=F64)
    residual = theta + phi - batch["t"]  # [K, N]
    return sum(weights[k] * residual[k] @ batch["B"][k] @ residual[k] / 2 for k in range(K))


def quadratic_inputs(model, batch, lr) -> CalibrationInputs:
    dummy = torch.zeros(1, 1, dtype=F64)
    logprobs = AlignedLogprobs(dummy, torch.zeros(K, 1, 1, dtype=F64), torch.ones(K, 1, dtype=torch.bool))
    return CalibrationInputs(
        step=0, minibatch=0, logprobs=logprobs, old_logprobs=dummy, response_mask=torch.ones(1, 1, dtype=F64),
        lr=lr, model=model, batch=batch, forward=parameters, objective=objective, aux_loss=aux_loss,
    )


def hand(model, batch, eval_=False):
    """Per head: (c, |g|, |m|, h_gm, h_mm) by hand; with eval_, c = <grad E, m> and H = E's."""
    theta, phi = model.theta.detach(), model.phi.detach()
    g = batch["b"] - batch["A"] @ theta
    e, H = (batch["b_eval"] - batch["A_eval"] @ theta, -batch["A_eval"]) if eval_ else (g, -batch["A"])
    rows = []
    for k in range(K):
        m = -batch["B"][k] @ (theta + phi[k] - batch["t"][k])
        rows.append(((e @ m).item(), g.norm().item(), m.norm().item(), (g @ H @ m).item(), (m @ H @ m).item()))
    return rows


def lambda_star(c, h_gm, h_mm, eta):
    return (c + eta * h_gm) / (-eta * h_mm)


def move(model, seed):
    """A stand-in for the trainer's update between calls."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))


def test_every_call_measuring_is_the_exact_argmax_of_delta_on_a_quadratic():
    model, batch, eta = QuadraticModel(), quadratic_batch(0), 0.2
    out = AmortisedTaylor(every=1)(quadratic_inputs(model, batch, eta))
    theta, phi = model.theta.detach(), model.phi.detach()
    g = batch["b"] - batch["A"] @ theta
    J = lambda th: (batch["b"] @ th - th @ batch["A"] @ th / 2).item()  # noqa: E731
    for k, (c, _, _, h_gm, h_mm) in enumerate(hand(model, batch)):
        expected = lambda_star(c, h_gm, h_mm, eta)
        assert out.lambdas[k].item() == pytest.approx(expected, rel=1e-12)
        m = -batch["B"][k] @ (theta + phi[k] - batch["t"][k])
        delta = lambda lam: J(theta + eta * (g + lam * m)) - J(theta + eta * g)  # noqa: E731
        assert delta(expected) > max(delta(expected - 1e-3), delta(expected + 1e-3))  # the true argmax
    assert out.info["measured_0"] == out.info["measured_1"] == 1.0 and out.info["warnings"] == 0


def test_between_measurements_the_carried_curvatures_meet_fresh_gradients_and_the_new_eta():
    model, cal = QuadraticModel(), AmortisedTaylor(every=3)
    etas = [0.2, 0.2, 0.05, 0.2]
    measured = hand(model, quadratic_batch(0))
    kappa = [-h_mm / m_norm**2 for _, _, m_norm, _, h_mm in measured]
    r_gm = [h_gm / (g_norm * m_norm) for _, g_norm, m_norm, h_gm, _ in measured]
    for call, eta in enumerate(etas):
        batch = quadratic_batch(call)
        if call:
            move(model, call)
        out = cal(quadratic_inputs(model, batch, eta))
        rows = hand(model, batch)
        for k, (c, g_norm, m_norm, h_gm, h_mm) in enumerate(rows):
            if call % 3 == 0:  # a measuring call: the fresh lambda*_taylor
                expected = lambda_star(c, h_gm, h_mm, eta)
                kappa[k], r_gm[k] = -h_mm / m_norm**2, h_gm / (g_norm * m_norm)
            else:
                expected = (c + eta * r_gm[k] * g_norm * m_norm) / (eta * kappa[k] * m_norm**2)
                assert expected != pytest.approx(lambda_star(c, h_gm, h_mm, eta), rel=1e-3)  # it is carried
            assert out.lambdas[k].item() == pytest.approx(expected, rel=1e-12), (call, k)
            assert out.info[f"measured_{k}"] == (1.0 if call % 3 == 0 else 0.0)
            assert out.info[f"kappa_m_{k}"] == pytest.approx(kappa[k], rel=1e-12)


def test_ema_carries_a_smoothed_curvature_and_measuring_calls_stay_fresh():
    model, beta = QuadraticModel(), 0.75
    cal = AmortisedTaylor(every=2, ema=beta)
    first = hand(model, quadratic_batch(0))
    cal(quadratic_inputs(model, quadratic_batch(0), 0.2))
    cal(quadratic_inputs(model, quadratic_batch(1), 0.2))
    move(model, 5)
    out = cal(quadratic_inputs(model, quadratic_batch(2), 0.2))  # measures: fresh values
    third = hand(model, quadratic_batch(2))
    for k in range(K):
        c, g_norm, m_norm, h_gm, h_mm = third[k]
        assert out.lambdas[k].item() == pytest.approx(lambda_star(c, h_gm, h_mm, 0.2), rel=1e-12)
        kappa = beta * (-first[k][4] / first[k][2] ** 2) + (1 - beta) * (-h_mm / m_norm**2)
        assert cal.state_dict()["kappa_m"][k] == pytest.approx(kappa, rel=1e-12)


def test_eval_objective_gives_the_taylor_lambda_star_of_the_curve_objective():
    model, batch, eta = QuadraticModel(), quadratic_batch(0), 0.1
    cal = AmortisedTaylor(every=2, eval_objective=eval_objective)
    assert cal.name == "amortised-taylor[every=2,eval_objective]"
    out = cal(quadratic_inputs(model, batch, eta))
    rows = hand(model, batch, eval_=True)
    for k, (c_e, _, _, h_gm, h_mm) in enumerate(rows):
        assert out.lambdas[k].item() == pytest.approx(lambda_star(c_e, h_gm, h_mm, eta), rel=1e-12)
        assert out.info[f"c_{k}"] == pytest.approx(c_e, rel=1e-12)
    move(model, 3)
    out = cal(quadratic_inputs(model, batch, eta))
    fresh = hand(model, batch, eval_=True)
    for k in range(K):
        kappa, r = -rows[k][4] / rows[k][2] ** 2, rows[k][3] / (rows[k][1] * rows[k][2])
        c_e, g_norm, m_norm = fresh[k][:3]
        expected = (c_e + eta * r * g_norm * m_norm) / (eta * kappa * m_norm**2)
        assert out.lambdas[k].item() == pytest.approx(expected, rel=1e-12)


def test_a_convex_direction_gives_zero_and_a_warning_while_carried():
    model, batch = QuadraticModel(), quadratic_batch(0)
    batch["A"] = -batch["A"]  # J convex: h_mm > 0 along every m
    cal = AmortisedTaylor(every=2)
    first = cal(quadratic_inputs(model, batch, 0.2))
    second = cal(quadratic_inputs(model, batch, 0.2))
    assert first.lambdas.tolist() == second.lambdas.tolist() == [0.0, 0.0]
    assert first.info["warnings"] == second.info["warnings"] == 2 and second.info["warnings_total"] == 4
    assert second.info["measured_0"] == 0.0 and second.info["kappa_m_0"] < 0


def test_a_head_without_mtp_signal_measures_again_on_its_next_call():
    model, batch = QuadraticModel(), quadratic_batch(0)
    zero_m = dict(batch, B=torch.zeros_like(batch["B"]))  # m = 0 on both heads
    cal = AmortisedTaylor(every=5)
    out = cal(quadratic_inputs(model, zero_m, 0.2))
    assert out.lambdas.tolist() == [0.0, 0.0] and out.info["warnings"] == 2
    out = cal(quadratic_inputs(model, batch, 0.2))  # call 1 is off schedule, but nothing is carried
    assert out.info["measured_0"] == out.info["measured_1"] == 1.0
    c, _, _, h_gm, h_mm = hand(model, batch)[0]
    assert out.lambdas[0].item() == pytest.approx(lambda_star(c, h_gm, h_mm, 0.2), rel=1e-12)


def test_resume_from_state_dict_continues_exactly():
    def run(cal, model, calls):
        outs = []
        for call in calls:
            move(model, call)
            outs.append(cal(quadratic_inputs(model, quadratic_batch(call), 0.2)))
        return outs

    straight_model, resumed_model = QuadraticModel(), QuadraticModel()
    straight = AmortisedTaylor(every=3, ema=0.5)
    run(straight, straight_model, [1, 2])
    expected = run(straight, straight_model, [3, 4, 5, 6])

    first = AmortisedTaylor(every=3, ema=0.5)
    run(first, resumed_model, [1, 2])
    state = json.loads(json.dumps(first.state_dict()))  # plain Python values
    resumed = AmortisedTaylor(every=3, ema=0.5)
    resumed.load_state_dict(state)
    got = run(resumed, resumed_model, [3, 4, 5, 6])
    for a, b in zip(got, expected):
        assert torch.equal(a.lambdas, b.lambdas) and a.info == b.info
    assert [o.info["measured_0"] for o in got] == [0.0, 1.0, 0.0, 0.0]  # calls 2..5: the schedule resumed


def test_resume_with_another_number_of_heads_names_the_fix():
    cal = AmortisedTaylor()
    cal.load_state_dict({"warnings_total": 0, "calls": 1, "kappa_m": [1.0], "r_gm": [0.0]})
    with pytest.raises(ValueError, match="build a new calibrator"):
        cal(quadratic_inputs(QuadraticModel(), quadratic_batch(0), 0.2))


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"every": 0}, ">= 1"),
        ({"every": 2.5}, "whole number"),
        ({"ema": 1.0}, "[0, 1)"),
        ({"scale": 0.0}, "non-zero"),
        ({"clip": (2.0, 1.0)}, "lo <= hi"),
        ({"eval_batch": {}}, "pass eval_objective"),
        ({"eval_objective": "j_true"}, "loss(out, batch)"),
    ],
)
def test_bad_options_raise_one_line_naming_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=re.escape(fix)) as err:
        make_calibrator("amortised-taylor", num_heads=2, **kwargs)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# a tiny GPT: the measuring calls are Oracle("taylor") to float64 rounding
# ---------------------------------------------------------------------------


def call_model(model, batch):
    return model(batch["input_ids"])


def gpt_and_batch(seed: int):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=12, d_model=16, n_layer=1, n_head=2, n_mtp=2)).double()
    return model, gpt_batch(model, seed)


def gpt_batch(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (4, 10), generator=gen)
    mask = torch.zeros(4, 9, dtype=F64)
    mask[:, 2:] = 1
    with torch.no_grad():
        current = token_logprobs(call_model(model, {"input_ids": ids}).main)
    old = current + 0.05 * torch.randn(current.shape, generator=gen, dtype=F64)
    advantages = torch.randn(4, generator=gen, dtype=F64)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": advantages - advantages.mean()}


def gpt_inputs(model, batch, lr) -> CalibrationInputs:
    with torch.no_grad():
        logprobs = aligned_logprobs(call_model(model, batch))
    return CalibrationInputs(
        step=0, minibatch=1, logprobs=logprobs, old_logprobs=batch["old_logprobs"],
        response_mask=batch["response_mask"], lr=lr, model=model, batch=batch, forward=call_model,
        objective=rl_objective, aux_loss=mtp_policy_loss,
    )


def test_on_a_gpt_measuring_calls_equal_the_oracle_and_the_others_carry_its_curvatures():
    model, _ = gpt_and_batch(0)
    cal, eta = AmortisedTaylor(every=2), 0.05
    carried, signs = None, []
    for call in range(3):
        batch = gpt_batch(model, call)
        inputs = gpt_inputs(model, batch, eta)
        out = cal(inputs)
        if call % 2 == 0:
            oracle = Oracle("taylor")(inputs)
            assert out.lambdas.tolist() == pytest.approx(oracle.lambdas.tolist(), rel=1e-12, abs=0)
            records = [Probe(model, rl_objective, loss, call_model).measure(batch, eta, gg_curvature=False,
                                                                           line_search=False, crossfit=False)
                       for loss in heads(K)]
            carried = [(-r.h_mm / r.v2, r.h_gm / (r.g_norm * r.m_norm)) for r in records]
        else:
            for k, loss in enumerate(heads(K)):
                r = Probe(model, rl_objective, loss, call_model).measure(batch, eta, hvp=False, line_search=False,
                                                                         crossfit=False)
                kappa, r_gm = carried[k]
                signs.append(kappa > 0)
                # a direction measured convex stays without a lambda* until the next measurement
                expected = (r.c + eta * r_gm * r.g_norm * r.m_norm) / (eta * kappa * r.v2) if kappa > 0 else 0.0
                assert out.lambdas[k].item() == pytest.approx(expected, rel=1e-12)
        with torch.no_grad():  # a stand-in for the trainer's step between mini-batches
            for p in model.parameters():
                p.mul_(1.01)
    assert signs == [False, True]  # this batch sequence meets both cases: head 0 convex, head 1 concave


def test_on_a_gpt_with_a_held_out_objective_measuring_calls_equal_the_probes_held_out_lambda_star():
    from mtpdiag.losses import j_true

    model, batch = gpt_and_batch(2)
    gen = torch.Generator().manual_seed(7)
    completion = torch.zeros(3, 9, dtype=F64)
    completion[:, -2:] = 1  # two target tokens: pi(y* | x) ~ 1e-2, far from rounding
    heldout = {"input_ids": torch.randint(0, 11, (3, 10), generator=gen), "response_mask": completion}
    cal, eta = AmortisedTaylor(every=2, eval_objective=j_true, eval_batch=heldout), 0.05
    out = cal(gpt_inputs(model, batch, eta))
    for k, loss in enumerate(heads(K)):
        record = Probe(model, rl_objective, loss, call_model).measure(
            batch, eta, eval_objective=j_true, eval_batch=heldout, gg_curvature=False, line_search=False,
            crossfit=False)
        expected = record.lambda_star_taylor if record.lambda_star_taylor is not None else 0.0
        assert out.lambdas[k].item() == pytest.approx(expected, rel=1e-12, abs=0)
        assert out.info[f"c_{k}"] == record.c_eval and record.c_eval != record.c  # the held-out correlation


def heads(num_heads):
    return [lambda out, batch, k=k: mtp_policy_loss(out, batch, head_weights=torch.eye(num_heads)[k])
            for k in range(num_heads)]


def test_leaves_model_grads_buffers_and_rng_untouched():
    model, batch = gpt_and_batch(1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cal = AmortisedTaylor(every=2)
    for _ in range(2):  # a measuring and a carrying call
        out = cal(gpt_inputs(model, batch, 0.05))
        assert torch.isfinite(out.lambdas).all()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad, n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


# ---------------------------------------------------------------------------
# through the trainer: a killed and resumed run repeats the uninterrupted one
# ---------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_a_killed_and_resumed_training_run_repeats_its_lambdas_exactly(tiny, tmp_path, cache):
    import pandas as pd

    from mtpdiag.train import train

    cfg = tiny(regime="occ", minibatches=2, steps=5, checkpoint_every=2, eval_every=10)
    # every=3 with 2 mini-batches a step: the measuring calls fall on different mini-batches,
    # and the checkpoint at step 2 is taken between a measuring call and the calls it serves
    full = train(cfg, tmp_path / "full", calibrator=AmortisedTaylor(every=3), cache_dir=cache, progress=False)

    def kill_at_step_4(ctx):
        if ctx.step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", calibrator=AmortisedTaylor(every=3), callbacks=[kill_at_step_4],
              cache_dir=cache, progress=False)
    train(cfg, tmp_path / "killed", resume=True, calibrator=AmortisedTaylor(every=3), cache_dir=cache, progress=False)
    resumed, straight = pd.read_csv(tmp_path / "killed" / "minibatch.csv"), pd.read_csv(full.out / "minibatch.csv")
    pd.testing.assert_frame_equal(resumed, straight, check_exact=True)
    # the first call had m != 0, so the schedule is every third call across steps and the resume
    assert straight["calib_measured"].tolist() == [1.0, 0.0, 0.0] * 3 + [1.0]
    carried = straight[(straight.calib_measured == 0) & (straight.calib_v2 > 0)]
    assert len(carried) and carried["lambda_0"].abs().gt(0).all()  # carried calls with an MTP signal set lambda
