"""Tables derived from a job's CSVs that several figures and claims share."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import regimes, schema
from .load import Job, JobError

OBJECTIVE = "j_batch"  # the curve of the gradient's own objective (docs/theory.md s.2); "j_true" is the held-out one
STAR_COLUMNS = ("lambda_star_taylor", "lambda_star_meas")
# the diagnostics measure the update of each mini-batch diag_minibatches lists (default: all); the
# figures read each measured step's first measured one
ADAMW = "adamw"  # Arm.optimizer and ProbeRecord.optimizer of an AdamW arm or update


def same_optimizer(job: Job, arm, candidates) -> str | None:
    """The label of the first of ``candidates`` (arms, in job order) trained with ``arm``'s
    optimizer override (an AdamW arm is compared with an AdamW arm), or None."""
    own = getattr(arm, "optimizer", None)
    return next((c.label for c in candidates if getattr(c, "optimizer", None) == own), None)


# the calibrators the report singles out by name: the paper's OCC reading (claim C6, Table 1) and the oracle,
# which measures lambda*_Taylor on every mini-batch (the per-mini-batch tables of C5)
PAPER_CALIBRATOR, ORACLE_CALIBRATOR = "occ-paper", "oracle"
CALIBRATED_READING_PREFIX = "occ-"  # occ-paper and a shadow shadow_paper are the same reading, "paper"


def first_minibatch(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a diagnostics table that are about each step's first measured mini-batch
    (per run: ``diag_minibatches`` may leave mini-batch 0 out)."""
    first = frame.groupby(["arm", "seed", "step"])["minibatch"].transform("min")
    return frame[frame["minibatch"] == first]


def trained_lrs(job: Job, arms=None) -> pd.DataFrame:
    """Each run's learning rate, from the trainer's own ``lr`` column of metrics.csv (every
    arm logs it, measured or not), else from its diag_steps.csv: columns ``arm, seed,
    trained_lr`` (median over steps)."""
    try:
        rows = job.table("metrics", columns=("lr",), needed_for="the trained learning rate", arms=arms)
    except JobError:  # a metrics.csv without lr (written by hand or by an older trainer)
        rows = job.table("diag_steps", columns=("lr",), needed_for="the trained learning rate", arms=arms)
    rows = rows.assign(lr=pd.to_numeric(rows["lr"], errors="coerce"))
    return rows.groupby(["arm", "seed"])["lr"].median().rename("trained_lr").reset_index()


def diag_steps(job: Job, needed_for: str, columns=(), arms=None, objective: str = OBJECTIVE) -> pd.DataFrame:
    """The diagnostics rows of one curve objective, on each measured step's first measured mini-batch."""
    steps = first_minibatch(job.table("diag_steps", columns=columns, needed_for=needed_for, arms=arms))
    rows = steps[steps["objective"] == objective]
    if rows.empty:
        raise JobError(
            f"{needed_for} needs diagnostics of objective {objective!r} in {job.path}; the diag_steps.csv files "
            f"only have {sorted(steps['objective'].unique())}"
        )
    return rows


