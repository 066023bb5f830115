"""SFT warm start, then RL with MTP heads, in one file (nanoGPT spirit).

RL step (GRPO/DAPO style, no KL): sample ``prompts_per_step`` prompts, ``group_size``
completions each (temperature sampling, EOS, ``max_new_tokens``), reward them with
the task's verifier, normalise rewards within each group, recompute pi_old, call the
callbacks, then take one optimiser step per mini-batch on

    loss = -J_batch + sum_k lambda_k * L_MTP,k

where J_batch is the main head's clipped token-level surrogate and L_MTP depends on
the regime:

* ``detach``: MTP cross-entropy on a graph cut from every parameter the main head
  uses (``detach_mode=full``) or only from the trunk (``trunk_only``), weight 1,
  so the heads keep learning; ``lam`` does not apply.
* ``ce``: MTP cross-entropy on the sampled tokens (no advantages), fixed ``lam``.
* ``policy``: the main head's clipped loss on the MTP heads' log-probs, ratio
  exp(log q_k - log pi_old(main)), fixed ``lam``.
* ``occ``: ``policy`` with lambda_t from a :class:`~mtpdiag.calibrators.Calibrator`,
  called once per mini-batch (``FixedLambda(lam)`` unless one is given).

Randomness of step s is a function of (seed, s) only, so a resumed run repeats
an uninterrupted one bit for bit, and callbacks cannot shift the trajectory.

Data parallel (``torchrun --nproc_per_node N``, or a process group the caller
initialised): rank 0 runs the SFT warm start and sends its weights to the other
ranks; every rank samples the whole rollout batch (same generator, same
weights, so the same batch as one process) and keeps its part of each
optimiser mini-batch; losses are each rank's share of the whole-batch loss
(:func:`mtpdiag.distributed.global_means`), gradients are summed over ranks
and every rank takes the same optimiser step. Nothing is wrapped in DDP, so
the diagnostics run on the raw module. Evaluation runs whole on every rank.
The metrics equal those of one process on the same global batch (with dropout
0: dropout masks depend on the shard); rank 0 alone writes the run directory,
checkpoints and the SFT cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import __version__
from .calibrators import CALIBRATORS, CalibrationInputs, Calibrator, FixedLambda, make_calibrator
from .distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_tensors,
    global_means,
    is_main_process,
    process_group_from_env,
    run_on_main,
    shard,
    world_size,
)
from .evaluation import (
    completion_rewards,
    exact_j_true,
    j_true_batch,
    rollout_mask,
    sample_completions,
    sampled_pass_at_1,
)
from .hook import CSVSink, DiagnosticsHook, MemorySink, every
from .integrations import require_unwrapped
from .losses import AlignedLogprobs, aligned_logprobs, group_advantages, j_true, mtp_ce_loss, mtp_policy_loss
from .losses import rl_objective
from .losses import sft_loss, token_logprobs
from .model import GPT, GPTConfig, GPTOutput
from .diagnostics import default_forward
from .rundir import RunDir
from .tasks import TASKS, Task, make_task

REGIMES = ("detach", "ce", "policy", "occ")
DETACH_MODES = {"full": "detach", "trunk_only": "detach_trunk_only"}
OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_LAMBDA = 1.0
# Fields a resumed run may change: the step budget, and where it runs.
RESUMABLE_FIELDS = ("steps", "device")
# SFT stops on J_true over these prompts (the held-out evaluation set uses the task's default seed)
SFT_VALIDATION_SEED, SFT_VALIDATION_PROMPTS = 1, 256
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as config.json. The defaults are the
    "small config" (about 1M parameters) measured in the README."""

    # task
    task: str = "addition"
    task_options: dict = field(default_factory=dict)
    # model (GPTConfig fields; the vocabulary comes from the task)
    block_size: int = 32
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True
    n_mtp: int = 1
    mtp_wiring: str = "parallel"
    attention: str = "math"
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
    regime: str = "detach"
    lam: float | None = None  # MTP coefficient for ce/policy/occ; None: DEFAULT_LAMBDA
    calibrator: str | None = None  # occ's lambda_t: a name in calibrators.CALIBRATORS; None: fixed lam
    detach_mode: str = "full"
    # evaluation, bookkeeping
    eval_every: int = 20
    eval_prompts: int = 256
    eval_samples: int = 4
    checkpoint_every: int = 50
    # exact MTP decomposition (Probe) every diag_every RL steps, on J_batch and on J_true; 0: off
    diag_every: int = 0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose one of {sorted(TASKS)}")
        for name, value, choices in (
            ("regime", self.regime, REGIMES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("detach_mode", self.detach_mode, tuple(DETACH_MODES)),
            ("dtype", self.dtype, tuple(DTYPES)),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}: choose one of {list(choices)}")
        if self.regime == "detach" and self.lam is not None:
            raise ValueError(
                "lam does not apply to regime 'detach' (its MTP heads train on a detached graph with weight 1): "
                "drop --lam, or choose --regime ce, policy or occ"
            )
        if self.calibrator is not None:
            if self.regime != "occ":
                raise ValueError(f"calibrator applies only to regime 'occ', not {self.regime!r}: drop --calibrator")
            if self.calibrator not in CALIBRATORS:
                raise ValueError(f"unknown calibrator {self.calibrator!r}: choose one of {sorted(CALIBRATORS)}")
            if self.lam is not None:
                raise ValueError(f"lam does not apply when calibrator {self.calibrator!r} sets lambda_t: drop --lam")
        if self.regime != "detach" and self.detach_mode != "full":
            raise ValueError(f"detach_mode applies only to regime 'detach', not {self.regime!r}: drop --detach-mode")
        for name in ("steps", "prompts_per_step", "group_size", "minibatches", "eval_every", "eval_prompts",
                     "eval_samples", "checkpoint_every", "sft_batch_size", "sft_eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.sft_target is not None and not 0 < self.sft_target <= 1:
            raise ValueError(f"sft_target={self.sft_target} is a J_true in (0, 1]; 'none' runs all sft_steps")
        if self.diag_every < 0:
            raise ValueError(f"diag_every={self.diag_every} must be >= 0 (0 turns the diagnostics off)")
        if self.sft_steps < 1:
            raise ValueError(f"sft_steps={self.sft_steps} must be at least 1")
        if self.minibatches > self.prompts_per_step * self.group_size:
            raise ValueError(
                f"minibatches={self.minibatches} exceeds the {self.prompts_per_step * self.group_size} rollouts per "
                "step (prompts_per_step * group_size): lower --minibatches"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        self.model_config(vocab_size=2)  # GPTConfig validates wiring, attention and head sizes

    @property
    def mtp_lambda(self) -> float:
        """The fixed MTP coefficient of ce/policy (and of occ's default calibrator)."""
        return DEFAULT_LAMBDA if self.lam is None else self.lam

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in MODEL_FIELDS})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**values)


