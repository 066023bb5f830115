"""What determines a run, and what it builds.

:class:`TrainConfig` (saved in config.json) holds the model's
:class:`~mtpdiag.model.GPTConfig` (the one home of the model's fields; the
vocabulary comes from the task) and a :class:`DiagnosticsConfig` (what the Probe
measures every ``diag_every`` steps). On disk and on the command line the config
is one flat dict, ``--d-model`` and ``--diag-every`` side by side:
:meth:`TrainConfig.to_dict` and :meth:`TrainConfig.from_dict` map it to and
from the nested objects, and :func:`flat_fields` lists its keys for the CLI.

:func:`build_task` and :func:`build_model` turn a config into the task and the
model; :func:`step_seed` makes the randomness of every step a function of the
run's seed and the step alone.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from . import regimes
from .diagnostics import HVP_MODES, PROBE_HVP_MODES, Probe, default_forward
from .distributed import is_main_process
from .evaluation import j_true_batch
from .hook import CSVSink, DiagnosticsHook, MemorySink, every
from .losses import LAMBDA_PLACEMENTS, j_true
from .integrations import require_unwrapped
from .model import GPT, GPTConfig, GPTOutput
from .tasks import TASKS, Task, make_task

OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Fields a resumed run may change: the step budget, and where it runs. Not the thread
# count: the numbers depend on it bit for bit (it is part of the SFT cache key).
RESUMABLE_FIELDS = ("steps", "device")
# an lr above these is far outside what the optimizer trains with (a warning, not an error:
# a run may probe divergence on purpose, and the collapse flags then mark it)
LARGE_LR = {"sgd": 1.0, "adamw": 0.1}
# the model's fields in the flat dict (the vocabulary is the task's)
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")
DIAG_PREFIX = "diag_"  # DiagnosticsConfig's field f is the flat key diag_<f> (--diag-<f>)


# ----------------------------------------------------------------------------- diagnostics


TOP_CURVATURE_STEPS = ("none", "first_last", "all")
# the gradient's own objective (always measured), held-out J_true and J_batch without the clip
CURVE_OBJECTIVES = ("j_batch", "j_true", "j_unclipped")
DEFAULT_CURVE_OBJECTIVES = CURVE_OBJECTIVES[:2]


@dataclass
class DiagnosticsConfig:
    """The exact MTP decomposition (Probe) of the trained update inside the trainer:
    on every mini-batch of every ``every``-th RL step (0: off), a curve Delta(lambda)
    of the real optimizer step per objective in ``objectives`` (on the mini-batches
    ``minibatches`` lists, by index; empty: every one), per parameter block
    with ``per_block``, g^T H g (kappa_g: one more Hessian-vector product per objective
    and mini-batch) with ``gg_curvature``. The top curvature L (for the L-smooth
    form) costs about ten measurements: ``top_curvature`` takes it on no step,
    on the first and the last measured step, or on all of them. ``reuse_gradients``: on a
    measured mini-batch the trainer splits its backward and hands g and m over (the measured
    step is then the trained one bit for bit, and the run's numbers differ from an unmeasured
    run's by rounding from the first measured mini-batch on); off, the Probe takes its own and
    measuring changes no trained number."""

    every: int = 0
    per_block: bool = True
    top_curvature: str = "first_last"
    objectives: tuple[str, ...] = DEFAULT_CURVE_OBJECTIVES
    hvp_mode: str = HVP_MODES[0]
    gg_curvature: bool = False
    minibatches: tuple[int, ...] = ()  # the mini-batch indices measured on a measured step (empty: all)
    reuse_gradients: bool = True

    def __post_init__(self):
        self.objectives = tuple(self.objectives)  # config.json holds a list
        self.minibatches = tuple(int(i) for i in self.minibatches)
        if any(i < 0 for i in self.minibatches) or len(set(self.minibatches)) != len(self.minibatches):
            raise ValueError(f"diag_minibatches={','.join(map(str, self.minibatches))}: list distinct mini-batch "
                             "indices from 0 (or none, for every mini-batch)")
        if self.every < 0:
            raise ValueError(f"diag_every={self.every} must be >= 0 (0 turns the diagnostics off)")
        if self.top_curvature not in TOP_CURVATURE_STEPS:
            raise ValueError(f"diag_top_curvature={self.top_curvature!r}: choose one of {list(TOP_CURVATURE_STEPS)}")
        if self.hvp_mode not in PROBE_HVP_MODES:
            raise ValueError(f"diag_hvp_mode={self.hvp_mode!r}: choose one of {list(PROBE_HVP_MODES)}")
        unknown = sorted(set(self.objectives) - set(CURVE_OBJECTIVES))
        if unknown or len(set(self.objectives)) != len(self.objectives) or CURVE_OBJECTIVES[0] not in self.objectives:
            raise ValueError(
                f"diag_objectives={','.join(self.objectives)}: list each of {list(CURVE_OBJECTIVES)} at most once, "
                f"{CURVE_OBJECTIVES[0]} included (the Probe always measures the gradient's own objective)"
            )

    def top_curvature_schedule(self, steps: int) -> Callable[[int], bool] | None:
        """The measured steps (of ``steps`` RL steps) that also get the top curvature L."""
        measured = range(self.every, steps + 1, self.every) if self.every else range(0)
        if self.top_curvature == "none" or not measured:
            return None
        chosen = set(measured) if self.top_curvature == "all" else {measured[0], measured[-1]}
        return chosen.__contains__

    def hook(self, steps: int, out: str | os.PathLike, model, losses) -> DiagnosticsHook:
        """The trainer's hook: the Probe of ``model`` on the regime's ``losses``
        (:class:`~mtpdiag.regimes.RegimeLosses`: J_batch, the MTP loss, where its lambda
        sits, the clip fraction; and held-out J_true, J_batch unclipped as configured) into
        ``out/diag_{steps,curves,blocks}.csv`` (rank 0 writes them). S is the joint
        model's (``shared_forward``), so a detached regime shows what its MTP loss
        reaches (or leaks into) there."""
        probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward, shared_forward=default_forward,
                      hvp_mode=self.hvp_mode, aux_sign_dependent=losses.aux_sign_dependent)
        extra = {"j_unclipped": losses.unclipped_objective} if "j_unclipped" in self.objectives else {}
        return DiagnosticsHook(
            probe,
            schedule=every(self.every),
            sink=CSVSink(out) if is_main_process() else MemorySink(),
            eval_objective=j_true if "j_true" in self.objectives else None,
            extra_objectives=extra,
            clip_fraction=losses.clip_fraction,
            per_block=self.per_block,
            gg_curvature=self.gg_curvature,
            top_curvature_schedule=self.top_curvature_schedule(steps),
            minibatches=self.minibatches or None,
            reuse_gradients=self.reuse_gradients,
        )


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as config.json. The defaults are the
    "small config" (about 1M parameters) measured in the README."""

    # task
    task: str = "addition"
    task_options: dict = field(default_factory=dict)
    model: GPTConfig = field(default_factory=GPTConfig)
    # SFT warm start: next-token + MTP cross-entropy on target completions, stopped
    # once J_true on a validation set (disjoint seed from the held-out set) reaches
    # sft_target (None: run all sft_steps), checked every sft_eval_every steps
    sft_steps: int = 3000
    sft_target: float | None = 0.5
    sft_eval_every: int = 25
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_mtp_weight: float = 1.0
    # RL
    steps: int = 200
    prompts_per_step: int = 32
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None: the task's longest correct completion
    minibatches: int = 2
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    regime: str = regimes.DETACH.name  # a name in regimes.REGIMES
    lam: float | None = None  # the fixed MTP coefficient (None: regimes.DEFAULT_LAMBDA), where the regime has one
    calibrator: str | None = None  # a calibrated regime's lambda_t: a name in calibrators.CALIBRATORS; None: fixed lam
    lambda_placement: str = LAMBDA_PLACEMENTS[0]  # a policy loss's lambda on the advantages or the objective (s.4)
    detach_mode: str = "full"
    # evaluation, bookkeeping
    eval_every: int = 20
    eval_prompts: int = 256
    eval_samples: int = 4
    checkpoint_every: int = 50
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    # CPU threads of torch's kernels for this run and its SFT (None: torch's default here,
    # torch.get_num_threads()). Sums, and so the weights, change with it in the last bits.
    threads: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {sorted(TASKS)}")
        for name, value, choices in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("detach_mode", self.detach_mode, tuple(regimes.DETACH_MODES)),
            ("dtype", self.dtype, tuple(DTYPES)),
            ("lambda_placement", self.lambda_placement, LAMBDA_PLACEMENTS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}: choose one of {list(choices)}")
        regimes.get(self.regime).validate(self)
        for name in ("steps", "prompts_per_step", "group_size", "minibatches", "eval_every", "eval_prompts",
                     "eval_samples", "checkpoint_every", "sft_batch_size", "sft_eval_every", "sft_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.sft_target is not None and not 0 < self.sft_target <= 1:
            raise ValueError(f"sft_target={self.sft_target} is a J_true in (0, 1]; 'none' runs all sft_steps")
        beyond = [i for i in self.diagnostics.minibatches if i >= self.minibatches]
        if beyond:
            raise ValueError(f"diag_minibatches lists {beyond}, but a step has mini-batches 0 to {self.minibatches - 1}: "
                             "lower the indices or raise --minibatches")
        if self.minibatches > self.prompts_per_step * self.group_size:
            raise ValueError(
                f"minibatches={self.minibatches} exceeds the {self.prompts_per_step * self.group_size} rollouts per "
                "step (prompts_per_step * group_size): lower --minibatches"
            )
        for name in ("lr", "sft_lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a finite number > 0")
        for name in ("weight_decay", "eps_low", "eps_high", "sft_mtp_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if self.lam is not None and not math.isfinite(self.lam):
            raise ValueError(f"lam={self.lam} must be a finite number (or 'none' for the regime's default)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1 ('none': the task's longest)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be at least 1 ('none': torch's default on this machine)")
        if self.model.vocab_size is not None:
            raise ValueError(f"model.vocab_size={self.model.vocab_size}: the vocabulary is the task's, leave it None")
        if not 0 <= self.model.dropout < 1:
            raise ValueError(f"dropout={self.model.dropout} must be in [0, 1)")
        deepest = self.model.block_size - 2  # head k predicts the token k+1 positions ahead
        if self.model.n_mtp > deepest:
            raise ValueError(
                f"n_mtp={self.model.n_mtp}: head k predicts the token k+1 positions ahead, so with "
                f"block_size={self.model.block_size} no head beyond {max(deepest, 0)} has a target: set --n-mtp "
                f"{max(deepest, 1)} or less, or raise --block-size"
            )

    def risky_values(self) -> list[str]:
        """Values that are valid but almost surely not meant (the trainer warns about each)."""
        risky = []
        if self.lr > LARGE_LR[self.optimizer]:
            risky.append(
                f"lr={self.lr:g} is far above what {self.optimizer} trains with (above {LARGE_LR[self.optimizer]:g}): "
                "expect the run to diverge or collapse; lower --lr"
            )
        return risky

    def to_dict(self) -> dict:
        """The flat dict of config.json and the CLI: the model's fields and ``diag_<field>``
        in place of the nested configs."""
        flat = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                flat.update({name: getattr(value, name) for name in MODEL_FIELDS})
            elif f.name == "diagnostics":
                flat.update({DIAG_PREFIX + d.name: _plain(getattr(value, d.name)) for d in fields(value)})
            else:
                flat[f.name] = _plain(value)
        return flat

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of a flat dict (a missing key takes its default)."""
        unknown = sorted(set(values) - {f.name for f in flat_fields()})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
        diagnostics = {k.removeprefix(DIAG_PREFIX): v for k, v in values.items() if k.startswith(DIAG_PREFIX)}
        own = {k: v for k, v in values.items() if k not in model and not k.startswith(DIAG_PREFIX)}
        return cls(model=GPTConfig(**model), diagnostics=DiagnosticsConfig(**diagnostics), **own)

    def with_values(self, **flat) -> "TrainConfig":
        """This config with some flat keys changed (``cfg.with_values(d_model=64, steps=10)``)."""
        return TrainConfig.from_dict({**self.to_dict(), **flat})


def threads_of(cfg: TrainConfig) -> int:
    """The thread count ``cfg`` runs with: its own, else torch's current default."""
    return cfg.threads if cfg.threads is not None else torch.get_num_threads()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plain(value):
    """A JSON value: a copy of a dict, a list for a tuple."""
    if isinstance(value, dict):
        return dict(value)
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class FlatField:
    name: str
    type: str  # the annotation, e.g. "int" or "float | None"
    default: object


def flat_fields() -> list[FlatField]:
    """The keys of :meth:`TrainConfig.to_dict`, in order, with their types and defaults."""
    out = []
    for f in fields(TrainConfig):
        if f.name == "model":
            out += [FlatField(g.name, g.type, g.default) for g in fields(GPTConfig) if g.name in MODEL_FIELDS]
        elif f.name == "diagnostics":
            out += [FlatField(DIAG_PREFIX + d.name, d.type, _default(d)) for d in fields(DiagnosticsConfig)]
        else:
            out.append(FlatField(f.name, f.type, _default(f)))
    return out


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


# ----------------------------------------------------------------------------- what a config builds


def max_new_tokens(cfg: TrainConfig, task: Task) -> int:
    return task.max_completion_len if cfg.max_new_tokens is None else cfg.max_new_tokens


def build_task(cfg: TrainConfig) -> Task:
    """The task, after checking that the model and generation length fit it."""
    task = make_task(cfg.task, **cfg.task_options)
    max_new = max_new_tokens(cfg, task)
    if max_new < task.max_completion_len:
        raise ValueError(
            f"max_new_tokens={max_new} is shorter than task {cfg.task!r}'s correct completions "
            f"({task.max_completion_len} tokens with EOS): raise --max-new-tokens"
        )
    needed = task.min_block_size(max_new)
    if cfg.model.block_size < needed:
        raise ValueError(
            f"block_size={cfg.model.block_size} is too small for task {cfg.task!r}: prompts take {task.prompt_len} "
            f"tokens and completions up to {max_new}, so set --block-size {needed} or more"
        )
    # head k predicts the token k+1 positions ahead, within a sequence of at most `needed` tokens
    if cfg.model.n_mtp > needed - 2:
        raise ValueError(
            f"n_mtp={cfg.model.n_mtp}: head k predicts the token k+1 positions ahead, and task {cfg.task!r}'s "
            f"sequences are at most {needed} tokens long, so no head beyond {needed - 2} has a target: set --n-mtp "
            f"{max(needed - 2, 1)} or less"
        )
    return task


def step_seed(seed: int, step: int, stream: str) -> int:
    """An independent seed for each (run seed, step, purpose)."""
    return int(np.random.SeedSequence([seed, step, int.from_bytes(stream.encode(), "little")]).generate_state(1)[0])


def build_model(cfg: TrainConfig, task: Task) -> GPT:
    """mtpdiag's GPT of ``cfg.model`` over the task's vocabulary, initialised from the run's seed."""
    torch.manual_seed(step_seed(cfg.seed, 0, "init"))
    model = GPT(replace(cfg.model, vocab_size=task.tokenizer.vocab_size))
    return model.to(device=cfg.device, dtype=DTYPES[cfg.dtype])


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser over the model's trainable parameters (a frozen one, requires_grad
    False, gets no step: not even AdamW's weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_model(model: nn.Module, cfg: TrainConfig, task: Task) -> None:
    """Reject a user model the trainer cannot run, naming the fix."""
    require_unwrapped(model)
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    wrong = {f"{p.dtype} on {p.device}" for p in model.parameters() if p.dtype != dtype or p.device.type != device.type}
    if wrong:
        raise ValueError(
            f"the model has parameters in {sorted(wrong)} but the config says dtype={cfg.dtype}, device={cfg.device}: "
            f"call model.to(device={cfg.device!r}, dtype=torch.{cfg.dtype}) or change the config"
        )
    if not isinstance(getattr(model, "mtp_heads", None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no `mtp_heads` module: the trainer logs their gradient norm")
    probe_batch = j_true_batch(task, task.heldout_problems(1), cfg.device)
    with torch.no_grad():
        output = model(probe_batch["input_ids"])
    vocab, n_mtp = task.tokenizer.vocab_size, cfg.model.n_mtp
    if not isinstance(output, GPTOutput) or len(output.mtp) != n_mtp or output.main.logits.size(-1) != vocab:
        got = (f"{len(output.mtp)} MTP heads over {output.main.logits.size(-1)} tokens"
               if isinstance(output, GPTOutput) else type(output).__name__)
        raise ValueError(
            f"the model returned {got}; the trainer needs a GPTOutput with n_mtp={n_mtp} MTP heads over "
            f"task {cfg.task!r}'s {vocab} tokens: build it with that vocabulary and n_mtp (or set --n-mtp)"
        )
