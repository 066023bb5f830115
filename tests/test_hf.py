"""MTP heads on tiny random Hugging Face models (nothing is downloaded)."""
import importlib
import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, grad, jvp

transformers = pytest.importorskip("transformers")

from mtpdiag.diagnostics import Probe  # noqa: E402
from mtpdiag.integrations import require_unwrapped  # noqa: E402
from mtpdiag.integrations.hf import (  # noqa: E402
    MTPCausalLM, MTPCausalLMOutput, check_eager_kernels, hf_tokenizer, shared_parameter_names,
)
from mtpdiag.losses import aligned_logprobs, j_true, mtp_ce_loss, mtp_policy_loss, rl_objective  # noqa: E402
from mtpdiag.model import GPTOutput  # noqa: E402

VOCAB = 11
T = 7
FAMILIES = ("gpt2", "llama", "qwen2")
WIRINGS = ("parallel", "sequential")
# HF's Llama / Qwen2 run RMSNorm and the eager softmax in float32 even on a
# float64 model, so two derivative paths there agree to float32 precision
# (about 100 ulps allowed); GPT-2 stays in float64.
HVP_RTOL = {"gpt2": 1e-9, "llama": 1e-5, "qwen2": 1e-5}


# transformers' own MTP modules (and its choice of experts kernels) arrived with transformers 5
needs_native_mtp = pytest.mark.skipif(
    importlib.util.find_spec("transformers.modeling_layers") is None
    or not hasattr(importlib.import_module("transformers.modeling_layers"), "MtpModel"),
    reason="this transformers has no MtpModel (transformers 5 has)",
)


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
    assert isinstance(out, MTPCausalLMOutput) and isinstance(out, GPTOutput)
    torch.testing.assert_close(out.logits, hf_logits)  # the HF contract: .logits of the main head
    torch.testing.assert_close(out.main.logits, hf_logits[:, :-1])
    torch.testing.assert_close(out.last_logits, hf_logits[:, -1])
    assert out.mtp_logits == tuple(pred.logits for pred in out.mtp) and len(out.mtp_logits) == 2
    assert torch.equal(out.main.targets, idx[:, 1:])
    assert torch.equal(out.main.target_pos, torch.arange(1, T))
    assert not model.final_norm._forward_pre_hooks and not model.final_norm._forward_hooks, (
        "the capture hooks must not outlive the forward"
    )

    trunk = model.trunk(idx)  # the copied heads read the decoder output before the final norm
    after_norm = model.hf_model.base_model(input_ids=idx)[0]
    torch.testing.assert_close(trunk.after_norm, after_norm)
    torch.testing.assert_close(model.final_norm(trunk.before_norm), after_norm)
    assert not torch.allclose(trunk.before_norm, after_norm)


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


@pytest.mark.parametrize("wiring", WIRINGS)
def test_each_mtp_head_has_its_own_parameters_and_the_probe_leaves_them_in_place(wiring):
    """One deepcopy memo for every head gave heads 2..K the first head's parameters, and
    functional_call, meeting one tensor under two names, left a detached copy in the model."""
    model = tiny_model("gpt2", wiring, n_mtp=3)
    first, *others = [{id(p) for p in head.parameters()} for head in model.mtp_heads]
    assert all(not (first & other) for other in others)
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters())) + 1  # tied wte
    before = dict(model.named_parameters())
    idx = tokens()
    Probe(model, rl_objective, mtp_policy_loss).measure(rl_batch(idx), 0.1, line_search=False, crossfit=False)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())


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
        check_eager_kernels(eager_model)


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


# ----------------------------------------------------------------------------- Hugging Face conventions


