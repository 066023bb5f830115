"""MTPGRPOTrainer: TRL's GRPO with mtpdiag's MTP regimes, OCC and diagnostics (tiny from-config models, offline)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from mtpdiag import regimes  # noqa: E402
from mtpdiag.diagnostics.functional import FunctionalModel, isolated, values_and_gradients  # noqa: E402
from mtpdiag.diagnostics.gradients import trained_weights  # noqa: E402
from mtpdiag.hook import DiagnosticsHook  # noqa: E402
from mtpdiag.integrations.hf import MTPCausalLM, hf_tokenizer  # noqa: E402
from mtpdiag.integrations.trl import (  # noqa: E402
    MTPGRPOConfig, MTPGRPOTrainer, RatioProxyWarning, task_dataset, task_reward,
)
from mtpdiag.model import GPTOutput, HeadPrediction  # noqa: E402
from mtpdiag.tasks import make_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_native_mtp = pytest.mark.skipif(
    not hasattr(importlib.import_module("transformers.modeling_layers"), "MtpModel"),
    reason="this transformers has no MtpModel (transformers 5 has)",
)
TASK = make_task("addition", digits=1)
TEMPERATURE = 0.7
# regime -> the MTPGRPOConfig fields that set its lambda
REGIME_FIELDS = {
    "detach": {},
    "ce": {"lam": 0.5},
    "policy": {"lam": 0.5},
    "occ": {"calibrator": "occ-paper"},
    "kl": {"lam": 0.5},
    "tv": {"lam": 0.5},
}


def tiny_gpt2(n_mtp: int = 2, seed: int = 0, dtype=torch.float64) -> MTPCausalLM:
    """GPT-2 stays in float64 end to end (LayerNorm, softmax), so losses agree to rounding."""
    config = transformers.GPT2Config(
        vocab_size=TASK.tokenizer.vocab_size, n_layer=2, n_embd=16, n_head=2, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MTPCausalLM.from_config(config, n_mtp=n_mtp, wiring="parallel").to(dtype)


def config(tmp_path, **fields) -> MTPGRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        temperature=TEMPERATURE, disable_tqdm=True, bf16=False,
    )  # fmt: skip
    return MTPGRPOConfig(**{**base, **fields})


def trainer_for(model, args, reward=None, n_prompts: int = 16) -> MTPGRPOTrainer:
    return MTPGRPOTrainer(
        model, reward or task_reward(TASK), args, train_dataset=task_dataset(TASK, n_prompts),
        processing_class=hf_tokenizer(TASK.tokenizer),
    )  # fmt: skip


# ----------------------------------------------------------------------------- a hand-made TRL micro-batch

PROMPTS = ["3+4=", "+4=", "4=", "1+2="]  # left padded to 4 tokens; "4=" is too short for head 2's first token
COMPLETIONS = ["70", "4", "", "30"]  # right padded; each ends with EOS


def micro_batch(model: MTPCausalLM, seed: int = 0) -> dict:
    """A micro-batch as TRL's _generate_and_score_completions leaves it, with ``old_per_token_logps``
    a little off the current log-probs so that the policy loss and OCC's ratio proxy read something."""
    tok = TASK.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    completions = [tok.encode(c) + [tok.eos_id] for c in COMPLETIONS]
    P, C = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [tok.pad_id] * (C - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(torch.cat([prompt_ids, completion_ids], 1), attention_mask=torch.cat([prompt_mask, completion_mask], 1))
        current = torch.log_softmax(out.main.logits / TEMPERATURE, -1).gather(
            -1, torch.cat([prompt_ids, completion_ids], 1)[:, 1:, None]
        )[:, P - 1 :, 0]
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.2, -0.4, 0.7, -1.5], dtype=torch.float64),
        "num_items_in_batch": completion_mask.sum(), "old_per_token_logps": current + 0.3 * torch.randn(current.shape, generator=gen, dtype=current.dtype),
    }  # fmt: skip


