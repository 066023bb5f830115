"""Per-step cost of each calibrator relative to the detach regime (issue #4).

Two measurements, one process, the same cached SFT weights and seeds:

1. end to end: every variant trains a few RL steps; the median per-step time
   (rollout + update) and update time, relative to detach. Rollout lengths and
   machine noise move these by several percent from variant to variant.
2. isolated: one rollout batch (its advantages replaced by N(0, 1) draws, so
   every loss term has a gradient; the cost does not depend on their values),
   and each variant's optimiser update on it, timed round-robin ``--repeats``
   times; the step ratio is (rollout + update) / (rollout + detach's update)
   with the rollout time of part 1.

Goals: the ratio proxy <= 1.02x detach, the step proxy <= 1.5x, the amortised Taylor
calibrator <= 1.1x (issue #16); the oracle and the cosine gate are printed for their
cost, with no goal. In the isolated part every call of a variant is its first on a
fresh calibrator only in the warm-up round; AmortisedTaylor's calls then run its
schedule (an HVP on every ``every``-th call): one isolated sample of such a variant
times a whole period of updates (``every`` calls) and divides by their number, so the
median is of the amortised cost; the end-to-end part runs the schedule as trained.

    python benchmarks/bench_occ.py                  # the small config, on CPU
    python benchmarks/bench_occ.py --device cuda --steps 23 --warmup 3
"""
from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtpdiag.calibrators import OCC, AmortisedTaylor, CosineGate, Oracle
from mtpdiag import regimes
from mtpdiag.config import TrainConfig, build_task
from mtpdiag.rollout import rollout
from mtpdiag.sft import warm_start
from mtpdiag.config import make_optimizer
from mtpdiag.train import Updater, train

# (label, regime, calibrator factory (num_heads -> Calibrator) or None, goal ratio or None)
VARIANTS = [
    ("detach", "detach", None, None),
    ("policy lam=0.1 (no calibrator)", "policy", None, None),
    ("occ-paper (ratio, sum)", "occ", lambda K: OCC.paper(), 1.02),
    ("occ-reference (ratio, tokenwise)", "occ", lambda K: OCC.reference(K), 1.02),
    ("occ step (JVP)", "occ", lambda K: OCC(proxy="step"), 1.5),
    ("occ step (finite difference h=1)", "occ", lambda K: OCC(proxy="step", finite_difference=1.0), 1.5),
    ("cosine gate", "occ", lambda K: CosineGate(1.0), None),
    ("oracle taylor", "occ", lambda K: Oracle("taylor"), None),
    ("amortised taylor every=4", "occ", lambda K: AmortisedTaylor(every=4), 1.1),
    ("amortised taylor every=16", "occ", lambda K: AmortisedTaylor(every=16), 1.1),
    ("oracle measured", "occ", lambda K: Oracle("measured"), None),
]


def config(args, regime: str) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        regime=regime, lam=0.1 if regimes.get(regime).lambda_rule == regimes.FIXED else None, steps=args.steps,
        device=args.device, n_mtp=args.n_mtp, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        sft_steps=args.sft_steps, sft_target=None, eval_every=10**6, eval_prompts=16, eval_samples=1,
        checkpoint_every=10**6, seed=0,
    ))


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def end_to_end(args, variants, tmp: Path) -> list[tuple[float, float]]:
    """(median step s, median update s) per variant, from short training runs."""
    times = []
    for i, (label, regime, factory, _) in enumerate(variants):
        calibrator = factory(args.n_mtp) if factory else None
        result = train(config(args, regime), tmp / f"run{i}", calibrator=calibrator, cache_dir=tmp / "cache",
                       progress=False)
        timed = result.metrics[result.metrics.step > args.warmup]
        times.append((float(np.median(timed.step_time_s)), float(np.median(timed.update_time_s))))
        print(f"  trained {label}: reward {timed.reward_mean.mean():.3f}", flush=True)
    return times


def isolated(args, variants, tmp: Path) -> list[float]:
    """Median update time per variant on one shared batch, variants interleaved."""
    base = config(args, "detach")
    task = build_task(base)
    model, _ = warm_start(base, task, tmp / "cache")
    batch, _ = rollout(model, task, base, step=1)
    generator = torch.Generator(device=args.device).manual_seed(0)
    batch["advantages"] = torch.randn(batch["advantages"].shape, generator=generator, device=args.device)

    def nonfinite(message):
        raise FloatingPointError(message)

    runners = []
    for _, regime, factory, _ in variants:
        cfg = config(args, regime)
        copy_ = copy.deepcopy(model)
        optimizer = make_optimizer(cfg, copy_)
        calibrator = factory(args.n_mtp) if factory else None
        update = Updater(copy_, optimizer, regimes.get(cfg.regime).losses(cfg), calibrator, cfg, nonfinite)
        # a calibrator with a schedule (AmortisedTaylor's HVP every `every` calls, one call per
        # mini-batch): one sample is one whole period of updates, its time divided by their number
        period = math.ceil(getattr(calibrator, "every", 1) / cfg.minibatches)
        runners.append((lambda update=update: update(batch, 1), period))
    samples = [[] for _ in runners]
    for repeat in range(args.repeats + 1):  # the first round warms up
        for i, (run, period) in enumerate(runners):
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(period):
                run()
            synchronize(args.device)
            if repeat:
                samples[i].append((time.perf_counter() - start) / period)
    return [float(np.median(s)) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="RL steps per variant (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per variant in the isolated part")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT warm start length (cached across variants)")
    parser.add_argument("--prompts-per-step", type=int, default=TrainConfig().prompts_per_step)
    parser.add_argument("--group-size", type=int, default=TrainConfig().group_size)
    parser.add_argument("--n-mtp", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], help="labels (prefixes) of variants to leave out")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}: nothing would be timed")
    variants = [v for v in VARIANTS if v[0] == "detach" or not any(v[0].startswith(p) for p in args.skip)]

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps per variant ({args.warmup} warm-up), {args.repeats} isolated repeats, n_mtp {args.n_mtp}")
    with tempfile.TemporaryDirectory() as tmp:
        trained = end_to_end(args, variants, Path(tmp))
        updates = isolated(args, variants, Path(tmp))

    step0, update0 = trained[0]
    rollout_s = step0 - update0
    print(f"\n{'':34s} {'end to end':>38s} | {'isolated update':>36s}")
    print(f"{'variant':34s} {'step s':>8s} {'x detach':>9s} {'update s':>9s} {'x detach':>9s} | "
          f"{'update s':>9s} {'x detach':>9s} {'step x':>8s}  goal (isolated step x)")
    for (label, _, _, goal), (step_s, update_s), iso in zip(variants, trained, updates):
        step_ratio = (rollout_s + iso) / (rollout_s + updates[0])
        verdict = "" if goal is None else f"<= {goal}x: {'met' if step_ratio <= goal else 'MISSED'}"
        print(f"{label:34s} {step_s:8.3f} {step_s / step0:8.3f}x {update_s:9.3f} {update_s / update0:8.3f}x | "
              f"{iso:9.4f} {iso / updates[0]:8.3f}x {step_ratio:7.3f}x  {verdict}")


if __name__ == "__main__":
    main()
