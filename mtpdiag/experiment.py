"""The main job: every regime over several seeds from one SFT warm start, with the
diagnostics on, then the figures and the claims report (docs/theory.md s.10).

Layout of a job directory (the names of :mod:`mtpdiag.schema`)::

    job.json                 preset, arms, seeds, versions
    .incomplete              present until the figures and report are written
    runs/<arm>/seed<k>/      one trainer run directory per (arm, seed)
    eta_sweep.csv            Taylor residual against eta (claim C1, figure F4)
    figures/                 F1-F6 (PNG and PDF), table1.{csv,md}, claims.{md,csv}

A killed job resumes: finished runs are skipped, unfinished ones continue from
their last checkpoint. The job holds ``<job>/.lock`` while it runs, so a second
job on the same directory is refused while the first lives, and takes over once
it is dead. Worker processes die with the job (``kill -9`` of it included), so
none keeps writing into a directory that a restarted job has taken over.

Every run trains with its config's thread count (the presets: 1), whatever
``--workers`` is, so a job's numbers do not depend on how it was parallelised.
"""
from __future__ import annotations

import copy
import ctypes
import json
import multiprocessing
import os
import platform
import queue
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__, progress, regimes
from .calibrators import OCC, CalibrationInputs, WithShadows, make_calibrator
from .config import TrainConfig, build_task
from .diagnostics import Probe
from .hook import every
from .progress import Progress, Update
from .regimes import CE, DETACH, FROZEN, KL_REGIME, OCC_REGIME, POLICY, TV_REGIME
from .losses import aligned_logprobs, j_true
from .rollout import heldout_batch, rollout
from .rundir import DirectoryLock, RunDir, check_output_dir, read_json
from .schema import ETA_SWEEP, INCOMPLETE, JOB_FILE, LOCK, Arm, atomic_write, run_dir, shadow_label
from .sft import warm_start, writable_cache
from .regret import RegretHook
from .resume import load_run
from .train import train


def arm_config(base: TrainConfig, arm: Arm, seed: int) -> TrainConfig:
    """The TrainConfig of one (arm, seed) of a job over ``base`` (without the Probe if the arm says so)."""
    cfg = replace(base, regime=arm.regime, lam=arm.lam, calibrator=arm.calibrator, seed=seed)
    if arm.optimizer is not None:
        cfg = replace(cfg, optimizer=arm.optimizer)
    if arm.lr is not None:
        cfg = replace(cfg, lr=arm.lr)
    return cfg if arm.diagnostics else cfg.with_values(diag_every=0)


# A measured step costs about 80 training steps (benchmarks/bench_trained_step.py), so the
# Probe runs where the claims read it: detach's MTP loss never reaches S (its curve is flat
# at 0; its SGD arm carries the regret experiment instead), the other fixed-lambda arms are
# there for Table 1's sweep and the paired final J_true. policy-0.5 is measured for claim C4.
SGD_ARMS = (
    Arm.of(DETACH.name, diagnostics=False),
    Arm.of(CE.name, 0.5),
    Arm.of(POLICY.name, 0.1, diagnostics=False),
    Arm.of(POLICY.name, 0.5),
    Arm.of(POLICY.name, 1.0, diagnostics=False),
    Arm.of(OCC_REGIME.name, calibrator="occ-paper"),
    Arm.of(OCC_REGIME.name, calibrator="occ-reference", diagnostics=False),
    Arm.of(OCC_REGIME.name, calibrator="oracle"),
    # mtpdiag's own calibrator (docs/theory.md s.5) end to end: lambda*_taylor with its curvature re-measured every 4th call
    Arm.of(OCC_REGIME.name, calibrator="amortised-taylor", diagnostics=False),
)
# The paper's regime: AdamW at the trainer's default lr, detach against OCC (claims C6 and C7:
# lambda*_precond against the optimizer-faithful lambda*_meas of the AdamW update)
ADAMW_LR = 1e-4
ADAMW_ARMS = (
    Arm.of(DETACH.name, diagnostics=False, optimizer="adamw", lr=ADAMW_LR),
    Arm.of(OCC_REGIME.name, calibrator="occ-paper", optimizer="adamw", lr=ADAMW_LR),
)
DEFAULT_ARMS = SGD_ARMS + ADAMW_ARMS
# The practitioners' regimes (docs/theory.md s.9), trained for their draft acceptance and
# J_true (F8, acceptance.md) without the Probe: each costs about a detach run.
ACCEPTANCE_ARMS = (
    Arm.of(KL_REGIME.name, 0.5, diagnostics=False),
    Arm.of(TV_REGIME.name, 0.5, diagnostics=False),
    Arm.of(FROZEN.name, diagnostics=False),
)