def checkpoints(steps) -> list[tuple[str, int]]:
    """An early, a middle and a late step out of the measured ``steps`` (fewer when fewer were measured)."""
    measured = sorted(set(int(s) for s in steps))
    picked = {"early": measured[0], "middle": measured[len(measured) // 2], "late": measured[-1]}
    seen, out = set(), []
    for name, step in picked.items():
        if step not in seen:
            seen.add(step)
            out.append((name, step))
    return out


def reading_of(calibrator: str) -> str:
    """The OCC reading a calibrator computes: ``occ-paper`` reads ``paper``, as does its shadow ``shadow_paper``."""
    return calibrator.removeprefix(CALIBRATED_READING_PREFIX)


def tracking_frame(job: Job, needed_for: str = "OCC tracking") -> pd.DataFrame:
    """lambda_t of every OCC reading next to the measured lambda*_t, one row per
    (occ arm, seed, step, proxy): columns ``arm, seed, step, proxy, lambda_t,
    lambda_plus`` and ``STAR_COLUMNS`` (NaN on steps without diagnostics).

    lambda_t is the step's mean over mini-batches (metrics.csv); lambda*_t is measured
    on the step's first mini-batch, for its update. The arm's own ``lambda_0`` is named
    after its calibrator; shadows after their label. Where an arm logs a shadow of its
    own reading, its own column is kept.
    """
    arms = job.arms_of(regimes.OCC_REGIME)
    own_lambda = schema.lambda_column(0)
    metrics = job.table("metrics", columns=(own_lambda,), needed_for=needed_for, arms=arms)
    diag = diag_steps(job, needed_for, columns=STAR_COLUMNS, arms=arms)
    frames = []
    for arm in arms:
        rows = metrics[metrics["arm"] == arm.label]
        sources = {reading_of(arm.calibrator or arm.label): (own_lambda, schema.calib_column("lambda_plus"))}
        for column in rows.columns:
            reading = schema.parse_shadow_lambda_column(column)
            if reading is not None and rows[column].notna().any():
                sources.setdefault(reading_of(reading), (column, schema.shadow_column(reading, "lambda_plus")))
        for proxy, (column, plus) in sources.items():
            frames.append(pd.DataFrame({
                "arm": arm.label, "seed": rows["seed"], "step": rows["step"], "proxy": proxy,
                "lambda_t": rows[column], "lambda_plus": rows[plus] if plus in rows else np.nan,
            }))
    tracked = pd.concat(frames, ignore_index=True).dropna(subset=["lambda_t"])
    return tracked.merge(diag[["arm", "seed", "step", *STAR_COLUMNS]], on=["arm", "seed", "step"], how="left")


def final_values(job: Job, column: str, needed_for: str = "the final table") -> pd.DataFrame:
    """The last finite ``column`` of every run: ``arm, seed, step, value``."""
    metrics = job.table("metrics", columns=(column,), needed_for=needed_for)
    rows = metrics[np.isfinite(pd.to_numeric(metrics[column], errors="coerce"))]
    last = rows.sort_values("step").groupby(["arm", "seed"], sort=False).tail(1)
    return last[["arm", "seed", "step", column]].rename(columns={column: "value"}).reset_index(drop=True)


def flagged_runs(job: Job) -> pd.DataFrame:
    """The runs the trainer flagged (:data:`~mtpdiag.schema.RUN_FLAGS` in metrics.csv), one row
    each: ``arm, seed``, a bool per flag, ``first_step`` (the first flagged step), and the
    post-SFT and last held-out ``j_true_start, j_true_last``. Runs written before the
    flags existed have none."""
    metrics = job.table("metrics", needed_for="the flagged runs")
    rows = []
    for (arm, seed), run in metrics.sort_values("step").groupby(["arm", "seed"], sort=False):
        flags = {flag: run[flag].eq(True) if flag in run else pd.Series(False, index=run.index)
                 for flag in schema.RUN_FLAGS}
        flagged = pd.concat(flags.values(), axis=1).any(axis=1)
        if flagged.any():
            j_true = run["j_true"].dropna()
            rows.append({"arm": arm, "seed": int(seed), **{flag: bool(f.any()) for flag, f in flags.items()},
                         "first_step": int(run.loc[flagged, "step"].iloc[0]),
                         "j_true_start": j_true.iloc[0], "j_true_last": j_true.iloc[-1]})
    frame = pd.DataFrame(rows, columns=["arm", "seed", *schema.RUN_FLAGS, "first_step", "j_true_start", "j_true_last"])
    return frame.astype(dict.fromkeys(schema.RUN_FLAGS, bool))  # a boolean mask even when empty


FLAG_WORDS = {schema.COLLAPSED: "collapsed", schema.LAMBDA_OUT_OF_RANGE: "λ out of range"}  # the report's words


def describe_flags(row) -> str:
    """A flagged run's flags in words: ``collapsed, λ out of range``."""
    return ", ".join(FLAG_WORDS[flag] for flag in schema.RUN_FLAGS if row[flag])

