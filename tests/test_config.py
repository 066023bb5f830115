"""TrainConfig: one flat dict on disk and on the CLI, nested objects inside (the
model's fields live in GPTConfig alone); what it builds; every bad-input error."""
import pytest
import torch

from mtpdiag import regimes
from mtpdiag.config import (
    MODEL_FIELDS,
    DiagnosticsConfig,
    TrainConfig,
    build_model,
    build_task,
    flat_fields,
)
from mtpdiag.losses import j_true
from mtpdiag.model import GPTConfig

# the "config" entry of a config.json written before the split (commit 1f85014, `mtpdiag run --micro`, oracle arm)
OLD_CONFIG = {
    "task": "addition", "task_options": {"digits": 1}, "block_size": 8, "d_model": 32, "n_layer": 1, "n_head": 2,
    "dropout": 0.0, "tie_embeddings": True, "n_mtp": 1, "mtp_wiring": "parallel", "attention": "math",
    "sft_steps": 400, "sft_target": 0.4, "sft_eval_every": 25, "sft_batch_size": 64, "sft_lr": 0.003,
    "sft_mtp_weight": 1.0, "steps": 4, "prompts_per_step": 4, "group_size": 4, "temperature": 1.0,
    "max_new_tokens": None, "minibatches": 2, "lr": 0.005, "optimizer": "sgd", "weight_decay": 0.0, "eps_low": 0.2,
    "eps_high": 0.28, "regime": "occ", "lam": None, "calibrator": "oracle", "detach_mode": "full", "eval_every": 2,
    "eval_prompts": 32, "eval_samples": 2, "checkpoint_every": 2, "diag_every": 2, "seed": 0, "device": "cpu",
    "dtype": "float32",
}  # fmt: skip


def test_a_config_json_written_before_the_split_reads_into_the_nested_config():
    cfg = TrainConfig.from_dict(OLD_CONFIG)
    assert cfg.model == GPTConfig(block_size=8, d_model=32, n_layer=1, n_head=2)
    assert cfg.diagnostics == DiagnosticsConfig(every=2)
    assert (cfg.regime, cfg.calibrator, cfg.lr, cfg.steps) == ("occ", "oracle", 0.005, 4)
    flat = cfg.to_dict()
    assert {key: flat[key] for key in OLD_CONFIG} == OLD_CONFIG  # every old key, unchanged
    assert sorted(set(flat) - set(OLD_CONFIG)) == ["diag_gg_curvature", "diag_hvp_mode", "diag_minibatches",
                                                    "diag_objectives",
                                                    "diag_per_block", "diag_reuse_gradients", "diag_top_curvature",
                                                    "lambda_placement", "threads"]  # fmt: skip


def test_the_flat_dict_round_trips_and_lists_every_field_once():
    cfg = TrainConfig(model=GPTConfig(d_model=64, n_mtp=2), diagnostics=DiagnosticsConfig(every=5, per_block=False))
    flat = cfg.to_dict()
    assert list(flat) == [f.name for f in flat_fields()]
    assert {"d_model", "n_mtp", "diag_every", "diag_per_block"} <= set(flat) and "model" not in flat
    assert "vocab_size" not in flat and set(MODEL_FIELDS) <= set(flat)  # the vocabulary is the task's
    assert (flat["d_model"], flat["n_mtp"], flat["diag_every"], flat["diag_per_block"]) == (64, 2, 5, False)
    assert TrainConfig.from_dict(flat) == cfg
    assert {f.name: f.default for f in flat_fields()} == TrainConfig.from_dict({}).to_dict() | {
        "diag_objectives": ("j_batch", "j_true"), "diag_minibatches": ()
    }


