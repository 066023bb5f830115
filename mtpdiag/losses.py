"""RL objectives and MTP losses on a :class:`~mtpdiag.model.GPTOutput`.

Conventions: every per-token tensor is ``[B, T-1]`` and aligned with the main
head's predictions, i.e. entry i concerns the token at sequence position i+1.
``response_mask`` marks completion tokens (and their EOS) in that layout.
MTP log-probs are shifted onto the same layout: head k's prediction of the
token at position p came from position p-1-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import global_count, global_mean
from .model import GPTOutput, HeadPrediction

# where the MTP policy loss puts its coefficient lambda (docs/theory.md s.4)
ADVANTAGES = "advantages"
LAMBDA_PLACEMENTS = (ADVANTAGES, "objective")


class NonFiniteLossError(FloatingPointError):
    """A training loss (SFT or RL) or gradient norm is not finite: training stops before the update."""


def token_logprobs(pred: HeadPrediction) -> torch.Tensor:
    """log p(target) for every entry of a head, shape [B, L]."""
    return torch.gather(F.log_softmax(pred.logits, dim=-1), -1, pred.targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class AlignedLogprobs:
    main: torch.Tensor  # [B, T-1]
    mtp: torch.Tensor  # [K, B, T-1], zero where a head has no prediction
    mtp_valid: torch.Tensor  # [K, T-1] bool


def aligned_logprobs(out: GPTOutput) -> AlignedLogprobs:
    main = token_logprobs(out.main)
    L = main.size(1)
    rows, valid = [], []
    for pred in out.mtp:
        lp = token_logprobs(pred)
        shift = L - lp.size(1)
        rows.append(F.pad(lp, (shift, 0)))
        v = torch.zeros(L, dtype=torch.bool, device=main.device)
        v[shift:] = True
        valid.append(v)
    if not rows:
        return AlignedLogprobs(main, main.new_zeros(0, *main.shape), torch.zeros(0, L, dtype=torch.bool))
    return AlignedLogprobs(main, torch.stack(rows), torch.stack(valid))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the mask; inside ``mtpdiag.distributed.global_means()`` on
    several ranks, this rank's share of the mean over every rank's masked entries."""
    return (x * mask).sum() / global_count(mask.sum()).clamp_min(1.0)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean, over the group std.
    A group whose rewards are all equal gets exactly zero advantage."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    # compare the rewards themselves: a rounded mean can leave a tiny nonzero std
    uniform = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(uniform, torch.zeros_like(centred), centred / (std + eps)).view(-1)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> torch.Tensor:
    """DAPO token-level clipped surrogate (to maximise): mean over masked tokens of
    min(r A, clip(r, 1-eps_low, 1+eps_high) A), r = exp(logp - old_logp)."""
    # zero the log-ratio off the mask so that an overflowing exp there cannot turn
    # into NaN in the loss (inf * 0) or in its gradient
    ratio = torch.exp(log_ratio(logp, old_logp, mask))
    adv = advantages.unsqueeze(-1)
    per_token = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return masked_mean(per_token, mask)


def rl_objective(out: GPTOutput, batch: dict, eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    """J_batch: the main head's clipped surrogate on a rollout batch."""
    return clipped_surrogate(
        token_logprobs(out.main), batch["old_logprobs"], batch["advantages"], batch["response_mask"], eps_low, eps_high
    )


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old) per token, 0 off the mask (so that an overflowing exp there stays finite)."""
    return (logp - old_logp).masked_fill(mask == 0, 0.0)


def rl_objective_unclipped(out: GPTOutput, batch: dict) -> torch.Tensor:
    """J_batch without the clip: the token-level mean of r A (docs/theory.md s.1)."""
    mask = batch["response_mask"]
    ratio = torch.exp(log_ratio(token_logprobs(out.main), batch["old_logprobs"], mask))
    return masked_mean(ratio * batch["advantages"].unsqueeze(-1), mask)


def clip_fraction(out: GPTOutput, batch: dict, eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    """The share of response tokens whose main-head ratio pi / pi_old lies outside
    [1 - eps_low, 1 + eps_high] (there the clipped surrogate has a kink, docs/theory.md s.4)."""
    mask = batch["response_mask"]
    ratio = torch.exp(log_ratio(token_logprobs(out.main), batch["old_logprobs"], mask))
    outside = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    return masked_mean(outside.to(mask.dtype), mask)


def head_weight_vector(head_weights, num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """The per-head MTP weights as a [K] tensor like ``like``: None is 1 on every head, a
    scalar that weight on every head, else one weight per head."""
    if head_weights is None:
        return like.new_ones(num_heads)
    weights = torch.as_tensor(head_weights, dtype=like.dtype, device=like.device)
    if weights.dim() == 0:
        return weights.expand(num_heads)
    if weights.shape != (num_heads,):
        raise ValueError(f"head_weights of shape {tuple(weights.shape)}: pass a scalar or one weight per head ({num_heads})")
    return weights


def mtp_policy_loss(
    out: GPTOutput, batch: dict, head_weights=None, eps_low: float = 0.2, eps_high: float = 0.28,
    placement: str = ADVANTAGES,
) -> torch.Tensor:
    """Policy loss on the MTP heads: the main head's clipped loss with ratio
    exp(log q_k - log pi_old(main)), summed over heads with ``head_weights`` (per-head
    lambda: a scalar or one per head; ones by default).

    ``placement`` (docs/theory.md s.4): ``"advantages"`` (the reference code) multiplies
    the advantages by head k's weight inside the clip, so a negative weight clips on the
    other side; ``"objective"`` multiplies head k's clipped objective by it. The two
    agree for weights >= 0."""
    if placement not in LAMBDA_PLACEMENTS:
        raise ValueError(f"placement={placement!r}: choose one of {LAMBDA_PLACEMENTS}")
    lp = aligned_logprobs(out)
    K = lp.mtp.size(0)
    weights = head_weight_vector(head_weights, K, lp.main)
    total = lp.main.new_zeros(())
    for k in range(K):
        mask = batch["response_mask"] * lp.mtp_valid[k]
        if placement == ADVANTAGES:
            advantages = weights[k] * batch["advantages"]
            total = total - clipped_surrogate(lp.mtp[k], batch["old_logprobs"], advantages, mask, eps_low, eps_high)
        else:
            obj = clipped_surrogate(lp.mtp[k], batch["old_logprobs"], batch["advantages"], mask, eps_low, eps_high)
            total = total - weights[k] * obj
    return total


def mtp_ce_loss(out: GPTOutput, batch: dict, head_weights=None) -> torch.Tensor:
    """Mean token cross-entropy of the MTP heads on the response tokens, summed
    over heads with ``head_weights`` (a scalar or one per head; ones by default)."""
    lp = aligned_logprobs(out)
    K = lp.mtp.size(0)
    weights = head_weight_vector(head_weights, K, lp.main)
    total = lp.main.new_zeros(())
    for k in range(K):
        total = total - weights[k] * masked_mean(lp.mtp[k], batch["response_mask"] * lp.mtp_valid[k])
    return total


def sft_loss(out: GPTOutput, batch: dict, mtp_weight: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy on the completion plus ``mtp_weight`` times the
    MTP heads' cross-entropy on the same completion tokens."""
    main = -masked_mean(token_logprobs(out.main), batch["response_mask"])
    return main + mtp_weight * mtp_ce_loss(out, batch)


