"""RL objectives and MTP losses against element-by-element float64 oracles."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtpdiag.losses import (
    aligned_logprobs,
    clip_fraction,
    clipped_surrogate,
    completion_logprob,
    group_advantages,
    j_true,
    masked_mean,
    mtp_ce_loss,
    mtp_kl_loss,
    mtp_policy_loss,
    mtp_tv_loss,
    rl_objective,
    rl_objective_unclipped,
    sft_loss,
    token_logprobs,
)
from mtpdiag.model import GPT, GPTConfig, GPTOutput, HeadPrediction

VOCAB, B, T = 9, 4, 8


@pytest.fixture(scope="module", params=["parallel", "sequential"])
def model(request):
    torch.manual_seed(0)
    return GPT(GPTConfig(VOCAB, block_size=T, d_model=16, n_layer=1, n_head=2, n_mtp=2, mtp_wiring=request.param)).double()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(B, T - 1, dtype=torch.float64)
    for b in range(B):
        mask[b, 2 : 4 + b] = 1.0  # completions of different lengths
    return {
        "input_ids": torch.randint(0, VOCAB, (B, T), generator=gen),
        "response_mask": mask,
        "old_logprobs": -torch.rand(B, T - 1, generator=gen, dtype=torch.float64) * 3,
        "advantages": torch.randn(B, generator=gen, dtype=torch.float64),
    }


def surrogate_oracle(logp, old, adv, mask, eps_low, eps_high):
    """DAPO's token-level mean, one token at a time."""
    total, count = 0.0, 0.0
    for b in range(len(logp)):
        for i in range(len(logp[b])):
            if mask[b][i]:
                ratio = math.exp(logp[b][i] - old[b][i])
                clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
                total += min(ratio * adv[b], clipped * adv[b])
                count += 1
    return total / max(count, 1.0)


@given(seed=st.integers(0, 2**31), eps_low=st.floats(0.05, 0.5), eps_high=st.floats(0.05, 0.5))
def test_clipped_surrogate_matches_the_token_by_token_oracle(seed, eps_low, eps_high):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 2
    old = logp + torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.4  # ratios on both sides of the clip
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).double()
    expected = surrogate_oracle(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps_low, eps_high)
    assert clipped_surrogate(logp, old, adv, mask, eps_low, eps_high).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("advantage", [1.5, -1.5])
def test_masked_positions_never_reach_the_loss_or_its_gradient_even_when_not_finite(advantage):
    logp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -1000.0]], dtype=torch.float64)  # exp(1000) overflows
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    value = clipped_surrogate(logp, old, torch.tensor([advantage], dtype=torch.float64), mask)
    value.backward()
    expected = surrogate_oracle(logp.tolist(), old.tolist(), [advantage], mask.tolist(), 0.2, 0.28)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0


def test_at_ratio_one_the_surrogate_gradient_is_the_advantage_weighted_score(model, batch):
    """grad J = masked mean of A_b * grad log pi(token) when pi_old = pi."""
    params = [p for name, p in model.named_parameters() if not name.startswith("mtp_heads.")]
    out = model(batch["input_ids"], with_mtp=False)
    logp = token_logprobs(out.main)
    on_policy = dict(batch, old_logprobs=logp.detach())
    grads = torch.autograd.grad(rl_objective(out, on_policy), params, retain_graph=True)
    weights = batch["advantages"][:, None] * batch["response_mask"] / batch["response_mask"].sum()
    expected = torch.autograd.grad((weights * logp).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=6), group_size=st.integers(1, 8))
def test_groups_with_uniform_reward_get_exactly_zero_advantage(values, group_size):
    rewards = torch.tensor([v for v in values for _ in range(group_size)], dtype=torch.float64)
    assert torch.equal(group_advantages(rewards, group_size), torch.zeros_like(rewards))


