"""The config-free primitives: exact J_true is the expected reward over every
completion, sampled pass@1 covers it, the sampler draws from the tempered model,
and a reward needs the exact target then EOS."""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from mtpdiag.config import build_task
from mtpdiag.evaluation import (
    completion_rewards,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from mtpdiag.losses import token_logprobs


def all_completions(task, length):
    """Every completion the sampler can return: tokens up to a first EOS, padding
    after it, or ``length`` tokens without EOS."""
    tok = task.tokenizer
    others = [i for i in range(tok.vocab_size) if i != tok.eos_id]
    rows = [list(body) + [tok.eos_id] + [tok.pad_id] * (length - n - 1)
            for n in range(length) for body in itertools.product(others, repeat=n)]  # fmt: skip
    rows += [list(body) for body in itertools.product(others, repeat=length)]
    return torch.tensor(rows)


def test_j_true_equals_the_expected_reward_over_all_completions(sft_model):
    model, task, cfg = sft_model
    problems = task.heldout_problems(3)
    completions = all_completions(task, task.max_completion_len)
    expected_rewards = []
    for problem in problems:
        prompt = task.encode_prompts([problem]).expand(len(completions), -1)
        ids = torch.cat([prompt, completions], dim=1)
        with torch.no_grad():
            logp = token_logprobs(model(ids, with_mtp=False).main)
        mask = rollout_mask(task.prompt_len, completions, task.tokenizer.eos_id)
        probs = (logp * mask).sum(1).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)  # the enumeration is complete
        rewards = completion_rewards(task, [problem] * len(completions), completions)
        assert rewards.sum() == 1.0  # exactly one completion is rewarded
        expected_rewards.append((probs * rewards).sum().item())
    exact = exact_j_true(model, j_true_batch(task, problems))
    assert 0.01 < exact < 0.99  # a model with something to learn, not a degenerate one
    assert exact == pytest.approx(np.mean(expected_rewards), rel=1e-12)


def test_sampled_pass_at_1_interval_covers_the_exact_j_true(sft_model):
    model, task, cfg = sft_model
    problems = task.heldout_problems(20)
    exact = exact_j_true(model, j_true_batch(task, problems))
    result = sampled_pass_at_1(model, task, problems, 200, 3, generator=torch.Generator().manual_seed(0))
    assert result.n_samples == 4000
    assert result.ci_low <= exact <= result.ci_high
    assert result.ci_high - result.ci_low < 0.04


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit, with cells expected below 1% pooled so every cell expects >= 30."""
    common = probs > 0.01
    observed = torch.cat([counts[common], counts[~common].sum(0, keepdim=True)])
    expected = torch.cat([probs[common], probs[~common].sum(0, keepdim=True)]) * counts.sum()
    keep = expected > 0
    return chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue


@pytest.mark.parametrize("temperature, other", [(1.0, 2.5), (2.5, 1.0)])
def test_sampler_draws_the_first_token_from_the_tempered_model(sft_model, temperature, other):
    model, task, cfg = sft_model
    prompt = task.encode_prompts(task.heldout_problems(1)).expand(3000, -1)
    tok = task.tokenizer
    first = sample_completions(model, prompt, 1, tok.eos_id, tok.pad_id, temperature, torch.Generator().manual_seed(1))
    counts = torch.bincount(first[:, 0], minlength=tok.vocab_size).double()
    with torch.no_grad():
        logits = model(prompt[:1]).last_logits[0]
    assert chi_square_pvalue(counts, torch.softmax(logits / temperature, -1)) > 1e-3
    assert chi_square_pvalue(counts, torch.softmax(logits / other, -1)) < 1e-6  # the test can tell temperatures apart


def test_completion_rewards_need_the_exact_target_then_eos(tiny):
    task = build_task(tiny())
    problem = task.heldout_problems(1)[0]
    tok = task.tokenizer
    target = tok.encode(problem.target)
    wrong = tok.encode(task.solve("9+9=" if problem.prompt != "9+9=" else "1+1="))
    rows = [
        target + [tok.eos_id],  # correct
        target + [tok.pad_id],  # no EOS: truncated
        [target[0], tok.pad_id, tok.eos_id],  # a padding token sampled mid-answer
        wrong + [tok.eos_id],
    ]
    rewards = completion_rewards(task, [problem] * 4, torch.tensor(rows))
    assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