def test_with_values_routes_each_flat_key_to_its_home_and_leaves_the_original_alone():
    cfg = TrainConfig()
    changed = cfg.with_values(d_model=64, diag_every=3, diag_top_curvature="all", steps=9)
    assert (changed.model.d_model, changed.diagnostics.every, changed.diagnostics.top_curvature) == (64, 3, "all")
    assert changed.steps == 9 and changed.model.n_layer == cfg.model.n_layer
    assert cfg == TrainConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "sorting"}, "unknown task 'sorting'"),
        ({"regime": "joint"},
         r"unknown regime 'joint': choose one of \['detach', 'ce', 'policy', 'occ', 'kl', 'tv', 'frozen'\]"),
        ({"lam": 0.5}, "lam does not apply to regime 'detach'.*drop --lam"),
        ({"regime": "policy", "detach_mode": "trunk_only"}, "detach_mode applies only to a detached regime, not 'policy'"),
        ({"detach_mode": "half"}, r"unknown detach_mode 'half': choose one of \['full', 'trunk_only'\]"),
        ({"optimizer": "lion"}, "unknown optimizer"),
        ({"minibatches": 17}, "lower --minibatches"),
        ({"temperature": 0.0}, "temperature"),
        ({"sft_target": 1.5}, r"sft_target=1.5 is a J_true in \(0, 1\]"),
        ({"sft_steps": 0}, "sft_steps=0 must be at least 1"),
        ({"regime": "policy", "calibrator": "occ-paper"}, "calibrator applies only to regimes \\['occ'\\].*drop --calibrator"),
        ({"regime": "occ", "calibrator": "nope"}, "unknown calibrator"),
        ({"regime": "occ", "calibrator": "occ-paper", "lam": 0.5}, "drop --lam"),
        ({"diag_every": -1}, "diag_every=-1 must be >= 0"),
        ({"diag_top_curvature": "last"}, r"diag_top_curvature='last': choose one of \['none', 'first_last', 'all'\]"),
        ({"diag_hvp_mode": "fwd_fwd"}, r"diag_hvp_mode='fwd_fwd': choose one of \['fwd_rev', 'rev_rev', 'auto'\]"),
        ({"diag_objectives": ("j_true",)}, "j_batch included"),
        ({"diag_objectives": ("j_batch", "loss")}, r"diag_objectives=j_batch,loss: list each of \['j_batch', 'j_true', 'j_unclipped'\]"),
        ({"n_head": 3}, "d_model=32 must be divisible by n_head=3"),
        ({"d_modle": 64}, r"unknown TrainConfig fields \['d_modle'\]"),
        # issue 10: values that used to fail only after the SFT, or never
        ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
        ({"lr": float("nan")}, "lr=nan must be a finite number > 0"),
        ({"lr": float("inf")}, "lr=inf must be a finite number > 0"),
        ({"sft_lr": 0.0}, "sft_lr=0.0 must be a finite number > 0"),
        ({"regime": "policy", "lam": float("nan")}, "lam=nan must be a finite number"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
        ({"eps_high": float("nan")}, "eps_high=nan must be a finite number >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
        ({"threads": 0}, "threads=0 must be at least 1"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"n_mtp": 100}, "n_mtp=100: .*block_size=8 no head beyond 6 has a target: set --n-mtp 6 or less"),
    ],
)
def test_bad_config_is_a_clear_error(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_n_mtp_beyond_the_tasks_sequences_names_the_fix(tiny):
    # block_size 32 allows 30 heads, but 1-digit addition's sequences are 7 tokens long
    with pytest.raises(ValueError, match="sequences are at most 7 tokens long.*set --n-mtp 5 or less"):
        build_task(tiny(block_size=32, n_mtp=6))
    assert build_task(tiny(block_size=32, n_mtp=5)).prompt_len == 4


def test_an_absurd_lr_is_a_warning_naming_it(tiny):
    """Valid but almost surely not meant: the trainer warns (a deliberate divergence test stays possible)."""
    assert tiny(optimizer="sgd", lr=1.0).risky_values() == [] and tiny(lr=0.1).risky_values() == []
    (sgd,) = tiny(optimizer="sgd", lr=1e6).risky_values()
    assert sgd.startswith("lr=1e+06 is far above what sgd trains with (above 1)") and "lower --lr" in sgd
    (adamw,) = tiny(lr=0.5).risky_values()
    assert "adamw" in adamw and "above 0.1" in adamw


def test_the_vocabulary_comes_from_the_task_not_the_config(tiny):
    with pytest.raises(ValueError, match="model.vocab_size=14: the vocabulary is the task's, leave it None"):
        TrainConfig(model=GPTConfig(vocab_size=14))
    cfg = tiny(dtype="float64")
    task = build_task(cfg)
    model = build_model(cfg, task)
    assert model.cfg.vocab_size == task.tokenizer.vocab_size == 14 and cfg.model.vocab_size is None
    assert model.lm_head.weight.dtype == torch.float64
    again, other = build_model(cfg, task), build_model(cfg.with_values(seed=1), task)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded by the run
    assert not torch.equal(model.wte.weight, other.wte.weight)


def test_block_size_too_small_for_the_task_names_the_fix(tiny):
    with pytest.raises(ValueError, match="block_size=6 is too small for task 'addition'.*--block-size 7"):
        build_task(tiny(block_size=6))
    with pytest.raises(ValueError, match="completions up to 4, so set --block-size 8"):
        build_task(tiny(block_size=7, max_new_tokens=4))
    with pytest.raises(ValueError, match="raise --max-new-tokens"):
        build_task(tiny(max_new_tokens=2))


@pytest.mark.parametrize(
    "every, steps, mode, chosen",
    [(2, 7, "first_last", {2, 6}), (2, 7, "all", {2, 4, 6}), (2, 7, "none", None), (3, 3, "first_last", {3}),
     (5, 4, "all", None), (0, 7, "all", None)],
)  # fmt: skip
def test_top_curvature_steps_are_none_the_first_and_last_or_all_measured_steps(every, steps, mode, chosen):
    schedule = DiagnosticsConfig(every=every, top_curvature=mode).top_curvature_schedule(steps)
    if chosen is None:
        assert schedule is None
    else:
        assert {s for s in range(steps + 2) if schedule(s)} == chosen


def test_the_diagnostics_hook_is_built_from_every_diagnostics_option(tiny, tmp_path):
    cfg = tiny(regime="policy", lam=0.5, dtype="float64")
    model, losses = build_model(cfg, build_task(cfg)), regimes.get("policy").losses(cfg)
    default = DiagnosticsConfig(every=3).hook(steps=9, out=tmp_path, model=model, losses=losses)
    assert default.eval_objective is j_true and default.measure_options == {"per_block": True, "gg_curvature": False}
    assert default.extra_objectives == {} and default.clip_fraction == losses.clip_fraction
    assert default.probe.hvp_mode == "fwd_rev" and default.probe.aux_sign_dependent  # lambda on the advantages
    assert default.probe.objective == losses.objective and default.probe.aux_loss == losses.aux_loss
    assert [s for s in range(10) if default.top_curvature_schedule(s)] == [3, 9]
    chosen = DiagnosticsConfig(every=3, per_block=False, top_curvature="all", objectives=["j_batch", "j_unclipped"],
                               hvp_mode="rev_rev", gg_curvature=True)  # fmt: skip
    placed = regimes.get("policy").losses(cfg.with_values(lambda_placement="objective"))
    hook = chosen.hook(steps=9, out=tmp_path, model=model, losses=placed)
    assert [s for s in range(1, 10) if hook.schedule(s)] == [3, 6, 9]
    assert hook.eval_objective is None and hook.measure_options == {"per_block": False, "gg_curvature": True}
    assert hook.extra_objectives == {"j_unclipped": placed.unclipped_objective}
    assert hook.probe.hvp_mode == "rev_rev" and not hook.probe.aux_sign_dependent  # lambda times the objective
    assert [s for s in range(10) if hook.top_curvature_schedule(s)] == [3, 6, 9]
    assert chosen.objectives == ("j_batch", "j_unclipped")  # config.json's list reads back as the tuple


def test_diag_minibatches_picks_the_measured_mini_batches_and_rejects_indices_past_the_step(tiny, tmp_path):
    cfg = tiny(regime="policy", lam=0.5, dtype="float64", minibatches=4, diag_every=1, diag_minibatches=[1, 3])
    assert cfg.diagnostics.minibatches == (1, 3)  # config.json's list reads back as the tuple
    model, losses = build_model(cfg, build_task(cfg)), regimes.get("policy").losses(cfg)
    hook = cfg.diagnostics.hook(steps=2, out=tmp_path, model=model, losses=losses)
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}  # never read: these mini-batches are skipped
    assert hook.on_update(1, 0, batch, None, 0.5) == {} and hook.on_update(1, 2, batch, None, 0.5) == {}
    assert DiagnosticsConfig(every=1).hook(steps=2, out=tmp_path, model=model, losses=losses).minibatches is None
    with pytest.raises(ValueError, match="mini-batches 0 to 3"):
        tiny(minibatches=4, diag_every=1, diag_minibatches=[4])
    with pytest.raises(ValueError, match="distinct mini-batch indices"):
        DiagnosticsConfig(every=1, minibatches=(1, 1))
