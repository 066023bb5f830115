"""Per-step RL time of each regime on the small config, and peak memory (issue #2).

All regimes train in this one process from the same cached SFT weights and seed,
in interleaved rounds so that a machine shared with other work slows them alike.
Prints the median time per RL step (rollout + update; evaluation, callbacks and
file writes excluded) and its ratio to detach, then the peak resident memory.
Goals: <= 0.5 s per step, occ (fixed-lambda calibrator) within 5% of detach,
peak resident memory <= 2 GB.

    python benchmarks/bench_train.py                 # the small config, on CPU
    python benchmarks/bench_train.py --device cuda
"""
from __future__ import annotations

import argparse
import resource
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mtpdiag import regimes
from mtpdiag.config import TrainConfig
from mtpdiag.train import train

REGIMES = {"detach": None, "ce": 0.5, "policy": 0.5, "occ": 0.5}  # regime -> lam (occ: FixedLambda(lam))
STEP_GOAL_S, OCC_GOAL, MEMORY_GOAL_GB = 0.5, 1.05, 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="RL steps per regime and round; the first is not timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sft-cache", default=None, help="SFT cache folder (default: $MTPDIAG_CACHE or ~/.cache)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step of each round is a warm-up")

    base = TrainConfig(device=args.device, steps=args.steps, eval_every=10**6, checkpoint_every=10**6)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; small config: "
          f"{base.prompts_per_step} prompts x G={base.group_size}, {base.minibatches} mini-batches, "
          f"d_model {base.model.d_model}, {base.model.n_layer} layers, {base.model.n_mtp} MTP head; "
          f"{args.rounds} rounds x {args.steps - 1} timed steps per regime", flush=True)
    step_times = {regime: [] for regime in REGIMES}
    update_times = {regime: [] for regime in REGIMES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for regime, lam in REGIMES.items():
                cfg = replace(base, regime=regime, lam=lam)
                out = Path(tmp) / f"{regime}-{round_index}"
                metrics = train(cfg, out, cache_dir=args.sft_cache, progress=False).metrics
                timed = metrics[metrics.step > 1]
                step_times[regime].extend(timed.step_time_s)
                update_times[regime].extend(timed.update_time_s)
            print(f"  round {round_index + 1}/{args.rounds} done", flush=True)

    detach = np.median(step_times["detach"])
    print(f"\n{'regime':8s} {'s/step':>8s} {'x detach':>9s} {'update s':>9s}  goal")
    for regime in REGIMES:
        step_s = np.median(step_times[regime])
        goals = [f"<= {STEP_GOAL_S} s: {'met' if step_s <= STEP_GOAL_S else 'MISSED'}"]
        if regimes.get(regime).lambda_rule == regimes.CALIBRATED:
            goals.append(f"<= {OCC_GOAL}x detach: {'met' if step_s / detach <= OCC_GOAL else 'MISSED'}")
        print(f"{regime:8s} {step_s:8.3f} {step_s / detach:8.3f}x {np.median(update_times[regime]):9.3f}  "
              + "; ".join(goals))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"peak resident memory {peak_gb:.2f} GB (goal <= {MEMORY_GOAL_GB} GB: "
          f"{'met' if peak_gb <= MEMORY_GOAL_GB else 'MISSED'})")


if __name__ == "__main__":
    main()
