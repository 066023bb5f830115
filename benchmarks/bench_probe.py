"""Cost of the Probe relative to training, next to curvlinops and a PyHessian-style HVP (issues #3, #13).

For each model size, on the same RL mini-batch (addition task; the trainer's
mini-batch of 128 sequences, fewer for the GPT-2-sized config), prints medians over
--repeats runs (after one warm-up call) of:

* a training step (forward, backward, AdamW step) and a gradient of J on S;
* a measure, ``measure(hvp=True, gg_curvature=False, line_search=False)`` (g, m, one
  HVP, the dot products), with each HVP mode, and with ``gg_curvature`` (h_gg) in the
  faster mode;
* the same measure reusing the trainer's gradients, as mtpdiag's trainer runs it on a
  measured mini-batch: the training step with its backward split over the one forward
  (``UpdateGradients.take``: g and the aux gradient), the measure handed them
  (``gradients=``; with h_gg, H m and H g_S in one batched product); its cost is what it
  adds to a plain training step;
* one HVP from scratch in each mode (``HessianAt``), curvlinops'
  ``HessianLinearOperator`` matvec (optional) and a PyHessian-style double backward
  (``autograd.grad(create_graph=True)``, then the gradient of grad . v);
* peak memory of a measure and of a training step: CUDA ``max_memory_allocated``, or on
  CPU the peak resident set of a child process that builds the model and its AdamW state
  and runs only that one thing.

Before the table, curvlinops' matvec and the double backward are checked against the
materialised Hessian (``torch.autograd.functional.hessian``) on a tiny float64 GPT; the
reference is that Hessian, not curvlinops.

    python benchmarks/bench_probe.py                                  # small config, on CPU
    python benchmarks/bench_probe.py --sizes small 6M --csv out.csv
    python benchmarks/bench_probe.py --device cuda --sizes all
"""
from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import subprocess
import sys
import time

import pandas as pd
import torch
from torch import nn

from mtpdiag import losses
from mtpdiag.diagnostics import Probe, UpdateGradients
from mtpdiag.diagnostics.hvp import HVP_MODES, HessianAt, flatten, unflatten
from mtpdiag.model import GPT, GPTConfig
from mtpdiag.tasks import make_task

try:
    import curvlinops
except ImportError:
    curvlinops = None
CURVLINOPS_MISSING = "n/a (pip install curvlinops-for-pytorch)"

# name -> (d_model, n_layer, n_head, vocab_size); "124M" is GPT-2 small (its vocabulary, tied embeddings)
SIZES = {
    "0.1M": (48, 2, 4, 14),
    "small": (128, 4, 4, 14),
    "6M": (256, 6, 8, 14),
    "25M": (512, 7, 8, 14),
    "124M": (768, 12, 12, 50257),
}
# sizes too slow on CPU for the trainer's mini-batch and several repeats: (sequences, repeats)
REDUCED = {"124M": (8, 1)}
CSV_COLUMNS = [
    "size", "params", "measure_over_train_step", "hvp_over_grad", "measure_gg_over_measure",
    "peak_mem_over_train_step", "curvlinops_over_ours", "measure_reused_over_train_step",
    "measure_gg_reused_over_measure_reused",
]


def targets(size: str) -> dict[str, tuple[str, float]]:
    """column -> (direction, bound): the issue's targets, tighter from 6M parameters up."""
    large = list(SIZES).index(size) >= list(SIZES).index("6M")
    return {
        "measure_over_train_step": ("<=", 3.0 if large else 3.5),
        "hvp_over_grad": ("<=", 2.0 if large else 2.5),
        "measure_gg_over_measure": ("<=", 1.3),
        "peak_mem_over_train_step": ("<=", 2.0),
        "curvlinops_over_ours": (">=", 1.0),
        "measure_reused_over_train_step": ("<=", 3.0 if large else 3.5),
        "measure_gg_reused_over_measure_reused": ("<=", 1.3),
    }


