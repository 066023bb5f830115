"""MTP heads in TRL's ``GRPOTrainer``: mtpdiag's regimes, OCC and the exact diagnostics where RLVR is trained.

Needs ``pip install "mtpdiag[trl]"``. A ``TrainerCallback`` never sees the batch,
so :class:`MTPGRPOTrainer` subclasses ``GRPOTrainer`` and adds the MTP term in
``_compute_loss``, where TRL adds its own auxiliary (MoE router) loss::

    model = MTPCausalLM.from_config(config)                    # HF conventions: TRL takes it as its model
    args = MTPGRPOConfig(output_dir="runs/grpo", regime="occ", calibrator="occ", calibrator_options={"proxy": "step"},
                         diag_every=10)
    trainer = MTPGRPOTrainer(model, reward_funcs, args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()    # metrics mtp/* reach TRL's loggers; diag_{steps,curves,blocks}.csv under <output_dir>/mtpdiag

How each TRL concern is met:

* **one trunk pass**: TRL's fused log-prob head runs the decoder; the decoder's last
  hidden states are captured there (:meth:`MTPCausalLM.capture_trunk`) and the MTP
  heads run on them, so TRL's own policy loss is untouched;
* **layout**: TRL's ``prompt_ids`` are left padded and ``completion_ids`` right
  padded; :func:`rl_batch` puts them in mtpdiag's layout (per-token tensors
  [B, T-1], entry i about token i+1), the MTP heads mask padded keys, and head k
  scores no token whose source position t-1-k is padding;
* **temperature**: TRL scores tokens with logits / temperature, and so do the MTP
  heads (:func:`tempered`); **mixed precision**: the heads run under TRL's autocast,
  as its forward does (the diagnostics measure in the parameters' own dtype);
* **normaliser**: the MTP term is normalised like the configured ``loss_type``
  (:class:`LossNormaliser`: dapo's token count of the accumulation window, grpo's
  per-sequence mean, ...), gradient accumulation included; every mtpdiag loss is
  used through its own signature, as a mean whose weights are the loss type's;
* **wrapped model**: the heads and the diagnostics run on
  ``accelerator.unwrap_model(model)``;
* **lambda**: the regime's own (1, or the config's ``lam``) or its calibrator's,
  chosen on every micro-batch (each micro-batch of an accumulation window gets
  its own lambda_t);
* **metrics**: ``mtp/loss``, ``mtp/lambda``, ``mtp/calib/<key>`` (the calibrator's
  readings) and ``mtp/diag/<field>`` (:data:`mtpdiag.hook.SUMMARY_FIELDS`) go through
  ``self._metrics``, so every TRL logger gets them;
* **diagnostics**: a :class:`~mtpdiag.hook.DiagnosticsHook` measures the first
  micro-batch of every scheduled optimiser step, before its backward, as the update
  of TRL's optimizer with that micro-batch's lambda (:func:`measure_micro_batch`;
  with gradient accumulation the real step also adds the later micro-batches'
  gradients); gradient checkpointing is suspended inside every measurement (the
  record's ``gradient_checkpointing`` column says so); the replayed step is clipped
  to ``max_grad_norm`` as the Trainer clips it (exactly so where the measured
  micro-batch is the whole step: ``gradient_accumulation_steps=1``);
* **the trainer's gradients**: on a measured micro-batch (and on every one for a
  calibrator that reads gradients, the step proxy) the backward is split over TRL's
  one trunk pass: g (J on the main head's logits of the captured trunk), the MTP
  term's gradient at head weight +1 and what the measurement needs besides, handed
  to the Probe and the calibrator; the micro-batch then trains on the update
  assembled from them as the Probe replays it, so the measured step is the trained
  one bit for bit (as in mtpdiag's own trainer,
  :mod:`mtpdiag.diagnostics.gradients`). That step differs from TRL's own backward
  by rounding (TRL's fused log-prob head computes in float32 whatever the model's
  dtype) and needs TRL's loss to be -J: where it is not (a KL or entropy term, a
  router loss, mixed precision, dropout, several processes, reentrant checkpointing:
  :meth:`MTPGRPOTrainer.gradients_not_reusable`) TRL's one backward
  trains and the Probe takes its own gradients (the record's ``gradients_from``).

TRL's defaults (``num_iterations=1``, ``steps_per_generation`` =
``gradient_accumulation_steps``) train every batch with the policy that sampled
it, so ``old_per_token_logps`` is the current log-prob and OCC's ratio proxy is
exactly 0: the trainer warns once and names the fixes.

The diagnostics' J is the clipped surrogate TRL trains, with its normaliser (its
KL and entropy terms, which the MTP heads do not touch, are left out); under
several processes each rank's loss is its share of the whole batch's, as the
Probe needs.
"""
from __future__ import annotations

