"""The GPT with MTP heads: what each head predicts, detach variants, and the
autodiff the diagnostics rely on (forward-over-reverse HVPs)."""
import pytest
import torch
from torch.func import functional_call, grad, jvp

from mtpdiag.losses import mtp_ce_loss, mtp_policy_loss, rl_objective, token_logprobs
from mtpdiag.model import GPT, GPTConfig

VOCAB, T = 11, 9


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, block_size=16, d_model=16, n_layer=2, n_head=2) | overrides
    return GPT(GPTConfig(**options)).double()


def random_ids(batch=3, length=T, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rl_batch(model, seed=2):
    """A rollout-like batch: completion in the second half, pi_old near pi."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(4, T, seed)
    mask = torch.zeros(4, T - 1, dtype=torch.float64)
    mask[:, 3:] = 1.0
    with torch.no_grad():
        old = token_logprobs(model(ids, with_mtp=False).main)
    return {
        "input_ids": ids,
        "response_mask": mask,
        "old_logprobs": old + 0.05 * torch.randn(old.shape, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(4, generator=gen, dtype=torch.float64),
    }


def last_input_read(target_pos: torch.Tensor, k: int, wiring: str) -> torch.Tensor:
    """Latest input position a prediction of ``target_pos`` by head k may read: the
    position t it is made from (t = target - 1 - k), except that a sequential module
    also reads the embedding of token t + k = target - 1."""
    return target_pos - 1 if (k == 0 or wiring == "sequential") else target_pos - 1 - k


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
@pytest.mark.parametrize("n_mtp", [1, 3])
def test_each_head_scores_the_token_it_claims_and_never_sees_it(wiring, n_mtp):
    model = tiny_model(n_mtp=n_mtp, mtp_wiring=wiring)
    ids = random_ids()
    out = model(ids)
    heads = [out.main, *out.mtp]
    assert len(out.mtp) == n_mtp
    for k, pred in enumerate(heads):
        assert torch.equal(pred.target_pos, torch.arange(1 + k, T))
        assert torch.equal(pred.targets, ids[:, pred.target_pos])
        assert pred.logits.shape == (3, T - 1 - k, VOCAB)
    # change the token at each position p: a head's logits row may only move if it
    # reads p, i.e. p <= its latest readable input, which is before its target
    for p in range(T):
        changed = ids.clone()
        changed[:, p] = (changed[:, p] + 1) % VOCAB
        out_changed = model(changed)
        for k, (pred, pred_changed) in enumerate(zip(heads, [out_changed.main, *out_changed.mtp])):
            reads_p = last_input_read(pred.target_pos, k, wiring) >= p
            assert (last_input_read(pred.target_pos, k, wiring) < pred.target_pos).all()
            moved = (pred.logits - pred_changed.logits).abs().amax(dim=(0, 2)) > 0
            assert torch.equal(moved[~reads_p], torch.zeros_like(moved[~reads_p])), (k, p)
            # the latest readable input always matters
            assert moved[last_input_read(pred.target_pos, k, wiring) == p].all(), (k, p)


def test_last_logits_are_the_next_token_logits_teacher_forcing_would_score():
    model = tiny_model()
    ids = random_ids()
    torch.testing.assert_close(model(ids[:, :-1]).last_logits, model(ids).main.logits[:, -1], rtol=0, atol=1e-12)


def rl_params_and_mtp_grads(model, batch, mtp_detach, mtp_loss):
    params = dict(model.named_parameters())
    out = model(batch["input_ids"], mtp_detach=mtp_detach)
    rl_grads = torch.autograd.grad(rl_objective(out, batch), list(params.values()), allow_unused=True, retain_graph=True)
    used_by_rl = {name for (name, _), g in zip(params.items(), rl_grads) if g is not None and g.abs().sum() > 0}
    mtp_grads = torch.autograd.grad(mtp_loss(out, batch), list(params.values()), allow_unused=True)
    leaking = {name for (name, _), g in zip(params.items(), mtp_grads) if g is not None and g.abs().sum() > 0}
    return used_by_rl, leaking


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mtp_loss", [mtp_ce_loss, mtp_policy_loss], ids=["ce", "policy"])
def test_detach_cuts_mtp_gradient_from_everything_the_rl_objective_uses(wiring, tie, mtp_loss):
    model = tiny_model(n_mtp=2, mtp_wiring=wiring, tie_embeddings=tie)
    batch = rl_batch(model)
    used_by_rl, leaking = rl_params_and_mtp_grads(model, batch, "detach", mtp_loss)
    assert used_by_rl and leaking  # both losses train something
    assert not (used_by_rl & leaking)
    assert all(name.startswith("mtp_heads.") for name in leaking)


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
@pytest.mark.parametrize("tie", [True, False])
def test_detach_trunk_only_leaks_through_the_shared_output_head_and_embedding(wiring, tie):
    model = tiny_model(n_mtp=2, mtp_wiring=wiring, tie_embeddings=tie)
    batch = rl_batch(model)
    used_by_rl, leaking = rl_params_and_mtp_grads(model, batch, "detach_trunk_only", mtp_policy_loss)
    shared_leaks = used_by_rl & leaking
    # parameter names of a tied weight: named_parameters lists it once, as wte.weight
    output_head = "wte.weight" if tie else "lm_head.weight"
    expected = {output_head} if (tie or wiring == "parallel") else {"lm_head.weight", "wte.weight"}
    assert shared_leaks == expected
    # without any detach the MTP loss reaches the trunk blocks as well
    _, leaking_joint = rl_params_and_mtp_grads(model, batch, "none", mtp_policy_loss)
    assert any(name.startswith("blocks.") for name in leaking_joint & used_by_rl)


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
def test_forward_over_reverse_hvp_matches_reverse_over_reverse_and_finite_differences(wiring):
    model = tiny_model(n_mtp=2, mtp_wiring=wiring, n_layer=1)
    batch = rl_batch(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    direction = {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}
    norm = torch.sqrt(sum((v**2).sum() for v in direction.values()))
    direction = {name: v / norm for name, v in direction.items()}

    def loss(p):
        out = functional_call(model, p, (batch["input_ids"],))
        return -rl_objective(out, batch) + 0.5 * mtp_policy_loss(out, batch)

    _, hvp_forward = jvp(grad(loss), (params,), (direction,))

    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    first = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    dot = sum((g * direction[name]).sum() for g, name in zip(first, leaves))
    hvp_reverse = dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))

    for name in params:
        torch.testing.assert_close(hvp_forward[name], hvp_reverse[name], rtol=1e-9, atol=1e-12)

    def flat(tensors):
        return torch.cat([t.flatten() for t in tensors.values()])

    def central_difference(eps):
        plus = grad(loss)({n: p + eps * direction[n] for n, p in params.items()})
        minus = grad(loss)({n: p - eps * direction[n] for n, p in params.items()})
        return (flat(plus) - flat(minus)) / (2 * eps)

    # a correct HVP leaves only the O(eps^2) truncation error of central differences:
    # halving eps divides it by about 4, where a wrong HVP would leave a constant gap
    hvp = flat(hvp_forward)
    coarse, fine = (torch.linalg.norm(central_difference(eps) - hvp) / torch.linalg.norm(hvp) for eps in (1e-2, 5e-3))
    assert fine < 1e-3
    assert coarse / fine > 3.0


def test_sdpa_attention_matches_the_written_out_attention():
    math_model = tiny_model(attention="math", n_mtp=2)
    sdpa_model = tiny_model(attention="sdpa", n_mtp=2)
    sdpa_model.load_state_dict(math_model.state_dict())
    ids = random_ids()
    a, b = math_model(ids), sdpa_model(ids)
    torch.testing.assert_close(a.main.logits, b.main.logits, rtol=1e-10, atol=1e-12)
    for head_a, head_b in zip(a.mtp, b.mtp):
        torch.testing.assert_close(head_a.logits, head_b.logits, rtol=1e-10, atol=1e-12)


def test_sequence_longer_than_block_size_names_the_fix():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match="raise block_size"):
        model(random_ids(length=9))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mtp_wiring": "diagonal"}, "mtp_wiring"),
        ({"attention": "flash"}, "attention"),
        ({"d_model": 10, "n_head": 4}, "divisible"),
        ({"n_mtp": 0}, "at least one MTP head"),
    ],
)
def test_bad_model_config_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(vocab_size=VOCAB, **options)


def test_unknown_detach_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        tiny_model()(random_ids(), mtp_detach="half")


def test_only_the_residual_projections_get_the_depth_scaled_init_not_the_sequential_mtp_proj():
    """GPT-2's init scales the two layers of each block that write into the residual
    stream by 1/sqrt(2 n_layer); SequentialMTPModule.proj (2d -> d, it builds a new
    stream) keeps the plain std 0.02 that the name match ``proj.weight`` once scaled too."""
    n_layer = 8
    model = tiny_model(n_layer=n_layer, d_model=64, n_head=2, mtp_wiring="sequential", n_mtp=2)
    scaled, plain = 0.02 / (2 * n_layer) ** 0.5, 0.02
    stds = {name: p.std().item() for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 2}
    residual = [n for n in stds if n.endswith(("attn.proj.weight", "mlp.2.weight"))]
    assert len(residual) == 2 * (n_layer + 2)  # every trunk block and both MTP modules' blocks
    for name in residual:
        assert stds[name] == pytest.approx(scaled, rel=0.1), name
    for name in ("mtp_heads.0.proj.weight", "mtp_heads.1.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.0.weight"):
        assert stds[name] == pytest.approx(plain, rel=0.1), name


def test_a_config_without_a_vocabulary_cannot_build_a_model():
    with pytest.raises(ValueError, match="GPTConfig.vocab_size is None: set it to the tokenizer's vocabulary size"):
        GPT(GPTConfig())
