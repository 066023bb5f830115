"""Sampling, rewards and evaluation: exact J_true on a held-out set, sampled pass@1,
and the speculative-decoding acceptance of the MTP heads' drafts.

A completion is correct only when it is exactly the target followed by EOS, which
is the event whose probability J_true = mean_x pi(y*(x) | x) measures; so the
sampled pass@1 (temperature 1) is an unbiased estimate of the exact J_true.

These primitives take a model, a task and tensors, no config: any loop can use
them. :mod:`mtpdiag.rollout` builds the trainer's rollout batch and evaluation
from them as a run's config and step say.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import binomtest

from .losses import aligned_distributions, j_true, total_variation
from .model import GPTOutput
from .schema import ENTROPY, accept_greedy_column, accept_tv_column
from .tasks import Problem, Task


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` tokens after each prompt (no KV cache).

    Returns the completion ids [B, N], N <= max_new_tokens: the sampled tokens up
    to and including the first EOS, then ``pad_id``. Sampling stops early once
    every row has produced EOS.
    """
    idx = prompt_ids
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx, with_mtp=False).last_logits
        probs = F.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = nxt.masked_fill(done, pad_id)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all():
            break
    return idx[:, prompt_ids.size(1) :]


def completion_rewards(task: Task, problems: list[Problem], completion_ids: torch.Tensor) -> torch.Tensor:
    """Reward 1.0 when a completion is EOS-terminated, contains no padding token
    and the task's verifier accepts its text; else 0.0. Shape [B], float64."""
    tok = task.tokenizer
    rewards = []
    for problem, row in zip(problems, completion_ids.tolist()):
        if tok.eos_id not in row:
            rewards.append(0.0)
            continue
        body = row[: row.index(tok.eos_id)]
        well_formed = tok.pad_id not in body
        rewards.append(task.verify(problem.prompt, tok.decode(body)) if well_formed else 0.0)
    return torch.tensor(rewards, dtype=torch.float64)


