"""Cost of the Probe relative to training (issue #3), in one process on one batch.

For each model size, on the same RL mini-batch (addition task, the trainer's
mini-batch of 128 sequences), prints medians over --repeats runs:

* full measure: ``measure(hvp=True, gg_curvature=False, line_search=False)``
  (2 gradients + 1 HVP + dot products) / one training step (forward, backward,
  AdamW step). Goal <= 4x. ``+h_gg`` adds the second HVP.
* fwd_rev HVP, rev_rev HVP: one Hessian-vector product from scratch / one
  gradient of J on S. Goal <= 2.5x.
* line search: cost per lambda point / one forward pass.
* memory (CUDA only; the CPU allocator keeps no statistics): peak allocated
  during a full measure / during a training step, both as totals and as the
  part above the resident parameters, gradients and optimizer state. Goal <= 3x.

    python benchmarks/bench_probe.py                         # small config, on CPU
    python benchmarks/bench_probe.py --device cuda --sizes all
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import pandas as pd
import torch

from mtpdiag import losses
from mtpdiag.diagnostics.hvp import HessianAt
from mtpdiag.model import GPT, GPTConfig
from mtpdiag.diagnostics import Probe
from mtpdiag.tasks import make_task

# name -> (d_model, n_layer, n_head); parameter counts from about 0.1M to 25M
SIZES = {"0.1M": (48, 2, 4), "small": (128, 4, 4), "6M": (256, 6, 8), "25M": (512, 7, 8)}
GOALS = {"measure / train step": 4.0, "fwd_rev HVP / grad": 2.5, "rev_rev HVP / grad": 2.5, "peak mem measure / train step": 3.0}


def rl_minibatch(model: GPT, n: int, device) -> dict:
    """Real addition prompts with random completions, on-policy old log-probs, random advantages."""
    task = make_task("addition")
    rng = random.Random(0)
    problems = task.sample_problems(rng, n)
    completions = ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4))) for _ in problems]
    ids, mask = task.encode_completions(problems, completions, device)
    with torch.no_grad():
        old = losses.token_logprobs(model(ids).main)
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": torch.randn(n, generator=generator).to(device)}


def timed(fn, repeats: int, device) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, device) -> tuple[int, int]:
    """(peak allocated bytes, peak above what was allocated before) while ``fn`` runs."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - resident


def bench_size(name: str, args, device) -> dict:
    d_model, n_layer, n_head = SIZES[name]
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=14, block_size=32, d_model=d_model, n_layer=n_layer, n_head=n_head, n_mtp=1)
    model = GPT(config).to(device)
    batch = rl_minibatch(model, args.batch, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        out = model(batch["input_ids"])
        loss = -losses.rl_objective(out, batch) + 0.1 * losses.mtp_policy_loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()  # optimizer state exists from here on, as in training
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    J, theta = probe.function_of_shared(losses.rl_objective, batch)
    direction = {k: torch.randn_like(t) for k, t in theta.items()}

    def gradient():
        leaves = {k: t.detach().requires_grad_() for k, t in theta.items()}
        torch.autograd.grad(J(leaves), list(leaves.values()))

    def forward():
        with torch.no_grad():
            J(theta)

    def full_measure(gg=False):
        return probe.measure(batch, 1e-4, gg_curvature=gg, line_search=False)

    def with_line_search():
        return probe.measure(batch, 1e-4, gg_curvature=False)

    t = {
        "train step": timed(train_step, args.repeats, device),
        "gradient": timed(gradient, args.repeats, device),
        "forward": timed(forward, args.repeats, device),
        "measure": timed(full_measure, args.repeats, device),
        "measure+h_gg": timed(lambda: full_measure(gg=True), args.repeats, device),
        "fwd_rev": timed(lambda: HessianAt(J, theta, "fwd_rev")(direction), args.repeats, device),
        "rev_rev": timed(lambda: HessianAt(J, theta, "rev_rev")(direction), args.repeats, device),
        "line search": timed(with_line_search, args.repeats, device),
    }
    n_points = with_line_search().curve.n_evaluations
    row = {
        "size": name,
        "params": model.num_parameters(),
        "train step ms": 1e3 * t["train step"],
        "measure / train step": t["measure"] / t["train step"],
        "measure+h_gg / train step": t["measure+h_gg"] / t["train step"],
        "fwd_rev HVP / grad": t["fwd_rev"] / t["gradient"],
        "rev_rev HVP / grad": t["rev_rev"] / t["gradient"],
        "line search per lambda / forward": (t["line search"] - t["measure"]) / n_points / t["forward"],
    }
    if device.type == "cuda":
        (train_peak, train_extra), (measure_peak, measure_extra) = (peak_memory(fn, device) for fn in (train_step, full_measure))
        row["peak mem measure / train step"] = measure_peak / train_peak
        row["extra mem measure / train step"] = measure_extra / train_extra
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["small"], help=f"any of {list(SIZES)}, or 'all'")
    parser.add_argument("--batch", type=int, default=128, help="sequences in the mini-batch (the trainer's default)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = list(SIZES) if args.sizes == ["all"] else args.sizes
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}: choose from {list(SIZES)} or 'all'")
    device = torch.device(args.device)
    rows = [bench_size(name, args, device) for name in sizes]
    table = pd.DataFrame(rows).set_index("size")
    print(f"device {device}, torch {torch.__version__}, batch {args.batch} sequences, medians of {args.repeats}")
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
    print("goals: " + ", ".join(f"{k} <= {v}x" for k, v in GOALS.items()))
    for column, goal in GOALS.items():
        if column in table:
            missed = table.index[table[column] > goal].tolist()
            print(f"  {column}: {'met' if not missed else 'missed at ' + ', '.join(missed)}")


if __name__ == "__main__":
    main()
