"""Cost of measuring the trained update (issue #11): one measured RL step against one training step.

On the small config (the TrainConfig defaults: the 1M-parameter GPT, one MTP head,
32 prompts x G=8 rollouts in 2 mini-batches of 128, AdamW) with the trainer's own
losses (the policy regime, lambda on the advantages) and held-out J_true batch, on
real addition prompts with random completions, on-policy old log-probs and random
advantages. A training step is the Updater's work on every mini-batch (forward,
backward, AdamW step); a measured step adds ``DiagnosticsHook.on_update`` on every
mini-batch with the trainer's diagnostics (``DiagnosticsConfig`` defaults: curves on
J_batch and J_true, per-block rows, cross-fitting, the clip fraction; no h_gg, no top
curvature, which the trainer takes on the first and the last measured step only).
Prints medians over --repeats and the ratio; --threads 1 by default, as the
report's figure is for one thread.

    python benchmarks/bench_trained_step.py
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from mtpdiag import regimes
from mtpdiag.config import DiagnosticsConfig, TrainConfig, build_model, build_task
from mtpdiag.distributed import global_means
from mtpdiag.losses import group_advantages, token_logprobs
from mtpdiag.rollout import heldout_batch


def rollout_like(model, task, cfg: TrainConfig) -> dict:
    """The trainer's rollout batch in shape: prompts, random completions, on-policy old log-probs."""
    rng = random.Random(0)
    problems = [p for p in task.sample_problems(rng, cfg.prompts_per_step) for _ in range(cfg.group_size)]
    completions = ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4))) for _ in problems]
    ids, mask = task.encode_completions(problems, completions, cfg.device)
    with torch.no_grad():
        old = token_logprobs(model(ids).main)
    generator = torch.Generator().manual_seed(0)
    rewards = (torch.rand(len(problems), generator=generator) < 0.5).to(old.dtype)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old,
            "advantages": group_advantages(rewards, cfg.group_size),
            "group": torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.group_size)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = TrainConfig(regime="policy", lam=0.5)
    task = build_task(cfg)
    model = build_model(cfg, task)
    losses = regimes.get(cfg.regime).losses(cfg)
    batch = rollout_like(model, task, cfg)
    heldout = heldout_batch(task, cfg)
    chunks = torch.arange(batch["input_ids"].size(0)).chunk(cfg.minibatches)
    minibatches = [{key: value[rows] for key, value in batch.items()} for rows in chunks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    lambdas = torch.tensor([cfg.lam])
    with tempfile.TemporaryDirectory() as out:
        hook = DiagnosticsConfig(every=1, top_curvature="none").hook(cfg.steps, out, model, losses)

        def step(measured: bool) -> float:
            """One step's work on every mini-batch; the seconds the diagnostics took (0 without)."""
            spent = 0.0
            model.train()
            for mb, minibatch in enumerate(minibatches):
                with global_means():
                    out = losses.forward(model, minibatch)
                    loss = losses.aux_loss(out, minibatch, lambdas) - losses.objective(out, minibatch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if measured:
                    started = time.perf_counter()
                    hook.on_update(1, mb, minibatch, optimizer, lambdas, eval_batch=heldout)
                    spent += time.perf_counter() - started
                optimizer.step()
            return spent

        step(False)  # optimizer state exists from here on, as in training
        trained, measuring = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step(False)
            trained.append(time.perf_counter() - started)
            measuring.append(step(True))
    train_s, diag_s = statistics.median(trained), statistics.median(measuring)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); small config: {model.num_parameters()} "
          f"parameters, {cfg.prompts_per_step} prompts x G={cfg.group_size} in {cfg.minibatches} mini-batches, "
          f"held-out {cfg.eval_prompts} prompts, {args.repeats} repeats")
    print(f"training step (every mini-batch's update): {train_s:.3f} s")
    print(f"diagnostics of every mini-batch's update:  {diag_s:.3f} s  ({diag_s / cfg.minibatches:.3f} s a mini-batch)")
    print(f"measured step / training step: {(train_s + diag_s) / train_s:.1f}x")


if __name__ == "__main__":
    main()
