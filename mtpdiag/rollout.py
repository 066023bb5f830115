"""The trainer's batches: the RL step's rollouts and the held-out evaluation.

:mod:`mtpdiag.evaluation` holds the primitives, free of any config (sampling,
rewards, the response mask, exact J_true, sampled pass@1); this module applies
them as a run's config says, with the step's seeds (:func:`~mtpdiag.config.step_seed`),
so a rollout batch and an evaluation are functions of (seed, step) alone.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from .config import DTYPES, TrainConfig, max_new_tokens, step_seed
from .evaluation import (
    acceptance_columns,
    acceptance_of,
    completion_rewards,
    draft_acceptance,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from .losses import group_advantages, token_logprobs
from .schema import ROLLOUT_PREFIX
from .tasks import Task

PERFORMANCE_COLUMNS = ("j_true", "pass1", "pass1_ci_low", "pass1_ci_high")


def eval_columns(n_mtp: int) -> set[str]:
    """The columns :func:`evaluate` writes for a model with ``n_mtp`` MTP heads."""
    return {*PERFORMANCE_COLUMNS, *acceptance_columns(n_mtp)}


def rollout(model: nn.Module, task: Task, cfg: TrainConfig, step: int) -> tuple[dict, torch.Tensor]:
    """Sample G completions for each of this step's prompts and build the RL batch
    (input_ids, response_mask, old_logprobs, advantages, and each row's prompt group). Returns (batch, rewards)."""
    batch, rewards, _ = _rollout(model, task, cfg, step, with_acceptance=False)
    return batch, rewards


def rollout_with_acceptance(
    model: nn.Module, task: Task, cfg: TrainConfig, step: int
) -> tuple[dict, torch.Tensor, dict]:
    """:func:`rollout`'s (batch, rewards), bit for bit, and the acceptance of the MTP heads'
    drafts teacher forced on that batch (``rollout_accept_tv_k``, ``rollout_accept_greedy_k``,
    ``rollout_entropy``) at the parameters that sampled it. It comes from the pi_old forward
    the batch needs anyway, run with the MTP heads, so the trunk runs once. On the model's
    own samples the contexts are those the drafts meet in decoding (docs/theory.md s.9)."""
    return _rollout(model, task, cfg, step, with_acceptance=True)


def _rollout(model, task, cfg, step, with_acceptance: bool) -> tuple[dict, torch.Tensor, dict]:
    prompt_rng = random.Random(step_seed(cfg.seed, step, "prompts"))
    problems = [p for p in task.sample_problems(prompt_rng, cfg.prompts_per_step) for _ in range(cfg.group_size)]
    prompt_ids = task.encode_prompts(problems, cfg.device)
    generator = torch.Generator(cfg.device).manual_seed(step_seed(cfg.seed, step, "rollout"))
    tok = task.tokenizer
    model.eval()
    completions = sample_completions(
        model, prompt_ids, max_new_tokens(cfg, task), tok.eos_id, tok.pad_id, cfg.temperature, generator
    )
    rewards = completion_rewards(task, problems, completions).to(cfg.device, DTYPES[cfg.dtype])
    input_ids = torch.cat([prompt_ids, completions], dim=1)
    with torch.no_grad():  # pi_old, recomputed by the model about to be updated (the heads leave the main head as is)
        out = model(input_ids, with_mtp=with_acceptance)
    old_logprobs = token_logprobs(out.main)
    batch = {
        "input_ids": input_ids,
        "response_mask": rollout_mask(task.prompt_len, completions, tok.eos_id).to(old_logprobs.dtype),
        "old_logprobs": old_logprobs,
        "advantages": group_advantages(rewards, cfg.group_size),
        "group": torch.arange(cfg.prompts_per_step, device=cfg.device).repeat_interleave(cfg.group_size),
    }
    if not with_acceptance:
        return batch, rewards, {}
    return batch, rewards, acceptance_of(out, batch["response_mask"]).columns(cfg.model.n_mtp, ROLLOUT_PREFIX)


def heldout_batch(task: Task, cfg: TrainConfig) -> dict:
    """The J_true batch of the ``cfg.eval_prompts`` held-out prompts."""
    return j_true_batch(task, task.heldout_problems(cfg.eval_prompts), cfg.device)


def evaluate(model: nn.Module, task: Task, cfg: TrainConfig, heldout: dict, step: int) -> dict:
    """Exact J_true on the held-out batch, sampled pass@1 (temperature 1, so it
    estimates the same quantity) with its 95% interval, and the MTP heads' draft
    acceptance and the main head's entropy teacher forced on the held-out target
    completions: the columns of :func:`eval_columns`."""
    model.eval()
    generator = torch.Generator(cfg.device).manual_seed(step_seed(cfg.seed, step, "eval"))
    problems = task.heldout_problems(cfg.eval_prompts)
    pass1 = sampled_pass_at_1(
        model, task, problems, cfg.eval_samples, max_new_tokens(cfg, task), 1.0, generator, cfg.device
    )
    return {
        "j_true": exact_j_true(model, heldout),
        "pass1": pass1.mean,
        "pass1_ci_low": pass1.ci_low,
        "pass1_ci_high": pass1.ci_high,
        **draft_acceptance(model, heldout).columns(cfg.model.n_mtp),
    }
