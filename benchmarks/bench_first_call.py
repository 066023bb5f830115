"""Where the first Hessian-vector product of a process spends its extra time (issue #13).

Each row runs in a fresh child process (1 intra-op thread) on bench_probe's small config
and RL mini-batch: one HVP from scratch (``HessianAt``) timed on its first call and as the
median of three warm calls after it, with the kernel time (``ru_stime``: mostly page faults
of memory touched for the first time) and the one-time modules the first call imported. The
setups before the first call:

* ``model``: the model and the batch only (no optimizer has run in the process);
* ``optimizer``: also AdamW with its state allocated by one step on zero gradients, as
  bench_probe builds it (AdamW's step imports ``torch._dynamo``);
* ``imports``: that, and ``torch._dynamo`` and ``torch._decomp.decompositions_for_jvp``
  imported beforehand (timed on their own): what the imports account for;
* ``train``: that, and one training step, as the first measure of a training run meets it.

    python benchmarks/bench_first_call.py
"""
from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import build, model_and_batch, train_step_of

from mtpdiag import losses
from mtpdiag.diagnostics import Probe
from mtpdiag.diagnostics.hvp import HessianAt

ONE_TIME_IMPORTS = ("torch._dynamo", "torch._decomp.decompositions_for_jvp")
# (mode, setup) of each row; the setups are those of the docstring
ROWS = [("rev_rev", "model"), ("fwd_rev", "model"), ("rev_rev", "optimizer"), ("fwd_rev", "optimizer"),
        ("fwd_rev", "imports"), ("rev_rev", "train"), ("fwd_rev", "train")]


def kernel_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def child(mode: str, setup: str) -> None:
    """In the child: time the first HVP and three warm ones after ``setup``; print one row of numbers."""
    torch.set_num_threads(1)
    if setup == "model":
        model, batch = model_and_batch("small", 128, torch.device("cpu"))
    else:
        model, batch, optimizer = build("small", 128, torch.device("cpu"))
    start = time.perf_counter()
    if setup == "imports":
        for name in ONE_TIME_IMPORTS:
            importlib.import_module(name)
    import_s = time.perf_counter() - start
    if setup == "train":
        train_step_of(model, batch, optimizer)()
    model.eval()
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    J, theta = probe.function_of_shared(losses.rl_objective, batch)
    direction = {k: torch.randn_like(t) for k, t in theta.items()}
    walls, kernels, imported = [], [], []
    for call in range(4):
        before_modules, start, start_kernel = set(sys.modules), time.perf_counter(), kernel_seconds()
        HessianAt(J, theta, mode)(direction)
        walls.append(time.perf_counter() - start)
        kernels.append(kernel_seconds() - start_kernel)
        if call == 0:
            imported = [name for name in ONE_TIME_IMPORTS if name in set(sys.modules) - before_modules]
    print(import_s, walls[0], statistics.median(walls[1:]), kernels[0], statistics.median(kernels[1:]),
          ",".join(imported) or "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for mode, setup in ROWS:
        print(f"[bench_first_call] {mode} after {setup} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, setup], capture_output=True, text=True, check=True,
        ).stdout.split()
        import_s, first, warm, first_kernel, warm_kernel = map(float, out[:5])
        rows.append({
            "mode": mode, "setup": setup, "imports before (s)": import_s, "first call (s)": first, "warm call (s)": warm,
            "extra (s)": first - warm, "extra kernel time (s)": first_kernel - warm_kernel,
            "first call imported": out[5],
        })
    table = pd.DataFrame(rows).set_index(["mode", "setup"])
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", None,
                           "display.precision", 3):
        print(table)
    for setup in ("model", "optimizer"):
        fwd, rev = table.loc[("fwd_rev", setup)], table.loc[("rev_rev", setup)]
        print(f"after {setup}: fwd_rev's first call takes {fwd['extra (s)']:.2f} s more than a warm one, rev_rev's "
              f"{rev['extra (s)']:.2f} s (kernel time: {fwd['extra kernel time (s)']:.2f} s and "
              f"{rev['extra kernel time (s)']:.2f} s)")
    pre, opt = table.loc[("fwd_rev", "imports")], table.loc[("fwd_rev", "optimizer")]
    print(f"the one-time imports take {pre['imports before (s)']:.2f} s when torch._dynamo is already imported; "
          f"done before, fwd_rev's extra is {pre['extra (s)']:.2f} s ({pre['extra (s)'] / opt['extra (s)']:.2f}x)")


if __name__ == "__main__":
    main()