def test_group_advantages_are_standardised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3, 2.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4).view(3, 4)
    r = rewards.view(3, 4)
    for g in (0, 2):
        expected = (r[g] - r[g].mean()) / (r[g].std(unbiased=False) + 1e-6)
        torch.testing.assert_close(adv[g], expected, rtol=1e-12, atol=0)
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))


def test_aligned_logprobs_put_each_heads_prediction_of_a_token_under_that_token(model, batch):
    out = model(batch["input_ids"])
    lp = aligned_logprobs(out)
    assert lp.mtp.shape == (2, B, T - 1)
    torch.testing.assert_close(lp.main, token_logprobs(out.main), rtol=0, atol=0)
    for k, pred in enumerate(out.mtp):
        per_head = token_logprobs(pred)
        for j, pos in enumerate(pred.target_pos.tolist()):
            # entry i of the aligned layout concerns the token at sequence position i + 1
            assert torch.equal(lp.mtp[k, :, pos - 1], per_head[:, j])
        assert lp.mtp_valid[k].tolist() == [i + 1 in pred.target_pos.tolist() for i in range(T - 1)]


def test_mtp_policy_loss_is_the_main_clipped_loss_on_head_logprobs_with_main_old_logprobs(model, batch):
    out = model(batch["input_ids"])
    lp = aligned_logprobs(out)
    weights = [0.7, 0.2]
    expected = 0.0
    for k in range(2):
        mask = (batch["response_mask"] * lp.mtp_valid[k]).tolist()
        expected -= weights[k] * surrogate_oracle(
            lp.mtp[k].tolist(), batch["old_logprobs"].tolist(), batch["advantages"].tolist(), mask, 0.2, 0.28
        )
    assert mtp_policy_loss(out, batch, weights).item() == pytest.approx(expected, rel=1e-12)


def cross_entropy_oracle(pred, mask_for_target):
    """Mean -log softmax(logits)[target] over rows whose target position is masked in."""
    total, count = 0.0, 0
    for b in range(pred.logits.shape[0]):
        for j, pos in enumerate(pred.target_pos.tolist()):
            if mask_for_target[b][pos - 1]:
                logits = pred.logits[b, j].tolist()
                log_norm = math.log(sum(math.exp(x) for x in logits))
                total += log_norm - logits[pred.targets[b, j]]
                count += 1
    return total / max(count, 1)


def test_mtp_ce_and_sft_losses_match_the_cross_entropy_oracle(model, batch):
    out = model(batch["input_ids"])
    mask = batch["response_mask"].tolist()
    heads = [cross_entropy_oracle(pred, mask) for pred in out.mtp]
    assert mtp_ce_loss(out, batch, [1.0, 0.5]).item() == pytest.approx(heads[0] + 0.5 * heads[1], rel=1e-12)
    main = cross_entropy_oracle(out.main, mask)
    assert sft_loss(out, batch, 0.3).item() == pytest.approx(main + 0.3 * sum(heads), rel=1e-12)


def test_j_true_is_the_mean_probability_of_the_whole_completion(model, batch):
    out = model(batch["input_ids"])
    probs = torch.softmax(out.main.logits, -1)
    expected = []
    for b in range(B):
        p = 1.0
        for i in range(T - 1):
            if batch["response_mask"][b, i]:
                p *= probs[b, i, batch["input_ids"][b, i + 1]].item()
        expected.append(p)
    torch.testing.assert_close(completion_logprob(out, batch).exp(), torch.tensor(expected, dtype=torch.float64))
    assert j_true(out, batch).item() == pytest.approx(sum(expected) / B, rel=1e-12)


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def softmax(logits):
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def distillation_oracle(out, mask, weights, distance, gradient):
    """sum_k w_k mean over masked tokens of distance(p_main, q_k), one token at a time, the
    main head's entry for a token found from the head's target position; and its gradient
    in each head's logits (``gradient(p, q)``: d distance / d logits of q)."""
    total, grads = 0.0, []
    for k, pred in enumerate(out.mtp):
        rows = [(b, j, pos) for b in range(pred.logits.shape[0]) for j, pos in enumerate(pred.target_pos.tolist())
                if mask[b][pos - 1]]
        grad = torch.zeros_like(pred.logits)
        for b, j, pos in rows:
            p, q = softmax(out.main.logits[b, pos - 1].tolist()), softmax(pred.logits[b, j].tolist())
            total += weights[k] * distance(p, q) / len(rows)
            grad[b, j] = torch.tensor(gradient(p, q), dtype=torch.float64) * weights[k] / len(rows)
        grads.append(grad)
    return total, grads