@dataclass(frozen=True)
class Preset:
    name: str
    base: TrainConfig
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...] = DEFAULT_ARMS
    eta_sweep_points: int = 7
    description: str = ""
    # the regret experiment (mtpdiag.regret) on every regret_every-th step of the SGD detach arm (0: off)
    regret_every: int = 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "base": self.base.to_dict(),
            "seeds": list(self.seeds),
            "arms": [asdict(a) for a in self.arms],
            "eta_sweep_points": self.eta_sweep_points,
            "description": self.description,
            "regret_every": self.regret_every,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        return cls(
            name=d["name"],
            base=TrainConfig.from_dict(d["base"]),
            seeds=tuple(d["seeds"]),
            arms=tuple(Arm(**a) for a in d["arms"]),
            eta_sweep_points=d["eta_sweep_points"],
            description=d.get("description", ""),
            regret_every=d.get("regret_every", 0),
        )

    def runs_regret(self, arm: Arm) -> bool:
        """Whether ``arm``'s runs carry the regret experiment: the SGD detach arm, when it is on."""
        return self.regret_every > 0 and arm.regime == DETACH.name and arm_config(self.base, arm, 0).optimizer == "sgd"


def _arm_calibrator(arm: Arm, num_heads: int):
    """The training calibrator of an occ arm, with shadows that log, on the same
    mini-batches, what the other readings would choose (claim C5). OCC arms
    shadow the other ratio preset (free). The oracle arm, which measures
    lambda*_taylor on every mini-batch anyway, shadows every OCC reading, so each
    is compared with lambda* on the same mini-batch and parameters."""
    if arm.calibrator is None:
        return None
    readings = {
        "occ-paper": lambda: make_calibrator("occ-paper", num_heads),
        "occ-reference": lambda: make_calibrator("occ-reference", num_heads),
        "occ-step": lambda: make_calibrator("occ", num_heads, proxy="step"),
    }
    cheap = ("occ-paper", "occ-reference")
    shadowed = [name for name in (readings if arm.calibrator == "oracle" else cheap) if name != arm.calibrator]
    shadows = {shadow_label(name.removeprefix("occ-")): readings[name]() for name in shadowed}
    return WithShadows(make_calibrator(arm.calibrator, num_heads), shadows)


def _warm_start(cfg: TrainConfig, cache_dir: str | None) -> None:
    warm_start(cfg, build_task(cfg), cache_dir)


def run_unit(job_dir: str, preset: dict, arm: dict, seed: int, cache_dir: str | None) -> str:
    """Train one (arm, seed) into ``<job>/runs/<arm>/seed<k>``, resuming it if it exists.
    Top level so a worker process can run it."""
    preset_obj, arm_obj = Preset.from_dict(preset), Arm(**arm)
    cfg = arm_config(preset_obj.base, arm_obj, seed)
    out = run_dir(job_dir, arm_obj.label, seed)
    if RunDir(out).is_complete():
        return str(out)
    callbacks = [RegretHook(cfg, out, every(preset_obj.regret_every))] if preset_obj.runs_regret(arm_obj) else []
    train(cfg, out, resume=out.exists(), calibrator=_arm_calibrator(arm_obj, cfg.model.n_mtp), callbacks=callbacks,
          cache_dir=cache_dir)
    return str(out)


# ----------------------------------------------------------------------------- worker processes

PARENT_POLL_S = 1.0  # how often a worker checks that its job is still alive (where prctl is not there)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """End this worker when the job process ``parent`` ends, however it ends.

    On Linux the kernel sends SIGKILL when the parent dies (prctl
    PR_SET_PDEATHSIG); everywhere a watchdog thread also checks the parent pid
    (an orphan is re-parented, so ``os.getppid()`` changes) and exits."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the job died before prctl took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="mtpdiag-parent-watchdog", daemon=True).start()


