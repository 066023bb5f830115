"""Calibrators: hand-computed OCC deltas for every preset, the step proxy against an
exactly linear model and against finite differences, non-finite handling, EMA / clip
state, and the gradient-based baselines."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from mtpdiag.calibrators import (
    OCC,
    CalibrationInputs,
    CosineGate,
    FixedLambda,
    Oracle,
    WithShadows,
    make_calibrator,
    response_block,
)
from mtpdiag.losses import AlignedLogprobs, aligned_logprobs, mtp_policy_loss, rl_objective, token_logprobs
from mtpdiag.model import GPT, GPTConfig, GPTOutput, HeadPrediction
from mtpdiag.diagnostics import Probe
from mtpdiag.regimes import DEFAULT_LAMBDA

EPS = 1e-8
F64 = torch.float64

# ---------------------------------------------------------------------------
# Hand-built log-probs: B = 2 sequences, T-1 = 5 positions, K = 2 heads.
# Columns 0-1 are prompt positions, the response starts at column 2; row 1's
# response ends at column 3, so its column 4 is padding. Head 1 (index 0) has no
# prediction at column 0, head 2 (index 1) none at columns 0-1.
# Every old log-prob is -1; the tables give delta = current - old.
# ---------------------------------------------------------------------------
OLD = -1.0
D_RL = [[0.5, 0.5, 0.1, 0.2, 0.3], [0.5, 0.5, 0.2, -0.1, 0.4]]
D_MTP = [
    [[0.0, 0.3, 0.2, 0.1, 0.1], [0.0, 0.3, 0.1, 0.2, 0.5]],  # head index 0, column 0 invalid
    [[0.0, 0.0, 0.1, 0.1, 0.2], [0.0, 0.0, 0.2, 0.1, 0.1]],  # head index 1, columns 0-1 invalid
]
RESPONSE_MASK = [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]
MTP_VALID = [[False, True, True, True, True], [False, False, True, True, True]]


def hand_inputs(d_rl=D_RL, d_mtp=D_MTP, response_mask=RESPONSE_MASK, mtp_valid=MTP_VALID) -> CalibrationInputs:
    valid = torch.tensor(mtp_valid)
    old = torch.full((len(d_rl), len(d_rl[0])), OLD, dtype=F64)
    # aligned_logprobs holds 0 (not a log-prob) where a head has no prediction
    mtp = torch.where(valid.unsqueeze(1), old + torch.tensor(d_mtp, dtype=F64), torch.zeros((), dtype=F64))
    logprobs = AlignedLogprobs(old + torch.tensor(d_rl, dtype=F64), mtp, valid)
    return CalibrationInputs(
        step=0, minibatch=0, logprobs=logprobs, old_logprobs=old,
        response_mask=torch.tensor(response_mask, dtype=F64), lr=0.1,
    )


AGG = ("sum", "tokenwise")


def tokenwise(pairs) -> float:
    return sum(r * m / (m * m + EPS) for r, m in pairs) / len(pairs)


# (delta_RL, delta_MTP) on the response tokens: row 0 columns 2-4, row 1 columns 2-3
HEAD0_RESPONSE = [(0.1, 0.2), (0.2, 0.1), (0.3, 0.1), (0.2, 0.1), (-0.1, 0.2)]
HEAD1_RESPONSE = [(0.1, 0.1), (0.2, 0.1), (0.3, 0.2), (0.2, 0.2), (-0.1, 0.1)]
# the unmasked response block adds row 1's padding column 4
HEAD0_PADDING = [(0.4, 0.5)]
HEAD1_PADDING = [(0.4, 0.1)]
# c_hat and v_hat^2 summed by hand from the pairs above
C_MASKED, V2_MASKED = (0.07, 0.12), (0.11, 0.11)
C_UNMASKED, V2_UNMASKED = (0.27, 0.16), (0.36, 0.12)


def test_paper_preset_sums_over_response_tokens():
    cal = OCC.paper()
    assert (cal.proxy, cal.aggregate, cal.masked, cal.lambda_plus) == ("ratio", "sum", True, 1.0)
    out = cal(hand_inputs())
    for k in range(2):
        assert out.info[f"c_hat_{k}"] == pytest.approx(C_MASKED[k], rel=1e-12)
        assert out.info[f"v_hat2_{k}"] == pytest.approx(V2_MASKED[k], rel=1e-12)
        assert out.info[f"n_tokens_{k}"] == 5
        assert out.info[f"r_hat2_{k}"] == pytest.approx(0.19, rel=1e-12)  # 0.1^2 + 0.2^2 + 0.3^2 + 0.2^2 + 0.1^2
    expected = [C_MASKED[k] / (V2_MASKED[k] + EPS) for k in range(2)]
    assert out.lambdas.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.info["warnings"] == 0


def test_reference_preset_tokenwise_mean_over_the_unmasked_block_scaled_by_heads():
    cal = OCC.reference(num_heads=2)
    assert (cal.aggregate, cal.masked, cal.lambda_plus) == ("tokenwise", False, pytest.approx(0.05))
    out = cal(hand_inputs())
    expected = [
        0.05 * tokenwise(HEAD0_RESPONSE + HEAD0_PADDING),
        0.05 * tokenwise(HEAD1_RESPONSE + HEAD1_PADDING),
    ]
    assert out.lambdas.tolist() == pytest.approx(expected, rel=1e-12)
    assert [out.info["n_tokens_0"], out.info["n_tokens_1"]] == [6, 6]
    assert out.info["lambda_plus"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "aggregate, masked, expected",
    [
        ("sum", True, [C_MASKED[k] / (V2_MASKED[k] + EPS) for k in range(2)]),
        ("sum", False, [C_UNMASKED[k] / (V2_UNMASKED[k] + EPS) for k in range(2)]),
        ("tokenwise", True, [tokenwise(HEAD0_RESPONSE), tokenwise(HEAD1_RESPONSE)]),
        ("tokenwise", False, [tokenwise(HEAD0_RESPONSE + HEAD0_PADDING), tokenwise(HEAD1_RESPONSE + HEAD1_PADDING)]),
    ],
)
def test_every_aggregate_and_mask_reading_matches_hand_computation(aggregate, masked, expected):
    out = OCC(aggregate=aggregate, masked=masked, lambda_plus=2.0)(hand_inputs())
    assert out.lambdas.tolist() == pytest.approx([2.0 * e for e in expected], rel=1e-12)


def test_masking_and_aggregation_change_lambda_by_the_hand_computed_amount():
    inputs = hand_inputs()
    lam = {(a, m): OCC(aggregate=a, masked=m)(inputs).lambdas[0].item() for a in AGG for m in (True, False)}
    # the padding token (0.4, 0.5) moves the sum reading from 0.07/0.11 to 0.27/0.36
    assert lam["sum", False] - lam["sum", True] == pytest.approx(0.27 / (0.36 + EPS) - 0.07 / (0.11 + EPS), rel=1e-9)
    # per-token ratios 0.5, 2, 3, 2, -0.5 (each times 1 - eps / delta_MTP^2) average ~1.4,
    # while the ratio of sums is 0.07 / 0.11
    ratios = [0.02 / (0.04 + EPS), 0.02 / (0.01 + EPS), 0.03 / (0.01 + EPS), 0.02 / (0.01 + EPS), -0.02 / (0.04 + EPS)]
    assert lam["tokenwise", True] - lam["sum", True] == pytest.approx(sum(ratios) / 5 - 0.07 / (0.11 + EPS), rel=1e-9)
    # the padding token's ratio 0.2 / 0.25 = 0.8 joins the mean
    assert lam["tokenwise", False] == pytest.approx((sum(ratios) + 0.2 / (0.25 + EPS)) / 6, rel=1e-9)
    assert lam["tokenwise", True] == pytest.approx(1.4, abs=1e-5)  # eps moves it by ~1e-6


def test_unmasked_block_leaves_out_positions_where_a_head_has_no_prediction():
    # response starts at column 1, where head index 1 has no prediction (its slot holds 0)
    mask = [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    out = OCC(masked=False)(hand_inputs(response_mask=mask))
    head0_pairs = [(0.5, 0.3)] + HEAD0_RESPONSE + HEAD0_PADDING + [(0.5, 0.3)]
    head1_pairs = HEAD1_RESPONSE + HEAD1_PADDING
    for k, pairs in enumerate((head0_pairs, head1_pairs)):
        c = sum(r * m for r, m in pairs)
        v2 = sum(m * m for _, m in pairs)
        assert out.info[f"n_tokens_{k}"] == len(pairs)
        assert out.lambdas[k].item() == pytest.approx(c / (v2 + EPS), rel=1e-12)


def test_response_block_starts_at_the_first_response_column_and_keeps_padding():
    mask = torch.tensor([[0.0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
    block = response_block(mask)
    assert block.tolist() == [[False, False, True, True, True]] * 2
    assert not response_block(torch.zeros(2, 5)).any()


def test_single_head_info_uses_plain_keys():
    inputs = hand_inputs(d_mtp=D_MTP[:1], mtp_valid=MTP_VALID[:1])
    out = OCC.paper()(inputs)
    assert out.lambdas.shape == (1,)
    assert out.info["c_hat"] == pytest.approx(C_MASKED[0], rel=1e-12)
    assert out.info["v_hat2"] == pytest.approx(V2_MASKED[0], rel=1e-12)
    assert "c_hat_0" not in out.info


def test_first_minibatch_with_fresh_old_logprobs_gives_zero_lambda():
    zero_rl = [[0.0] * 5, [0.0] * 5]
    out = OCC.paper()(hand_inputs(d_rl=zero_rl))
    assert out.lambdas.tolist() == [0.0, 0.0]
    assert out.info["warnings"] == 0


# ---------------------------------------------------------------------------
# Zero / non-finite v_hat^2: lambda 0, a counted warning, never NaN in the loss
# ---------------------------------------------------------------------------


def test_zero_v_hat2_gives_zero_lambda_and_a_counted_warning():
    d_mtp = [D_MTP[0], [[0.0] * 5, [0.0] * 5]]  # head index 1 equals pi_old exactly
    cal = OCC.paper()
    out = cal(hand_inputs(d_mtp=d_mtp))
    assert out.lambdas[1].item() == 0.0
    assert out.lambdas[0].item() == pytest.approx(C_MASKED[0] / (V2_MASKED[0] + EPS), rel=1e-12)
    assert (out.info["warnings"], out.info["warnings_total"]) == (1, 1)
    out = cal(hand_inputs(d_mtp=d_mtp))
    assert (out.info["warnings"], out.info["warnings_total"]) == (1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("aggregate", AGG)
def test_non_finite_log_probs_on_a_counted_token_give_zero_lambda_and_a_warning(bad, aggregate):
    inputs = hand_inputs()
    inputs.logprobs.mtp[0, 0, 3] = bad  # a response token of head index 0
    out = OCC(aggregate=aggregate)(inputs)
    assert torch.isfinite(out.lambdas).all()
    assert out.lambdas[0].item() == 0.0 and out.lambdas[1].item() != 0.0
    assert out.info["warnings"] == 1


def test_non_finite_values_outside_the_mask_do_not_leak_in():
    inputs = hand_inputs()
    inputs.logprobs.main[1, 4] = float("nan")  # row 1's padding position
    inputs.logprobs.mtp[0, 1, 4] = float("-inf")
    out = OCC.paper()(inputs)
    assert out.info["warnings"] == 0
    assert out.lambdas[0].item() == pytest.approx(C_MASKED[0] / (V2_MASKED[0] + EPS), rel=1e-12)


def test_nan_never_reaches_the_mtp_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, d_model=16, n_layer=1, n_head=2, n_mtp=2))
    ids = torch.randint(2, 10, (2, 6))
    mask = torch.zeros(2, 5)
    mask[:, 2:] = 1
    out = model(ids)
    lp = aligned_logprobs(out)
    old = lp.main.detach().clone()
    batch = {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": torch.ones(2)}
    overflowed = lp.main.detach().clone()
    overflowed[0, 3] = float("-inf")  # the calibrator sees a log-prob that underflowed
    inputs = CalibrationInputs(0, 0, AlignedLogprobs(overflowed, lp.mtp.detach(), lp.mtp_valid), old, mask, 0.1)
    cal = OCC.paper()
    lambdas = cal(inputs).lambdas
    assert lambdas.tolist() == [0.0, 0.0]
    loss = mtp_policy_loss(out, batch, head_weights=lambdas)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------
# clip, EMA and resumable state
# ---------------------------------------------------------------------------


def scaled_inputs(scale: float) -> CalibrationInputs:
    """Hand inputs whose paper lambda is ``scale`` times the base one."""
    return hand_inputs(d_rl=[[scale * x for x in row] for row in D_RL])


BASE = [C_MASKED[k] / (V2_MASKED[k] + EPS) for k in range(2)]


def test_clip_bounds_each_head():
    out = OCC(clip=(0.0, 0.7))(scaled_inputs(1.0))
    assert out.lambdas.tolist() == pytest.approx([BASE[0], 0.7], rel=1e-12)
    out = OCC(clip=(0.0, 0.7))(scaled_inputs(-1.0))
    assert out.lambdas.tolist() == [0.0, 0.0]
    assert out.info["lambda_raw_0"] == pytest.approx(-BASE[0], rel=1e-12)


def test_ema_smooths_over_calls_and_resumes_from_its_state():
    cal = OCC(ema=0.75)
    first = cal(scaled_inputs(1.0)).lambdas
    assert first.tolist() == pytest.approx(BASE, rel=1e-12)  # the first value starts the average
    second = cal(scaled_inputs(3.0)).lambdas
    assert second.tolist() == pytest.approx([0.75 * b + 0.25 * 3 * b for b in BASE], rel=1e-12)

    resumed = OCC(ema=0.75)
    resumed.load_state_dict(cal.state_dict())
    assert resumed(scaled_inputs(-2.0)).lambdas.tolist() == pytest.approx(
        cal(scaled_inputs(-2.0)).lambdas.tolist(), rel=1e-12
    )


def test_a_warning_step_outputs_zero_and_leaves_the_ema_state_alone():
    cal = OCC(ema=0.5)
    cal(scaled_inputs(1.0))
    no_mtp_change = [[[0.0] * 5, [0.0] * 5]] * 2
    warned = cal(hand_inputs(d_mtp=no_mtp_change))
    assert warned.lambdas.tolist() == [0.0, 0.0] and warned.info["warnings"] == 2
    after = cal(scaled_inputs(3.0)).lambdas
    assert after.tolist() == pytest.approx([0.5 * b + 0.5 * 3 * b for b in BASE], rel=1e-12)
    assert cal.state_dict()["warnings_total"] == 2


def test_fixed_lambda_has_one_value_per_head():
    assert FixedLambda(0.3)(hand_inputs()).lambdas.tolist() == pytest.approx([0.3, 0.3])


def test_fixed_calibrator_by_name_defaults_to_the_trainers_lambda():
    """CALIBRATORS["fixed"] once defaulted to 0.1 while the trainer's default lambda is 1.0."""
    assert DEFAULT_LAMBDA == 1.0
    fixed = make_calibrator("fixed", num_heads=2)
    assert fixed.lam == DEFAULT_LAMBDA and fixed(hand_inputs()).lambdas.tolist() == [DEFAULT_LAMBDA] * 2
    assert make_calibrator("fixed", lam=0.25).lam == 0.25


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"proxy": "logprob"}, "choose one of"),
        ({"aggregate": "mean"}, "choose one of"),
        ({"eps": 0.0}, "small positive"),
        ({"clip": (1.0, 0.0)}, "lo <= hi"),
        ({"ema": 1.0}, "[0, 1)"),
        ({"finite_difference": 1e-3}, "only the step proxy"),
    ],
)
def test_bad_options_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        OCC(**kwargs)


