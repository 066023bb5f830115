"""Command line: ``mtpdiag train ...`` (one subcommand per job).

Every key of the flat :class:`~mtpdiag.config.TrainConfig` dict is a flag
(``--block-size``, ``--lr``, ``--diag-every``, ...); task options are
``--task-option digits=4``. With ``--resume`` the run directory's saved config
is the base and flags given override it.

Bad input, a damaged file or a run that diverged ends with one line,
``mtpdiag <command>: error: <what and the fix>``, and exit status 2; an
interrupt with exit status 130, the run left resumable.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from . import __version__, regimes
from .calibrators import CALIBRATORS
from .config import CURVE_OBJECTIVES, DTYPES, OPTIMIZERS, TOP_CURVATURE_STEPS, TrainConfig, flat_fields
from .diagnostics import PROBE_HVP_MODES
from .distributed import is_main_process
from .experiment import PRESETS, micro, run_job
from .losses import NonFiniteLossError
from .model import ATTENTION_IMPLS, WIRINGS
from .progress import one_line_warning
from .rundir import RunDir
from .tasks import TASKS
from .health import COLLAPSE_FRACTION, LAMBDA_RANGE
from .train import train

DESCRIPTION = (
    "mtpdiag measures, inside a small-GPT RL (GRPO/DAPO) training loop, how a multi-token-prediction loss "
    "helps or hurts the RL objective. 'mtpdiag train' runs one regime; 'mtpdiag run' runs the main job and "
    "writes its figures and claims report."
)


def choices() -> dict:
    """Each flag's choices, read from the registries when the parser is built."""
    return {
        "task": sorted(TASKS),
        "regime": regimes.names(),
        "optimizer": OPTIMIZERS,
        "detach_mode": tuple(regimes.DETACH_MODES),
        "dtype": tuple(DTYPES),
        "mtp_wiring": WIRINGS,
        "attention": ATTENTION_IMPLS,
        "calibrator": [*sorted(CALIBRATORS), None],
        "diag_top_curvature": TOP_CURVATURE_STEPS,
        "diag_hvp_mode": PROBE_HVP_MODES,
    }


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def _task_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write a task option as KEY=VALUE, e.g. digits=4")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _optional(parse):
    def parse_or_none(text: str):
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = parse.__name__  # argparse names the type in its error messages
    return parse_or_none


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count of processes: use 1 or more")
    return value


def _indices(text: str) -> tuple[int, ...]:
    return tuple(int(name) for name in _names(text))


PARSERS = {"int": int, "float": float, "str": str, "bool": _bool, "int | None": _optional(int),
           "float | None": _optional(float), "str | None": _optional(str), "tuple[str, ...]": _names,
           "tuple[int, ...]": _indices}