def _worker_init(parent: int, updates, one_line_warnings: bool) -> None:
    """Every worker of a job: it dies with the job, its progress bars go to the job's, and
    its warnings look like the job's."""
    _die_with_parent(parent)
    progress.forward_to(updates.put)
    if one_line_warnings:
        warnings.showwarning = progress.one_line_warning


class _Workers:
    """A pool of worker processes that die with this process, and whose progress
    reaches ``on_update``. On any exception (an interrupt included) the queued
    units are cancelled and the workers ended: nothing keeps training behind the
    job's back."""

    def __init__(self, count: int, on_update):
        context = multiprocessing.get_context("spawn")
        self.updates = context.Queue()
        self.on_update = on_update
        self.pool = ProcessPoolExecutor(count, mp_context=context, initializer=_worker_init,
                                        initargs=(os.getpid(), self.updates,
                                                  warnings.showwarning is progress.one_line_warning))

    def run(self, calls: dict, on_done) -> None:
        """Submit ``calls`` ({key: (fn, *args)}); ``on_done(key)`` as each finishes."""
        try:
            pending = {self.pool.submit(*call): key for key, call in calls.items()}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                self._drain()
                for future in done:
                    future.result()
                    on_done(pending.pop(future))
        except BaseException:
            self.pool.shutdown(wait=False, cancel_futures=True)
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):  # None once shut down
                process.kill()  # a run killed anywhere resumes from its last checkpoint
            raise
        self.pool.shutdown()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self.on_update(self.updates.get_nowait())
            except queue.Empty:
                return


def run_job(
    preset: Preset,
    out: str | Path,
    *,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    report: bool = True,
) -> Path:
    """Run every (arm, seed) of ``preset`` into ``out``, then the eta sweep and the
    report. Re-running on the same ``out`` resumes; a different preset there is an
    error, and so is a job directory another live process is writing.

    ``workers``: parallel training processes (None: one per core, at most one per
    run). ``progress``: see :class:`~mtpdiag.progress.Progress`; one bar per phase
    (SFT, runs, eta sweep, report)."""
    if torch.device(preset.base.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"preset {preset.name!r} trains on CUDA and this machine has no GPU: use --preset default or quick")
    units = [(arm, seed) for seed in preset.seeds for arm in preset.arms]
    if workers is None:
        workers = min(os.cpu_count() or 1, len(units))
    if workers < 1:
        raise ValueError(f"workers={workers}: a job needs at least one worker process (--workers 1 or more)")
    job_dir = Path(out)
    check_output_dir(job_dir)
    _check_job(job_dir, preset)
    with DirectoryLock(job_dir, "job directory"):
        _open_job(job_dir, preset)
        # one SFT per seed, before the runs, so no two runs train the same one
        sft_configs = [replace(preset.base, seed=seed) for seed in preset.seeds]
        cache = str(writable_cache(sft_configs, cache_dir, job_dir))
        _sft_phase(sft_configs, cache, workers, progress)
        _runs_phase(preset, job_dir, units, cache, workers, progress)
        eta_sweep(preset, job_dir, progress)
        if report:
            from .report import build_report

            build_report(job_dir, progress=progress)
        (job_dir / INCOMPLETE).unlink(missing_ok=True)
    return job_dir


def _sft_phase(configs: list[TrainConfig], cache_dir: str, workers: int, show: bool | None) -> None:
    with Progress(len(configs), "mtpdiag run: sft", unit="seed", show=show) as bar:
        def on_update(update: Update) -> None:
            bar.set_postfix(**{update.desc: f"{update.n}/{update.total} {update.postfix}".strip()})

        if workers == 1:
            progress.forward_to(on_update)
            try:
                for cfg in configs:
                    _warm_start(cfg, cache_dir)
                    bar.update()
            finally:
                progress.forward_to(None)
        else:
            _Workers(min(workers, len(configs)), on_update).run(
                {cfg.seed: (_warm_start, cfg, cache_dir) for cfg in configs}, lambda seed: bar.update()
            )


