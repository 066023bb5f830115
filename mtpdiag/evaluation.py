"""Sampling, rewards and evaluation: exact J_true on a held-out set and sampled pass@1.

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

from .losses import j_true
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