def model_and_batch(size: str, batch_size: int, device):
    """The model of ``size`` and an RL mini-batch on it."""
    d_model, n_layer, n_head, vocab = SIZES[size]
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, block_size=32, d_model=d_model, n_layer=n_layer, n_head=n_head, n_mtp=1)
    model = GPT(config).to(device)
    return model, rl_minibatch(model, batch_size, device)


def build(size: str, batch_size: int, device):
    """The model of ``size``, an RL mini-batch on it and an AdamW optimizer with its state allocated."""
    model, batch = model_and_batch(size, batch_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # the optimizer state a training run holds, without a forward or backward
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, batch, optimizer


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
    advantages = torch.randn(n, generator=generator).to(device, old.dtype)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": advantages}


def train_step_of(model, batch, optimizer):
    def train_step():
        out = model(batch["input_ids"])
        loss = -losses.rl_objective(out, batch) + 0.1 * losses.mtp_policy_loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def measured_step_of(model, batch, optimizer, mode: str, gg: bool = False):
    """A training step whose backward is split over its forward, measured with the gradients
    it took, as the trainer does on a measured mini-batch (mtpdiag.train.Updater)."""
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def measured_step():
        out = model(batch["input_ids"])
        grads = UpdateGradients.take(losses.rl_objective(out, batch), losses.mtp_policy_loss(out, batch), params)
        probe.measure(batch, 1e-4, gg_curvature=gg, line_search=False, gradients=grads)
        optimizer.zero_grad(set_to_none=True)
        grads.set_grad(params, 0.1, 0.1 * losses.mtp_policy_loss(out, batch), sign_dependent=False)
        optimizer.step()

    return measured_step


def measure_of(model, batch, mode: str, gg: bool = False):
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode)
    return lambda: probe.measure(batch, 1e-4, gg_curvature=gg, line_search=False)


def double_backward_hvp(J, theta):
    """PyHessian's Hessian-vector product: the gradient with create_graph, then the gradient of grad . v."""

    def hvp(direction):
        leaves = {k: t.detach().requires_grad_() for k, t in theta.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(J(leaves), list(leaves.values()), create_graph=True)
            dot = sum((g * direction[k]).sum() for g, k in zip(grads, leaves))
            return dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))

    return hvp


class _Objective(nn.Module):
    """J on a batch as curvlinops' "model": X is the batch, the prediction J itself (shape [1])."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, X):
        return losses.rl_objective(self.model(X["input_ids"]), X).reshape(1)


class _Sum(nn.Module):
    """curvlinops' "loss": the prediction summed, so its Hessian is J's."""

    reduction = "sum"

    def forward(self, prediction, target):
        return prediction.sum()


def curvlinops_hvp(model: GPT, batch: dict, theta: dict):
    """curvlinops' HessianLinearOperator of J on the parameters ``theta`` names, as a function of a direction dict."""
    named = dict(model.named_parameters())
    op = curvlinops.HessianLinearOperator(
        _Objective(model), _Sum(), [named[k] for k in theta],
        [(batch, torch.zeros(1, device=batch["input_ids"].device))],
        check_deterministic=False, batch_size_fn=lambda X: X["input_ids"].shape[0],
    )
    return lambda direction: dict(zip(theta, op @ [direction[k] for k in theta]))