# ---------------------------------------------------------------------------
# step proxy
# ---------------------------------------------------------------------------


def two_way_logits(logprob: torch.Tensor) -> torch.Tensor:
    """Logits over a 2-token vocabulary whose log-softmax at token 0 is exactly
    ``logprob``: token 1 takes the rest of the mass, so the normaliser is 1."""
    return torch.stack([logprob, torch.log(-torch.expm1(logprob))], dim=-1)


class LinearLogprobModel(nn.Module):
    """Every target's log-prob is linear in the parameters: the main head's is
    -1 + A @ theta, head k's is -1 + A_k @ (theta + phi_k). So S = {theta}, and the
    Jacobian of the main log-probs w.r.t. S is A, known exactly."""

    def __init__(self, batch_size: int, length: int, n_shared: int, num_heads: int):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.theta = nn.Parameter(0.1 * torch.randn(n_shared, generator=gen, dtype=F64))
        self.phi = nn.Parameter(0.1 * torch.randn(num_heads, n_shared, generator=gen, dtype=F64))
        self.register_buffer("A", 0.05 * torch.randn(batch_size, length, n_shared, generator=gen, dtype=F64))
        self.register_buffer("A_mtp", 0.05 * torch.randn(num_heads, batch_size, length, n_shared, generator=gen, dtype=F64))

    def forward(self, idx: torch.Tensor) -> GPTOutput:
        B, L = idx.size(0), idx.size(1) - 1
        positions = torch.arange(1, L + 1)

        def head(logprob, offset):
            return HeadPrediction(two_way_logits(logprob), torch.zeros(B, L - offset, dtype=torch.long), positions[offset:])

        out = GPTOutput(main=head(-1 + self.A[:, :L] @ self.theta, 0))
        for k in range(self.phi.size(0)):
            out.mtp.append(head(-1 + self.A_mtp[k, :, : L - 1 - k] @ (self.theta + self.phi[k]), k + 1))
        return out