def left_padded(idx: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b of ``idx`` with its first ``pads[b]`` tokens turned into left padding (id 0, mask 0)."""
    mask = torch.ones_like(idx)
    padded = idx.clone()
    for b, n in enumerate(pads):
        padded[b, :n], mask[b, :n] = 0, 0
    return padded, mask


@pytest.mark.parametrize(
    "family, wiring", [("gpt2", "parallel"), ("gpt2", "sequential"), ("qwen2", "parallel"), ("qwen2", "sequential"),
                       pytest.param("deepseek_v3", "native", marks=needs_native_mtp)],
)  # fmt: skip
def test_a_left_padded_row_predicts_what_it_predicts_alone(family, wiring):
    """TRL's layout: every real token of a left-padded batch gets, from the main head and from
    every MTP head, the logits it gets in its unpadded row at the same positions."""
    # transformers' Qwen2 and DeepSeek-V3 turn a fully masked (padded) row into NaN in float64 (a
    # float64 mask minimum becomes -inf in their float32 softmax), so they run in float32 here, as they train
    if family == "deepseek_v3":
        model = tiny_deepseek_v3().float()
    else:
        model = tiny_model(family, wiring) if family == "gpt2" else tiny_model(family, wiring).float()
    pads = [0, 2, 3]
    padded, mask = left_padded(tokens(), pads)
    out = model(padded, attention_mask=mask)
    tol = {"rtol": 1e-10, "atol": 1e-12} if family == "gpt2" else {"rtol": 1e-4, "atol": 1e-5}
    for b, n in enumerate(pads):
        alone = model(padded[b : b + 1, n:], position_ids=torch.arange(n, T)[None])
        torch.testing.assert_close(out.logits[b : b + 1, n:], alone.logits, **tol)
        for k, (pred, pred_alone) in enumerate(zip(out.mtp, alone.mtp), start=1):
            # row t of head k reads positions up to t (parallel) or t+k (sequential): from n on, all real
            torch.testing.assert_close(pred.logits[b : b + 1, n:], pred_alone.logits, **tol)


def test_generate_is_the_wrapped_models_and_trainer_plumbing_is_delegated():
    model = tiny_model("qwen2", "parallel")
    padded, mask = left_padded(tokens(), [0, 1, 2])
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    generated = model.generate(padded, **kwargs)
    assert torch.equal(generated, model.hf_model.generate(padded, **kwargs)) and generated.shape == (3, T + 3)
    assert model.config is model.hf_model.config and model.generation_config is model.hf_model.generation_config
    assert model.base_model is model.hf_model.base_model and model.get_output_embeddings() is model.hf_model.lm_head
    enable_checkpointing(model)
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_the_task_tokenizer_in_hf_form_has_the_tasks_ids():
    from mtpdiag.tasks import make_task

    task = make_task("addition", digits=2)
    tokenizer = hf_tokenizer(task.tokenizer)
    assert tokenizer("12+34=")["input_ids"] == task.tokenizer.encode("12+34=")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (task.tokenizer.pad_id, task.tokenizer.eos_id)
    assert tokenizer.decode(task.tokenizer.encode("64") + [task.tokenizer.eos_id], skip_special_tokens=True) == "64"


# ----------------------------------------------------------------------------- native transformers MTP (DeepSeek-V3)


def deepseek_v3_config(num_mtp_layers: int = 2):
    """Two decoder layers (one dense, one MoE), MLA attention, ``num_mtp_layers`` MTP modules."""
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=2, kv_lora_rank=4,
        q_lora_rank=4, qk_rope_head_dim=2, v_head_dim=4, qk_nope_head_dim=2, n_group=1, topk_group=1,
        num_experts_per_tok=1, first_k_dense_replace=1, max_position_embeddings=16, num_mtp_layers=num_mtp_layers,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip


def tiny_deepseek_v3(num_mtp_layers: int = 2, seed: int = 0) -> MTPCausalLM:
    torch.manual_seed(seed)
    return MTPCausalLM.from_config(deepseek_v3_config(num_mtp_layers)).double()


@needs_native_mtp
def test_a_config_that_declares_mtp_layers_gets_transformers_own_modules():
    from transformers.modeling_layers import MtpLayer, MtpModel

    model = tiny_deepseek_v3()
    assert model.wiring == "native" and model.n_mtp == 2
    assert all(isinstance(head, MtpLayer) for head in model.mtp_heads)
    assert all(torch.isfinite(p).all() and p.abs().max() <= 1 for p in model.mtp_heads.parameters())
    new = {name for name, _ in model.named_parameters()} - {f"hf_model.{n}" for n, _ in model.hf_model.named_parameters()}
    assert new and all(name.startswith("mtp_heads.") for name in new), "the embedding and head stay the model's own"

    # transformers' MtpModel on the same layers: forward_layer chained depth by depth, then the shared head
    idx = tokens()
    out = model(idx)
    reference = MtpModel(model.hf_model, 2).double()
    reference.layers.load_state_dict(model.mtp_heads.state_dict())
    prev = model.hf_model.base_model(input_ids=idx).last_hidden_state  # MTP decoding reads it after the norm
    positions = torch.arange(T)[None].expand(idx.size(0), T)
    for k, pred in enumerate(out.mtp, start=1):
        prev = reference.forward_layer(k - 1, prev[:, : T - k], positions[:, k:], None, input_ids=idx[:, k:])
        logits = reference._project_to_logits(prev)[:, : T - 1 - k]
        torch.testing.assert_close(pred.logits, logits, rtol=1e-12, atol=1e-12)
        assert torch.equal(pred.targets, idx[:, 1 + k :])


@needs_native_mtp
def test_native_mtp_shared_parameters_include_the_final_norm_and_match_autograd():
    model = tiny_deepseek_v3()
    batch = rl_batch(tokens())
    params = dict(model.named_parameters())
    out = model(batch["input_ids"])

    def reached(loss):
        g = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
        return {name for name, gi in zip(params, g) if gi is not None}

    shared = set(shared_parameter_names(model))
    assert shared == reached(rl_objective(out, batch)) & reached(mtp_policy_loss(out, batch))
    assert "hf_model.model.norm.weight" in shared


@needs_native_mtp
def test_native_deepseek_v3_mtp_through_the_probe_matches_a_materialised_hessian():
    """c, v^2, h_gm and h_mm on S from the Probe (forward-over-reverse products) against g, m and
    the Hessian of J on S materialised by torch.autograd.functional.hessian, all in float64.
    transformers' DeepSeek-V3 computes RMSNorm and the attention softmax in float32 even on
    float64 inputs, so the two derivative paths agree to float32 precision."""
    model = tiny_deepseek_v3(num_mtp_layers=1).eval()
    batch = rl_batch(tokens())
    record = Probe(model, rl_objective, mtp_policy_loss).measure(batch, 0.1, line_search=False)
    assert record.hvp_mode == "fwd_rev" and record.n_shared == len(torch.cat(
        [p.reshape(-1) for p in model.hf_model.parameters()]
    ))  # fmt: skip

    names = shared_parameter_names(model)
    params = dict(model.named_parameters())
    sizes, shapes = [params[n].numel() for n in names], [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def at(flat):
        return {n: t.view(shape) for n, t, shape in zip(names, flat.split(sizes), shapes)}

    def J(flat):
        return rl_objective(functional_call(model, at(flat), (batch["input_ids"],)), batch)

    def L_mtp(flat):
        return mtp_policy_loss(functional_call(model, at(flat), (batch["input_ids"],)), batch)

    H = torch.autograd.functional.hessian(J, theta, vectorize=True)
    g = torch.autograd.functional.jacobian(J, theta)
    m = -torch.autograd.functional.jacobian(L_mtp, theta)
    expected = {"c": g @ m, "v2": m @ m, "h_gm": g @ H @ m, "h_mm": m @ H @ m}
    for field, value in expected.items():
        torch.testing.assert_close(torch.tensor(getattr(record, field), dtype=torch.float64), value, rtol=1e-5, atol=0)
    assert abs(record.h_mm) > 0 and abs(record.h_gm) > 0


@needs_native_mtp
def test_native_wiring_needs_declared_layers_and_their_number():
    with pytest.raises(ValueError, match="declares MTP layers.*wiring='parallel' or 'sequential'"):
        MTPCausalLM.from_config(tiny_config("qwen2"), wiring="native")
    with pytest.raises(ValueError, match="n_mtp=3 but the config declares num_mtp_layers=2: pass n_mtp=2"):
        MTPCausalLM(tiny_deepseek_v3().hf_model, n_mtp=3)
    copied = MTPCausalLM(tiny_deepseek_v3().hf_model, n_mtp=1, wiring="sequential")
    assert copied.wiring == "sequential" and len(copied(tokens()).mtp) == 1


@needs_native_mtp
def test_a_fused_experts_kernel_is_rejected_with_the_fix():
    fused = transformers.AutoModelForCausalLM.from_config(deepseek_v3_config(), attn_implementation="eager")
    assert fused.config._experts_implementation != "eager"
    with pytest.raises(ValueError, match='experts_implementation="eager"'):
        MTPCausalLM(fused)


# ----------------------------------------------------------------------------- gradient checkpointing


def enable_checkpointing(model: MTPCausalLM) -> None:
    """As the HF Trainer does: ``activation_checkpointing_enable`` (transformers 5), else its older name."""
    if hasattr(model.hf_model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()


def _checkpointing_state(hf_model):
    flags = [m.gradient_checkpointing for m in hf_model.modules() if hasattr(m, "gradient_checkpointing")]
    hooks = sum(len(m._forward_hooks) for m in hf_model.modules())
    return flags, hooks


@pytest.mark.parametrize("hvp_mode", ["fwd_rev", "rev_rev"])
def test_an_hvp_under_gradient_checkpointing_runs_with_it_suspended_and_says_so(hvp_mode):
    """As the HF Trainer turns it on (TRL's default): flags on every layer and a requires_grad_
    hook on the input embedding, which torch.func transforms reject."""
    model = tiny_model("qwen2", "parallel", n_mtp=1)
    batch = rl_batch(tokens())
    plain = Probe(model, rl_objective, mtp_policy_loss, hvp_mode=hvp_mode).measure(batch, 0.1, line_search=False)
    assert plain.gradient_checkpointing is None
    enable_checkpointing(model)
    enable_checkpointing(model)  # re-enabling (as TRL does around generation) leaves a second hook
    model.train()
    before = _checkpointing_state(model.hf_model)
    assert any(before[0])
    if hasattr(model.hf_model, "activation_checkpointing_enable"):  # transformers 5 adds the hook for plain models too
        assert before[1] >= 2
    record = Probe(model, rl_objective, mtp_policy_loss, hvp_mode=hvp_mode).measure(batch, 0.1, line_search=False)
    assert record.gradient_checkpointing == "suspended" and record.hvp_mode == hvp_mode and record.hvp_fallback is None
    assert record.as_row()["gradient_checkpointing"] == "suspended", "the diagnostics CSV column"
    for field in ("c", "v2", "h_gm", "h_mm"):
        assert getattr(record, field) == pytest.approx(getattr(plain, field), rel=1e-12)
    assert _checkpointing_state(model.hf_model) == before and model.training, "restored after the measurement"


def test_the_step_proxy_runs_in_training_mode_under_gradient_checkpointing():
    from mtpdiag.calibrators import OCC, CalibrationInputs

    model = tiny_model("qwen2", "parallel", n_mtp=1)
    batch = rl_batch(tokens())

    def lam():
        out = model(batch["input_ids"])
        inputs = CalibrationInputs(
            step=1, minibatch=0, logprobs=aligned_logprobs(out), old_logprobs=batch["old_logprobs"],
            response_mask=batch["response_mask"], lr=0.1, model=model, batch=batch,
            forward=lambda m, b: m(b["input_ids"]), objective=rl_objective, aux_loss=mtp_policy_loss,
        )  # fmt: skip
        return OCC(proxy="step")(inputs).lambdas

    model.train()
    without = lam()
    enable_checkpointing(model)
    torch.testing.assert_close(lam(), without, rtol=1e-12, atol=0)


def test_other_checkpointing_inside_an_hvp_is_an_error_naming_the_fix():
    """torch.utils.checkpoint in a model's own code: nothing mtpdiag can suspend; forward mode errs naming the fix."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return checkpoint(self.inner, idx, use_reentrant=False)

    model = Checkpointed(tiny_model("gpt2", "parallel", n_mtp=1))
    batch = rl_batch(tokens())
    with pytest.raises(RuntimeError, match="met activation checkpointing inside the model.*turn it off while measuring"):
        Probe(model, rl_objective, mtp_policy_loss, hvp_mode="fwd_rev").measure(batch, 0.1, line_search=False)
    # reverse mode differentiates every moved parameter (none held fixed, so the recomputation's metadata
    # matches) at theta, where the recomputation's values are the measured ones: it measures exactly
    measured = Probe(model, rl_objective, mtp_policy_loss, hvp_mode="rev_rev").measure(batch, 0.1, line_search=False)
    plain = Probe(model.inner, rl_objective, mtp_policy_loss, hvp_mode="rev_rev").measure(batch, 0.1, line_search=False)
    assert (measured.c, measured.h_gm, measured.h_mm) == pytest.approx((plain.c, plain.h_gm, plain.h_mm), rel=1e-12)
