"""Jobs for the report's tests: a real micro job from the trainer, and job or run
directories written from hand-built rows with the trainer's and the Probe's column
names, whose verdicts are known."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtpdiag import __version__, regimes, schema
from mtpdiag.calibrators import WithShadows, make_calibrator
from mtpdiag.diagnostics import Curve, Fit, Probe, ProbeRecord
from mtpdiag.report import load_job
from mtpdiag.config import TrainConfig
from mtpdiag.rollout import rollout
from mtpdiag.resume import load_run
from mtpdiag.hook import every
from mtpdiag.regret import RegretHook
from mtpdiag.train import train

MICRO = dict(
    task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2,
    sft_steps=200, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
    steps=6, prompts_per_step=8, group_size=4, lr=1e-3, eval_every=3, eval_prompts=12, eval_samples=2,
    checkpoint_every=6, dtype="float64",
)  # fmt: skip
DETACH = {"label": "detach", "regime": "detach", "lam": None, "calibrator": None}
CE = {"label": "ce-0.5", "regime": "ce", "lam": 0.5, "calibrator": None}
POLICY = {"label": "policy-0.5", "regime": "policy", "lam": 0.5, "calibrator": None}
OCC_PAPER = {"label": "occ-paper", "regime": "occ", "lam": None, "calibrator": "occ-paper"}
ARMS = [DETACH, CE, POLICY, OCC_PAPER]
SEEDS = (0, 1)
SWEEP_ETAS = np.geomspace(1e-3, 1e-1, 4)


def job_json(root: Path, arms, seeds=SEEDS, version=__version__) -> None:
    """job.json as `mtpdiag run` writes it (the fields the report reads)."""
    preset = {"name": root.name, "base": {}, "seeds": list(seeds), "arms": arms, "diag_every": 2}
    (root / schema.JOB_FILE).write_text(json.dumps({"mtpdiag_version": version, "preset": preset}))


def build_micro_job(root: Path) -> Path:
    """A real job in the layout of `mtpdiag run`, built from the trainer, the hook and the
    Probe directly (fast and independent of the orchestration): 4 arms x 2 seeds of 6 RL
    steps on a tiny model, diagnostics of every mini-batch every 2 steps with per-block
    rows (and the top curvature L, which costs most, on the policy arm only), shadows of
    the OCC readings, the regret experiment on the (SGD) detach arm every 3 steps, and
    an eta sweep on the final ce/policy models."""
    torch.set_num_threads(1)
    for arm in ARMS:
        for seed in SEEDS:
            run = schema.run_dir(root, arm["label"], seed)
            cfg = TrainConfig.from_dict({**MICRO, "regime": arm["regime"], "lam": arm["lam"], "seed": seed})
            calibrator = None
            if arm["calibrator"]:
                shadows = {schema.shadow_label("paper"): make_calibrator("occ-paper"),
                           schema.shadow_label("reference"): make_calibrator("occ-reference")}
                calibrator = WithShadows(make_calibrator(arm["calibrator"]), shadows)
            cfg = cfg.with_values(diag_every=2, diag_per_block=True, diag_objectives=("j_batch",),
                                  diag_top_curvature="all" if arm is POLICY else "none")  # fmt: skip
            callbacks = []
            if arm is DETACH:  # the SGD detach arm carries the regret experiment, as in `mtpdiag run`
                cfg = cfg.with_values(optimizer="sgd", lr=0.02, diag_every=0)
                callbacks = [RegretHook(cfg, run, every(3), eta_scales=(1.0, 4.0))]
            train(cfg, run, calibrator=calibrator, callbacks=callbacks, progress=False, cache_dir=root / "cache")
    rows = []
    for arm in (CE, POLICY):
        for seed in SEEDS:
            model, cfg, task = load_run(schema.run_dir(root, arm["label"], seed))
            batch, _ = rollout(model, task, cfg, cfg.steps + 1)
            losses = regimes.get(cfg.regime).losses(cfg)
            probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward)
            for eta in SWEEP_ETAS:
                record = probe.measure(batch, eta, grid=[0.5, 1.0, 2.0], gg_curvature=False, crossfit=False)
                rows += [{"arm": arm["label"], "seed": seed, "step": cfg.steps, "eta": eta, "lambda": r["lambda"],
                          "delta_meas": r["delta_meas"], "delta_taylor": r["delta_taylor"],
                          "residual": abs(r["delta_meas"] - r["delta_taylor"])} for r in record.curve_rows()]
    pd.DataFrame(rows).to_csv(root / schema.ETA_SWEEP, index=False)
    job_json(root, ARMS)
    return root


def copy_job(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pt", "cache", schema.FIGURES_DIR))
    return target


RECORD = dict(optimizer="sgd", lr=1e-3, dtype="float64", hvp_mode="fwd_rev", n_shared=1, n_shared_tensors=1,
              n_moved=1, objective_value=0.0, c=0.0, g_norm=1.0, m_norm=1.0, v2=1.0, cos=0.0)
STEP_COLUMNS = ["step", "minibatch", "objective", *ProbeRecord(**RECORD).as_row()]
FIT = Fit(np.zeros(3), None, None)
CURVE = Curve(np.zeros(1), np.zeros(1), np.zeros(1), FIT, FIT, 0.0, 0.0, 1, 0.0)
CURVE_COLUMNS = ["step", "minibatch", "objective", *ProbeRecord(**RECORD, curve=CURVE).curve_rows()[0]]


def write_run(run: Path, metrics, diag=None, curves=None) -> None:
    """A run directory's CSVs from hand-built rows (``diag`` rows: step + overrides)."""
    run.mkdir(parents=True)
    pd.DataFrame(metrics).to_csv(run / schema.METRICS, index=False)
    if diag:
        frame = pd.DataFrame([{**dict.fromkeys(STEP_COLUMNS), "minibatch": 0, "objective": "j_batch", **row}
                              for row in diag])  # fmt: skip
        frame.to_csv(run / schema.diag_file("steps"), index=False)
    if curves:
        rows = [{"minibatch": 0, **row} for row in curves]
        pd.DataFrame(rows, columns=CURVE_COLUMNS).to_csv(run / schema.diag_file("curves"), index=False)