def call_model(model, batch):
    return model(batch["input_ids"])


def rl_batch(model, B: int, T: int, vocab: int, seed: int = 0) -> dict:
    """A rollout batch with a 3-token prompt, one padded row, and old log-probs a
    little off the current ones (as after a few mini-batches)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.zeros(B, T - 1, dtype=F64)
    mask[:, 2:] = 1
    mask[0, T - 3 :] = 0
    with torch.no_grad():
        current = token_logprobs(call_model(model, {"input_ids": ids}).main)
    old = current + 0.05 * torch.randn(current.shape, generator=gen, dtype=current.dtype)
    advantages = torch.randn(B, generator=gen, dtype=current.dtype)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": advantages}


def model_inputs(model, batch, lr: float, forward=call_model) -> CalibrationInputs:
    with torch.no_grad():
        logprobs = aligned_logprobs(forward(model, batch))
    return CalibrationInputs(
        step=0, minibatch=1, logprobs=logprobs, old_logprobs=batch["old_logprobs"],
        response_mask=batch["response_mask"], lr=lr, model=model, batch=batch, forward=forward,
        objective=rl_objective, aux_loss=mtp_policy_loss,
    )


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, block_size=12, d_model=16, n_layer=1, n_head=2, n_mtp=2)
    return GPT(GPTConfig(**{**cfg, **overrides})).double()


@pytest.mark.parametrize("aggregate", AGG)
@pytest.mark.parametrize("finite_difference", [None, 1.0, 0.25])
def test_step_proxy_on_a_linear_model_is_exactly_the_jacobian_inner_product(aggregate, finite_difference):
    B, T, K, eta = 3, 7, 2, 0.5
    model = LinearLogprobModel(B, T - 1, n_shared=5, num_heads=K)
    batch = rl_batch(model, B, T, vocab=2)
    out = OCC(proxy="step", aggregate=aggregate, finite_difference=finite_difference)(model_inputs(model, batch, eta))

    # independent reference: g, m_k by autograd on the module, J = A by construction
    res = call_model(model, batch)
    g = torch.autograd.grad(rl_objective(res, batch), model.theta, retain_graph=True)[0]
    mask = batch["response_mask"].bool()
    d_rl = (eta * model.A[:, : T - 1] @ g)[mask]
    for k in range(K):
        m_k = -torch.autograd.grad(mtp_policy_loss(res, batch, head_weights=torch.eye(K)[k]), model.theta, retain_graph=True)[0]
        d_mtp = (eta * model.A[:, : T - 1] @ m_k)[mask]
        assert out.info[f"c_hat_{k}"] == pytest.approx((d_rl @ d_mtp).item(), rel=1e-9)
        assert out.info[f"v_hat2_{k}"] == pytest.approx((d_mtp @ d_mtp).item(), rel=1e-9)
        if aggregate == "sum":
            expected = (d_rl @ d_mtp) / (d_mtp @ d_mtp + EPS)
        else:
            expected = (d_rl * d_mtp / (d_mtp**2 + EPS)).mean()
        assert out.lambdas[k].item() == pytest.approx(expected.item(), rel=1e-9)


def test_step_proxy_jvp_and_finite_difference_agree_with_error_shrinking_like_h_squared():
    model = tiny_gpt()
    batch = rl_batch(model, B=4, T=10, vocab=11)
    inputs = model_inputs(model, batch, lr=0.1)
    jvp = OCC(proxy="step")(inputs).info
    errors = []
    for h in (0.1, 0.01, 0.001):
        fd = OCC(proxy="step", finite_difference=h)(inputs).info
        errors.append(max(abs(fd[key] - jvp[key]) / abs(jvp[key]) for key in ("c_hat_0", "c_hat_1", "v_hat2_0", "v_hat2_1")))
    # a central difference is second order: 10x smaller h, ~100x smaller error
    assert errors[0] > 50 * errors[1] > 2500 * errors[2]
    assert errors[2] < 1e-5


def test_step_proxy_finite_difference_sees_the_same_dropout_masks_as_the_jvp():
    model = tiny_gpt(dropout=0.2)
    model.train()
    inputs = model_inputs(model, rl_batch(model, B=4, T=10, vocab=11), lr=0.1)
    jvp = OCC(proxy="step")(inputs).lambdas
    fd = OCC(proxy="step", finite_difference=1e-4)(inputs).lambdas
    torch.testing.assert_close(fd, jvp, rtol=1e-6, atol=0)


@pytest.mark.parametrize("finite_difference", [None, 0.5])
def test_step_proxy_leaves_model_grads_buffers_and_rng_untouched(finite_difference):
    model = tiny_gpt(dropout=0.1)
    model.train()
    batch = rl_batch(model, B=3, T=9, vocab=11)
    inputs = model_inputs(model, batch, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    out = OCC(proxy="step", finite_difference=finite_difference)(inputs)
    assert torch.isfinite(out.lambdas).all()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad, n
    assert buffers.keys() == dict(model.named_buffers()).keys()
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_step_proxy_runs_on_fused_attention_and_matches_the_math_path():
    math_model = tiny_gpt()
    sdpa_model = tiny_gpt(attention="sdpa")
    sdpa_model.load_state_dict(math_model.state_dict())
    batch = rl_batch(math_model, B=3, T=9, vocab=11)
    math = OCC(proxy="step")(model_inputs(math_model, batch, 0.1)).lambdas
    sdpa = OCC(proxy="step")(model_inputs(sdpa_model, batch, 0.1)).lambdas
    torch.testing.assert_close(sdpa, math, rtol=1e-9, atol=0)


def test_step_proxy_with_all_advantages_zero_has_zero_v_hat2_and_warns():
    # every group's rewards equal: zero advantages, so g = m = 0 and no log-prob moves
    model = tiny_gpt()
    batch = rl_batch(model, B=3, T=9, vocab=11)
    batch["advantages"] = torch.zeros(3, dtype=F64)
    out = OCC(proxy="step")(model_inputs(model, batch, 0.1))
    assert out.lambdas.tolist() == [0.0, 0.0]
    assert out.info["v_hat2_0"] == 0.0 and out.info["warnings"] == 2


def test_step_proxy_with_detached_mtp_heads_says_there_is_no_shared_set():
    model = tiny_gpt()
    batch = rl_batch(model, B=3, T=9, vocab=11)

    def detached(m, b):
        return m(b["input_ids"], mtp_detach="detach")

    with pytest.raises(ValueError, match="detached"):
        OCC(proxy="step")(model_inputs(model, batch, 0.1, forward=detached))


def test_step_proxy_without_a_model_names_the_fix():
    with pytest.raises(ValueError, match="proxy='ratio'"):
        OCC(proxy="step")(hand_inputs())


# ---------------------------------------------------------------------------
# oracle and cosine gate
# ---------------------------------------------------------------------------


def linear_model_gradients(model: LinearLogprobModel, batch: dict):
    """g on S = {theta} and m_k = -grad of head k's policy loss, by autograd on the module."""
    out = call_model(model, batch)
    K = model.phi.size(0)
    g = torch.autograd.grad(rl_objective(out, batch), model.theta, retain_graph=True)[0]
    ms = [
        -torch.autograd.grad(mtp_policy_loss(out, batch, head_weights=torch.eye(K)[k]), model.theta, retain_graph=True)[0]
        for k in range(K)
    ]
    return g, ms


