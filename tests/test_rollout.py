"""The trainer's batches: a rollout batch is consistent and a function of (seed,
step); the evaluation is exact J_true on the held-out batch, pass@1 with its interval
and the heads' draft acceptance teacher forced on the held-out targets."""
import torch

from mtpdiag.evaluation import draft_acceptance, exact_j_true, j_true_batch
from mtpdiag.losses import token_logprobs
from mtpdiag.rollout import eval_columns, evaluate, heldout_batch, rollout, rollout_with_acceptance


def test_rollout_batch_is_consistent_and_a_function_of_seed_and_step(sft_model):
    model, task, cfg = sft_model
    batch, rewards = rollout(model, task, cfg, step=3)
    again, _ = rollout(model, task, cfg, step=3)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    other, _ = rollout(model, task, cfg, step=4)
    assert not torch.equal(batch["input_ids"], other["input_ids"])

    B = cfg.prompts_per_step * cfg.group_size
    ids, mask = batch["input_ids"], batch["response_mask"]
    assert ids.shape[0] == B and mask.shape == (B, ids.shape[1] - 1)
    tok = task.tokenizer
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        completion = row[task.prompt_len :]
        end = completion.index(tok.eos_id) + 1 if tok.eos_id in completion else len(completion)
        assert row_mask == [0.0] * (task.prompt_len - 1) + [1.0] * end + [0.0] * (len(completion) - end)
    with torch.no_grad():
        torch.testing.assert_close(batch["old_logprobs"], token_logprobs(model(ids, with_mtp=False).main))
    groups = rewards.view(cfg.prompts_per_step, cfg.group_size)
    advantages = batch["advantages"].view_as(groups)
    uniform = (groups == groups[:, :1]).all(1)
    assert uniform.any() and (~uniform).any()  # this seed exercises both kinds of group
    assert torch.equal(advantages[uniform], torch.zeros_like(advantages[uniform]))
    assert torch.allclose(advantages[~uniform].mean(1), torch.zeros(int((~uniform).sum()), dtype=torch.float64))


def test_evaluation_is_exact_j_true_on_the_heldout_batch_and_pass_at_1_seeded_by_the_step(sft_model):
    model, task, cfg = sft_model
    heldout = heldout_batch(task, cfg)
    assert torch.equal(heldout["input_ids"], j_true_batch(task, task.heldout_problems(cfg.eval_prompts))["input_ids"])
    result = evaluate(model, task, cfg, heldout, step=3)
    assert set(result) == eval_columns(cfg.model.n_mtp) == {"j_true", "pass1", "pass1_ci_low", "pass1_ci_high",
                                                            "accept_tv_1", "accept_greedy_1", "entropy"}
    assert result["j_true"] == exact_j_true(model, heldout)
    accepted = draft_acceptance(model, heldout)
    assert (result["accept_tv_1"], result["accept_greedy_1"], result["entropy"]) == (
        accepted.tv[0], accepted.greedy[0], accepted.entropy)
    assert 0 < result["accept_tv_1"] < 1 and result["entropy"] > 0
    assert result["pass1_ci_low"] <= result["pass1"] <= result["pass1_ci_high"]
    assert evaluate(model, task, cfg, heldout, step=3) == result
    others = [evaluate(model, task, cfg, heldout, step=s)["pass1"] for s in range(4, 10)]
    assert any(p != result["pass1"] for p in others)  # each step draws its own samples


def test_rollout_with_acceptance_is_the_rollout_and_the_draft_acceptance_on_its_batch(sft_model):
    model, task, cfg = sft_model
    batch, rewards = rollout(model, task, cfg, step=3)
    same, same_rewards, accepted = rollout_with_acceptance(model, task, cfg, step=3)
    assert torch.equal(rewards, same_rewards) and all(torch.equal(batch[key], same[key]) for key in batch)
    expected = draft_acceptance(model, batch)
    assert accepted == {"rollout_accept_tv_1": expected.tv[0], "rollout_accept_greedy_1": expected.greedy[0],
                        "rollout_entropy": expected.entropy}