def rollout_mask(prompt_len: int, completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """response_mask [B, P+N-1] for prompts of length P followed by ``completion_ids``
    [B, N]: true on every sampled token up to and including the first EOS."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = torch.zeros(completion_ids.size(0), prompt_len + completion_ids.size(1) - 1, device=completion_ids.device)
    mask[:, prompt_len - 1 :] = (~after_eos).float()
    return mask


def j_true_batch(task: Task, problems: list[Problem], device=None) -> dict:
    """The J_true batch: each prompt followed by its unique target completion and
    EOS (``input_ids``, ``response_mask``); use ``task.heldout_problems(n)``."""
    input_ids, response_mask = task.encode_completions(problems, [p.target for p in problems], device)
    return {"input_ids": input_ids, "response_mask": response_mask}


@torch.no_grad()
def exact_j_true(model, batch: dict, chunk_size: int = 1024) -> float:
    """J_true = mean_x pi(y*(x) | x) by teacher forcing, in chunks of prompts."""
    n = batch["input_ids"].size(0)
    total = 0.0
    for start in range(0, n, chunk_size):
        part = {key: value[start : start + chunk_size] for key, value in batch.items()}
        total += j_true(model(part["input_ids"], with_mtp=False), part).item() * part["input_ids"].size(0)
    return total / n


@dataclass
class PassAtOne:
    mean: float
    ci_low: float
    ci_high: float
    n_samples: int


@torch.no_grad()
def sampled_pass_at_1(
    model,
    task: Task,
    problems: list[Problem],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> PassAtOne:
    """Fraction of correct samples over ``samples_per_prompt`` samples of every prompt,
    with a 95% Wilson interval. On a fixed prompt set the count of successes is a
    sum of independent Bernoullis with per-prompt rates, whose variance is at most
    the binomial one, so the interval is conservative for pass@1 on that set."""
    repeated = [p for p in problems for _ in range(samples_per_prompt)]
    prompt_ids = task.encode_prompts(repeated, device)
    tok = task.tokenizer
    completions = sample_completions(model, prompt_ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature, generator)
    successes = int(completion_rewards(task, repeated, completions).sum().item())
    ci = binomtest(successes, len(repeated)).proportion_ci(confidence_level=0.95, method="wilson")
    return PassAtOne(successes / len(repeated), float(ci.low), float(ci.high), len(repeated))


# ----------------------------------------------------------------------------- speculative-decoding acceptance

TEACHER = "teacher"  # the model's default conditioning: every head reads the sequence's own tokens


@dataclass
class Acceptance:
    """How useful each MTP head is as a draft model of the main head, teacher forced on
    a batch (docs/theory.md s.9): for head k = 1..K, ``tv[k-1]`` is the mean over the
    response tokens it predicts of 1 - TV(p_main at t+k, q_k at t), the probability that
    speculative rejection sampling accepts its draft of that token, and ``greedy[k-1]``
    the fraction of those tokens where argmax q_k = argmax p_main (greedy verification).
    ``entropy`` is the main head's mean entropy (nats) over the response tokens. NaN
    where a head predicts no response token."""

    tv: list[float]
    greedy: list[float]
    entropy: float

    def columns(self, n_heads: int | None = None, prefix: str = "") -> dict[str, float]:
        """The :func:`acceptance_columns` and their values (NaN for a head the batch was too short for)."""
        n = len(self.tv) if n_heads is None else n_heads
        values = []
        for k in range(n):
            values += [self.tv[k], self.greedy[k]] if k < len(self.tv) else [float("nan")] * 2
        return dict(zip(acceptance_columns(n, prefix), [*values, self.entropy], strict=True))


def acceptance_columns(n_heads: int, prefix: str = "") -> list[str]:
    """``accept_tv_k``, ``accept_greedy_k`` for k = 1..n_heads, then ``entropy``, each under ``prefix``."""
    heads = [column(k) for k in range(1, n_heads + 1) for column in (accept_tv_column, accept_greedy_column)]
    return [prefix + name for name in (*heads, ENTROPY)]


def _acceptance_sums(out: GPTOutput, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, 3]: per head, the masked sums of 1 - TV and of greedy agreement, and the
    token count; [2]: the masked sum of the main head's entropy and its token count),
    in float64, so that chunks add up."""
    rows = []
    for pair in aligned_distributions(out):
        mask = response_mask[:, pair.shift:].double()
        accept = 1 - total_variation(pair.main, pair.head).double()
        agree = (pair.main.argmax(-1) == pair.head.argmax(-1)).double()
        rows.append(torch.stack([(accept * mask).sum(), (agree * mask).sum(), mask.sum()]))
    heads = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    log_p = F.log_softmax(out.main.logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).double()
    mask = response_mask.double()
    return heads, torch.stack([(entropy * mask).sum(), mask.sum()])


def _ratio(total: torch.Tensor, count: torch.Tensor) -> float:
    return (total / count).item() if count > 0 else float("nan")


def _from_sums(heads: torch.Tensor, entropy: torch.Tensor) -> Acceptance:
    return Acceptance([_ratio(h[0], h[2]) for h in heads], [_ratio(h[1], h[2]) for h in heads],
                      _ratio(entropy[0], entropy[1]))


def acceptance_of(out: GPTOutput, response_mask: torch.Tensor) -> Acceptance:
    """The :class:`Acceptance` of a forward's output ``out`` on a batch with ``response_mask``."""
    return _from_sums(*_acceptance_sums(out, response_mask))


@torch.no_grad()
def draft_acceptance(model, batch: dict, conditioning: str = TEACHER, chunk_size: int = 1024) -> Acceptance:
    """The :class:`Acceptance` of ``model``'s MTP heads on ``batch`` (``input_ids``,
    ``response_mask``), in chunks of rows. ``conditioning`` is GPT.forward's
    ``mtp_conditioning``: ``teacher`` (default; sequential module k reads the true
    token t+k, as training does) or ``drafts`` (module k >= 2 reads its predecessor's
    greedy draft, as a drafter at inference does; the same numbers for parallel heads)."""
    options = {} if conditioning == TEACHER else {"mtp_conditioning": conditioning}
    heads, entropy = None, None
    for start in range(0, batch["input_ids"].size(0), chunk_size):
        rows = slice(start, start + chunk_size)
        part = _acceptance_sums(model(batch["input_ids"][rows], **options), batch["response_mask"][rows])
        heads, entropy = part if heads is None else (heads + part[0], entropy + part[1])
    return _from_sums(heads, entropy)