def build_task(cfg: TrainConfig) -> Task:
    """The task, after checking that the model and generation length fit it."""
    task = make_task(cfg.task, **cfg.task_options)
    max_new = max_new_tokens(cfg, task)
    if max_new < task.max_completion_len:
        raise ValueError(
            f"max_new_tokens={max_new} is shorter than task {cfg.task!r}'s correct completions "
            f"({task.max_completion_len} tokens with EOS): raise --max-new-tokens"
        )
    needed = task.prompt_len + max_new
    if cfg.block_size < needed:
        raise ValueError(
            f"block_size={cfg.block_size} is too small for task {cfg.task!r}: prompts take {task.prompt_len} tokens "
            f"and completions up to {max_new}, so set --block-size {needed} or more"
        )
    return task


def max_new_tokens(cfg: TrainConfig, task: Task) -> int:
    return task.max_completion_len if cfg.max_new_tokens is None else cfg.max_new_tokens


def step_seed(seed: int, step: int, stream: str) -> int:
    """An independent seed for each (run seed, step, purpose)."""
    return int(np.random.SeedSequence([seed, step, int.from_bytes(stream.encode(), "little")]).generate_state(1)[0])


def build_model(cfg: TrainConfig, task: Task) -> GPT:
    torch.manual_seed(step_seed(cfg.seed, 0, "init"))
    model = GPT(cfg.model_config(task.tokenizer.vocab_size))
    return model.to(device=cfg.device, dtype=DTYPES[cfg.dtype])