def hand_built_job(root: Path, arms, seeds, diag=None, final_j_true=None, curves=None, sweep=None, metrics=None):
    """Write a job directory from hand-built rows and load it. ``diag(arm, seed)`` gives
    diag_steps rows (step + overrides), ``curves(arm, seed)`` diag_curves rows,
    ``metrics(arm, seed)`` the metrics rows, or ``final_j_true(arm, seed)`` the J_true
    after the last step."""
    root.mkdir()
    job_json(root, arms, seeds)
    for arm in arms:
        for seed in seeds:
            final = final_j_true(arm["label"], seed) if final_j_true else 0.5
            rows = [{"step": 0, "j_true": 0.5, "pass1": 0.5}, {"step": 10, "j_true": final, "pass1": final}]
            run = schema.run_dir(root, arm["label"], seed)
            write_run(run, metrics(arm["label"], seed) if metrics else rows,
                      diag(arm["label"], seed) if diag else None, curves(arm["label"], seed) if curves else None)
            (run / schema.CONFIG).write_text(json.dumps({"config": {}, "versions": {"mtpdiag": __version__}}))
    if sweep is not None:
        sweep.to_csv(root / schema.ETA_SWEEP, index=False)
    return load_job(root)


def hand_built_run(root: Path, config: dict, calibrator=None, shadows=None, metrics=None) -> Path:
    """A run directory of `mtpdiag train` in the config.json format the trainer writes:
    the TrainConfig under "config", the primary calibrator's name under "calibrator" and
    the shadows as {label: name}."""
    write_run(root, metrics or [{"step": 0, "j_true": 0.5, "pass1": 0.5}, {"step": 2, "j_true": 0.6, "pass1": 0.5}])
    saved = {"config": config, "calibrator": calibrator, "shadows": shadows or {},
             "versions": {"mtpdiag": __version__}}
    (root / schema.CONFIG).write_text(json.dumps(saved))
    return root


def sweep_rows(power: float, arm: str = POLICY["label"], seeds=(0, 1)) -> pd.DataFrame:
    """An eta sweep whose residual is lambda * eta^power (times a per-seed factor)."""
    eta = np.geomspace(1e-3, 1e-1, 5)
    return pd.DataFrame([{"arm": arm, "seed": seed, "step": 10, "eta": e, "lambda": lam, "delta_meas": 0.0,
                          "delta_taylor": 0.0, "residual": lam * (1 + 0.01 * seed) * e ** power}
                         for seed in seeds for lam in (0.5, 1.0, 2.0) for e in eta])


def collapsed_job(root: Path, seeds=(0, 1, 2, 3)):
    """Detach and OCC paper over ``seeds``, every run healthy at J_true about 0.5 except OCC
    paper seed 0, which the trainer flagged as collapsed at step 10 (J_true 0.001): the
    oracle arm of issue 10. OCC paper gains 0.05 over Detach on the healthy seeds."""
    def metrics(arm, seed):
        fallen = arm == OCC_PAPER["label"] and seed == 0
        final = 0.001 if fallen else 0.5 + 0.01 * seed + (0.05 + 0.001 * seed if arm == OCC_PAPER["label"] else 0)
        return [{"step": 0, "j_true": 0.5, "pass1": 0.5, "collapsed": False, "lambda_out_of_range": False},
                {"step": 5, "j_true": (0.5 + final) / 2, "pass1": 0.5, "collapsed": False,
                 "lambda_out_of_range": fallen},
                {"step": 10, "j_true": final, "pass1": final, "collapsed": fallen, "lambda_out_of_range": fallen}]

    return hand_built_job(root, [DETACH, OCC_PAPER], seeds, metrics=metrics)