# what each flat TrainConfig key's flag does (units, range); the default and the choices are added
HELP = {
    "task": "the RL task (each has a unique correct completion, so J_true is exact)",
    "task_options": "a task constructor option, repeatable (e.g. digits=4)",
    "block_size": "the model's context length in tokens (>= the task's prompt plus completion)",
    "d_model": "width of the residual stream (divisible by --n-head)",
    "n_layer": "transformer blocks in the trunk",
    "n_head": "attention heads per block",
    "dropout": "dropout probability in [0, 1)",
    "tie_embeddings": "share the input embedding with the output head (true/false)",
    "n_mtp": "MTP heads; head k predicts the token k+1 positions ahead (1 .. block_size-2)",
    "mtp_wiring": "parallel: one block per head on the trunk; sequential: DeepSeek-V3-style chained modules",
    "attention": "math: softmax(QK^T)V written out (exact HVPs need it); sdpa: the fused kernel",
    "sft_steps": "most SFT warm-start steps (>= 1)",
    "sft_target": "stop SFT once validation J_true reaches this, in (0, 1]",
    "sft_eval_every": "SFT steps between validation J_true checks",
    "sft_batch_size": "target completions per SFT step",
    "sft_lr": "AdamW learning rate of the SFT warm start (> 0)",
    "sft_mtp_weight": "weight of the MTP cross-entropy in the SFT loss (>= 0)",
    "steps": "RL steps (may be raised on --resume)",
    "prompts_per_step": "prompts sampled per RL step",
    "group_size": "completions sampled per prompt (the GRPO group)",
    "temperature": "sampling temperature of the rollouts (> 0)",
    "max_new_tokens": "most tokens sampled per completion (>= the task's longest correct one)",
    "minibatches": "optimiser steps per RL step, on consecutive chunks of its rollouts",
    "lr": "RL learning rate (> 0; a warning above 1 for sgd, above 0.1 for adamw)",
    "optimizer": "the RL optimiser",
    "weight_decay": "the optimiser's weight decay (>= 0)",
    "eps_low": "lower PPO clip range of the token ratio (>= 0)",
    "eps_high": "upper PPO clip range of the token ratio (>= 0; DAPO's clip-higher)",
    "regime": "how the MTP heads meet the RL objective",
    "lambda_placement": "where a policy-loss regime puts lambda: on the advantages (the reference code) or the objective",
    "lam": "the fixed MTP coefficient lambda of a ce, policy or occ run (finite)",
    "calibrator": "the occ regime's online lambda_t, chosen on every mini-batch",
    "detach_mode": "detach regime: full cuts the MTP heads from trunk, embedding and head; trunk_only the trunk",
    "eval_every": "RL steps between held-out evaluations (exact J_true, sampled pass@1)",
    "eval_prompts": "held-out prompts per evaluation",
    "eval_samples": "completions sampled per held-out prompt for pass@1",
    "checkpoint_every": "RL steps between checkpoints (a resumed run restarts from the last one)",
    "diag_every": "RL steps between exact MTP decompositions (0: off)",
    "diag_per_block": "also measure c and v^2 per parameter block (true/false)",
    "diag_top_curvature": "measured steps that also get the top curvature L (Lanczos, ~10 HVPs)",
    "diag_objectives": f"comma-separated curve objectives, of {','.join(CURVE_OBJECTIVES)} (j_batch included)",
    "diag_hvp_mode": "Hessian-vector products: forward-over-reverse, reverse-over-reverse, or auto (the faster, timed once)",
    "diag_gg_curvature": "also measure g^T H g (kappa_g: one more Hessian-vector product per objective) (true/false)",
    "diag_minibatches": "comma-separated mini-batch indices (from 0) measured on a measured step (empty: all)",
    "diag_reuse_gradients": "measured mini-batches: the Probe reads g and m from the trainer's split backward "
                            "(true; the measured step is the trained one bit for bit) or takes its own (false; "
                            "measuring changes no trained number) (true/false)",
    "seed": "seed of the initialisation, SFT and every RL step (same seed: same SFT start)",
    "device": "torch device, e.g. cpu or cuda (may change on --resume)",
    "dtype": "floating-point type of the parameters and all computation",
    "threads": "CPU threads of torch (>= 1; 'none': torch's default here); part of the SFT cache key",
}


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per flat TrainConfig key. Defaults are suppressed so that only the flags
    actually given override the base config (the defaults, or a resumed run's)."""
    flag_choices = choices()
    for f in flat_fields():
        if f.name == "task_options":
            parser.add_argument("--task-option", dest="task_options", action="append", type=_task_option,
                                default=argparse.SUPPRESS, metavar="KEY=VALUE", help=HELP[f.name])
            continue
        default = "none" if f.default is None else _shown(f.default)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=PARSERS[f.type], choices=flag_choices.get(f.name),
            default=argparse.SUPPRESS,
            help=f"{HELP[f.name]} (default: {default}" + ("; 'none' unsets it)" if "None" in f.type else ")"),
        )
    parser.add_argument("--out", required=True, help="the run directory to create (or continue with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint; flags given override its config")
    parser.add_argument("--sft-cache", default=None,
                        help="folder of the cached SFT warm starts (default: $MTPDIAG_CACHE or ~/.cache/mtpdiag)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="print no progress (default: a bar on a terminal, a line every 30 s off it)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags given on the command line over the base config: a resumed run's saved
    config, else the defaults."""
    saved = RunDir(args.out).read_config() if args.resume else None
    base = saved["config"] if saved else TrainConfig().to_dict()
    given = {f.name: getattr(args, f.name) for f in flat_fields() if hasattr(args, f.name)}
    if "task_options" in given:
        given["task_options"] = dict(given["task_options"])
    return TrainConfig.from_dict({**base, **given})


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    result = train(cfg, args.out, resume=args.resume, progress=args.progress, cache_dir=args.sft_cache)
    if not is_main_process():
        return
    final = result.metrics.iloc[-1]
    print(
        f"{cfg.regime}: step {int(final['step'])}, J_true {final['j_true']:.4f}, "
        f"pass@1 {final['pass1']:.3f} [{final['pass1_ci_low']:.3f}, {final['pass1_ci_high']:.3f}] -> {result.out}"
    )


def cmd_run(args: argparse.Namespace) -> None:
    preset = micro(PRESETS[args.preset]) if args.micro else PRESETS[args.preset]
    job = run_job(preset, args.out or f"runs/{preset.name}", workers=args.workers, cache_dir=args.sft_cache,
                  progress=args.progress)
    print(f"figures and claims report: {job / 'figures'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpdiag", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mtpdiag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train", help="SFT warm start (cached), then RL in one MTP regime",
        description=f"SFT warm start (cached), then RL in one MTP regime, into --out. metrics.csv flags a run whose "
                    f"J_true falls below {COLLAPSE_FRACTION:g} x its post-SFT value or whose lambda leaves "
                    f"[-{LAMBDA_RANGE:g}, {LAMBDA_RANGE:g}].",
    )
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=cmd_train)
    run_parser = commands.add_parser(
        "run", help="the main job: every regime over several seeds with diagnostics, then the figures and claims report"
    )
    run_parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                            help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
                            + " (default: default)")
    run_parser.add_argument("--micro", action="store_true",
                            help="the preset on a tiny model for a few steps: checks the whole path in a minute or two")
    run_parser.add_argument("--out", default=None,
                            help="job directory (default: runs/<preset>); run again on it to resume a stopped job")
    run_parser.add_argument("--workers", type=_positive, default=None,
                            help="parallel training processes, >= 1, each with one thread "
                                 "(default: one per core, at most one per run)")
    run_parser.add_argument("--sft-cache", default=None,
                            help="folder of the cached SFT warm starts (default: $MTPDIAG_CACHE or ~/.cache/mtpdiag)")
    run_parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                            help="print no progress (default: a bar per phase on a terminal, a line every 30 s off it)")
    run_parser.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning  # catch_warnings restores it
        try:
            args.func(args)
        except (ValueError, NonFiniteLossError, OSError) as err:
            # OSError: a file that cannot be read or written (permissions, a full disk): its own words name it
            text = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err)
            print(f"mtpdiag {args.command}: error: {' '.join(text.split())}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"mtpdiag {args.command}: interrupted; the same command with --resume (train) or again (run) "
                  "continues from the last checkpoint", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()