# ----------------------------------------------------------------------------- regimes


@dataclass(frozen=True)
class RegimeLosses:
    """What the trainer optimises on one mini-batch, as pure functions of
    (model output, batch): loss = -objective(out, batch) + aux_loss(out, batch, lambdas).
    ``aux_loss`` with no head weights is L_MTP summed over heads with weight 1."""

    regime: str
    mtp_detach: str
    eps_low: float
    eps_high: float

    def forward(self, model, batch: dict) -> GPTOutput:
        return model(batch["input_ids"], mtp_detach=self.mtp_detach)

    def objective(self, out: GPTOutput, batch: dict) -> torch.Tensor:
        return rl_objective(out, batch, self.eps_low, self.eps_high)

    def aux_loss(self, out: GPTOutput, batch: dict, head_weights=None) -> torch.Tensor:
        if self.regime in ("detach", "ce"):
            return mtp_ce_loss(out, batch, head_weights)
        return mtp_policy_loss(out, batch, head_weights, self.eps_low, self.eps_high)


def regime_losses(cfg: TrainConfig) -> RegimeLosses:
    mtp_detach = DETACH_MODES[cfg.detach_mode] if cfg.regime == "detach" else "none"
    return RegimeLosses(cfg.regime, mtp_detach, cfg.eps_low, cfg.eps_high)


# ----------------------------------------------------------------------------- SFT warm start


