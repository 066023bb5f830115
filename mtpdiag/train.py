"""The RL loop with MTP heads, and resume (nanoGPT spirit).

A run: the SFT warm start (:mod:`mtpdiag.sft`, cached), then ``cfg.steps`` RL
steps (GRPO/DAPO style, no KL). Each step samples ``prompts_per_step`` prompts,
``group_size`` completions each (:func:`mtpdiag.rollout.rollout`), calls the
callbacks, then takes one optimiser step per mini-batch on

    loss = -J_batch + sum_k lambda_k * L_MTP,k

where J_batch is the main head's clipped token-level surrogate, and the regime
(:mod:`mtpdiag.regimes`) says how the MTP heads are detached, what L_MTP is and
how lambda is chosen (weight 1, the config's fixed ``lam``, or a
:class:`~mtpdiag.calibrators.Calibrator` on every mini-batch).

Randomness of step s is a function of (seed, s) only, so a resumed run repeats
an uninterrupted one bit for bit, and callbacks cannot shift the trajectory.
The run uses ``cfg.threads`` CPU threads (config.json records the count): the
same config, thread count, machine type and torch build give the same numbers
bit for bit.

A run gone wrong is flagged in its metrics (:mod:`mtpdiag.health`); resume and
loading a finished run are :mod:`mtpdiag.resume`.

Data parallel (``torchrun --nproc_per_node N``, or a process group the caller
initialised): every rank samples the whole rollout batch and trains on its part
of each mini-batch, and the metrics equal those of one process on the same
global batch (see :mod:`mtpdiag.distributed`).
"""
from __future__ import annotations

import math
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import __version__, regimes
from .calibrators import CalibrationInputs, Calibrator
from .config import (DTYPES, TrainConfig, build_model, build_task, check_model, make_optimizer, step_seed,
                     threads_of, torch_threads)
from .distributed import (all_reduce_gradients, all_reduce_sum, check_shards, global_means, is_main_process,
                          minibatch_rows, on_main_then_broadcast, process_group_from_env, rank_run_dir, run_on_main,
                          shard, world_size)
from .diagnostics.gradients import UpdateGradients, training_differs
from .health import flag_row
from .hook import DiagnosticsHook
from .losses import AlignedLogprobs, NonFiniteLossError, aligned_logprobs
from .model import GPTOutput
from .progress import Progress
from .regimes import CALIBRATED, UNIT, RegimeLosses
from .resume import calibrator_names, open_run
from .rollout import eval_columns, evaluate, heldout_batch, rollout_with_acceptance
from .rundir import DirectoryLock, check_output_dir
from .schema import METRICS, RUN_FLAGS, calib_column, format_arm_label, lambda_column
from .sft import nonfinite_parameters, warm_start, writable_cache
from .tasks import Task



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
    model: nn.Module
    metrics: pd.DataFrame
    out: Path


def _grad_norm(params) -> float:
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


# ----------------------------------------------------------------------------- the update