def linear_model_hessian(model: LinearLogprobModel, batch: dict) -> torch.Tensor:
    """With log-probs -1 + A theta and every ratio inside the clip range, J_batch is
    mean over response tokens of A_adv * exp(a . theta - 1 - old), so its Hessian is
    mean of A_adv * ratio * a a^T, written out here."""
    mask = batch["response_mask"].bool()
    L = mask.size(1)
    a = model.A[:, :L][mask]  # [N, n]
    logp = -1 + a @ model.theta.detach()
    ratio = torch.exp(logp - batch["old_logprobs"][mask])
    assert ((ratio > 0.8) & (ratio < 1.28)).all(), "the hand Hessian assumes no token is clipped"
    weight = batch["advantages"].unsqueeze(1).expand_as(mask)[mask] * ratio
    return (a.T * weight) @ a / mask.sum()


def test_oracle_taylor_matches_the_hand_derived_lambda_star_per_head():
    B, T, K, eta = 4, 7, 2, 0.3
    model = LinearLogprobModel(B, T - 1, n_shared=5, num_heads=K)
    batch = rl_batch(model, B, T, vocab=2)
    batch["advantages"] = -batch["advantages"].abs() - 0.1  # all negative: J is concave along every direction
    g, ms = linear_model_gradients(model, batch)
    H = linear_model_hessian(model, batch)
    expected = [((g @ m + eta * g @ H @ m) / (-eta * m @ H @ m)).item() for m in ms]
    out = Oracle("taylor", scale=0.5)(model_inputs(model, batch, eta))
    assert out.lambdas.tolist() == pytest.approx([0.5 * e for e in expected], rel=1e-8)
    assert [out.info["lambda_star_taylor_0"], out.info["lambda_star_taylor_1"]] == pytest.approx(expected, rel=1e-8)
    assert out.info["warnings"] == 0


