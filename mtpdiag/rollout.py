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
    completion_rewards,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from .losses import group_advantages, token_logprobs
from .tasks import Task

EVAL_COLUMNS = {"j_true", "pass1", "pass1_ci_low", "pass1_ci_high"}


def rollout(model: nn.Module, task: Task, cfg: TrainConfig, step: int) -> tuple[dict, torch.Tensor]:
    """Sample G completions for each of this step's prompts and build the RL batch
    (input_ids, response_mask, old_logprobs, advantages, and each row's prompt group). Returns (batch, rewards)."""
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
    with torch.no_grad():  # pi_old, recomputed by the model about to be updated
        old_logprobs = token_logprobs(model(input_ids, with_mtp=False).main)
    batch = {
        "input_ids": input_ids,
        "response_mask": rollout_mask(task.prompt_len, completions, tok.eos_id).to(old_logprobs.dtype),
        "old_logprobs": old_logprobs,
        "advantages": group_advantages(rewards, cfg.group_size),
        "group": torch.arange(cfg.prompts_per_step, device=cfg.device).repeat_interleave(cfg.group_size),
    }
    return batch, rewards


def heldout_batch(task: Task, cfg: TrainConfig) -> dict:
    """The J_true batch of the ``cfg.eval_prompts`` held-out prompts."""
    return j_true_batch(task, task.heldout_problems(cfg.eval_prompts), cfg.device)


def evaluate(model: nn.Module, task: Task, cfg: TrainConfig, heldout: dict, step: int) -> dict:
    """Exact J_true on the held-out batch and sampled pass@1 (temperature 1, so it
    estimates the same quantity) with its 95% interval: the ``EVAL_COLUMNS``."""
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
    }
