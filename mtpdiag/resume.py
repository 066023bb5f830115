"""Resuming a run and loading a finished one: a resumed run must continue the config
(and calibrator) it ran; :func:`load_run` gives a run directory's last model."""
from __future__ import annotations

from pathlib import Path

from .calibrators import Calibrator, WithShadows
from .config import RESUMABLE_FIELDS, TrainConfig, build_model, build_task
from .model import GPT
from .rundir import RunDir
from .tasks import Task


def calibrator_names(calibrator: Calibrator | None) -> dict:
    """config.json's record of the calibrator: the primary's name under ``calibrator``,
    each shadow's name under its label in ``shadows``."""
    if isinstance(calibrator, WithShadows):
        return {"calibrator": calibrator.primary.name, "shadows": {k: c.name for k, c in calibrator.shadows.items()}}
    return {"calibrator": calibrator.name if calibrator is not None else None, "shadows": {}}


def open_run(run: RunDir, cfg: TrainConfig, calibrator: Calibrator | None, resume: bool) -> dict | None:
    if resume:
        check_resumable(run, cfg, calibrator)
    return run.open(resume)


def check_resumable(run: RunDir, cfg: TrainConfig, calibrator: Calibrator | None) -> None:
    """A resumed run must continue the config it ran. One with no checkpoint yet has
    no state to continue (it starts again from step 0), so it may take a corrected config."""
    saved = run.read_config()
    if saved is None or not run.checkpoint_path.exists():
        return
    current = cfg.to_dict()
    differ = sorted(k for k in current if k not in RESUMABLE_FIELDS and saved["config"].get(k) != current[k])
    if differ:
        changes = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"cannot resume {run.path}: its config differs in {changes}; only {list(RESUMABLE_FIELDS)} may change "
            "on resume (start a new --out for a different config)"
        )
    names = calibrator_names(calibrator)
    ran = {key: saved.get(key) for key in names}
    if ran != names:
        raise ValueError(
            f"cannot resume {run.path}: it ran calibrator {ran['calibrator']!r} with shadows {ran['shadows']}, "
            f"not {names['calibrator']!r} with shadows {names['shadows']}"
        )


def load_run(out: str | Path, device: str | None = None) -> tuple[GPT, TrainConfig, Task]:
    """The model of a run directory's last checkpoint, with its config and task."""
    run = RunDir(out)
    saved = run.read_config()
    checkpoint = run.read_checkpoint()
    if saved is None or checkpoint is None:
        raise FileNotFoundError(f"{out} has no config.json and checkpoint.pt: is it a run directory of `mtpdiag train`?")
    if saved.get("model_class", "GPT") != "GPT":
        raise ValueError(
            f"{out} trained a {saved['model_class']}, not mtpdiag's GPT: build that model and load "
            f"torch.load('{run.checkpoint_path}')['model'] into it"
        )
    values = saved["config"] if device is None else {**saved["config"], "device": device}
    cfg = TrainConfig.from_dict(values)
    task = build_task(cfg)
    model = build_model(cfg, task)
    model.load_state_dict(checkpoint["model"])
    return model, cfg, task
