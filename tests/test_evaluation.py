"""The config-free primitives: exact J_true is the expected reward over every
completion, sampled pass@1 covers it, the sampler draws from the tempered model,
a reward needs the exact target then EOS, and a head's draft acceptance is what
speculative rejection sampling accepts."""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from mtpdiag.config import build_task
from mtpdiag.evaluation import (
    acceptance_of,
    completion_rewards,
    draft_acceptance,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from mtpdiag.losses import token_logprobs
from mtpdiag.model import GPT, GPTConfig, GPTOutput, HeadPrediction


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


# ----------------------------------------------------------------------------- draft acceptance

V, T = 4, 6


def hand_output(gen, n_heads=1, scale=1.5):
    """A GPTOutput of random logits over V tokens for 2 sequences of length T, laid out as GPT.forward lays
    them out (head k predicts the token at position t+1+k from position t)."""
    ids = torch.randint(0, V, (2, T), generator=gen)
    positions = torch.arange(T)
    main = HeadPrediction(scale * torch.randn(2, T - 1, V, generator=gen, dtype=torch.float64), ids[:, 1:],
                          positions[1:])
    heads = [HeadPrediction(scale * torch.randn(2, T - 1 - k, V, generator=gen, dtype=torch.float64), ids[:, 1 + k:],
                            positions[1 + k:]) for k in range(1, n_heads + 1)]
    return GPTOutput(main, heads)


RESPONSE = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)  # [2, T-1], the aligned layout


def aligned_pairs(out, mask, head):
    """(p_main, q_k) of every masked token head k predicts, found from the head's target positions."""
    pred = out.mtp[head]
    return [(torch.softmax(out.main.logits[b, pos - 1], -1), torch.softmax(pred.logits[b, j], -1))
            for b in range(2) for j, pos in enumerate(pred.target_pos.tolist()) if mask[b, pos - 1]]


def speculative_sample(p, q, n, gen):
    """n rounds of speculative rejection sampling of one token: draft x ~ q, accept with
    probability min(1, p(x)/q(x)), else resample from (p - q)+. Returns (accepted, tokens)."""
    draft = torch.multinomial(q, n, replacement=True, generator=gen)
    accepted = torch.rand(n, generator=gen, dtype=torch.float64) < (p[draft] / q[draft]).clamp(max=1.0)
    residual = (p - q).clamp(min=0)
    resampled = torch.multinomial(residual / residual.sum(), n, replacement=True, generator=gen)
    return accepted, torch.where(accepted, draft, resampled)


def test_accept_tv_is_the_acceptance_rate_of_simulated_speculative_rejection_sampling():
    gen = torch.Generator().manual_seed(0)
    out = hand_output(gen)
    pairs = aligned_pairs(out, RESPONSE, 0)
    n = 20000
    accepted = 0
    for i, (p, q) in enumerate(pairs):
        hits, tokens = speculative_sample(p, q, n, gen)
        accepted += int(hits.sum())
        if i == 0:  # the simulation is exact speculative sampling: its tokens follow the main head
            assert chi_square_pvalue(torch.bincount(tokens, minlength=V).double(), p) > 1e-3
    ci = binomtest(accepted, n * len(pairs)).proportion_ci(confidence_level=0.99)
    assert ci.high - ci.low < 0.01  # tight enough to tell 1 - TV from anything else nearby
    assert ci.low <= acceptance_of(out, RESPONSE).tv[0] <= ci.high
    assert len(pairs) == 6  # the masked tokens head 1 predicts: aligned entries 2..4 and 1..3 of the rows


def test_accept_tv_and_greedy_are_one_for_a_head_that_is_the_main_head_at_its_aligned_position():
    out = hand_output(torch.Generator().manual_seed(1), n_heads=2)
    copies = [HeadPrediction(out.main.logits[:, k:], pred.targets, pred.target_pos)
              for k, pred in enumerate(out.mtp, start=1)]
    same = acceptance_of(GPTOutput(out.main, copies), RESPONSE)
    assert same.tv == pytest.approx([1.0, 1.0], abs=1e-15) and same.greedy == [1.0, 1.0]
    assert max(acceptance_of(out, RESPONSE).tv) < 0.9  # random heads are not accepted that often