def _runs_phase(preset: Preset, job_dir: Path, units: list, cache_dir: str, workers: int, show: bool | None) -> None:
    """Every unfinished (arm, seed); one bar over all their RL steps."""
    todo = [(arm, seed) for arm, seed in units if not RunDir(run_dir(job_dir, arm.label, seed)).is_complete()]
    # the oracle runs cost about twice the others: start them first so none is left alone at the end
    todo.sort(key=lambda unit: unit[0].calibrator != "oracle")
    steps = preset.base.steps
    finished = (len(units) - len(todo)) * steps
    running: dict[str, int] = {}  # a running (or finished) run's bar: its steps so far
    with Progress(len(units) * steps, "mtpdiag run: rl", initial=finished, show=show) as bar:
        def on_update(update: Update) -> None:
            running[update.key] = update.n
            bar.set_postfix(runs=f"{len(units) - len(todo)}/{len(units)} done",
                            **{update.desc: update.postfix})
            bar.moveto(finished + sum(running.values()))

        def on_done(unit) -> None:
            todo.remove(unit)
            bar.set_postfix(runs=f"{len(units) - len(todo)}/{len(units)} done")

        calls = {(arm, seed): (run_unit, str(job_dir), preset.to_dict(), asdict(arm), seed, cache_dir)
                 for arm, seed in todo}
        if workers == 1:
            progress.forward_to(on_update)
            try:
                for unit, call in calls.items():
                    call[0](*call[1:])
                    on_done(unit)
            finally:
                progress.forward_to(None)
        else:
            _Workers(min(workers, len(calls)) or 1, on_update).run(calls, on_done)


def _check_job(job_dir: Path, preset: Preset) -> None:
    """``job_dir`` must hold this preset's job, or nothing yet."""
    saved = read_json(job_dir / JOB_FILE)
    if saved is not None:
        if saved.get("preset") != preset.to_dict():
            raise ValueError(
                f"{job_dir} holds a job with another preset ({saved.get('preset', {}).get('name')!r}); "
                "choose a new --out, or delete that directory to start over"
            )
    elif job_dir.exists() and any(p.name != LOCK for p in job_dir.iterdir()):
        raise ValueError(f"{job_dir} is not empty and holds no job.json: choose a new --out")