def test_oracle_without_concavity_gives_zero_and_a_warning():
    B, T = 4, 7
    model = LinearLogprobModel(B, T - 1, n_shared=5, num_heads=1)
    batch = rl_batch(model, B, T, vocab=2)
    batch["advantages"] = batch["advantages"].abs() + 0.1  # all positive: J is convex, h_mm > 0
    out = Oracle("taylor")(model_inputs(model, batch, 0.3))
    assert out.lambdas.tolist() == [0.0]
    assert out.info["h_mm"] > 0 and out.info["warnings"] == 1
    assert out.info["lambda_star_taylor"] != out.info["lambda_star_taylor"]  # NaN: undefined, logged as such


def test_oracle_measured_takes_the_probe_curve_argmax_near_the_taylor_value():
    model = tiny_gpt(n_mtp=1)
    batch = rl_batch(model, B=4, T=10, vocab=11)
    batch["advantages"] = batch["advantages"] - batch["advantages"].mean()
    inputs = model_inputs(model, batch, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    out = Oracle("measured")(inputs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    reference = Probe(model, rl_objective, mtp_policy_loss, call_model).measure(batch, 1e-3, gg_curvature=False)
    measured = reference.curve.lambda_star
    assert out.lambdas.item() == pytest.approx(measured, rel=1e-6)
    assert out.info["lambda_star_meas"] == pytest.approx(measured, rel=1e-6)
    # a small step: the exact curve is close to the Taylor quadratic
    assert out.info["lambda_star_meas"] == pytest.approx(out.info["lambda_star_taylor"], rel=0.05)


@pytest.mark.parametrize("mtp_sign", [1.0, -1.0])
def test_cosine_gate_is_lambda0_times_the_positive_part_of_the_cosine(mtp_sign):
    B, T, K = 4, 7, 2
    model = LinearLogprobModel(B, T - 1, n_shared=5, num_heads=K)
    with torch.no_grad():  # head k's prediction of each token moves with (+) or against (-) the main head's
        for k in range(K):
            model.A_mtp[k, :, : T - 2 - k] = mtp_sign * model.A[:, k + 1 :]
    batch = rl_batch(model, B, T, vocab=2)
    g, ms = linear_model_gradients(model, batch)
    cos = [(g @ m / (g.norm() * m.norm())).item() for m in ms]
    assert all(c * mtp_sign > 0.5 for c in cos)
    out = CosineGate(lambda0=0.3)(model_inputs(model, batch, 0.1))
    assert out.lambdas.tolist() == pytest.approx([0.3 * max(0.0, c) for c in cos], rel=1e-9, abs=0)
    assert [out.info["cos_0"], out.info["cos_1"]] == pytest.approx(cos, rel=1e-9)


def test_oracle_and_cosine_clip_is_off_by_default_and_named_in_the_record():
    B, T, K, eta = 4, 7, 2, 0.3
    model = LinearLogprobModel(B, T - 1, n_shared=5, num_heads=K)
    batch = rl_batch(model, B, T, vocab=2)
    batch["advantages"] = -batch["advantages"].abs() - 0.1  # concave: lambda* defined on both heads
    inputs = model_inputs(model, batch, eta)
    free = Oracle("taylor")(inputs).lambdas
    lo, hi = float(free.min()) + 0.25 * float(free.max() - free.min()), float(free.max()) - 0.01
    clipped = Oracle("taylor", clip=(lo, hi))
    out = clipped(inputs)
    assert out.lambdas.tolist() == pytest.approx(free.clamp(lo, hi).tolist(), rel=1e-12)
    assert [out.info["lambda_raw_0"], out.info["lambda_raw_1"]] == pytest.approx(free.tolist(), rel=1e-12)
    assert Oracle().name == "oracle[taylor]" and Oracle().clip is None  # off by default
    assert clipped.name == f"oracle[taylor,clip=({lo:g},{hi:g})]"
    assert make_calibrator("oracle", clip=(0, 10)).name == "oracle[taylor,clip=(0,10)]"
    gate = make_calibrator("cosine", lambda0=0.3, clip=(0.0, 0.1))
    assert gate.name == "cosine[lambda0=0.3,clip=(0,0.1)]" and CosineGate().name == "cosine[lambda0=1]"
    assert gate(inputs).lambdas.max() <= 0.1
    with pytest.raises(ValueError, match="lo <= hi"):
        Oracle(clip=(1.0, 0.0))


def test_a_clip_leaves_an_undefined_lambda_at_zero():
    model = LinearLogprobModel(4, 6, n_shared=5, num_heads=1)
    batch = rl_batch(model, 4, 7, vocab=2)
    batch["advantages"] = batch["advantages"].abs() + 0.1  # convex: no lambda*
    out = Oracle("taylor", clip=(0.5, 2.0))(model_inputs(model, batch, 0.3))
    assert out.lambdas.tolist() == [0.0] and out.info["warnings"] == 1


def test_gradient_calibrators_without_a_model_name_the_fix():
    for calibrator in (Oracle(), CosineGate()):
        with pytest.raises(ValueError, match="proxy='ratio'"):
            calibrator(hand_inputs())
    with pytest.raises(ValueError, match="choose one of"):
        Oracle("meas")


def test_make_calibrator_builds_the_presets_by_name():
    assert make_calibrator("occ-paper").name == "occ-paper"
    assert make_calibrator("occ-reference", num_heads=4).lambda_plus == pytest.approx(0.025)
    assert make_calibrator("occ", proxy="step", aggregate="tokenwise").proxy == "step"
    assert make_calibrator("oracle", source="measured").source == "measured"
    assert make_calibrator("cosine", lambda0=0.5).lambda0 == 0.5
    with pytest.raises(ValueError, match="choose one of"):
        make_calibrator("occ-paprer")


def test_shadows_log_what_other_calibrators_would_choose_on_the_same_inputs():
    cal = WithShadows(OCC.paper(), {"ref": OCC.reference(num_heads=2), "smooth": OCC(ema=0.5)}, every=2)
    first = cal(hand_inputs())
    alone = OCC.paper()(hand_inputs())
    torch.testing.assert_close(first.lambdas, alone.lambdas)
    reference = OCC.reference(num_heads=2)(hand_inputs())
    assert [first.info["ref_lambda_0"], first.info["ref_lambda_1"]] == reference.lambdas.tolist()
    assert first.info["ref_c_hat_1"] == reference.info["c_hat_1"]
    assert first.info["c_hat_0"] == alone.info["c_hat_0"]
    second = cal(scaled_inputs(3.0))
    assert not any(key.startswith(("ref_", "smooth_")) for key in second.info)  # every=2: shadows skipped

    resumed = WithShadows(OCC.paper(), {"ref": OCC.reference(num_heads=2), "smooth": OCC(ema=0.5)}, every=2)
    resumed.load_state_dict(cal.state_dict())
    assert resumed(scaled_inputs(-1.0)).info == cal(scaled_inputs(-1.0)).info
    assert "smooth=occ[ratio,sum,masked,lambda_plus=1,ema=0.5]" in cal.name