def sft_hash(cfg: TrainConfig) -> str:
    """Hash of everything that determines the SFT weights."""
    keys = ("task", "task_options", *MODEL_FIELDS, "sft_steps", "sft_target", "sft_eval_every", "sft_batch_size",
            "sft_lr", "sft_mtp_weight", "seed", "dtype")
    spec = {key: getattr(cfg, key) for key in keys}
    spec["device_type"] = torch.device(cfg.device).type
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sft_cache_file(cfg: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir or $MTPDIAG_CACHE or ~/.cache/mtpdiag>/sft/<hash>.pt``."""
    root = cache_dir or os.environ.get("MTPDIAG_CACHE") or Path.home() / ".cache" / "mtpdiag"
    return Path(root) / "sft" / f"{sft_hash(cfg)}.pt"


def run_sft(cfg: TrainConfig, task: Task, progress: bool | None = None, model: nn.Module | None = None):
    """Supervised warm start on target completions: next-token + MTP cross-entropy,
    until validation J_true reaches ``sft_target``. Trains ``model`` in place
    (default: a new GPT from ``cfg``). Returns (model, summary)."""
    model = build_model(cfg, task) if model is None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    rng = random.Random(step_seed(cfg.seed, 0, "sft"))
    validation = j_true_batch(task, task.heldout_problems(SFT_VALIDATION_PROMPTS, SFT_VALIDATION_SEED), cfg.device)
    val_j_true = None
    bar = tqdm(range(1, cfg.sft_steps + 1), desc="sft", disable=_tqdm_disable(progress))
    for step in bar:
        model.train()
        problems = task.sample_problems(rng, cfg.sft_batch_size)
        input_ids, response_mask = task.encode_completions(problems, [p.target for p in problems], cfg.device)
        loss = sft_loss(model(input_ids), {"input_ids": input_ids, "response_mask": response_mask}, cfg.sft_mtp_weight)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"SFT step {step}: loss {loss.item()} is not finite: lower --sft-lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.sft_target is not None and step % cfg.sft_eval_every == 0:
            model.eval()
            val_j_true = exact_j_true(model, validation)
            bar.set_postfix(val_j_true=f"{val_j_true:.3f}")
            if val_j_true >= cfg.sft_target:
                break
    bar.close()
    if cfg.sft_target is not None and (val_j_true is None or val_j_true < cfg.sft_target):
        warnings.warn(
            f"SFT ran all sft_steps={cfg.sft_steps} and ended at validation J_true {val_j_true}, short of "
            f"sft_target={cfg.sft_target}: raise --sft-steps (or --sft-lr) to reach it"
        )
    return model, {"sft_steps_run": step, "sft_val_j_true": val_j_true}


def warm_start(
    cfg: TrainConfig, task: Task, cache_dir=None, progress: bool | None = None, model: nn.Module | None = None
):
    """The SFT model, trained once per SFT config and then read from the cache, so
    every regime with the same seed starts from the same weights.
    Returns (model, {"sft_cache_file", "sft_steps_run", "sft_val_j_true"}).

    ``model``: warm-start this module in place instead of mtpdiag's GPT. It is not
    cached (``sft_cache_file`` None): the cache key is the config, which sees neither
    a module's architecture nor its initial weights, and a stale hit would load
    wrong weights silently."""
    if model is not None:
        model, summary = run_sft(cfg, task, progress, model)
        return model, {"sft_cache_file": None, **summary}
    file = sft_cache_file(cfg, cache_dir)
    if file.exists():
        saved = torch.load(file, map_location=cfg.device, weights_only=True)
        model = build_model(cfg, task)
        model.load_state_dict(saved["model"])
        summary = saved["summary"]
    else:
        model, summary = run_sft(cfg, task, progress)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        torch.save({"model": model.state_dict(), "summary": summary}, tmp)
        os.replace(tmp, file)
    return model, {"sft_cache_file": str(file), **summary}


# ----------------------------------------------------------------------------- rollout


def rollout(model: GPT, task: Task, cfg: TrainConfig, step: int) -> tuple[dict, torch.Tensor]:
    """Sample G completions for each of this step's prompts and build the RL batch
    (input_ids, response_mask, old_logprobs, advantages). Returns (batch, rewards)."""
    prompt_rng = random.Random(step_seed(cfg.seed, step, "prompts"))
    problems = [p for p in task.sample_problems(prompt_rng, cfg.prompts_per_step) for _ in range(cfg.group_size)]
    prompt_ids = task.encode_prompts(problems, cfg.device)
    generator = torch.Generator(cfg.device).manual_seed(step_seed(cfg.seed, step, "rollout"))
    tok = task.tokenizer
    model.eval()
    completions = sample_completions(
        model, prompt_ids, max_new_tokens(cfg, task), tok.eos_id, tok.pad_id, cfg.temperature, generator
    )
    rewards = completion_rewards(task, problems, completions).to(cfg.device, DTYPES[cfg.dtype])
    input_ids = torch.cat([prompt_ids, completions], dim=1)
    with torch.no_grad():  # pi_old, recomputed by the model about to be updated
        old_logprobs = token_logprobs(model(input_ids, with_mtp=False).main)
    batch = {
        "input_ids": input_ids,
        "response_mask": rollout_mask(task.prompt_len, completions, tok.eos_id).to(old_logprobs.dtype),
        "old_logprobs": old_logprobs,
        "advantages": group_advantages(rewards, cfg.group_size),
    }
    return batch, rewards


# ----------------------------------------------------------------------------- evaluation


EVAL_COLUMNS = {"j_true", "pass1", "pass1_ci_low", "pass1_ci_high"}


def evaluate(model: GPT, task: Task, cfg: TrainConfig, heldout: dict, step: int) -> dict:
    """Exact J_true on the held-out batch and sampled pass@1 (temperature 1, so it
    estimates the same quantity) with its 95% interval."""
    model.eval()
    generator = torch.Generator(cfg.device).manual_seed(step_seed(cfg.seed, step, "eval"))
    problems = task.heldout_problems(cfg.eval_prompts)
    pass1 = sampled_pass_at_1(
        model, task, problems, cfg.eval_samples, max_new_tokens(cfg, task), 1.0, generator, cfg.device
    )
    return {
        "j_true": exact_j_true(model, heldout),
        "pass1": pass1.mean,
        "pass1_ci_low": pass1.ci_low,
        "pass1_ci_high": pass1.ci_high,
    }


# ----------------------------------------------------------------------------- RL loop


@dataclass
class StepContext:
    """What a callback sees, once per RL step, after the rollout batch is built and
    before the optimiser update (model in training mode, as the update sees it).
    Callbacks must not change the model, its gradients, the optimiser or the batch.
    On several ranks ``batch``, ``rewards`` and ``j_true_batch`` are this rank's
    rows (the Probe sums over ranks); callbacks run on every rank, and should
    write files on rank 0 only (:func:`mtpdiag.distributed.is_main_process`)."""

    step: int
    model: nn.Module
    batch: dict
    rewards: torch.Tensor
    j_true_batch: dict
    lr: float
    optimizer: torch.optim.Optimizer
    losses: RegimeLosses
    calibrator: Calibrator | None
    cfg: TrainConfig
    task: Task


Callback = Callable[[StepContext], "dict | None"]


@dataclass
class TrainResult:
    model: GPT
    metrics: pd.DataFrame
    out: Path


def make_optimizer(cfg: TrainConfig, model: GPT) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _tqdm_disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm hides the bar when not on a TTY


def _grad_norm(params) -> float:
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def minibatch_rows(n: int, minibatches: int, device=None) -> list[torch.Tensor]:
    """This rank's rows of each optimiser mini-batch: the mini-batches are consecutive
    chunks of the step's ``n`` rollouts, as on one process, and each is split into
    one consecutive part per rank (:func:`mtpdiag.distributed.shard`)."""
    return [index[shard(index.numel(), device)] for index in torch.arange(n, device=device).chunk(minibatches)]


def check_shards(cfg: TrainConfig) -> None:
    """Every rank needs at least one rollout of every mini-batch and one held-out prompt."""
    ranks = world_size()
    rollouts = torch.arange(cfg.prompts_per_step * cfg.group_size)
    smallest = min(chunk.numel() for chunk in rollouts.chunk(cfg.minibatches))
    if smallest < ranks:
        raise ValueError(
            f"a mini-batch of {smallest} rollouts cannot give each of the {ranks} ranks one: raise "
            f"--prompts-per-step or --group-size, or lower --minibatches (or the number of ranks)"
        )
    if cfg.eval_prompts < ranks:
        raise ValueError(
            f"eval_prompts={cfg.eval_prompts} cannot give each of the {ranks} ranks a held-out prompt: "
            "raise --eval-prompts"
        )


def update(model, optimizer, batch, losses, cfg, calibrator, step, on_nonfinite) -> list[dict]:
    """One optimiser step per mini-batch of the step's rollout ``batch``; returns one
    metrics row per mini-batch. On several ranks each computes its share of every
    loss on its rows, the gradients are summed over ranks, and the rows hold the
    whole mini-batch's numbers."""
    model.train()
    n = batch["input_ids"].size(0)
    rows = []
    for mb, index in enumerate(minibatch_rows(n, cfg.minibatches, cfg.device)):
        with global_means():
            row = _update_minibatch(model, optimizer, batch, index, mb, losses, cfg, calibrator, step, on_nonfinite)
        rows.append(row)
    return rows


def _update_minibatch(model, optimizer, batch, index, mb, losses, cfg, calibrator, step, on_nonfinite) -> dict:
    """The optimiser step on the rows ``index`` of ``batch``; its metrics row."""
    K = cfg.n_mtp
    mbatch = {key: value[index] for key, value in batch.items()}
    out = losses.forward(model, mbatch)
    j_batch = losses.objective(out, mbatch)
    row = {"step": step, "minibatch": mb}
    if cfg.regime == "detach":
        lambdas = torch.ones(K, dtype=DTYPES[cfg.dtype])
    elif cfg.regime in ("ce", "policy"):
        lambdas = torch.full((K,), cfg.mtp_lambda, dtype=DTYPES[cfg.dtype])
    else:
        lp = aligned_logprobs(out)
        calibration = calibrator(
            CalibrationInputs(
                step=step, minibatch=mb,
                logprobs=AlignedLogprobs(lp.main.detach(), lp.mtp.detach(), lp.mtp_valid),
                old_logprobs=mbatch["old_logprobs"], response_mask=mbatch["response_mask"],
                lr=optimizer.param_groups[0]["lr"], model=model, batch=mbatch,
                forward=losses.forward, objective=losses.objective, aux_loss=losses.aux_loss,
            )
        )
        lambdas = calibration.lambdas.detach()
        if lambdas.shape != (K,) or not torch.isfinite(lambdas).all():
            raise ValueError(
                f"calibrator {calibrator.name} returned lambdas {lambdas.tolist()} at step {step}, "
                f"mini-batch {mb}: it must return {K} finite values, one per MTP head"
            )
        row.update({f"calib_{key}": value for key, value in calibration.info.items()})
    if cfg.regime != "detach":
        row.update({f"lambda_{k}": lam for k, lam in enumerate(lambdas.tolist())})
    aux = losses.aux_loss(out, mbatch, lambdas)
    loss = aux - j_batch
    with torch.no_grad():
        loss_mtp = losses.aux_loss(out, mbatch)
    # each rank holds its share of every loss: their sum is the whole mini-batch's value
    values = all_reduce_sum(torch.stack([loss_mtp, j_batch.detach(), aux.detach(), loss.detach()])).tolist()
    row.update(zip(("loss_mtp", "j_batch", "loss_mtp_weighted", "loss_total"), values))
    for name in ("j_batch", "loss_mtp_weighted", "loss_total"):
        if not np.isfinite(row[name]):
            on_nonfinite(f"step {step}, mini-batch {mb}: {name} = {row[name]} is not finite")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_gradients(model.parameters())
    row["grad_norm"] = _grad_norm(model.parameters())
    row["grad_norm_mtp_heads"] = _grad_norm(model.mtp_heads.parameters())
    if not np.isfinite(row["grad_norm"]):
        on_nonfinite(f"step {step}, mini-batch {mb}: the gradient norm {row['grad_norm']} is not finite")
    optimizer.step()
    return row


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    calibrator: Calibrator | None = None,
    callbacks: list[Callback] = (),
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
    model: nn.Module | None = None,
) -> TrainResult:
    """SFT warm start (cached), then ``cfg.steps`` RL steps, logged to the run
    directory ``out``. ``resume`` continues ``out`` from its last checkpoint
    (or starts it when it has none).

    ``model``: train this module, in place, instead of mtpdiag's GPT built from
    ``cfg`` (e.g. an :class:`~mtpdiag.integrations.hf.MTPCausalLM`). Called as
    ``model(idx, mtp_detach=..., with_mtp=...)`` it returns a GPTOutput with
    ``cfg.n_mtp`` MTP heads (``model.mtp_heads``) over the task's vocabulary;
    its parameters are on ``cfg.device`` in ``cfg.dtype``; cfg's other model
    fields do not apply. Its SFT warm start is not cached (see :func:`warm_start`).

    Under ``torchrun`` (or in a process group the caller initialised) every rank
    calls ``train`` with the same arguments (see the module docstring) and gets
    the same metrics; rank 0 alone writes ``out``. Callbacks run on every rank
    and see this rank's rows of the batch, the rewards and the held-out batch.
    """
    with process_group_from_env(cfg.device):
        return _train(cfg, out, resume, calibrator, callbacks, progress, cache_dir, model)


