"""Command line: ``mtpdiag train ...`` (one subcommand per job).

Every key of the flat :class:`~mtpdiag.config.TrainConfig` dict is a flag
(``--block-size``, ``--lr``, ``--diag-every``, ...); task options are
``--task-option digits=4``. With ``--resume`` the run directory's saved config
is the base and flags given override it.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import regimes
from .calibrators import CALIBRATORS
from .config import CURVE_OBJECTIVES, DTYPES, OPTIMIZERS, TOP_CURVATURE_STEPS, TrainConfig, flat_fields
from .diagnostics import HVP_MODES
from .distributed import is_main_process
from .experiment import PRESETS, micro, run_job
from .losses import NonFiniteLossError
from .model import ATTENTION_IMPLS, WIRINGS
from .rundir import RunDir
from .tasks import TASKS
from .train import train


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
        "diag_hvp_mode": HVP_MODES,
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


PARSERS = {"int": int, "float": float, "str": str, "bool": _bool, "int | None": _optional(int),
           "float | None": _optional(float), "str | None": _optional(str), "tuple[str, ...]": _names}
HELP = {"diag_objectives": f"comma-separated curve objectives, of {','.join(CURVE_OBJECTIVES)}"}


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per flat TrainConfig key. Defaults are suppressed so that only the flags
    actually given override the base config (the defaults, or a resumed run's)."""
    flag_choices = choices()
    for f in flat_fields():
        if f.name == "task_options":
            parser.add_argument("--task-option", dest="task_options", action="append", type=_task_option,
                                default=argparse.SUPPRESS, metavar="KEY=VALUE",
                                help="task constructor option, repeatable (e.g. digits=4)")
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=PARSERS[f.type], choices=flag_choices.get(f.name),
            default=argparse.SUPPRESS,
            help=", ".join(filter(None, [HELP.get(f.name), f"default: {_shown(f.default)}"]))
            + (" ('none' to unset)" if "None" in f.type else ""),
        )
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/x")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--sft-cache", default=None,
                        help="SFT cache folder (default: $MTPDIAG_CACHE or ~/.cache/mtpdiag)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bar (it is hidden anyway when not on a terminal)")


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
    parser = argparse.ArgumentParser(prog="mtpdiag", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="SFT warm start (cached), then RL in one MTP regime")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=cmd_train)
    run_parser = commands.add_parser(
        "run", help="the main job: every regime over several seeds with diagnostics, then the figures and claims report"
    )
    run_parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                            help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()))
    run_parser.add_argument("--micro", action="store_true",
                            help="the preset on a tiny model for a few steps: checks the whole path in a minute or two")
    run_parser.add_argument("--out", default=None, help="job directory (default: runs/<preset>); rerun to resume")
    run_parser.add_argument("--workers", type=int, default=None, help="parallel training processes (default: cores)")
    run_parser.add_argument("--sft-cache", default=None,
                            help="SFT cache folder (default: $MTPDIAG_CACHE or ~/.cache/mtpdiag)")
    run_parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                            help="hide the progress bar")
    run_parser.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, NonFiniteLossError) as err:
        sys.exit(f"mtpdiag {args.command}: error: {err}")


if __name__ == "__main__":
    main()