def kl_oracle(p, q):
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


def kl_gradient(p, q):
    return [qv - pv for pv, qv in zip(p, q)]  # d/dz KL(p || softmax(z)) = q - p


def tv_oracle(p, q):
    return 0.5 * sum(abs(pv - qv) for pv, qv in zip(p, q))


def tv_gradient(p, q):
    # d/dz_j (1/2) sum_v |p_v - q_v| = -(1/2) sum_v sign(p_v - q_v) q_v (1[v = j] - q_j)
    sign = [math.copysign(1.0, pv - qv) if pv != qv else 0.0 for pv, qv in zip(p, q)]
    mean = sum(s * qv for s, qv in zip(sign, q))
    return [-0.5 * qj * (sj - mean) for sj, qj in zip(sign, q)]


def leaf_output(out):
    """``out`` with every head's logits as leaf tensors, to read the gradient of a loss in them."""
    def leaf(pred):
        return HeadPrediction(pred.logits.detach().clone().requires_grad_(), pred.targets, pred.target_pos)

    return GPTOutput(leaf(out.main), [leaf(pred) for pred in out.mtp])


@pytest.mark.parametrize("loss, distance, gradient", [(mtp_kl_loss, kl_oracle, kl_gradient),
                                                      (mtp_tv_loss, tv_oracle, tv_gradient)], ids=["kl", "tv"])
def test_kl_and_tv_losses_and_their_gradients_match_the_float64_oracle(model, batch, loss, distance, gradient):
    out = leaf_output(model(batch["input_ids"]))
    weights = [0.7, 0.2]
    expected, expected_grads = distillation_oracle(out, batch["response_mask"].tolist(), weights, distance, gradient)
    value = loss(out, batch, weights)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    assert out.main.logits.grad is None or not out.main.logits.grad.any()  # the main head is the detached target
    for pred, grad in zip(out.mtp, expected_grads):
        torch.testing.assert_close(pred.logits.grad, grad, rtol=1e-10, atol=1e-15)
    assert loss(out, batch).item() == pytest.approx(distillation_oracle(
        out, batch["response_mask"].tolist(), [1.0, 1.0], distance, gradient)[0], rel=1e-12)  # default weights: ones


@pytest.mark.parametrize("loss", [mtp_kl_loss, mtp_tv_loss], ids=["kl", "tv"])
def test_kl_and_tv_losses_are_zero_when_each_head_is_the_main_head_at_its_aligned_position(model, batch, loss):
    out = model(batch["input_ids"])
    L = out.main.logits.size(1)
    copies = [HeadPrediction(out.main.logits[:, L - pred.logits.size(1):], pred.targets, pred.target_pos)
              for pred in out.mtp]
    assert loss(GPTOutput(out.main, copies), batch).abs().item() < 1e-15
    assert loss(out, batch).item() > 0