import math
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from trl import GRPOConfig, GRPOTrainer

from .. import regimes
from ..calibrators import OCC, CalibrationInputs, Calibrator, WithShadows, make_calibrator
from ..diagnostics import Probe
from ..diagnostics.gradients import UpdateGradients, needs_trained_aux, trained_weights, training_differs
from ..diagnostics.hvp import HVP_MODES
from ..diagnostics.probe import PROBE_HVP_MODES
from ..distributed import global_count, is_main_process, world_size
from ..hook import SUMMARY_FIELDS, CSVSink, DiagnosticsHook, MemorySink, every
from ..losses import ADVANTAGES, LAMBDA_PLACEMENTS, AlignedLogprobs, aligned_logprobs, head_weight_vector, rl_objective
from ..model import GPTOutput, HeadPrediction
from ..regimes import CALIBRATED, UNIT
from ..tasks import Task
from . import require_unwrapped
from .hf import MTPCausalLM, TrunkStates

# the loss types whose policy term is the two-sided clipped surrogate that the MTP policy loss and J mirror
SUPPORTED_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo")
# GRPOConfig fields that reweight or mask the main head's per-token policy term, with the value that leaves it alone
_UNMIRRORED = {"top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "delta": None}
METRIC_PREFIX = "mtp/"


class RatioProxyWarning(UserWarning):
    """OCC's ratio proxy can only read 0 in this TRL configuration."""


RATIO_PROXY_IS_ZERO = (
    "OCC's ratio proxy reads exactly 0 here: TRL trains every batch with the policy that sampled it "
    "(old_per_token_logps is the current log-prob), so lambda_t = 0 and the MTP heads get no gradient; set "
    "num_iterations > 1, or steps_per_generation > gradient_accumulation_steps, or use the step proxy "
    "(calibrator='occ', calibrator_options={'proxy': 'step'})"
)


# ----------------------------------------------------------------------------- config


@dataclass
class MTPGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the MTP heads' regime and the diagnostics (names as in mtpdiag's ``TrainConfig``)."""

    regime: str = field(default="occ", metadata={"help": f"how the MTP heads train: one of {regimes.names()}"})
    lam: float | None = field(
        default=None, metadata={"help": "the fixed MTP coefficient (regimes ce, policy; occ without a calibrator)"}
    )
    calibrator: str | None = field(
        default=None, metadata={"help": "the calibrator that sets lambda_t (regime occ): occ-paper, occ, oracle, ..."}
    )
    calibrator_options: dict | None = field(
        default=None, metadata={"help": "keyword options of the calibrator, e.g. {'proxy': 'step'}"}
    )
    detach_mode: str = field(default="full", metadata={"help": "regime detach: full or trunk_only"})
    lambda_placement: str = field(
        default=ADVANTAGES, metadata={"help": f"a policy loss's lambda on the advantages or the objective: {LAMBDA_PLACEMENTS}"}
    )
    diag_every: int = field(
        default=0, metadata={"help": "measure the MTP decomposition every n optimiser steps (0: off)"}
    )
    diag_dir: str | None = field(
        default=None, metadata={"help": "where the diagnostics CSVs go (default <output_dir>/mtpdiag)"}
    )
    diag_hvp_mode: str = field(default=HVP_MODES[0], metadata={"help": f"Hessian-vector products: one of {PROBE_HVP_MODES}"})
    diag_per_block: bool = field(default=False, metadata={"help": "also measure per parameter block"})
    diag_line_search: bool = field(default=True, metadata={"help": "also measure the curve Delta(lambda)"})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported with MTP heads: choose one of {SUPPORTED_LOSS_TYPES}, "
                "whose policy term is the clipped surrogate that the MTP policy loss and the diagnostics mirror"
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}: the MTP policy loss and the diagnostics "
                "are token-level; set importance_sampling_level='token'"
            )
        changed = [f"{name}={getattr(self, name)!r}" for name, neutral in _UNMIRRORED.items()
                   if getattr(self, name) != neutral]  # fmt: skip
        if self.use_vllm and self.vllm_importance_sampling_correction:
            changed.append("vllm_importance_sampling_correction=True")
        if changed:
            raise ValueError(
                f"{', '.join(changed)} reweights TRL's per-token policy term, which the MTP policy loss and the "
                "diagnostics do not mirror: leave it at its default"
            )
        if self.lambda_placement not in LAMBDA_PLACEMENTS:
            raise ValueError(f"lambda_placement={self.lambda_placement!r}: choose one of {LAMBDA_PLACEMENTS}")
        regime = regimes.get(self.regime)
        regime.validate(self)
        if self.calibrator_options and not self.calibrator:
            raise ValueError("calibrator_options needs a calibrator: set calibrator='occ' (or another name) too")
        if self.calibrator:
            try:  # the options are checked here, before any work; the trainer builds it for the model's heads
                make_calibrator(self.calibrator, 1, **(self.calibrator_options or {}))
            except TypeError as err:
                raise ValueError(
                    f"calibrator_options={self.calibrator_options} do not fit calibrator {self.calibrator!r} ({err})"
                ) from None
        if self.diag_every < 0:
            raise ValueError(f"diag_every={self.diag_every} must be >= 0 (0 turns the diagnostics off)")
        if self.diag_hvp_mode not in PROBE_HVP_MODES:
            raise ValueError(f"diag_hvp_mode={self.diag_hvp_mode!r}: choose one of {PROBE_HVP_MODES}")


# ----------------------------------------------------------------------------- TRL batch -> mtpdiag batch


@dataclass(frozen=True)
class LossNormaliser:
    """What TRL's ``loss_type`` divides the summed per-token loss of one micro-batch by.

    The loss is sum_{b,t} x_bt * mask_bt * row_weight_b / denominator: ``row_weight``
    is 1 / (tokens of row b) for ``grpo`` (a per-sequence mean), else 1; the
    denominator is TRL's (dapo: the accumulation window's token count per
    process; grpo, luspo: rows x accumulation steps; bnpo: tokens x accumulation
    steps; dr_grpo: rows x max_completion_length x accumulation steps).
    """

    loss_type: str
    accumulation_steps: int
    steps_per_generation: int
    num_processes: int
    max_completion_length: int | None

    def __call__(self, mask: torch.Tensor, num_items_in_batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(row weights [B], denominator) of a micro-batch whose completion-token mask is ``mask`` [B, C]."""
        rows = mask.new_ones(mask.size(0))
        accumulation = self.accumulation_steps if train else 1  # TRL neither splits nor accumulates eval batches
        if self.loss_type == "grpo":
            return 1.0 / mask.sum(-1).clamp(min=1.0), mask.new_tensor(mask.size(0) * accumulation)
        if self.loss_type == "bnpo":
            return rows, mask.sum().clamp(min=1.0) * accumulation
        if self.loss_type == "dr_grpo":
            return rows, mask.new_tensor(mask.size(0) * self.max_completion_length * accumulation)
        if self.loss_type == "luspo":
            return rows, mask.new_tensor(mask.size(0) * accumulation)
        # dapo: num_items_in_batch spans the generation batch of every process; TRL rescales it to one window
        denominator = torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)
        denominator = denominator / self.num_processes
        if train:
            denominator = denominator * self.accumulation_steps / self.steps_per_generation
        return rows, denominator