class _RowsInMemory(RunDir):
    """The run directory of a rank other than 0: rows in memory (``train`` returns
    them), no file written."""

    def write_config(self, config: dict) -> None:
        """Rank 0 writes config.json."""

    def save_checkpoint(self, state: dict) -> None:
        """Rank 0 writes checkpoint.pt."""

    def mark_complete(self) -> None:
        """Rank 0 removes the marker."""

    def _write_csv(self) -> None:
        """Rank 0 writes the CSV files."""


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
    vocab = task.tokenizer.vocab_size
    if not isinstance(output, GPTOutput) or len(output.mtp) != cfg.n_mtp or output.main.logits.size(-1) != vocab:
        got = (f"{len(output.mtp)} MTP heads over {output.main.logits.size(-1)} tokens"
               if isinstance(output, GPTOutput) else type(output).__name__)
        raise ValueError(
            f"the model returned {got}; the trainer needs a GPTOutput with n_mtp={cfg.n_mtp} MTP heads over "
            f"task {cfg.task!r}'s {vocab} tokens: build it with that vocabulary and n_mtp (or set --n-mtp)"
        )


def _open_run(run: RunDir, cfg: TrainConfig, calibrator: Calibrator | None, resume: bool) -> dict | None:
    if resume:
        _check_resumable(run, cfg, calibrator)
    return run.open(resume)