def test_greedy_agreement_and_entropy_match_the_token_by_token_oracle_and_chunks_add_up():
    out = hand_output(torch.Generator().manual_seed(2), n_heads=2)
    result = acceptance_of(out, RESPONSE)
    for head in range(2):
        pairs = aligned_pairs(out, RESPONSE, head)
        assert result.greedy[head] == pytest.approx(np.mean([int(p.argmax() == q.argmax()) for p, q in pairs]))
        assert result.tv[head] == pytest.approx(np.mean([1 - 0.5 * (p - q).abs().sum().item() for p, q in pairs]),
                                                rel=1e-12)
    probs = torch.softmax(out.main.logits, -1)
    entropies = [-(probs[b, i] * probs[b, i].log()).sum().item() for b in range(2) for i in range(T - 1)
                 if RESPONSE[b, i]]
    assert result.entropy == pytest.approx(np.mean(entropies), rel=1e-12)
    columns = result.columns(n_heads=3, prefix="rollout_")
    assert list(columns) == ["rollout_accept_tv_1", "rollout_accept_greedy_1", "rollout_accept_tv_2",
                             "rollout_accept_greedy_2", "rollout_accept_tv_3", "rollout_accept_greedy_3",
                             "rollout_entropy"]
    assert np.isnan(columns["rollout_accept_tv_3"]) and columns["rollout_accept_tv_2"] == result.tv[1]
    only_prompt = acceptance_of(out, torch.zeros_like(RESPONSE))
    assert np.isnan(only_prompt.tv).all() and np.isnan(only_prompt.entropy)  # no response token: NaN, never 0/0 noise


@pytest.fixture(scope="module", params=["parallel", "sequential"])
def mtp_model(request):
    torch.manual_seed(0)
    cfg = GPTConfig(V + 3, block_size=8, d_model=16, n_layer=1, n_head=2, n_mtp=3, mtp_wiring=request.param)
    return GPT(cfg).double().eval()


def test_draft_acceptance_of_a_model_is_that_of_its_forward_in_any_chunking(mtp_model):
    ids = torch.randint(0, V + 3, (5, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(5, 7, dtype=torch.float64)
    mask[:, :2] = 0
    batch = {"input_ids": ids, "response_mask": mask}
    with torch.no_grad():
        whole = acceptance_of(mtp_model(ids), mask)
    chunked = draft_acceptance(mtp_model, batch, chunk_size=2)
    assert chunked.tv == pytest.approx(whole.tv, rel=1e-12) and chunked.greedy == pytest.approx(whole.greedy)
    assert chunked.entropy == pytest.approx(whole.entropy, rel=1e-12)


def test_inference_time_drafts_condition_depth_k_on_the_models_own_drafts(mtp_model):
    """With ``drafts``, what head k says at position t depends on no token after t+1 (a
    drafter at inference knows only those); teacher forcing reads the true t+k. Depth 1
    reads the true t+1 either way, and parallel heads read no later token at all."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V + 3, (3, 8), generator=gen)
    t = 2
    changed = ids.clone()
    changed[:, t + 2:] = (ids[:, t + 2:] + 1 + torch.randint(0, V + 1, (3, 8 - t - 2), generator=gen)) % (V + 3)
    with torch.no_grad():
        teacher, drafts = mtp_model(ids), mtp_model(ids, mtp_conditioning="drafts")
        teacher_changed = mtp_model(changed)
        drafts_changed = mtp_model(changed, mtp_conditioning="drafts")
    sequential = mtp_model.cfg.mtp_wiring == "sequential"
    assert torch.equal(teacher.mtp[0].logits, drafts.mtp[0].logits)
    for k in range(3):
        torch.testing.assert_close(drafts_changed.mtp[k].logits[:, : t + 1], drafts.mtp[k].logits[:, : t + 1],
                                   rtol=0, atol=1e-13)
        assert torch.equal(teacher.mtp[k].logits, drafts.mtp[k].logits) == (not sequential or k == 0)
    if sequential:  # teacher forcing reads the true token t+2 at depth 2: changing it changes head 2 at t
        assert not torch.allclose(teacher_changed.mtp[1].logits[:, t], teacher.mtp[1].logits[:, t])
        # by hand: module 2 reads module 1's argmax at the same position as its token t+2
        with torch.no_grad():
            h = mtp_model.trunk(ids)
            first, feats = mtp_model.mtp_heads[0](h[:, :7], mtp_model.wte(ids[:, 1:]))
            draft = mtp_model.lm_head(feats).argmax(-1)
            _, feats = mtp_model.mtp_heads[1](first[:, :6], mtp_model.wte(draft[:, :6]))
        torch.testing.assert_close(drafts.mtp[1].logits, mtp_model.lm_head(feats)[:, :5], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"mtp_conditioning='sampled': choose one of \('teacher', 'drafts'\)"):
        mtp_model(ids, mtp_conditioning="sampled")