def rl_batch(inputs: dict, old_logprobs: torch.Tensor, normaliser: LossNormaliser, train: bool) -> dict:
    """A TRL micro-batch in mtpdiag's layout.

    ``input_ids`` and ``attention_mask`` [B, T] are prompt and completion side by
    side (T = P + C); the per-token tensors [B, T-1] have entry i about token i+1:
    ``response_mask`` (completion tokens, tool output excluded), ``old_logprobs``
    (TRL's ``old_per_token_logps``, else ``old_logprobs`` [B, C], the current
    log-probs, as TRL does; in their dtype) and ``loss_weights`` (the response mask times the loss
    type's row weights); ``advantages`` [B]; ``loss_normaliser`` the loss type's
    denominator.
    """
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)}: the MTP losses take one advantage per sequence, [B]"
        )
    P = prompt_ids.size(1)
    dtype = old_logprobs.dtype
    old = inputs.get("old_per_token_logps", old_logprobs).to(dtype)
    mask = mask.to(dtype)
    row_weights, denominator = normaliser(mask, inputs.get("num_items_in_batch"), train)
    lead = mask.new_zeros(mask.size(0), P - 1)  # positions 1..P-1 are prompt tokens
    response_mask = torch.cat([lead, mask], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        "response_mask": response_mask,
        "old_logprobs": torch.cat([lead, old.detach()], dim=1),
        "advantages": advantages.to(dtype),
        "loss_weights": response_mask * row_weights[:, None],
        "loss_normaliser": denominator,
    }


