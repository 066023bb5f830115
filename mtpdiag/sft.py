"""The SFT warm start and its cache.

Every RL run starts from a supervised warm start: next-token + MTP cross-entropy
on the task's target completions, stopped once J_true on a validation set (a
seed disjoint from the held-out set's) reaches ``sft_target``. It is trained once
per SFT config and then read from ``<cache>/sft/<hash>.pt``, so every regime with
the same seed starts from the same weights.

The weights depend on the thread count in their last bits (sums are split over
threads), so the key holds it: the same key gives the same weights bit for bit on
the same machine type and torch build. A cache that cannot be written is found
before the SFT runs (:func:`writable_cache`), and the weights are then kept in the
run's (or job's) own directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import MODEL_FIELDS, TrainConfig, build_model, step_seed, threads_of, torch_threads
from .evaluation import exact_j_true, j_true_batch
from .losses import NonFiniteLossError, sft_loss
from .progress import Progress
from .schema import atomic_write
from .tasks import Task

# SFT stops on J_true over these prompts (the held-out evaluation set uses the task's default seed)
SFT_VALIDATION_SEED, SFT_VALIDATION_PROMPTS = 1, 256
SFT_FIELDS = ("sft_steps", "sft_target", "sft_eval_every", "sft_batch_size", "sft_lr", "sft_mtp_weight")


def sft_hash(cfg: TrainConfig) -> str:
    """Hash of everything that determines the SFT weights: the flat config's task,
    model, SFT, seed and dtype keys, the device type and the thread count."""
    flat = cfg.to_dict()
    spec = {key: flat[key] for key in ("task", "task_options", *MODEL_FIELDS, *SFT_FIELDS, "seed", "dtype")}
    spec["device_type"] = torch.device(cfg.device).type
    spec["threads"] = threads_of(cfg)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MTPDIAG_CACHE``, else ``~/.cache/mtpdiag``."""
    return Path(cache_dir or os.environ.get("MTPDIAG_CACHE") or Path.home() / ".cache" / "mtpdiag")


def sft_cache_file(cfg: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """``<cache root>/sft/<hash>.pt`` (see :func:`cache_root`)."""
    return cache_root(cache_dir) / "sft" / f"{sft_hash(cfg)}.pt"


def writable_cache(configs: list[TrainConfig], cache_dir: str | Path | None, fallback: str | Path) -> Path:
    """The cache root the SFT of ``configs`` can use, found before any of it runs:
    the given one when it holds all their entries or can be written, else
    ``fallback`` (the run's or the job's directory) with a one-line warning, so a
    read-only cache costs no SFT work."""
    root = cache_root(cache_dir)
    if all(sft_cache_file(cfg, root).exists() for cfg in configs):
        return root
    folder = root / "sft"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        warnings.warn(
            f"the SFT cache {folder} cannot be written ({err.strerror or err}): the SFT weights are kept in "
            f"{Path(fallback) / 'sft'} instead; pass a writable --sft-cache to share them between runs",
            stacklevel=2,
        )
        return Path(fallback)
    return root


def run_sft(cfg: TrainConfig, task: Task, progress: bool | None = None, model: nn.Module | None = None):
    """Supervised warm start on target completions: next-token + MTP cross-entropy,
    until validation J_true reaches ``sft_target``. Trains ``model`` in place
    (default: a new GPT from ``cfg``) with ``cfg``'s thread count. Returns (model, summary).
    ``progress``: see :class:`~mtpdiag.progress.Progress` (None: a bar on a terminal,
    lines off it)."""
    with torch_threads(threads_of(cfg)):
        return _run_sft(cfg, task, progress, model)


def _run_sft(cfg, task, progress, model):
    model = build_model(cfg, task) if model is None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    rng = random.Random(step_seed(cfg.seed, 0, "sft"))
    validation = j_true_batch(task, task.heldout_problems(SFT_VALIDATION_PROMPTS, SFT_VALIDATION_SEED), cfg.device)
    val_j_true = None
    with Progress(cfg.sft_steps, f"sft seed {cfg.seed}", show=progress) as bar:
        for step in range(1, cfg.sft_steps + 1):
            model.train()
            problems = task.sample_problems(rng, cfg.sft_batch_size)
            input_ids, response_mask = task.encode_completions(problems, [p.target for p in problems], cfg.device)
            batch = {"input_ids": input_ids, "response_mask": response_mask}
            loss = sft_loss(model(input_ids), batch, cfg.sft_mtp_weight)
            if not torch.isfinite(loss):
                bad = nonfinite_parameters(model)
                cause = f"parameters {bad} hold inf/nan" if bad else "lower --sft-lr"
                raise NonFiniteLossError(f"SFT step {step}: loss {loss.item()} is not finite: {cause}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cfg.sft_target is not None and step % cfg.sft_eval_every == 0:
                model.eval()
                val_j_true = exact_j_true(model, validation)
                bar.set_postfix(val_j_true=f"{val_j_true:.3f}")
            bar.update()
            if val_j_true is not None and val_j_true >= cfg.sft_target:
                break
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
    wrong weights silently.

    ``cache_dir`` must be writable unless it holds the entry: pass it through
    :func:`writable_cache` first, as the trainer and the job do."""
    if model is not None:
        model, summary = run_sft(cfg, task, progress, model)
        return model, {"sft_cache_file": None, **summary}
    file = sft_cache_file(cfg, cache_dir)
    if file.exists():
        try:
            saved = torch.load(file, map_location=cfg.device, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"the SFT cache entry {file} is damaged ({str(err).splitlines()[0]}): delete it to train it again"
            ) from err
        model = build_model(cfg, task)
        model.load_state_dict(saved["model"])
        summary = saved["summary"]
    else:
        model, summary = run_sft(cfg, task, progress)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda tmp: torch.save({"model": model.state_dict(), "summary": summary}, tmp))
    return model, {"sft_cache_file": str(file), **summary}


def nonfinite_parameters(model: nn.Module, shown: int = 5) -> list[str]:
    """The names of (at most ``shown``) parameters holding inf or nan."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    return bad[:shown] + ([f"and {len(bad) - shown} more"] if len(bad) > shown else [])