def row_reference(model, inputs, regime, lambdas, mtp_detach, eps_low, eps_high, loss_type) -> torch.Tensor:
    """mtpdiag's own MTP loss, row by row on the unpadded sequences (at the positions they had in the
    batch), head by head; the per-token terms (a head's mean times its token count) summed and
    normalised as loss_type prescribes."""
    total, rows = 0.0, inputs["prompt_ids"].size(0)
    all_tokens = inputs["completion_mask"].sum()
    for b in range(rows):
        keep = torch.cat([inputs["prompt_mask"][b], inputs["completion_mask"][b]]).bool()
        ids = torch.cat([inputs["prompt_ids"][b], inputs["completion_ids"][b]])[keep][None]
        positions = torch.arange(keep.numel())[keep][None]
        out = model(ids, position_ids=positions, mtp_detach=mtp_detach)
        scale = lambda pred: HeadPrediction(pred.logits / TEMPERATURE, pred.targets, pred.target_pos)  # noqa: E731
        n_prompt, L = int(inputs["prompt_mask"][b].sum()), ids.size(1)
        n_completion = L - n_prompt
        response_mask = torch.zeros(1, L - 1, dtype=torch.float64)
        response_mask[0, n_prompt - 1 :] = 1.0
        old = torch.zeros(1, L - 1, dtype=torch.float64)
        old[0, n_prompt - 1 :] = inputs["old_per_token_logps"][b, :n_completion]
        batch = {"input_ids": ids, "response_mask": response_mask, "old_logprobs": old,
                 "advantages": inputs["advantages"][b : b + 1]}  # fmt: skip
        for k, pred in enumerate(out.mtp, start=1):
            head = GPTOutput(scale(out.main), [scale(pred)])
            mean = regime.aux_loss(head, batch, None, eps_low, eps_high)
            # token p of the completion is scored by head k when its source p-1-k is in the row
            n_head = sum(1 for p in range(n_prompt, L) if p - 1 - k >= 0)
            per_sequence = n_head / n_completion if loss_type == "grpo" else n_head
            total = total + lambdas[k - 1] * mean * per_sequence
    return total / (rows if loss_type == "grpo" else all_tokens)


def one_micro_batch(tmp_path, **fields):
    """A tiny model, a trainer of the config ``fields`` in training mode, and one micro-batch."""
    model = tiny_gpt2()
    trainer = trainer_for(model, config(tmp_path, **fields))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    return model, trainer, micro_batch(model)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("regime_name", list(REGIME_FIELDS))
