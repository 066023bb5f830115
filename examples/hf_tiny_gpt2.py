"""A few RL steps of mtpdiag's trainer on a tiny Hugging Face GPT-2 with an MTP
head, with the exact diagnostics on.

    python examples/hf_tiny_gpt2.py --out runs/hf-tiny-gpt2
    torchrun --standalone --nproc_per_node 2 examples/hf_tiny_gpt2.py --out runs/hf-tiny-gpt2-2ranks

The GPT-2 is random (nothing is downloaded): 2 layers of width 32 over the
1-digit addition task's 14-token vocabulary, eager attention (exact
Hessian-vector products need it), wrapped by ``MTPCausalLM`` with one parallel
MTP head on GPT-2's output embedding. ``train(..., model=...)`` warm-starts it by
SFT (not cached: the cache is keyed on mtpdiag's own model config), then runs RL
with OCC (the paper's reading), and the Probe measures c, v^2, h_gm, h_mm and
lambda* every step on J_batch and on held-out J_true into ``<out>/diag_*.csv``.
Under torchrun every rank builds the model and rank 0's SFT weights reach the others.
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch
import transformers

from mtpdiag.config import DTYPES, TrainConfig
from mtpdiag.distributed import is_main_process
from mtpdiag.integrations.hf import MTPCausalLM
from mtpdiag.tasks import make_task
from mtpdiag.train import TrainResult, train


def tiny_gpt2(vocab_size: int, n_mtp: int = 1, dtype: torch.dtype = torch.float32) -> MTPCausalLM:
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return MTPCausalLM.from_config(config, n_mtp=n_mtp, wiring="parallel").to(dtype)


def main(argv: list[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (must not exist or be empty)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT warm-start steps")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = parser.parse_args(argv)

    cfg = TrainConfig.from_dict(dict(
        task="addition", task_options={"digits": 1}, block_size=8, n_mtp=1, dtype=args.dtype,
        sft_steps=args.sft_steps, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
        steps=args.steps, prompts_per_step=8, group_size=4, minibatches=2, lr=1e-3,
        regime="occ", calibrator="occ-paper", eval_every=args.steps, eval_prompts=32, eval_samples=2, diag_every=1,
    ))  # fmt: skip
    task = make_task(cfg.task, **cfg.task_options)
    model = tiny_gpt2(task.tokenizer.vocab_size, cfg.model.n_mtp, DTYPES[cfg.dtype])
    result = train(cfg, args.out, model=model, progress=args.progress)
    if is_main_process():
        print(result.metrics[["step", "reward_mean", "j_batch", "lambda_0", "j_true"]].to_string(index=False))
        diag = pd.read_csv(result.out / "diag_steps.csv")
        print(diag[["step", "minibatch", "objective", "c", "v2", "h_mm", "lambda_star_taylor", "lambda_star_meas"]]
              .to_string(index=False))
    return result


if __name__ == "__main__":
    main()
