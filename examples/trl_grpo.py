"""GRPO with TRL on a tiny Qwen2 with an MTP head, OCC and the exact diagnostics, on CPU.

    python examples/trl_grpo.py --steps 3 --out runs/trl-grpo

Nothing is downloaded (HF_HUB_OFFLINE=1): the Qwen2 is built from a config (2
layers of width 32, eager attention) over the 1-digit addition task's 14-token
vocabulary, with a tokenizer built in code on the task's character ids, and
wrapped by ``MTPCausalLM`` (one parallel MTP head). A short supervised warm
start (mtpdiag's SFT, ``--sft-steps``) makes some sampled answers right, so the
groups' rewards differ and GRPO has advantages to train on. Then
``MTPGRPOTrainer`` runs TRL's GRPO (loss_type dapo) with the OCC regime; the
step proxy reads lambda_t (the ratio proxy is 0 under TRL's defaults, see
``mtpdiag.integrations.trl``), and the Probe measures c, v^2, h_mm and lambda*
every step into ``<out>/mtpdiag/diag_steps.csv`` (TRL's own log keeps the
``mtp/*`` metrics in ``trainer.state.log_history``).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mtpdiag.config import TrainConfig  # noqa: E402
from mtpdiag.integrations.hf import MTPCausalLM, hf_tokenizer  # noqa: E402
from mtpdiag.integrations.trl import MTPGRPOConfig, MTPGRPOTrainer, task_dataset, task_reward  # noqa: E402
from mtpdiag.sft import run_sft  # noqa: E402
from mtpdiag.tasks import make_task  # noqa: E402


def tiny_qwen2(vocab_size: int, seed: int = 0) -> MTPCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MTPCausalLM.from_config(config, n_mtp=1, wiring="parallel")


def main(argv: list[str] | None = None) -> MTPGRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (TRL's output_dir)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO optimiser steps")
    parser.add_argument("--sft-steps", type=int, default=150, help="supervised warm-start steps (0: none)")
    args = parser.parse_args(argv)

    task = make_task("addition", digits=1)
    model = tiny_qwen2(task.tokenizer.vocab_size)
    if args.sft_steps:
        sft = TrainConfig.from_dict(dict(task="addition", task_options={"digits": 1}, sft_steps=args.sft_steps,
                                         sft_target=None, sft_batch_size=32, sft_lr=3e-3))  # fmt: skip
        run_sft(sft, task, progress=False, model=model)
    config = MTPGRPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16, num_generations=8,
        max_completion_length=task.max_completion_len, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, bf16=False,  # full precision on CPU: the function the Probe measures
        regime="occ", calibrator="occ", calibrator_options={"proxy": "step"}, diag_every=1,
    )  # fmt: skip
    trainer = MTPGRPOTrainer(
        model, task_reward(task), config, train_dataset=task_dataset(task, 16 * args.steps),
        processing_class=hf_tokenizer(task.tokenizer),
    )  # fmt: skip
    trainer.train()
    if trainer.is_world_process_zero():
        diag = pd.read_csv(os.path.join(args.out, "mtpdiag", "diag_steps.csv"))
        print(diag[["step", "c", "cos", "v2", "h_mm", "lambda_star_taylor", "gradient_checkpointing"]].to_string(index=False))
    return trainer


if __name__ == "__main__":
    main()