def test_the_mtp_term_equals_mtpdiags_own_loss_on_the_same_batch(tmp_path, regime_name, loss_type):
    model, trainer, inputs = one_micro_batch(tmp_path, regime=regime_name, loss_type=loss_type,
                                             **REGIME_FIELDS[regime_name])
    added = trainer._compute_loss(model, inputs) - GRPOTrainer._compute_loss(trainer, model, inputs)

    regime = regimes.get(regime_name)
    lambdas = trainer._mtp_last_lambdas if regime.lambda_rule == regimes.CALIBRATED else regime.lambdas(trainer.args.lam, 2)
    if regime_name == "occ":
        assert lambdas.abs().min() > 0, "the ratio proxy should read the perturbed old log-probs"
    reference = row_reference(model, inputs, regime, lambdas, trainer.mtp_losses.mtp_detach, trainer.epsilon_low,
                              trainer.epsilon_high, loss_type)  # fmt: skip
    torch.testing.assert_close(added, reference, rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(added, params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(reference, params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    assert any(g.abs().max() > 0 for g in got)
    assert trainer._metrics["train"]["mtp/loss"], "the MTP loss reaches TRL's metrics"


def test_the_frozen_regime_keeps_the_heads_out_of_the_update_and_adds_nothing(tmp_path):
    model, trainer, inputs = one_micro_batch(tmp_path, regime="frozen")
    added = trainer._compute_loss(model, inputs) - GRPOTrainer._compute_loss(trainer, model, inputs)
    assert added.item() == 0.0
    heads = {id(p) for p in model.mtp_heads.parameters()}
    assert heads and not any(p.requires_grad for p in model.mtp_heads.parameters())
    optimizer = trainer.create_optimizer()
    assert not heads & {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_under_detach_the_trunk_gradient_is_plain_grpos(tmp_path):
    model, trainer, inputs = one_micro_batch(tmp_path, regime="detach")
    trunk = dict(model.hf_model.named_parameters())
    with_mtp = torch.autograd.grad(trainer._compute_loss(model, inputs), list(trunk.values()))
    plain = torch.autograd.grad(GRPOTrainer._compute_loss(trainer, model, inputs), list(trunk.values()))
    for name, g, p in zip(trunk, with_mtp, plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0, msg=name)
    heads = torch.autograd.grad(trainer._compute_loss(model, inputs), list(model.mtp_heads.parameters()))
    assert all(h.abs().max() > 0 for h in heads), "the detached heads still learn (their cross-entropy)"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_the_micro_batches_of_an_accumulation_window_add_up_to_the_windows_term(tmp_path, loss_type):
    model = tiny_gpt2()
    trainer = trainer_for(model, config(tmp_path, regime="policy", lam=0.5, loss_type=loss_type,
                                        gradient_accumulation_steps=2))  # fmt: skip
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    inputs = micro_batch(model)
    window = 0.0
    for rows in (slice(0, 2), slice(2, 4)):  # TRL's num_items_in_batch spans the whole generation batch
        part = {key: value[rows] if key != "num_items_in_batch" else value for key, value in inputs.items()}
        window = window + trainer._compute_loss(model, part) - GRPOTrainer._compute_loss(trainer, model, part)
    regime = regimes.get("policy")
    reference = row_reference(model, inputs, regime, regime.lambdas(0.5, 2), "none", trainer.epsilon_low,
                              trainer.epsilon_high, loss_type)  # fmt: skip
    torch.testing.assert_close(window, reference, rtol=1e-10, atol=1e-12)


def test_eval_reuses_the_last_training_lambda(tmp_path):
    model, trainer, inputs = one_micro_batch(tmp_path, regime="occ", calibrator="occ-paper")
    trainer._compute_loss(model, inputs)
    trained = trainer._mtp_last_lambdas.clone()
    model.eval()
    with torch.no_grad():
        trainer._compute_loss(model, micro_batch(model, seed=1))
    assert torch.equal(trainer._mtp_last_lambdas, trained)
    assert trainer._metrics["eval"]["mtp/loss"] and not trainer._metrics["eval"].get("mtp/calib/c_hat")


# ----------------------------------------------------------------------------- the trainer's gradients (issue 13)


class HandedOver(DiagnosticsHook):
    """A hook that keeps the gradients and the batch the trainer hands it."""

    def on_update(self, step, minibatch, batch, optimizer, lambdas, **options):
        self.given, self.batch, self.lambdas = options.get("gradients"), batch, lambdas
        return super().on_update(step, minibatch, batch, optimizer, lambdas, **options)


def measured_micro_batch(tmp_path, beta: float = 0.0, reuse_gradients: bool = True, **fields):
    """One measured training micro-batch through ``_compute_loss``, its loss backpropagated as
    TRL's training step does; the model, the trainer and the hook. ``beta`` is set on the built
    trainer: a config's beta != 0 would have TRL load a reference model from the hub."""
    model = tiny_gpt2()
    hook = HandedOver(None, schedule=1, line_search=False, reuse_gradients=reuse_gradients)
    trainer = MTPGRPOTrainer(model, task_reward(TASK), config(tmp_path, **fields), diagnostics=hook,
                             train_dataset=task_dataset(TASK, 16), processing_class=hf_tokenizer(TASK.tokenizer))
    trainer.current_gradient_accumulation_steps, trainer.beta = 1, beta
    trainer.create_optimizer()
    model.train()
    inputs = micro_batch(model)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.1  # TRL's KL term reads it where beta != 0
    model.zero_grad(set_to_none=True)
    trainer._compute_loss(model, inputs).backward()
    return model, trainer, hook


@pytest.mark.parametrize("fields", [
    {"regime": "policy", "lam": 0.5},
    {"regime": "occ", "calibrator": "occ", "calibrator_options": {"proxy": "step"}},
], ids=["policy", "occ-step-proxy"])
def test_trls_split_backward_hands_the_probe_its_own_gradients_bit_for_bit_and_trains_the_replayed_step(
    tmp_path, fields
):
    model, trainer, hook = measured_micro_batch(tmp_path, **fields)
    assert trainer.gradients_not_reusable() is None
    given, losses_ = hook.given, trainer.mtp_losses
    assert given is not None and given.source == "trainer"
    fm = FunctionalModel(model, losses_.forward)
    params = {n: p.detach() for n, p in fm.trainable().items()}
    with isolated(model):
        (value, _), (g, aux) = values_and_gradients(fm, [losses_.objective, losses_.aux_loss], hook.batch, params, {})
    assert torch.equal(given.value, value)
    for own, reused in ((g, given.g), (aux, given.aux)):
        assert all(torch.equal(own[n], reused[n]) for n in own)
    update = given.update(trained_weights(hook.lambdas), [n for n in params if n in given.reached])
    trainable = dict(model.named_parameters())
    assert all(torch.equal(trainable[n].grad, u) for n, u in update.items()), "TRL's backward leaves the update"
    assert hook.sink.rows["steps"][0]["gradients_from"] == "trainer"


def test_the_split_micro_batch_trains_trls_one_backward_to_its_fused_heads_float32_rounding(tmp_path):
    """TRL's fused log-prob head computes in float32 whatever the model's dtype, so on this
    float64 model its policy gradient and J's differ by float32 rounding (eps 1.2e-7 relative),
    not float64's: the split changes the trained step by that much and no more."""
    fields = {"regime": "policy", "lam": 0.5}
    split, _, _ = measured_micro_batch(tmp_path, **fields)
    one = measured_micro_batch(tmp_path / "one", reuse_gradients=False, **fields)[0]
    a = {n: p.grad for n, p in split.named_parameters() if p.grad is not None}
    b = {n: p.grad for n, p in one.named_parameters() if p.grad is not None}
    assert a.keys() == b.keys()
    scale = max(t.abs().max().item() for t in b.values())
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert 1e-12 * scale < worst < 1e-6 * scale, "float32 rounding, more than float64's and within a few ulps"


def test_a_measure_from_trls_gradients_reads_what_the_probes_own_gradients_read(tmp_path):
    """The split's gradients are the Probe's own bit for bit; the record then differs only where
    the Probe batches its products with g known (one vmapped pass): float64 rounding."""
    fields = {"regime": "policy", "lam": 0.5}
    reused = measured_micro_batch(tmp_path, **fields)[2].sink.rows["steps"][0]
    own = measured_micro_batch(tmp_path / "own", reuse_gradients=False, **fields)[2].sink.rows["steps"][0]
    assert (reused["gradients_from"], own["gradients_from"]) == ("trainer", "probe")
    for name in ("c", "cos", "v2", "h_gm", "h_mm", "a", "b", "lambda_star_taylor", "delta_trained"):
        assert reused[name] == pytest.approx(own[name], rel=1e-10, abs=1e-14), name


@pytest.mark.parametrize("max_grad_norm", [0.01, 0.0], ids=["clipped", "unclipped"])
def test_the_measured_step_is_clipped_as_the_trainer_clips_it(tmp_path, max_grad_norm):
    model, _, hook = measured_micro_batch(tmp_path, regime="policy", lam=0.5, max_grad_norm=max_grad_norm)
    row = hook.sink.rows["steps"][0]
    if not max_grad_norm:
        assert row["max_grad_norm"] is None and row["grad_norm_trained"] is None
        return
    trained = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    assert row["max_grad_norm"] == max_grad_norm
    assert row["grad_norm_trained"] == pytest.approx(trained, rel=1e-12) and trained > max_grad_norm


def test_a_kl_term_keeps_trls_one_backward_and_the_probe_takes_its_own_gradients(tmp_path):
    model, trainer, hook = measured_micro_batch(tmp_path, regime="policy", lam=0.5, beta=0.1)
    assert "KL term (beta=0.1)" in trainer.gradients_not_reusable()
    assert hook.given is None and hook.sink.rows["steps"][0]["gradients_from"] == "probe"


def test_reentrant_checkpointing_keeps_trls_one_backward(tmp_path):
    args = config(tmp_path, regime="policy", lam=0.5, gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = trainer_for(tiny_gpt2(), args)
    assert "reentrant gradient checkpointing" in trainer.gradients_not_reusable()
    assert trainer_for(tiny_gpt2(), config(tmp_path, regime="policy", lam=0.5)).gradients_not_reusable() is None


# ----------------------------------------------------------------------------- real training runs


def length_reward(prompts, completions, **kwargs):
    """Rewards that differ within a group even for a random model, so GRPO's advantages are not 0."""
    return [float(len(c)) for c in completions]


def test_diagnostics_rows_with_lambda_star_reach_the_csv_and_trls_metrics(tmp_path):
    model = tiny_gpt2(n_mtp=1)
    args = config(tmp_path, max_steps=2, regime="occ", calibrator="occ", calibrator_options={"proxy": "step"},
                  diag_every=1)  # fmt: skip
    assert args.gradient_checkpointing, "TRL's default: the measurement must cope with it"
    trainer = trainer_for(model, args, reward=length_reward)
    trainer.train()
    steps = pd.read_csv(tmp_path / "out" / "mtpdiag" / "diag_steps.csv")
    assert list(steps["step"]) == [1, 2] and set(steps["objective"]) == {"j_batch"}
    assert (steps["gradient_checkpointing"] == "suspended").all() and (steps["hvp_mode"] == "fwd_rev").all()
    assert (steps["gradients_from"] == "trainer").all(), "the split backward runs under TRL's gradient checkpointing"
    assert steps["v2"].gt(0).all() and steps["c"].ne(0).all()
    concave = steps[steps["concave"]]
    assert len(concave), "this seed's steps are concave along m"
    torch.testing.assert_close(
        torch.tensor(concave["lambda_star_taylor"].to_numpy()), torch.tensor((concave["a"] / (2 * concave["b"])).to_numpy())
    )
    assert (tmp_path / "out" / "mtpdiag" / "diag_curves.csv").exists()
    logged = [row for row in trainer.state.log_history if "mtp/diag/c" in row]
    assert [row["step"] for row in logged] == [1, 2]
    for row, (_, measured) in zip(logged, steps.iterrows()):
        for field in ("c", "cos", "v2", "h_mm", "lambda_star_taylor"):
            want = measured[field]
            assert (row[f"mtp/diag/{field}"] is None and pd.isna(want)) or row[f"mtp/diag/{field}"] == pytest.approx(want)
        assert row["mtp/lambda"] != 0 and "mtp/calib/c_hat" in row
    assert model.hf_model.is_gradient_checkpointing, "checkpointing is back on after every measurement"


@pytest.mark.parametrize("num_iterations, warns", [(1, True), (2, False)])
def test_the_ratio_proxy_warning_fires_once_only_when_it_can_only_read_0(tmp_path, num_iterations, warns):
    model = tiny_gpt2(n_mtp=1)
    args = config(tmp_path, max_steps=2, regime="occ", calibrator="occ-paper", num_iterations=num_iterations)
    trainer = trainer_for(model, args, reward=length_reward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    fired = [w for w in caught if issubclass(w.category, RatioProxyWarning)]
    assert len(fired) == (1 if warns else 0)
    if warns:
        text = str(fired[0].message)
        assert "\n" not in text and all(fix in text for fix in ("num_iterations", "steps_per_generation", "step"))
        assert all(row["mtp/lambda"] == 0 for row in trainer.state.log_history if "mtp/lambda" in row)
    else:
        assert any(row["mtp/lambda"] != 0 for row in trainer.state.log_history if "mtp/lambda" in row)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"loss_type": "cispo"}, r"loss_type='cispo' is not supported.*\('dapo', 'grpo', 'bnpo', 'dr_grpo', 'luspo'\)"),
        ({"importance_sampling_level": "sequence"}, "set importance_sampling_level='token'"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5 reweights.*leave it at its default"),
        ({"regime": "detach", "lam": 0.5}, "lam does not apply to regime 'detach'"),
        ({"regime": "occ", "calibrator": "nope"}, "unknown calibrator 'nope'"),
        ({"calibrator_options": {"proxy": "step"}}, "calibrator_options needs a calibrator"),
        ({"calibrator": "occ", "calibrator_options": {"prox": "step"}}, "do not fit calibrator 'occ'"),
        ({"calibrator": "occ", "calibrator_options": {"proxy": "exact"}}, "proxy='exact': choose one of"),
        ({"diag_hvp_mode": "fast"}, "diag_hvp_mode='fast': choose one of"),
    ],
)
def test_bad_config_is_one_line_naming_the_fix(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match) as err:
        config(tmp_path, **fields)
    assert "\n" not in str(err.value)


def test_the_trainer_takes_an_mtp_model_and_config(tmp_path):
    hf_model = tiny_gpt2().hf_model
    with pytest.raises(TypeError, match="wrap it, MTPCausalLM"):
        MTPGRPOTrainer(hf_model, task_reward(TASK), config(tmp_path))
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="MTPGRPOConfig"):
        MTPGRPOTrainer(tiny_gpt2(), task_reward(TASK), GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


# ----------------------------------------------------------------------------- the example


def test_example_writes_a_diagnostics_csv_with_lambda_star(tmp_path):
    spec = importlib.util.spec_from_file_location("trl_grpo", REPO / "examples" / "trl_grpo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "1", "--sft-steps", "20", "--out", str(tmp_path / "run")])
    steps = pd.read_csv(tmp_path / "run" / "mtpdiag" / "diag_steps.csv")
    assert "lambda_star_taylor" in steps.columns and list(steps["step"]) == [1]


def deepseek_v3() -> MTPCausalLM:
    ds_config = transformers.DeepseekV3Config(
        vocab_size=TASK.tokenizer.vocab_size, hidden_size=8, intermediate_size=16, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2, kv_lora_rank=4,
        q_lora_rank=4, qk_rope_head_dim=2, v_head_dim=4, qk_nope_head_dim=2, n_group=1, topk_group=1,
        num_experts_per_tok=1, first_k_dense_replace=1, max_position_embeddings=16, num_mtp_layers=2,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return MTPCausalLM.from_config(ds_config)


@needs_native_mtp
def test_a_native_deepseek_v3_mtp_model_trains_the_same_term(tmp_path):
    """transformers' own MTP layers through TRL, in float32 (transformers' DeepSeek-V3 turns padded
    rows into NaN in float64, see test_hf)."""
    model = deepseek_v3()
    assert model.wiring == "native"
    trainer = trainer_for(model, config(tmp_path, regime="policy", lam=0.5))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    inputs = {k: v.float() if torch.is_floating_point(v) else v for k, v in micro_batch(model).items()}
    added = trainer._compute_loss(model, inputs) - GRPOTrainer._compute_loss(trainer, model, inputs)
    regime = regimes.get("policy")
    reference = row_reference(model, inputs, regime, regime.lambdas(0.5, 2), "none", trainer.epsilon_low,
                              trainer.epsilon_high, "dapo")  # fmt: skip
    torch.testing.assert_close(added, reference.float(), rtol=1e-5, atol=1e-7)


@needs_native_mtp
@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_heads_run_under_trls_mixed_precision(tmp_path, bf16, dtype):
    """GRPOConfig's bf16 default puts TRL's forward under bfloat16 autocast (on CPU too): the MTP heads run under it as well."""
    model = deepseek_v3()
    trainer = trainer_for(model, config(tmp_path, regime="policy", lam=0.5, bf16=bf16))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    inputs = {k: v.float() if torch.is_floating_point(v) else v for k, v in micro_batch(model).items()}
    head_dtypes = []
    predictions = model.mtp_predictions

    def spy(*args, **kwargs):
        out = predictions(*args, **kwargs)
        head_dtypes.extend(pred.logits.dtype for pred in out)
        return out

    model.mtp_predictions = spy
    assert torch.isfinite(trainer._compute_loss(model, inputs))
    assert head_dtypes == [dtype, dtype]