def check_against_materialised() -> list[str]:
    """Max |H v - reference| on a tiny float64 GPT (d_model 16, one layer) for each HVP
    here, the reference being the materialised ``torch.autograd.functional.hessian``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=14, block_size=32, d_model=16, n_layer=1, n_head=2, n_mtp=1)).double()
    batch = rl_minibatch(model, 4, torch.device("cpu"))
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    J, theta = probe.function_of_shared(losses.rl_objective, batch)
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    H = torch.autograd.functional.hessian(lambda x: J(unflatten(x, theta)), flatten(theta))
    reference = H @ flatten(v)
    candidates = {f"ours {mode}": HessianAt(J, theta, mode) for mode in HVP_MODES}
    candidates["double backward"] = double_backward_hvp(J, theta)
    if curvlinops is not None:
        model.eval()
        candidates["curvlinops"] = curvlinops_hvp(model, batch, theta)
    lines = [f"HVP check, tiny float64 GPT ({flatten(theta).numel()} parameters in S), max |Hv - materialised Hessian v|"
             f" (|Hv|max {reference.abs().max().item():.3g}):"]
    for name, hvp in candidates.items():
        err = (flatten(hvp(v)) - reference).abs().max().item()
        verdict = "agrees" if err <= 1e-10 * reference.abs().max().item() else "DISAGREES"
        lines.append(f"  {name:16s} {err:.2e}  {verdict} (margin 1e-10 relative)")
    if curvlinops is None:
        lines.append(f"  curvlinops       {CURVLINOPS_MISSING}")
    return lines


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


def peak_memory(size: str, what: str, batch_size: int, mode: str, device) -> tuple[float, float]:
    """(peak memory, its part above what was held before) in bytes, of running ``what`` ("train"
    or "measure") once on the model of ``size`` with its AdamW state: CUDA's peak allocation, or
    on CPU the peak resident set of a child process doing only that (the CPU allocator keeps no
    statistics; the child's resident set also holds torch itself)."""
    if device.type == "cuda":
        model, batch, optimizer = build(size, batch_size, device)
        fn = train_step_of(model, batch, optimizer) if what == "train" else measure_of(model, batch, mode)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        return float(peak), float(peak - before)
    child = subprocess.run(
        [sys.executable, __file__, "--peak-child", what, size, str(batch_size), mode],
        capture_output=True, text=True, check=True,
    )
    before, peak = map(float, child.stdout.split()[-2:])
    return peak, peak - before


def peak_rss() -> int:
    """This process's peak resident set in bytes: Linux's VmHWM, which starts afresh at exec
    (``ru_maxrss`` does not: it keeps the forking parent's peak), else ``ru_maxrss`` (KiB)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_child(what: str, size: str, batch_size: int, mode: str) -> None:
    """In the child: build, run ``what`` once, print the peak resident set before and after in bytes."""
    torch.set_num_threads(1)
    model, batch, optimizer = build(size, batch_size, torch.device("cpu"))
    fn = train_step_of(model, batch, optimizer) if what == "train" else measure_of(model, batch, mode)
    before = peak_rss()
    fn()
    print(before, peak_rss())


def bench_size(size: str, args, device) -> dict:
    batch_size, repeats = REDUCED.get(size, (args.batch, args.repeats))
    repeats = min(repeats, args.repeats)
    model, batch, optimizer = build(size, batch_size, device)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    J, theta = probe.function_of_shared(losses.rl_objective, batch)
    direction = {k: torch.randn_like(t) for k, t in theta.items()}

    def gradient():
        leaves = {k: t.detach().requires_grad_() for k, t in theta.items()}
        torch.autograd.grad(J(leaves), list(leaves.values()))

    t = {"train step": timed(train_step_of(model, batch, optimizer), repeats, device),
         "gradient": timed(gradient, repeats, device)}
    for mode in HVP_MODES:
        t[f"measure {mode}"] = timed(measure_of(model, batch, mode), repeats, device)
    best_measure = min(HVP_MODES, key=lambda mode: t[f"measure {mode}"])
    t["measure+h_gg"] = timed(measure_of(model, batch, best_measure, gg=True), repeats, device)
    for gg, key in ((False, "measured step"), (True, "measured step+h_gg")):
        t[key] = timed(measured_step_of(model, batch, optimizer, best_measure, gg), repeats, device)
    model.eval()  # the Probe measures with eval semantics; so do the HVPs timed here
    for mode in HVP_MODES:
        t[f"HVP {mode}"] = timed(lambda: HessianAt(J, theta, mode)(direction), repeats, device)
    t["HVP double backward"] = timed(lambda: double_backward_hvp(J, theta)(direction), repeats, device)
    curvlinops_note = None
    if curvlinops is None:
        curvlinops_note = CURVLINOPS_MISSING
    else:
        try:
            t["HVP curvlinops"] = timed(lambda: curvlinops_hvp(model, batch, theta)(direction), repeats, device)
        except (RuntimeError, NotImplementedError) as err:  # reported, not fatal: curvlinops is a comparison
            curvlinops_note = f"failed: {str(err).splitlines()[0][:120]}"
    model.train()
    best_hvp = min(HVP_MODES, key=lambda mode: t[f"HVP {mode}"])
    peak_train, extra_train = peak_memory(size, "train", batch_size, best_measure, device)
    peak_measure, extra_measure = peak_memory(size, "measure", batch_size, best_measure, device)
    row = {
        "size": size,
        "params": model.num_parameters(),
        "batch": batch_size,
        "repeats": repeats,
        "train step ms": 1e3 * t["train step"],
        "gradient ms": 1e3 * t["gradient"],
        **{f"measure {mode} / train step": t[f"measure {mode}"] / t["train step"] for mode in HVP_MODES},
        **{f"HVP {mode} / grad": t[f"HVP {mode}"] / t["gradient"] for mode in HVP_MODES},
        "HVP double backward / grad": t["HVP double backward"] / t["gradient"],
        "HVP curvlinops / grad": t["HVP curvlinops"] / t["gradient"] if "HVP curvlinops" in t else math.nan,
        "peak mem train step MB": peak_train / 2**20,
        "peak mem measure MB": peak_measure / 2**20,
        "extra mem measure / train step": extra_measure / extra_train if extra_train > 0 else math.nan,
        # the columns (--csv)
        "measure_over_train_step": t[f"measure {best_measure}"] / t["train step"],
        "hvp_over_grad": t[f"HVP {best_hvp}"] / t["gradient"],
        "measure_gg_over_measure": t["measure+h_gg"] / t[f"measure {best_measure}"],
        "peak_mem_over_train_step": peak_measure / peak_train,
        "curvlinops_over_ours": t["HVP curvlinops"] / t[f"HVP {best_hvp}"] if "HVP curvlinops" in t else math.nan,
        "measure_reused_over_train_step": t["measured step"] / t["train step"] - 1,
        "measure_gg_reused_over_measure_reused": (t["measured step+h_gg"] - t["train step"])
        / (t["measured step"] - t["train step"]),
        "best measure mode": best_measure,
        "best HVP mode": best_hvp,
    }
    row["curvlinops note"] = curvlinops_note or ""
    return row


def report_targets(table: pd.DataFrame) -> list[str]:
    lines = ["targets (ratio: value vs bound at each size; 'missed by' = how far past the bound):"]
    for size, row in table.iterrows():
        parts = []
        for column, (direction, bound) in targets(size).items():
            value = row[column]
            if not math.isfinite(value):
                parts.append(f"{column} n/a")
                continue
            met = value <= bound if direction == "<=" else value >= bound
            miss = value / bound - 1 if direction == "<=" else bound / value - 1
            parts.append(f"{column} {value:.2f} {direction} {bound:g}: " + ("met" if met else f"missed by {100 * miss:.0f}%"))
        lines.append(f"  {size}: " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["small"], help=f"any of {list(SIZES)}, or 'all'")
    parser.add_argument("--batch", type=int, default=128, help="sequences in the mini-batch (the trainer's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", help=f"also write the columns {CSV_COLUMNS} to this file")
    parser.add_argument("--peak-child", nargs=4, metavar=("WHAT", "SIZE", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        what, size, batch_size, mode = args.peak_child
        return peak_child(what, size, int(batch_size), mode)
    sizes = list(SIZES) if args.sizes == ["all"] else args.sizes
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}: choose from {list(SIZES)} or 'all'")
    if args.batch < 2 or args.repeats < 1:
        parser.error("--batch needs at least 2 sequences and --repeats at least 1")
    device = torch.device(args.device)
    print("\n".join(check_against_materialised()))
    rows = [bench_size(size, args, device) for size in sizes]
    table = pd.DataFrame(rows).set_index("size")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, medians after one warm-up; "
          f"batch = sequences of up to 32 tokens")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.drop(columns=CSV_COLUMNS[2:]).to_string(float_format=lambda x: f"{x:.2f}"))
        print(table[CSV_COLUMNS[1:]].to_string(float_format=lambda x: f"{x:.2f}"))
    print("\n".join(report_targets(table)))
    if args.csv:
        table.reset_index()[CSV_COLUMNS].to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