def _warm_start_from_main(cfg, task, cache_dir, progress, model):
    """``warm_start`` on rank 0 only (one SFT run, one writer of the cache); the other
    ranks build the same model (or take ``model``) and receive rank 0's weights."""
    warm = {}

    def on_main():
        warm["model"], summary = warm_start(cfg, task, cache_dir, progress, model)
        return summary

    summary = run_on_main(on_main)
    if is_main_process():
        model = warm["model"]
    elif model is None:
        model = build_model(cfg, task)
    broadcast_tensors(model.state_dict().values())
    return model, summary


def _train(cfg, out, resume, calibrator, callbacks, progress, cache_dir, model) -> TrainResult:
    if calibrator is not None and cfg.regime != "occ":
        raise ValueError(f"a calibrator only applies to regime 'occ', not {cfg.regime!r}")
    if cfg.regime == "occ" and calibrator is None:
        calibrator = make_calibrator(cfg.calibrator, cfg.n_mtp) if cfg.calibrator else FixedLambda(cfg.mtp_lambda)
    task = build_task(cfg)
    check_shards(cfg)
    if model is not None:
        check_model(model, cfg, task)
    main = is_main_process()
    run = RunDir(out) if main else _RowsInMemory(out)
    if cfg.diag_every:
        callbacks = [diagnostics_hook(cfg, run.path), *callbacks]
    checkpoint = run_on_main(lambda: _open_run(run, cfg, calibrator, resume))
    if checkpoint is not None and not main:
        run.rows = checkpoint["rows"]
    model, sft_summary = _warm_start_from_main(cfg, task, cache_dir, progress, model)
    run.write_config({
        "config": cfg.to_dict(),
        "model_class": type(model).__name__,
        "calibrator": calibrator.name if calibrator else None,
        "sft": sft_summary,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "world_size": world_size(),
        "versions": {"mtpdiag": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    optimizer = make_optimizer(cfg, model)
    losses = regime_losses(cfg)
    heldout = j_true_batch(task, task.heldout_problems(cfg.eval_prompts), cfg.device)
    heldout_rows = shard(cfg.eval_prompts, cfg.device)
    heldout_shard = {key: value[heldout_rows] for key, value in heldout.items()}
    start = 0
    if checkpoint is not None:
        start = checkpoint["step"]
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if calibrator is not None:
            calibrator.load_state_dict(checkpoint["calibrator"])
    else:
        run.append({"step": 0, **evaluate(model, task, cfg, heldout, 0)}, [])

    def save_checkpoint(step):
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if calibrator is not None:
            state["calibrator"] = calibrator.state_dict()
        run.save_checkpoint(state)

    def on_nonfinite(message):
        where = f"{run.checkpoint_path} holds the last good state" if run.checkpoint_path.exists() else "no checkpoint yet"
        raise NonFiniteLossError(f"{message}; stopped before the update ({where})")

    disable = _tqdm_disable(progress) if main else True
    bar = tqdm(total=cfg.steps, initial=start, desc=f"rl {cfg.regime}", disable=disable)
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        # every rank samples the whole batch (the one a single process would) and trains on its rows
        batch, rewards = rollout(model, task, cfg, step)
        t_rollout = time.perf_counter() - t0
        model.train()
        rows = torch.cat(minibatch_rows(rewards.numel(), cfg.minibatches, cfg.device))
        ctx = StepContext(step, model, {key: value[rows] for key, value in batch.items()}, rewards[rows], heldout_shard,
                          optimizer.param_groups[0]["lr"], optimizer, losses, calibrator, cfg, task)
        t1 = time.perf_counter()
        extra = {}
        for callback in callbacks:
            extra.update(callback(ctx) or {})
        t_callbacks = time.perf_counter() - t1
        torch.manual_seed(step_seed(cfg.seed, step, "update"))  # dropout masks, whatever callbacks drew
        t2 = time.perf_counter()
        mb_rows = update(model, optimizer, batch, losses, cfg, calibrator, step, on_nonfinite)
        t_update = time.perf_counter() - t2
        groups = rewards.view(-1, cfg.group_size)
        row = {
            "step": step,
            "reward_mean": rewards.mean().item(),
            "uniform_group_frac": (groups == groups[:, :1]).all(dim=1).double().mean().item(),
            "response_len_mean": batch["response_mask"].sum(1).mean().item(),
            **pd.DataFrame(mb_rows).drop(columns=["step", "minibatch"]).mean(numeric_only=True).to_dict(),
            "lr": ctx.lr,
            **({"calibrator": calibrator.name} if calibrator is not None else {}),
            "rollout_time_s": t_rollout,
            "update_time_s": t_update,
            "step_time_s": t_rollout + t_update,
            "callback_time_s": t_callbacks,
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row.update(evaluate(model, task, cfg, heldout, step))
        clashes = sorted(set(extra) & (set(row) | EVAL_COLUMNS))
        if clashes:
            raise ValueError(f"callback metrics {clashes} clash with the trainer's columns: rename them")
        row.update(extra)
        run.append(row, mb_rows)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", j_true=f"{row.get('j_true', float('nan')):.3f}")
    bar.close()
    run.mark_complete()
    return TrainResult(model, run.metrics(), run.path)


def diagnostics_hook(cfg: TrainConfig, out: Path) -> DiagnosticsHook:
    """The Probe every ``cfg.diag_every`` steps on the regime's own J_batch and MTP
    loss, with a second curve on held-out J_true, per-block numbers included, into
    ``out/diag_{steps,curves,blocks}.csv``. S is the joint model's, so a detached
    regime shows what its MTP loss reaches (or leaks into) there. The top
    curvature L (for the L-smooth form) costs about ten measurements, so it is
    taken on the first and the last measured step only."""
    measured_steps = range(cfg.diag_every, cfg.steps + 1, cfg.diag_every)
    return DiagnosticsHook(
        schedule=every(cfg.diag_every),
        sink=CSVSink(out) if is_main_process() else MemorySink(),  # rank 0 writes the files
        eval_objective=j_true,
        per_block=True,
        top_curvature_schedule={measured_steps[0], measured_steps[-1]}.__contains__ if measured_steps else None,
        probe_options={"shared_forward": default_forward},
    )


def _check_resumable(run: RunDir, cfg: TrainConfig, calibrator: Calibrator | None) -> None:
    saved = run.read_config()
    if saved is None:
        return
    current = cfg.to_dict()
    differ = sorted(k for k in current if k not in RESUMABLE_FIELDS and saved["config"].get(k) != current[k])
    if differ:
        changes = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"cannot resume {run.path}: its config differs in {changes}; only {list(RESUMABLE_FIELDS)} may change "
            "on resume (start a new --out for a different config)"
        )
    name = calibrator.name if calibrator else None
    if saved["calibrator"] != name:
        raise ValueError(f"cannot resume {run.path}: it ran calibrator {saved['calibrator']!r}, not {name!r}")


def load_run(out: str | Path, device: str | None = None) -> tuple[GPT, TrainConfig, Task]:
    """The model of a run directory's last checkpoint, with its config and task."""
    run = RunDir(out)
    saved = run.read_config()
    if saved is None or not run.checkpoint_path.exists():
        raise FileNotFoundError(f"{out} has no config.json and checkpoint.pt: is it a run directory of `mtpdiag train`?")
    if saved.get("model_class", "GPT") != "GPT":
        raise ValueError(
            f"{out} trained a {saved['model_class']}, not mtpdiag's GPT: build that model and load "
            f"torch.load('{run.checkpoint_path}')['model'] into it"
        )
    values = saved["config"] if device is None else {**saved["config"], "device": device}
    cfg = TrainConfig.from_dict(values)
    task = build_task(cfg)
    model = build_model(cfg, task)
    model.load_state_dict(torch.load(run.checkpoint_path, map_location=cfg.device, weights_only=False)["model"])
    return model, cfg, task
