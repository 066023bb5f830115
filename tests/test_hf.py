"""MTP heads on tiny random Hugging Face models (nothing is downloaded)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, grad, jvp

transformers = pytest.importorskip("transformers")

from mtpdiag.integrations import require_unwrapped  # noqa: E402
from mtpdiag.integrations.hf import MTPCausalLM, check_eager_attention, shared_parameter_names  # noqa: E402
from mtpdiag.losses import aligned_logprobs, j_true, mtp_ce_loss, mtp_policy_loss, rl_objective  # noqa: E402

VOCAB = 11
T = 7
FAMILIES = ("gpt2", "llama", "qwen2")
WIRINGS = ("parallel", "sequential")
# HF's Llama / Qwen2 run RMSNorm and the eager softmax in float32 even on a
# float64 model, so two derivative paths there agree to float32 precision
# (about 100 ulps allowed); GPT-2 stays in float64.
HVP_RTOL = {"gpt2": 1e-9, "llama": 1e-5, "qwen2": 1e-5}


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    llama_like = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    return transformers.Qwen2Config(**llama_like)


def tiny_model(family: str, wiring: str, n_mtp: int = 2, seed: int = 0) -> MTPCausalLM:
    torch.manual_seed(seed)
    return MTPCausalLM.from_config(tiny_config(family), n_mtp=n_mtp, wiring=wiring).double()


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def rl_batch(idx: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(2)
    response_mask = torch.zeros(idx.size(0), T - 1, dtype=torch.float64)
    response_mask[:, 2:] = 1.0
    return {
        "input_ids": idx,
        "response_mask": response_mask,
        "old_logprobs": -2.0 - torch.rand(idx.size(0), T - 1, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(idx.size(0), generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
def test_main_head_is_the_hf_model(family, wiring):
    model = tiny_model(family, wiring)
    idx = tokens()
    out = model(idx)
    hf_logits = model.hf_model(idx).logits.double()
    torch.testing.assert_close(out.main.logits, hf_logits[:, :-1])
    torch.testing.assert_close(out.last_logits, hf_logits[:, -1])
    assert torch.equal(out.main.targets, idx[:, 1:])
    assert torch.equal(out.main.target_pos, torch.arange(1, T))
    assert not model.final_norm._forward_pre_hooks, "the pre-norm hook must not outlive the forward"

    trunk = model.trunk(idx)  # what the MTP heads read: the decoder output before the final norm
    after_norm = model.hf_model.base_model(input_ids=idx)[0]
    torch.testing.assert_close(model.final_norm(trunk), after_norm)
    assert not torch.allclose(trunk, after_norm)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("n_mtp", [1, 2])
def test_mtp_head_k_at_position_t_scores_token_t_plus_1_plus_k(family, wiring, n_mtp):
    """Head k's row t targets token t+1+k and reads tokens up to t (parallel) or t+k
    (sequential: module k embeds token t+k); it must not see any later token."""
    model = tiny_model(family, wiring, n_mtp)
    idx = tokens()
    out = model(idx)
    assert len(out.mtp) == n_mtp
    for k, pred in enumerate(out.mtp, start=1):
        assert pred.logits.shape == (idx.size(0), T - 1 - k, VOCAB)
        assert torch.equal(pred.targets, idx[:, 1 + k :])
        assert torch.equal(pred.target_pos, torch.arange(1 + k, T))

    for changed_pos in range(1, T):
        edited = idx.clone()
        edited[:, changed_pos] = (idx[:, changed_pos] + 1 - 2) % (VOCAB - 2) + 2
        edited_out = model(edited)
        for k, (pred, edited_pred) in enumerate(zip(out.mtp, edited_out.mtp), start=1):
            first_row_reading_it = changed_pos - (k if wiring == "sequential" else 0)
            rows = pred.logits.size(1)
            before = slice(0, max(0, min(first_row_reading_it, rows)))
            torch.testing.assert_close(edited_pred.logits[:, before], pred.logits[:, before], rtol=0, atol=0)
            if 0 <= first_row_reading_it < rows:
                assert not torch.allclose(
                    edited_pred.logits[:, first_row_reading_it], pred.logits[:, first_row_reading_it]
                ), f"head {k} row {first_row_reading_it} should read token {changed_pos}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
def test_mtpdiag_losses_run_on_the_output(family, wiring):
    model = tiny_model(family, wiring)
    idx = tokens()
    batch = rl_batch(idx)
    out = model(idx)
    lp = aligned_logprobs(out)
    assert lp.main.shape == (idx.size(0), T - 1)
    assert lp.mtp.shape == (2, idx.size(0), T - 1)
    assert lp.mtp_valid.tolist() == [[False] + [True] * (T - 2), [False, False] + [True] * (T - 3)]
    objective = rl_objective(out, batch) - mtp_policy_loss(out, batch) - mtp_ce_loss(out, batch) + j_true(out, batch)
    objective.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _objective(model, batch, mtp_detach="none"):
    def f(params):
        out = functional_call(model, params, (batch["input_ids"],), {"mtp_detach": mtp_detach})
        return rl_objective(out, batch) - mtp_policy_loss(out, batch)

    return f


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
def test_forward_over_reverse_hvp_matches_double_backward(family, wiring):
    model = tiny_model(family, wiring, n_mtp=1)
    batch = rl_batch(tokens())
    params = {name: p.detach() for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    direction = {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}
    f = _objective(model, batch)

    _, hvp_forward = jvp(grad(f), (params,), (direction,))

    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    g_dot_v = sum((gi * direction[name]).sum() for gi, name in zip(g, leaves))
    hvp_reverse = torch.autograd.grad(g_dot_v, list(leaves.values()))

    for name, hv in zip(leaves, hvp_reverse):
        torch.testing.assert_close(hvp_forward[name], hv, rtol=HVP_RTOL[family], atol=HVP_RTOL[family] * hv.abs().max())
    assert any(hv.abs().max() > 0 for hv in hvp_reverse)


def _mtp_gradients(model, batch, mtp_detach):
    """Gradient of the MTP policy loss alone on every parameter (zeros where unreachable)."""
    params = dict(model.named_parameters())
    out = model(batch["input_ids"], mtp_detach=mtp_detach)
    g = torch.autograd.grad(mtp_policy_loss(out, batch), list(params.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if gi is None else gi for (name, p), gi in zip(params.items(), g)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
def test_detach_modes_and_mtp_gradient_on_shared_parameters(family, wiring):
    model = tiny_model(family, wiring)
    batch = rl_batch(tokens())
    shared = shared_parameter_names(model)
    hf = model.hf_model
    head_and_embed = {id(hf.get_output_embeddings().weight)}
    if wiring == "sequential":
        head_and_embed.add(id(hf.get_input_embeddings().weight))
    params = dict(model.named_parameters())

    joint = _mtp_gradients(model, batch, "none")
    assert all(joint[name].abs().max() > 0 for name in shared)

    detached = _mtp_gradients(model, batch, "detach")
    assert all(detached[name].abs().max() == 0 for name in shared)

    # Cutting only the trunk still lets MTP gradient into the shared output head (and, sequential, embedding).
    trunk_only = _mtp_gradients(model, batch, "detach_trunk_only")
    leaking = {name for name in shared if trunk_only[name].abs().max() > 0}
    assert leaking == {name for name in shared if id(params[name]) in head_and_embed}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wiring", WIRINGS)
def test_shared_parameter_names_match_autograd_reachability(family, wiring):
    model = tiny_model(family, wiring)
    batch = rl_batch(tokens())
    params = dict(model.named_parameters())
    out = model(batch["input_ids"])

    def reached(loss):
        g = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
        return {name for name, gi in zip(params, g) if gi is not None}

    from_autograd = reached(rl_objective(out, batch)) & reached(mtp_policy_loss(out, batch))
    assert set(shared_parameter_names(model)) == from_autograd
    assert any(name.startswith("mtp_heads.") for name in params) and not any(
        name.startswith("mtp_heads.") for name in from_autograd
    )


def test_fused_attention_is_rejected_with_the_fix():
    config = tiny_config("llama")
    sdpa_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        MTPCausalLM(sdpa_model)

    class LlamaSdpaAttention(nn.Module):
        """Stands for the per-implementation attention classes of transformers < 4.48."""

    eager_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    eager_model.legacy_attention = LlamaSdpaAttention()
    with pytest.raises(ValueError, match="attention class LlamaSdpaAttention"):
        check_eager_attention(eager_model)


def test_switching_to_a_fused_kernel_after_wrapping_fails_during_the_hvp():
    model = tiny_model("gpt2", "parallel", n_mtp=1)
    batch = rl_batch(tokens())
    params = {name: p.detach() for name, p in model.named_parameters()}
    model.hf_model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*attn_implementation=\"eager\""):
        jvp(grad(_objective(model, batch)), (params,), (params,))


def test_bad_arguments_name_the_fix():
    hf_model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"), attn_implementation="eager")
    with pytest.raises(ValueError, match="choose one of"):
        MTPCausalLM(hf_model, wiring="tree")
    with pytest.raises(ValueError, match="at least one MTP head"):
        MTPCausalLM(hf_model, n_mtp=0)
    model = MTPCausalLM(hf_model)
    with pytest.raises(ValueError, match="choose one of"):
        model(tokens(), mtp_detach="stop")
    with pytest.raises(ValueError, match="larger max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="wrap the HF model with MTPCausalLM"):
        shared_parameter_names(hf_model)


def test_unsupported_layout_is_a_clear_error():
    opt = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16
    )
    with pytest.raises(ValueError, match="laid out like GPT-2 or Llama"):
        MTPCausalLM.from_config(opt)


@pytest.fixture
def single_process_group(tmp_path):
    """A real one-process gloo group, as DDP and FSDP need."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_module_is_rejected_with_the_fix(single_process_group):
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model("gpt2", "parallel", n_mtp=1)
    with pytest.raises(TypeError, match="pass `model.module`"):
        MTPCausalLM(DistributedDataParallel(model.hf_model))
    with pytest.raises(TypeError, match="pass `model.module`"):
        shared_parameter_names(DistributedDataParallel(model))
    assert require_unwrapped(model) is model


def test_fsdp_sharded_module_is_rejected_with_the_fix(single_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    fsdp1 = FullyShardedDataParallel(tiny_model("gpt2", "parallel", n_mtp=1), device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match="FullyShardedDataParallel.*full_state_dict=True"):
        shared_parameter_names(fsdp1)

    hf_model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    fully_shard(hf_model.model.layers[0])  # FSDP2 on one layer only: found below the root
    with pytest.raises(TypeError, match="at submodule 'model.layers.0'.*full_state_dict=True"):
        MTPCausalLM(hf_model)