@dataclass
class Updater:
    """A run's optimiser update: ``updater(batch, step)`` takes one optimiser step per
    mini-batch of the step's rollout ``batch`` on the regime's loss and returns one
    metrics row per mini-batch. On several ranks each computes its share of every
    loss on its rows, the gradients are summed over ranks, and the rows hold the
    whole mini-batch's numbers. ``diagnostics`` measures each mini-batch's update
    just before the optimiser takes it (on the held-out rows ``heldout`` too); its
    summary and its time (``diag_time_s``) join the mini-batch's row.

    On a mini-batch the diagnostics measure, or for a calibrator that reads gradients
    (the step proxy), the backward is split over the one forward: g, the aux gradient at
    head weight +1 (and what the measurement needs besides), handed to the Probe and the
    calibrator, and the update assembled from them as the Probe replays it
    (:mod:`mtpdiag.diagnostics.gradients`): the measured step is the trained step bit for
    bit, and it differs from one backward over the sum by rounding only (the hook's
    ``reuse_gradients`` off keeps the one backward on measured mini-batches). A model whose
    training forward has randomness (dropout) keeps the one backward."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: RegimeLosses
    calibrator: Calibrator | None
    cfg: TrainConfig
    on_nonfinite: Callable[[str], None]
    diagnostics: DiagnosticsHook | None = None
    heldout: dict | None = None

    def __call__(self, batch: dict, step: int) -> list[dict]:
        self.model.train()
        rows = []
        for mb, index in enumerate(minibatch_rows(batch["input_ids"].size(0), self.cfg.minibatches, self.cfg.device)):
            with global_means():
                rows.append(self._minibatch({key: value[index] for key, value in batch.items()}, step, mb))
        return rows

    def _lambdas(self, out: GPTOutput, mbatch: dict, step: int, mb: int, row: dict,
                 grads: UpdateGradients | None) -> torch.Tensor:
        """The MTP coefficients of one mini-batch: the regime's own, or its calibrator's
        (whose info joins ``row``)."""
        regime, K = self.losses.regime, self.cfg.model.n_mtp
        if regime.lambda_rule != CALIBRATED:
            return regime.lambdas(self.cfg.lam, K, DTYPES[self.cfg.dtype])
        lp = aligned_logprobs(out)
        calibration = self.calibrator(
            CalibrationInputs(
                step=step, minibatch=mb,
                logprobs=AlignedLogprobs(lp.main.detach(), lp.mtp.detach(), lp.mtp_valid),
                old_logprobs=mbatch["old_logprobs"], response_mask=mbatch["response_mask"],
                lr=self.optimizer.param_groups[0]["lr"], model=self.model, batch=mbatch,
                forward=self.losses.forward, objective=self.losses.objective, aux_loss=self.losses.aux_loss,
                gradients=grads,
            )
        )
        lambdas = calibration.lambdas.detach()
        if lambdas.shape != (K,) or not torch.isfinite(lambdas).all():
            raise ValueError(
                f"calibrator {self.calibrator.name} returned lambdas {lambdas.tolist()} at step {step}, "
                f"mini-batch {mb}: it must return {K} finite values, one per MTP head"
            )
        row.update({calib_column(key): value for key, value in calibration.info.items()})
        return lambdas

    def _minibatch(self, mbatch: dict, step: int, mb: int) -> dict:
        """The optimiser step on one mini-batch; its metrics row."""
        losses, model = self.losses, self.model
        measured = self.diagnostics is not None and self.diagnostics.measures(step, mb)
        reused = measured and self.diagnostics.reuse_gradients
        # g and m wanted: the backward passes are split over the one forward (the class docstring)
        split = (reused or (self.calibrator is not None and self.calibrator.reads_gradients)) and not self._stochastic
        with sdpa_kernel(SDPBackend.MATH) if split else nullcontext():  # the Probe's attention: the same gradients
            out = losses.forward(model, mbatch)
        j_batch = losses.objective(out, mbatch)
        # L_MTP at head weight 1: the logged loss_mtp, and on a split backward also G+
        aux_unit = losses.aux_loss(out, mbatch) if split else None
        grads = self._gradients(out, mbatch, j_batch, aux_unit, reused) if split else None
        row = {"step": step, "minibatch": mb}
        lambdas = self._lambdas(out, mbatch, step, mb, row, grads)
        if losses.regime.lambda_rule != UNIT:
            row.update({lambda_column(k): lam for k, lam in enumerate(lambdas.tolist())})
        aux = losses.aux_loss(out, mbatch, lambdas)
        loss = aux - j_batch
        if aux_unit is not None:
            loss_mtp = aux_unit.detach()
        else:
            with torch.no_grad():
                loss_mtp = losses.aux_loss(out, mbatch)
        # each rank holds its share of every loss: their sum is the whole mini-batch's value
        values = all_reduce_sum(torch.stack([loss_mtp, j_batch.detach(), aux.detach(), loss.detach()])).tolist()
        row.update(zip(("loss_mtp", "j_batch", "loss_mtp_weighted", "loss_total"), values))
        where = f"step {step}, mini-batch {mb}"
        for name in ("j_batch", "loss_mtp_weighted", "loss_total"):
            if not np.isfinite(row[name]):
                self.on_nonfinite(f"{where}: {name} = {row[name]} is not finite{_culprits(model)}; "
                                  "stopped before the update")
        self.optimizer.zero_grad(set_to_none=True)
        if grads is None:
            loss.backward()
            all_reduce_gradients(model.parameters())
        else:
            grads.set_grad(self._trainable(), lambdas, aux, self.losses.aux_sign_dependent)
        row["grad_norm"] = _grad_norm(model.parameters())
        row["grad_norm_mtp_heads"] = _grad_norm(model.mtp_heads.parameters())
        if not np.isfinite(row["grad_norm"]):
            self.on_nonfinite(f"{where}: the gradient norm {row['grad_norm']} is not finite{_culprits(model)}; "
                              "stopped before the update")
        if measured:
            started = time.perf_counter()
            measured = self.diagnostics.on_update(step, mb, mbatch, self.optimizer, lambdas, eval_batch=self.heldout,
                                                  gradients=grads if reused else None)  # fmt: skip
            if measured:
                row.update({**self.diagnostics.summary(measured), "diag_time_s": time.perf_counter() - started})
        self.optimizer.step()
        bad = nonfinite_parameters(model)
        if bad:
            self.on_nonfinite(f"{where}: the update (lr {self.optimizer.param_groups[0]['lr']:g}) left inf/nan in "
                              f"parameters {bad}: lower --lr")
        return row

    @property
    def _stochastic(self) -> bool:
        """The training forward is not the function the Probe differentiates (dropout, ...):
        the Probe and the calibrators then take their own gradients."""
        return training_differs(self.model) is not None

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _gradients(self, out: GPTOutput, mbatch: dict, j_batch: torch.Tensor, aux_unit: torch.Tensor,
                   measured: bool) -> UpdateGradients:
        """g and the aux gradients from the backward passes over ``out``: at head weight +1
        (``aux_unit``), at -1 where the diagnostics need it, and per head for a gradient-reading
        calibrator (K > 1)."""
        losses, K = self.losses, self.cfg.model.n_mtp
        minus = losses.aux_loss(out, mbatch, -1.0) if measured and self.diagnostics.wants_aux_minus() else None
        reads = self.calibrator is not None and self.calibrator.reads_gradients
        heads = [losses.aux_loss(out, mbatch, torch.eye(K)[k]) for k in range(K)] if reads and K > 1 else None
        return UpdateGradients.take(j_batch, aux_unit, self._trainable(), aux_minus=minus,
                                    aux_heads=heads)  # fmt: skip


def _culprits(model: nn.Module) -> str:
    """Names the parameters that hold inf/nan, if any: they, not the loss, are then the cause."""
    bad = nonfinite_parameters(model)
    return f" because parameters {bad} hold inf/nan" if bad else ""


# ----------------------------------------------------------------------------- the run


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
    ``cfg.model.n_mtp`` MTP heads (``model.mtp_heads``) over the task's vocabulary;
    its parameters are on ``cfg.device`` in ``cfg.dtype``; cfg's other model
    fields do not apply. Its SFT warm start is not cached (see :func:`~mtpdiag.sft.warm_start`).

    Under ``torchrun`` (or in a process group the caller initialised) every rank
    calls ``train`` with the same arguments (see the module docstring) and gets
    the same metrics; rank 0 alone writes ``out``. Callbacks run on every rank
    and see this rank's rows of the batch, the rewards and the held-out batch.

    Everything that can be checked (the config against the task, ``out``, the SFT
    cache's writability) is checked before ``out`` is touched. ``progress``: see
    :class:`~mtpdiag.progress.Progress` (None: a bar on a terminal, lines off it).
    """
    cfg = replace(cfg, threads=threads_of(cfg))  # config.json records the count that ran
    with process_group_from_env(cfg.device), torch_threads(cfg.threads):
        return _train(cfg, out, resume, calibrator, callbacks, progress, cache_dir, model)