def completion_logprob(out: GPTOutput, batch: dict) -> torch.Tensor:
    """log pi(completion | prompt) per sequence, [B]."""
    return (token_logprobs(out.main) * batch["response_mask"]).sum(-1)


def j_true(out: GPTOutput, batch: dict) -> torch.Tensor:
    """Exact expected exact-match reward: mean_x pi(y*(x) | x), teacher forced on
    a batch whose completions are the unique targets (under
    ``mtpdiag.distributed.global_means()``, this rank's share of the mean over all prompts)."""
    return global_mean(completion_logprob(out, batch).exp())


# ----------------------------------------------------------------------------- distributions of a head and the main head


@dataclass
class AlignedDistributions:
    """Head k's and the main head's log-distributions over the vocabulary, [B, n, V]
    each, at the n entries where head k predicts: ``head[:, j]`` is head k at position
    j, ``main[:, j]`` the main head at position j + k, both predicting the token at
    position j + 1 + k. ``shift`` (= k) maps them onto the aligned [B, T-1] layout:
    entry j here is entry j + shift there (``response_mask[:, shift:]`` masks them)."""

    main: torch.Tensor
    head: torch.Tensor
    shift: int


def aligned_distributions(out: GPTOutput) -> list[AlignedDistributions]:
    """One :class:`AlignedDistributions` per MTP head of ``out``, with gradients (detach
    the main head's where it is a target)."""
    L = out.main.logits.size(1)
    pairs = []
    for pred in out.mtp:
        shift = L - pred.logits.size(1)
        pairs.append(AlignedDistributions(F.log_softmax(out.main.logits[:, shift:], dim=-1),
                                          F.log_softmax(pred.logits, dim=-1), shift))
    return pairs


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = (1/2) sum_v |p(v) - q(v)| over the last dimension."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def mtp_distillation_loss(out: GPTOutput, batch: dict, distance, head_weights=None) -> torch.Tensor:
    """sum_k w_k mean over response tokens of distance(p_main.detach(), q_k) at the
    aligned positions (head k at t against the main head at t+k, the same token):
    the MTP heads distilled from the detached main head, whose own distribution
    gets no gradient from it (docs/theory.md s.9)."""
    pairs = aligned_distributions(out)
    weights = head_weight_vector(head_weights, len(pairs), out.main.logits)
    total = out.main.logits.new_zeros(())
    for k, pair in enumerate(pairs):
        per_token = distance(pair.main.detach(), pair.head)
        total = total + weights[k] * masked_mean(per_token, batch["response_mask"][:, pair.shift:])
    return total


def mtp_kl_loss(out: GPTOutput, batch: dict, head_weights=None) -> torch.Tensor:
    """Forward KL(p_main.detach() || q_k) per response token (SkyRL's soft
    distillation: its gradient in q_k is the soft cross-entropy's), summed over heads
    with ``head_weights`` (a scalar or one per head; ones by default)."""
    return mtp_distillation_loss(out, batch, kl_divergence, head_weights)


def mtp_tv_loss(out: GPTOutput, batch: dict, head_weights=None) -> torch.Tensor:
    """TV(p_main.detach(), q_k) per response token, summed over heads with
    ``head_weights`` (ones by default): one minus the expected speculative acceptance
    of head k's draft, as a loss (arXiv 2606.12370)."""
    return mtp_distillation_loss(out, batch, total_variation, head_weights)