def tempered(out: GPTOutput, temperature: float) -> GPTOutput:
    """``out`` with every logit divided by the sampling temperature (how TRL scores tokens)."""
    if temperature == 1.0:
        return out

    def scaled(pred: HeadPrediction) -> HeadPrediction:
        return HeadPrediction(pred.logits / temperature, pred.targets, pred.target_pos)

    last = None if out.last_logits is None else out.last_logits / temperature
    return GPTOutput(scaled(out.main), [scaled(pred) for pred in out.mtp], last)


def source_valid(attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T-1]: entry i is true when head k's prediction of token i+1 reads a real token
    (position i-k, which left padding can make a pad)."""
    shifted = F.pad(attention_mask[:, : attention_mask.size(1) - 1 - k], (k, 0))
    return shifted.bool()


# ----------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class TRLLosses:
    """The MTP term and J of a TRL micro-batch as pure functions of (model output, batch),
    normalised like the loss type (``batch["loss_weights"]``, ``batch["loss_normaliser"]``).

    Each is an mtpdiag loss (a mean over the tokens of ``response_mask``) taken with
    the loss weights as its mask, times their count, over the denominator: the sum
    of the per-token terms the loss type prescribes. ``global_count`` keeps that
    exact inside ``mtpdiag.distributed.global_means`` (the Probe's data parallel).
    """

    regime: regimes.Regime
    mtp_detach: str
    eps_low: float
    eps_high: float
    temperature: float
    lambda_placement: str = ADVANTAGES

    @property
    def aux_sign_dependent(self) -> bool:
        """As :attr:`mtpdiag.regimes.RegimeLosses.aux_sign_dependent`."""
        return self.regime.placement_applies and self.lambda_placement == ADVANTAGES

    def forward(self, model, batch: dict) -> GPTOutput:
        return tempered(model(batch["input_ids"], attention_mask=batch["attention_mask"], mtp_detach=self.mtp_detach),
                        self.temperature)  # fmt: skip

    def joint_forward(self, model, batch: dict) -> GPTOutput:
        """The forward with every MTP head attached: what S is found with for a detached regime."""
        return tempered(model(batch["input_ids"], attention_mask=batch["attention_mask"]), self.temperature)

    @staticmethod
    def _normalised(mean: torch.Tensor, weights: torch.Tensor, batch: dict) -> torch.Tensor:
        return mean * global_count(weights.sum()).clamp_min(1.0) / batch["loss_normaliser"]

    def objective(self, out: GPTOutput, batch: dict) -> torch.Tensor:
        """J: the main head's clipped surrogate (to maximise), normalised like the loss type."""
        weights = batch["loss_weights"]
        mean = rl_objective(out, {**batch, "response_mask": weights}, self.eps_low, self.eps_high)
        return self._normalised(mean, weights, batch)

    def aux_loss(self, out: GPTOutput, batch: dict, head_weights=None) -> torch.Tensor:
        """The regime's MTP loss summed over heads with ``head_weights`` (a scalar or one per
        head; ones by default, placed as ``lambda_placement`` says for a policy loss), each
        head on the tokens it can score, normalised like the loss type."""
        total = batch["loss_weights"].new_zeros(())
        weights_of = head_weight_vector(head_weights, len(out.mtp), total)
        placed = {"placement": self.lambda_placement} if self.regime.placement_applies else {}
        for k, pred in enumerate(out.mtp, start=1):
            weights = batch["loss_weights"] * source_valid(batch["attention_mask"], k)
            head = GPTOutput(out.main, [pred], out.last_logits)
            mean = self.regime.aux_loss(head, {**batch, "response_mask": weights}, weights_of[k - 1], self.eps_low,
                                        self.eps_high, **placed)  # fmt: skip
            total = total + self._normalised(mean, weights, batch)
        return total


# ----------------------------------------------------------------------------- diagnostics


def measures(hook: DiagnosticsHook | None, step: int, optimizer) -> bool:
    """Whether ``hook`` measures the first micro-batch of ``step``: it is scheduled, and the
    step moves something (a warm-up's first step at learning rate 0 does not)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the real one
    return hook is not None and hook.measures(step, 0) and optimizer.param_groups[0]["lr"] > 0


def measure_micro_batch(hook: DiagnosticsHook, step: int, batch: dict, optimizer, lambdas,
                        gradients: UpdateGradients | None = None, max_grad_norm: float = 0.0) -> dict[str, float]:
    """The trainer's one call into the diagnostics: the hook measures the update of
    ``optimizer`` (a torch optimizer, or accelerate's wrapper of one) on ``batch`` (one
    micro-batch, in mtpdiag's layout, at the parameters the update starts from) with the
    trained ``lambdas`` if :func:`measures` says so; ``gradients`` are the trainer's own,
    if it took them; ``max_grad_norm`` is the Trainer's clipping (``TrainingArguments``'
    field: 0 is none). Returns the summary fields of J's record for TRL's metrics."""
    if not measures(hook, step, optimizer):
        return {}
    records = hook.on_update(step, 0, batch, getattr(optimizer, "optimizer", optimizer), lambdas, gradients=gradients,
                             max_grad_norm=max_grad_norm if max_grad_norm > 0 else None)  # fmt: skip
    if hook.objective_name not in records:
        return {}
    row = records[hook.objective_name].as_row()
    return {f"{METRIC_PREFIX}diag/{name}": row[name] for name in SUMMARY_FIELDS}


def default_hook(args: MTPGRPOConfig) -> DiagnosticsHook | None:
    """The hook ``args`` asks for (``diag_every`` > 0), writing ``diag_dir`` on the main process."""
    if not args.diag_every:
        return None
    directory = Path(args.diag_dir or Path(args.output_dir) / "mtpdiag")
    return DiagnosticsHook(
        None,
        schedule=every(args.diag_every),
        sink=CSVSink(directory) if is_main_process() else MemorySink(),
        per_block=args.diag_per_block,
        line_search=args.diag_line_search,
        probe_options={"hvp_mode": args.diag_hvp_mode},
    )


# ----------------------------------------------------------------------------- the trainer


def _trains_on_ratio_proxy(calibrator: Calibrator | None) -> bool:
    primary = calibrator.primary if isinstance(calibrator, WithShadows) else calibrator
    return isinstance(primary, OCC) and primary.proxy == "ratio"


def _as_metric(value) -> float:
    return math.nan if value is None else float(value)


def _numeric_items(info: dict) -> dict[str, float]:
    """A calibrator's info as numbers (per-head lists as ``key_k``; None as NaN, which TRL's log skips)."""
    items = {}
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            items.update({f"{key}_{k}": _as_metric(v) for k, v in enumerate(value)})
        elif value is None or isinstance(value, (int, float)):
            items[key] = _as_metric(value)
    return items


class MTPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` for an :class:`~mtpdiag.integrations.hf.MTPCausalLM`: TRL's GRPO
    loss plus the regime's MTP term (see the module docstring).

    ``args`` is an :class:`MTPGRPOConfig`. ``calibrator`` replaces the one
    ``args.calibrator`` names (regime occ); ``diagnostics`` replaces the hook
    ``args.diag_*`` describe (its probe is built here on the trainer's losses).
    Other arguments are ``GRPOTrainer``'s.
    """

    def __init__(
        self,
        model: MTPCausalLM,
        reward_funcs,
        args: MTPGRPOConfig,
        *,
        calibrator: Calibrator | None = None,
        diagnostics: DiagnosticsHook | None = None,
        **kwargs,
    ):
        if not isinstance(model, MTPCausalLM):
            raise TypeError(
                f"MTPGRPOTrainer trains an MTPCausalLM, got {type(model).__name__}: wrap it, "
                "MTPCausalLM(hf_model) or MTPCausalLM.from_config(config)"
            )
        if not isinstance(args, MTPGRPOConfig):
            raise TypeError(f"args must be an MTPGRPOConfig (GRPOConfig plus the MTP fields), got {type(args).__name__}")
        regime = regimes.get(args.regime)
        if calibrator is None and args.calibrator is not None:
            calibrator = make_calibrator(args.calibrator, model.n_mtp, **(args.calibrator_options or {}))
        self.mtp_calibrator = regime.calibrator(args, calibrator)
        if diagnostics is not None and diagnostics.probe is not None:
            raise ValueError("diagnostics: pass a DiagnosticsHook without a probe; the trainer builds it on its own losses")
        for param in regime.frozen_parameters(model):  # before TRL builds its optimizer over the trainable ones
            param.requires_grad_(False)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.mtp_losses = TRLLosses(
            regime, regime.mtp_detach(args.detach_mode), self.epsilon_low, self.epsilon_high, self.temperature,
            args.lambda_placement,
        )
        self.mtp_hook = diagnostics if diagnostics is not None else default_hook(args)
        if self.mtp_hook is not None:
            options = self.mtp_hook.probe_options
            self.mtp_hook.probe = Probe(
                require_unwrapped(model), self.mtp_losses.objective, self.mtp_losses.aux_loss,
                forward=self.mtp_losses.forward, shared_forward=self.mtp_losses.joint_forward,
                aux_sign_dependent=self.mtp_losses.aux_sign_dependent, **options,
            )  # fmt: skip
        self._mtp_last_lambdas: torch.Tensor | None = None
        self._mtp_warned_ratio = False

    def _loss_normaliser(self) -> LossNormaliser:
        return LossNormaliser(
            self.loss_type, getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps),
            self.args.steps_per_generation, self.accelerator.num_processes, self.max_completion_length,
        )  # fmt: skip

    def _compute_loss(self, model, inputs):
        """TRL's loss on ``inputs`` plus the regime's MTP term (see the module docstring)."""
        mtp_model = self.accelerator.unwrap_model(model)
        train = self.model.training
        step = self.state.global_step + 1
        first = self._step % self.current_gradient_accumulation_steps == 0
        measured = train and first and measures(self.mtp_hook, step, self.optimizer)
        reused = measured and self.mtp_hook.reuse_gradients
        reads = self.mtp_calibrator is not None and self.mtp_calibrator.reads_gradients
        # g and m wanted: the backward is split over TRL's one trunk pass (the module docstring)
        split = train and (reused or reads) and self.gradients_not_reusable() is None
        with mtp_model.capture_trunk() as states:
            loss = super()._compute_loss(model, inputs)
        if not states:
            raise RuntimeError(f"{type(mtp_model.base_model).__name__} ran no final norm in TRL's forward")
        mode = "train" if train else "eval"
        if train:
            self._warn_if_ratio_proxy_is_zero(inputs)
        out, batch = self._mtp_forward(mtp_model, inputs, states, train, main_gradient=split)
        # what the Probe and the calibrators differentiate: each rank's share of the whole batch's
        # loss (DDP averages the trained gradients over ranks; the Probe sums its own)
        share = {**batch, "loss_normaliser": batch["loss_normaliser"] * world_size()}
        aux_unit = self.mtp_losses.aux_loss(out, batch)
        grads = self._mtp_gradients(mtp_model, out, share, aux_unit, measured and reused) if split else None
        lambdas = self._mtp_lambdas(mtp_model, out, share, train, grads)
        term = self.mtp_losses.aux_loss(out, batch, lambdas)
        metrics = {"loss": aux_unit.detach()}
        if self.mtp_losses.regime.lambda_rule != UNIT:
            metrics.update({self._head_key("lambda", k): lam for k, lam in enumerate(lambdas.tolist())})
        total = loss + term
        if grads is not None:
            total = self._trained_on(mtp_model, grads, lambdas, term, total)
        if measured:
            metrics.update(measure_micro_batch(self.mtp_hook, step, share, self.optimizer, lambdas,
                                               grads if reused else None, self.args.max_grad_norm or 0.0))  # fmt: skip
        for name, value in metrics.items():
            name = name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name
            self._metrics[mode][name].append(self._gathered(value))
        return total

    def gradients_not_reusable(self) -> str | None:
        """Why this trainer's backward cannot be split into the gradients the Probe and the
        calibrators differentiate (then TRL's one backward trains and they take their own),
        or None. The split trains on J's gradient in place of TRL's policy loss's, so
        TRL's loss must be -J on the same function."""
        model = self.accelerator.unwrap_model(self.model)
        if self.beta != 0.0:
            return f"TRL's loss has a KL term (beta={self.beta:g}) that J leaves out"
        if self._entropy_bonus_enabled:
            return "TRL's loss has an entropy bonus that J leaves out"
        if self.aux_loss_enabled:
            return "TRL's loss has a router load-balancing term that J leaves out"
        if self.accelerator.mixed_precision != "no":
            return f"TRL's forward runs in {self.accelerator.mixed_precision}, the Probe in the parameters' own dtype"
        if world_size() > 1:
            return "several processes (DDP reduces the trained gradients itself)"
        if self.args.gradient_checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            return "reentrant gradient checkpointing takes no torch.autograd.grad (TRL's default use_reentrant=False does)"
        return training_differs(model)

    def _mtp_gradients(self, mtp_model, out: GPTOutput, batch: dict, aux_unit: torch.Tensor,
                       measured: bool) -> UpdateGradients:
        """g and the MTP term's gradients from backward passes over TRL's trunk (``out``, with
        the main head's logits on the graph): at head weight +1 (``aux_unit``), at -1 where the
        diagnostics need it, and per head for a gradient-reading calibrator (K > 1)."""
        losses, K = self.mtp_losses, len(out.mtp)
        minus = losses.aux_loss(out, batch, -1.0) if measured and self.mtp_hook.wants_aux_minus() else None
        reads = self.mtp_calibrator is not None and self.mtp_calibrator.reads_gradients
        heads = [losses.aux_loss(out, batch, torch.eye(K, dtype=aux_unit.dtype)[k]) for k in range(K)] \
            if reads and K > 1 else None  # fmt: skip
        return UpdateGradients.take(losses.objective(out, batch), aux_unit, self._mtp_trainable(mtp_model),
                                    aux_minus=minus, aux_heads=heads)  # fmt: skip

    def _trained_on(self, mtp_model, grads: UpdateGradients, lambdas: torch.Tensor, term: torch.Tensor,
                    total: torch.Tensor) -> torch.Tensor:
        """``total``'s value with, as its gradient, the update assembled from ``grads`` at
        ``lambdas`` (``term``: the MTP term at them, on the same forward): TRL's backward of
        the returned loss leaves exactly that update in ``.grad`` (d/dp of sum(p * u) is u,
        with no rounding), so the trained step is the one the Probe replays."""
        trainable = self._mtp_trainable(mtp_model)
        trained = trained_weights(lambdas)
        if needs_trained_aux(trained, self.mtp_losses.aux_sign_dependent, grads.aux_minus is not None):
            grads.with_trained(term, trainable)
        update = grads.update(trained, [n for n in trainable if n in grads.reached])
        linear = sum((trainable[n] * u).sum() for n, u in update.items())
        return total.detach() + (linear - linear.detach())

    @staticmethod
    def _mtp_trainable(mtp_model) -> dict[str, torch.Tensor]:
        return {n: p for n, p in mtp_model.named_parameters() if p.requires_grad}

    def _head_key(self, key: str, k: int) -> str:
        return key if self.accelerator.unwrap_model(self.model).n_mtp == 1 else f"{key}_{k}"

    def _gathered(self, value) -> float:
        if isinstance(value, torch.Tensor):
            return self.accelerator.gather(value.detach().reshape(1)).nanmean().item()
        return _as_metric(value)

    def _mtp_forward(self, mtp_model: MTPCausalLM, inputs: dict, states, train: bool,
                     main_gradient: bool = False) -> tuple[GPTOutput, dict]:
        """The MTP heads on the trunk TRL just ran, and the micro-batch in mtpdiag's layout;
        ``main_gradient``: the main head's logits on the graph too (J's gradient is taken)."""
        trunk = TrunkStates.cat(states)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        output_head = mtp_model.get_output_embeddings()
        # the heads run under TRL's mixed precision, as its own forward does (GRPOConfig's bf16 default)
        with self.accelerator.autocast():
            # the main head's logits are data unless J is differentiated here: TRL's own loss trains them
            with nullcontext() if main_gradient else torch.no_grad():
                main_logits = F.linear(trunk.after_norm, output_head.weight, output_head.bias)
            mtp = mtp_model.mtp_predictions(input_ids, trunk, attention_mask, mtp_detach=self.mtp_losses.mtp_detach)
        out = GPTOutput.from_main_logits(main_logits, input_ids)
        out.mtp = mtp
        out = tempered(out, self.temperature)
        current = aligned_logprobs(GPTOutput(out.main)).main[:, inputs["prompt_ids"].size(1) - 1 :]
        return out, rl_batch(inputs, current, self._loss_normaliser(), train)

    def _warn_if_ratio_proxy_is_zero(self, inputs: dict) -> None:
        """Once: without ``old_per_token_logps`` TRL's old log-prob is the current one."""
        if self._mtp_warned_ratio or "old_per_token_logps" in inputs or not _trains_on_ratio_proxy(self.mtp_calibrator):
            return
        warnings.warn(RATIO_PROXY_IS_ZERO, RatioProxyWarning, stacklevel=3)
        self._mtp_warned_ratio = True

    def _mtp_lambdas(self, mtp_model, out: GPTOutput, batch: dict, train: bool,
                     gradients: UpdateGradients | None = None) -> torch.Tensor:
        """The regime's own lambdas, or its calibrator's on this micro-batch (eval reuses the last
        training ones); ``batch`` is this rank's share; ``gradients``: the trainer's own, if taken."""
        regime, K = self.mtp_losses.regime, len(out.mtp)
        dtype = batch["loss_weights"].dtype
        if regime.lambda_rule != CALIBRATED:
            return regime.lambdas(self.args.lam, K, dtype).to(batch["loss_weights"].device)
        if not train and self._mtp_last_lambdas is not None:
            return self._mtp_last_lambdas
        lp = aligned_logprobs(out)
        micro_batch = self._step % self.current_gradient_accumulation_steps if train else 0
        calibration = self.mtp_calibrator(
            CalibrationInputs(
                step=self.state.global_step + 1, minibatch=micro_batch,
                logprobs=AlignedLogprobs(lp.main.detach(), lp.mtp.detach(), lp.mtp_valid),
                old_logprobs=batch["old_logprobs"], response_mask=batch["response_mask"],
                lr=self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0,
                model=mtp_model, batch=batch, forward=self.mtp_losses.forward, objective=self.mtp_losses.objective,
                aux_loss=self.mtp_losses.aux_loss, gradients=gradients,
            )
        )  # fmt: skip
        lambdas = calibration.lambdas.detach().to(device=batch["loss_weights"].device, dtype=dtype)
        if lambdas.shape != (K,) or not torch.isfinite(lambdas).all():
            raise ValueError(
                f"calibrator {self.mtp_calibrator.name} returned lambdas {lambdas.tolist()}: it must return {K} finite "
                "values, one per MTP head"
            )
        mode = "train" if train else "eval"
        for key, value in _numeric_items(calibration.info).items():
            self._metrics[mode][f"{METRIC_PREFIX}calib/{key}"].append(value)
        self._mtp_last_lambdas = lambdas
        return lambdas


# ----------------------------------------------------------------------------- mtpdiag tasks as TRL data


def task_dataset(task: Task, n: int, seed: int = 0):
    """``n`` prompts of ``task`` as a ``datasets.Dataset`` with a ``prompt`` column (TRL's standard format)."""
    from datasets import Dataset

    problems = task.sample_problems(random.Random(f"{task.name}-trl-{seed}"), n)
    return Dataset.from_dict({"prompt": [p.prompt for p in problems]})


def task_reward(task: Task) -> Callable[..., list[float]]:
    """TRL reward function: ``task``'s verifier on each decoded completion (1.0 for the exact answer)."""

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [task.verify(prompt, completion) for prompt, completion in zip(prompts, completions)]

    reward.__name__ = f"{task.name}_exact_match"
    return reward