def _open_job(job_dir: Path, preset: Preset) -> None:
    """Mark the job incomplete and write its job.json (after :func:`_check_job`, under its lock)."""
    spec = {"mtpdiag_version": __version__, "preset": preset.to_dict()}
    file = job_dir / JOB_FILE
    (job_dir / INCOMPLETE).touch()
    spec["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    atomic_write(file, lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))


ETA_SWEEP_LAMBDAS = (-1.0, 1.0, 2.0)
ETA_SWEEP_DECADES = 2.0
ETA_SWEEP_TOP = 1e-3
ETA_SWEEP_TRAINED_POINTS = 4  # etas from lr/10 to ETA_SWEEP_ABOVE_LR x lr
ETA_SWEEP_ABOVE_LR = 4.0
ETA_SWEEP_MAX_BATCHES = 20


def eta_sweep_arm(preset: Preset) -> Arm:
    """The arm whose final model the eta sweep probes: a joint SGD policy arm if the
    preset has one (the regime claim C1 is about), else the first joint SGD arm (the
    sweep takes SGD steps: the theory's)."""
    joint = [a for a in preset.arms if regimes.get(a.regime).joint and arm_config(preset.base, a, 0).optimizer == "sgd"]
    if not joint:
        raise ValueError("the eta sweep needs an SGD arm whose MTP loss reaches the shared parameters "
                         "(not only detached ones): add one to the preset")
    return next((a for a in joint if regimes.get(a.regime) is POLICY), joint[0])


def eta_sweep(preset: Preset, job_dir: Path, progress: bool | None = None) -> pd.DataFrame:
    """Per eta, on one state (the final model of every seed of one arm, a fresh rollout
    batch), in float64 so rounding stays far below the eta^3 residual: the curve
    Delta(lambda) on the held-out J_true against its Taylor parabola (claim C1, F4),
    lambda*_taylor, and the paper reading's OCC lambda_t after one SGD step of that
    eta (claim C8).

    The etas are ``eta_sweep_points`` over ``ETA_SWEEP_DECADES`` decades up to
    ``ETA_SWEEP_TOP / (|g| + |m|)`` (a step along g + m that moves the parameters by
    0.001 in norm: where the eta^3 law is clean), and ``ETA_SWEEP_TRAINED_POINTS``
    from a tenth of the trained lr to ``ETA_SWEEP_ABOVE_LR`` times it, the range of the
    step actually taken. J_true has no PPO clip, so its curve is smooth at every eta."""
    file = job_dir / ETA_SWEEP
    if file.exists():
        return pd.read_csv(file)
    arm = eta_sweep_arm(preset)
    rows = []
    with Progress(len(preset.seeds), f"mtpdiag run: eta sweep of {arm.label}", unit="seed", show=progress) as bar:
        for seed in preset.seeds:
            rows += _eta_sweep_rows(run_dir(job_dir, arm.label, seed), preset)
            bar.update()
    frame = pd.DataFrame(rows)
    atomic_write(file, lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def sweep_etas(eta_max: float, lr: float, points: int) -> np.ndarray:
    """The sweep's step sizes, ascending: the clean small-eta range and the trained range."""
    small = np.geomspace(eta_max * 10**-ETA_SWEEP_DECADES, eta_max, points)
    trained = np.geomspace(lr / 10, ETA_SWEEP_ABOVE_LR * lr, ETA_SWEEP_TRAINED_POINTS)
    return np.unique(np.concatenate([small, trained]))


def occ_lambda_after_step(model, losses, cfg: TrainConfig, batch: dict, eta: float) -> float:
    """The paper reading's OCC lambda_t (head 1) on the second half of ``batch`` after one
    SGD step of size ``eta`` with the regime's loss on the first half, from pi_old of
    ``batch``: the trainer's second mini-batch, at step size eta. ``model`` is not changed."""
    half = batch["input_ids"].size(0) // 2
    first, second = ({k: v[rows] for k, v in batch.items()} for rows in (slice(0, half), slice(half, None)))
    stepped = copy.deepcopy(model)
    optimizer = torch.optim.SGD(stepped.parameters(), lr=eta)
    out = losses.forward(stepped, first)
    lambdas = regimes.get(cfg.regime).lambdas(cfg.lam, cfg.model.n_mtp, torch.float64)
    (losses.aux_loss(out, first, lambdas) - losses.objective(out, first)).backward()
    optimizer.step()
    with torch.no_grad():
        lp = aligned_logprobs(losses.forward(stepped, second))
    calibration = OCC.paper()(CalibrationInputs(
        step=cfg.steps + 1, minibatch=1, logprobs=lp, old_logprobs=second["old_logprobs"],
        response_mask=second["response_mask"], lr=eta))  # fmt: skip
    return float(calibration.lambdas[0])


def _eta_sweep_rows(run_dir: Path, preset: Preset) -> list[dict]:
    model, cfg, task = load_run(run_dir)
    model = model.to(torch.float64)
    cfg = replace(cfg, dtype="float64")
    losses = regimes.get(cfg.regime).losses(cfg)
    probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward)
    heldout = heldout_batch(task, cfg)
    for step in range(cfg.steps + 1, cfg.steps + 1 + ETA_SWEEP_MAX_BATCHES):
        batch, _ = rollout(model, task, cfg, step)  # the rollouts training would have drawn next
        first = probe.measure(batch, 1.0, hvp=False, line_search=False, crossfit=False)
        if first.g_norm > 0 and first.m_norm > 0:
            break
    else:
        raise RuntimeError(
            f"the eta sweep found no rollout batch with a non-zero RL and MTP gradient in {ETA_SWEEP_MAX_BATCHES} "
            f"tries on {run_dir} (every group had a uniform reward): train longer or with more prompts per step"
        )
    eta_max = ETA_SWEEP_TOP / (first.g_norm + first.m_norm)
    rows = []
    for eta in sweep_etas(eta_max, cfg.lr, preset.eta_sweep_points):
        record = probe.measure(batch, float(eta), eval_objective=j_true, eval_batch=heldout, grid=ETA_SWEEP_LAMBDAS,
                               gg_curvature=False, crossfit=False)
        occ = occ_lambda_after_step(model, losses, cfg, batch, float(eta))
        rows += [
            {
                "arm": run_dir.parent.name, "seed": cfg.seed, "step": step, "eta": float(eta), "lambda": row["lambda"],
                "delta_meas": row["delta_meas"], "delta_taylor": row["delta_taylor"],
                "residual": abs(row["delta_meas"] - row["delta_taylor"]),
                "lambda_star_taylor": record.lambda_star_taylor, "lambda_occ_paper": occ,
            }
            for row in record.curve_rows()
        ]
    return rows


# The theory is for an SGD step of size eta = lr, so the SGD arms train with it: then
# lambda*_t, the trained lambda and OCC's lambda_t all refer to the step taken; the AdamW
# arms (the paper's regime) set their own optimizer. lr 0.005 raises J_true steadily at
# the small config; 0.02 and above collapse it. Four mini-batches: OCC's ratio reading is
# 0 on the first (pi_old is the policy itself there) and read on the other three.
# One thread per run: the numbers are then the same whatever --workers is.
SMALL = TrainConfig(optimizer="sgd", lr=0.005, threads=1, minibatches=4)

PRESETS = {
    "quick": Preset(
        "quick",
        SMALL.with_values(steps=30, prompts_per_step=16, eval_every=10, eval_prompts=128, checkpoint_every=10,
                diag_every=10, diag_minibatches=(1,)),
        seeds=(0,),
        arms=DEFAULT_ARMS + ACCEPTANCE_ARMS,
        eta_sweep_points=5,
        regret_every=30,
        description="every arm, one seed, 30 RL steps: a look at the whole pipeline in minutes",
    ),
    # sized for 30 minutes on 2 cores: the Probe on mini-batch 1 of every 8th step (5 measured
    # steps, the fewest C4 and C7 read; OCC's reading is non-zero there), the regret
    # experiment on every 20th step (8 states of 4 mini-batches per seed and eta)
    "default": Preset(
        "default",
        SMALL.with_values(steps=40, prompts_per_step=16, eval_every=10, eval_prompts=128, checkpoint_every=20,
                diag_every=8, diag_minibatches=(1,)),
        seeds=(0, 1, 2),
        arms=DEFAULT_ARMS + ACCEPTANCE_ARMS,
        eta_sweep_points=5,
        regret_every=20,
        description="every arm, three seeds, 40 RL steps at the small config (about 30 minutes on 2 cores): "
                    "the committed figures",
    ),
    "long": Preset(
        "long",
        SMALL.with_values(steps=200, prompts_per_step=16, eval_every=20, eval_prompts=128, checkpoint_every=20,
                diag_every=25),
        seeds=tuple(range(9)),
        arms=DEFAULT_ARMS + ACCEPTANCE_ARMS,
        regret_every=50,
        description="the full design: nine paired seeds (a 0.016 gap in final J_true at 80% power), 200 RL steps "
                    "(J_true flattens), every mini-batch measured; hours on 2 cores (projection in the README)",
    ),
    "full": Preset(
        "full",
        SMALL.with_values(d_model=384, n_layer=6, n_head=6, block_size=64, n_mtp=2, task="running_sum",
                task_options={"terms": 8}, sft_steps=3000, steps=400, prompts_per_step=64, eval_every=20,
                eval_prompts=512, checkpoint_every=50, diag_every=20, device="cuda"),
        seeds=(0, 1, 2, 3, 4),
        description="a 10M-parameter GPT with two MTP heads for one GPU (not run on CPU)",
    ),
}


def micro(preset: Preset) -> Preset:
    """``preset`` on a tiny model for a few steps: the CI smoke test of the whole path."""
    base = preset.base.with_values(
        task="addition", task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2,
        sft_steps=400, sft_target=0.4, sft_lr=3e-3, steps=4, prompts_per_step=4, group_size=4, eval_every=2, eval_prompts=32,
        eval_samples=2, checkpoint_every=2, diag_every=2, device="cpu",
    )
    return replace(preset, name=f"{preset.name}-micro", base=base, eta_sweep_points=4,
                   regret_every=min(preset.regret_every, 2))