@pytest.mark.parametrize("lam", [0.7, -0.7])
def test_lambda_on_the_advantages_and_on_the_objective_agree_for_lambda_above_0_and_differ_below(model, batch, lam):
    """On the advantages, a negative lambda flips the advantages inside the clip, so the min of the
    clipped surrogate becomes a max: the loss is |lambda| mean max(r A, clip(r) A), which the
    objective placement (lambda times the clipped objective) is not."""
    out = model(batch["input_ids"])
    lp = aligned_logprobs(out)
    placed = {p: mtp_policy_loss(out, batch, lam, placement=p).item() for p in ("advantages", "objective")}
    on_objective, on_advantages = 0.0, 0.0
    for k in range(2):
        mask = (batch["response_mask"] * lp.mtp_valid[k]).tolist()
        args = (lp.mtp[k].tolist(), batch["old_logprobs"].tolist())
        on_objective -= lam * surrogate_oracle(*args, batch["advantages"].tolist(), mask, 0.2, 0.28)
        on_advantages -= surrogate_oracle(*args, (lam * batch["advantages"]).tolist(), mask, 0.2, 0.28)
    assert placed["objective"] == pytest.approx(on_objective, rel=1e-12)
    assert placed["advantages"] == pytest.approx(on_advantages, rel=1e-12)
    if lam > 0:
        assert placed["advantages"] == pytest.approx(placed["objective"], rel=1e-12)
    else:
        # the test batch's ratios lie far outside the clip, so the two sides differ by a lot
        assert abs(placed["advantages"] - placed["objective"]) > 0.1 * abs(placed["objective"])
    with pytest.raises(ValueError, match="placement='logits': choose one of"):
        mtp_policy_loss(out, batch, lam, placement="logits")


def test_head_weights_are_a_scalar_for_every_head_or_one_per_head(model, batch):
    out = model(batch["input_ids"])
    for loss in (mtp_policy_loss, mtp_ce_loss, mtp_kl_loss, mtp_tv_loss):
        assert loss(out, batch, 0.4).item() == loss(out, batch, [0.4, 0.4]).item()
        assert loss(out, batch).item() == loss(out, batch, 1.0).item()
    for loss in (mtp_ce_loss, mtp_kl_loss):
        with pytest.raises(ValueError, match="one weight per head \\(2\\)"):
            loss(out, batch, [1.0, 2.0, 3.0])


def test_the_unclipped_objective_and_the_clip_fraction_token_by_token(model, batch):
    out = model(batch["input_ids"])
    logp = token_logprobs(out.main).tolist()
    total = outside = count = 0.0
    for b in range(B):
        for i in range(T - 1):
            if batch["response_mask"][b, i]:
                ratio = math.exp(logp[b][i] - batch["old_logprobs"][b, i].item())
                total += ratio * batch["advantages"][b].item()
                outside += not (0.8 <= ratio <= 1.28)
                count += 1
    assert rl_objective_unclipped(out, batch).item() == pytest.approx(total / count, rel=1e-12)
    assert clip_fraction(out, batch).item() == pytest.approx(outside / count, rel=1e-12)
    assert 0 < outside < count  # the batch has ratios on both sides of the clip boundary
    on_policy = dict(batch, old_logprobs=token_logprobs(out.main).detach())
    assert clip_fraction(out, on_policy).item() == 0.0


def test_the_configs_lambda_placement_reaches_the_policy_loss_regimes_only(tiny, model, batch):
    from mtpdiag import regimes

    out = model(batch["input_ids"])
    for placement, sign_dependent in (("advantages", True), ("objective", False)):
        cfg = tiny(regime="policy", lam=0.5, lambda_placement=placement)
        regime_losses = regimes.get("policy").losses(cfg)
        assert regime_losses.lambda_placement == placement and regime_losses.aux_sign_dependent is sign_dependent
        expected = mtp_policy_loss(out, batch, -0.5, placement=placement)
        assert regime_losses.aux_loss(out, batch, -0.5).item() == expected.item()
    assert not regimes.get("ce").losses(tiny(regime="ce", lam=0.5)).aux_sign_dependent  # lambda times the CE: linear
    with pytest.raises(ValueError, match="lambda_placement applies only to the policy-loss regimes .*'policy', 'occ'"):
        tiny(regime="ce", lam=0.5, lambda_placement="objective")
    with pytest.raises(ValueError, match="unknown lambda_placement 'logits'"):
        tiny(lambda_placement="logits")