def _train(cfg, out, resume, calibrator, callbacks, progress, cache_dir, user_model) -> TrainResult:
    regime = regimes.get(cfg.regime)
    calibrator = regime.calibrator(cfg, calibrator)
    task = build_task(cfg)
    check_shards(cfg.prompts_per_step * cfg.group_size, cfg.minibatches, cfg.eval_prompts)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but this machine has no GPU torch can use: pass --device cpu")
    if user_model is not None:
        check_model(user_model, cfg, task)
    check_output_dir(out)
    if user_model is None:  # a user model's SFT is not cached
        cache_dir = run_on_main(lambda: writable_cache([cfg], cache_dir, out))
    lock = run_on_main(lambda: DirectoryLock(out).acquire())
    try:
        return _run(cfg, out, resume, calibrator, callbacks, progress, cache_dir, user_model, regime, task)
    finally:
        if is_main_process():
            lock.release()


def _run(cfg, out, resume, calibrator, callbacks, progress, cache_dir, user_model, regime, task) -> TrainResult:
    run = rank_run_dir(out)
    checkpoint = run_on_main(lambda: open_run(run, cfg, calibrator, resume))
    if is_main_process():  # once the run is known to start
        for message in cfg.risky_values():
            warnings.warn(message, stacklevel=4)
    if checkpoint is not None:
        run.rows = checkpoint["rows"]  # rank 0 read them in run.open; the other ranks take them here
    model, sft_summary = on_main_then_broadcast(
        lambda: warm_start(cfg, task, cache_dir, progress, user_model),
        lambda: build_model(cfg, task) if user_model is None else user_model,
    )
    run.write_config({
        "config": cfg.to_dict(),
        "model_class": type(model).__name__,
        **calibrator_names(calibrator),
        "sft": sft_summary,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "world_size": world_size(),
        "versions": {"mtpdiag": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    for param in regime.frozen_parameters(model):
        param.requires_grad_(False)
    optimizer = make_optimizer(cfg, model)
    losses = regime.losses(cfg)
    heldout = heldout_batch(task, cfg)
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
        run.append({"step": 0, **evaluate(model, task, cfg, heldout, 0), **dict.fromkeys(RUN_FLAGS, False)}, [])

    def save_checkpoint(step):
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if calibrator is not None:
            state["calibrator"] = calibrator.state_dict()
        run.save_checkpoint(state)

    def on_nonfinite(message):
        where = f"{run.checkpoint_path} holds the last good state" if run.checkpoint_path.exists() else "no checkpoint yet"
        raise NonFiniteLossError(f"{message} ({where})")

    diagnostics = cfg.diagnostics.hook(cfg.steps, run.path, model, losses) if cfg.diagnostics.every else None
    update = Updater(model, optimizer, losses, calibrator, cfg, on_nonfinite, diagnostics, heldout_shard)
    label = format_arm_label(cfg.regime, cfg.lam, cfg.calibrator)  # as `mtpdiag run` names the arm
    bar = Progress(cfg.steps, f"rl {label} seed {cfg.seed}", initial=start,
                   show=progress if is_main_process() else False)
    # the postfix shows the last evaluated J_true, never a nan between evaluations
    evaluated = [r["j_true"] for r in run.rows[METRICS] if math.isfinite(r.get("j_true", math.nan))]
    last_j_true = evaluated[-1] if evaluated else None
    for step in range(start + 1, cfg.steps + 1):
        bad = nonfinite_parameters(model)
        if bad:  # before any callback: the diagnostics would only report their gradients as non-finite
            on_nonfinite(f"step {step}: parameters {bad} hold inf/nan before the step (from the checkpoint, "
                         "or set by a callback)")
        t0 = time.perf_counter()
        # every rank samples the whole batch (the one a single process would) and trains on its rows
        batch, rewards, accepted = rollout_with_acceptance(model, task, cfg, step)
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
        mb_rows = update(batch, step)
        t_update = time.perf_counter() - t2
        groups = rewards.view(-1, cfg.group_size)
        row = {
            "step": step,
            "reward_mean": rewards.mean().item(),
            "uniform_group_frac": (groups == groups[:, :1]).all(dim=1).double().mean().item(),
            "response_len_mean": batch["response_mask"].sum(1).mean().item(),
            **accepted,
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
        clashes = sorted(set(extra) & (set(row) | eval_columns(cfg.model.n_mtp) | set(RUN_FLAGS)))
        if clashes:
            raise ValueError(f"callback metrics {clashes} clash with the trainer's columns: rename them")
        row.update(extra)
        flag_row(run, row, mb_rows)
        run.append(row, mb_rows)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(step)
        last_j_true = row.get("j_true", last_j_true)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}",
                        **({"J_true": f"{last_j_true:.3f}"} if last_j_true is not None else {}))
        bar.update()
    bar.close()
    run.mark_complete()
    return TrainResult(model, run.metrics(), run.path)


