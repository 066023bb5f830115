"""The on-disk format of run and job directories, in one place.

Writers (trainer, hook, experiment) and readers (report, analyses) import the
names below; nothing else spells a file name, a column prefix or an arm label.

Run directory (``mtpdiag train``)::

    config.json      the TrainConfig, seeds, versions, calibrator
    metrics.csv      one row per RL step (step 0: the post-SFT evaluation)
    minibatch.csv    one row per optimiser mini-batch
    diag_steps.csv   one row per measured step and curve objective (DiagnosticsHook)
    diag_curves.csv  one row per lambda of each measured curve
    diag_blocks.csv  one row per parameter block
    checkpoint.pt    the latest checkpoint (with the rows up to its step)
    .incomplete      present until the run is done
    .lock            the pid of the process writing the directory, while it runs
    sft/             the SFT weights, when the --sft-cache could not be written

Job directory (``mtpdiag run``)::

    job.json  .incomplete  .lock  runs/<arm label>/seed<k>/  eta_sweep.csv  figures/  (sft/)

Report (``figures/`` of a job, or ``--out``)::

    <figure>.png  <figure>.pdf  <figure>_data.csv   one set per FIGURE_FILES entry
    table1.csv  table1.md  claims.csv  claims.md  acceptance.csv  acceptance.md
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# ----------------------------------------------------------------------------- file names

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
INCOMPLETE = ".incomplete"
LOCK = ".lock"
METRICS = "metrics.csv"
MINIBATCH = "minibatch.csv"
DIAG_PREFIX = "diag_"
DIAG_TABLES = ("steps", "curves", "blocks")
REGRET_PREFIX = "regret_"  # a run's regret rows (mtpdiag.regret.RegretHook): regret_steps.csv
# the regret rows' choices the report singles out: the detach step, the measured best, mtpdiag's own calibrators
REGRET_DETACH, REGRET_ORACLE = "detach", "lambda*_meas"
REGRET_PROPOSED = ("amortised-taylor", "amortised-taylor(J_true)")
JOB_FILE = "job.json"
ETA_SWEEP = "eta_sweep.csv"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
# the report's files: each figure as <name>.png, <name>.pdf and <name>_data.csv (the numbers it plotted)
FIGURE_FILES = {
    "F1": "F1_concave_curves",
    "F2": "F2_decomposition",
    "F3": "F3_occ_tracking",
    "F4": "F4_taylor_residual",
    "F5": "F5_performance",
    "F6": "F6_per_block",
    "F7": "F7_regret",
    "F8": "F8_acceptance_tradeoff",
}
FIGURE_FORMATS = ("png", "pdf")
TABLE1_CSV, TABLE1_MD = "table1.csv", "table1.md"
CLAIMS_CSV, CLAIMS_MD = "claims.csv", "claims.md"
ACCEPTANCE_CSV, ACCEPTANCE_MD = "acceptance.csv", "acceptance.md"
REGRET_CSV, REGRET_MD = "regret.csv", "regret.md"


def diag_file(table: str, suffix: str = ".csv", prefix: str = DIAG_PREFIX) -> str:
    """``diag_steps.csv`` and its siblings."""
    if table not in DIAG_TABLES:
        raise ValueError(f"diagnostics table {table!r}: choose one of {DIAG_TABLES}")
    return f"{prefix}{table}{suffix}"


def figure_data_file(figure: str) -> str:
    """``F1_concave_curves_data.csv``: the numbers figure ``F1_concave_curves`` plotted."""
    return f"{figure}_data.csv"


def run_dir(job_dir: str | os.PathLike, label: str, seed: int) -> Path:
    """``<job>/runs/<arm label>/seed<k>``."""
    return Path(job_dir) / RUNS_DIR / label / f"seed{seed}"


# ----------------------------------------------------------------------------- columns

CALIB_PREFIX = "calib_"  # a calibrator's info key k is logged as calib_<k>
LAMBDA_PREFIX = "lambda_"  # the MTP coefficient of head k as lambda_<k>
SHADOW_PREFIX = "shadow_"  # WithShadows logs shadow s's info key k as calib_shadow_<s>_<k>
HOOK_PREFIX = "diag_"  # DiagnosticsHook's summary of objective o, field f in metrics.csv: diag_<o>_<f>
# metrics.csv flags of a run gone wrong (set by the trainer, read by the report)
COLLAPSED = "collapsed"  # J_true fell far below its post-SFT value, or the reward stayed 0
LAMBDA_OUT_OF_RANGE = "lambda_out_of_range"  # an MTP coefficient left the sane range
RUN_FLAGS = (COLLAPSED, LAMBDA_OUT_OF_RANGE)


def calib_column(key: str) -> str:
    return f"{CALIB_PREFIX}{key}"


def lambda_column(head: int) -> str:
    return f"{LAMBDA_PREFIX}{head}"


def shadow_label(reading: str) -> str:
    """The WithShadows label of a shadowed reading: ``paper`` -> ``shadow_paper``."""
    return f"{SHADOW_PREFIX}{reading}"


def shadow_column(reading: str, key: str) -> str:
    """``calib_shadow_<reading>_<key>``: what shadow ``reading`` logged under ``key``."""
    return calib_column(f"{shadow_label(reading)}_{key}")


_SHADOW_LAMBDA = re.compile(rf"^{CALIB_PREFIX}{SHADOW_PREFIX}(?P<reading>.+)_lambda(?:_0)?$")


def parse_shadow_lambda_column(column: str) -> str | None:
    """The reading whose lambda (head 0) ``column`` holds, or None: inverse of
    ``shadow_column(reading, "lambda")`` (and of ``"lambda_0"`` with several heads)."""
    match = _SHADOW_LAMBDA.match(column)
    return match["reading"] if match else None


def hook_column(objective: str, field: str) -> str:
    return f"{HOOK_PREFIX}{objective}_{field}"


# speculative-decoding acceptance of MTP head k = 1..K (mtpdiag.evaluation.Acceptance), in metrics.csv: held out
# on evaluation steps as below, on every step's rollout batch under ROLLOUT_PREFIX (rollout_accept_tv_1, ...)
ENTROPY = "entropy"  # the main head's mean entropy over the response tokens (nats)
ROLLOUT_PREFIX = "rollout_"


def accept_tv_column(head: int) -> str:
    """``accept_tv_<k>``: mean over response tokens of 1 - TV(p_main, q_k), head k counted from 1."""
    return f"accept_tv_{head}"


def accept_greedy_column(head: int) -> str:
    """``accept_greedy_<k>``: fraction of response tokens where argmax q_k = argmax p_main, k from 1."""
    return f"accept_greedy_{head}"


# eta_sweep.csv: one row per (arm, seed, step, lambda, eta); a series is one curve of residual against eta
ETA_SWEEP_SERIES = ("arm", "seed", "step", "lambda")
ETA_SWEEP_COLUMNS = ("arm", "seed", "step", "eta", "lambda", "delta_meas", "delta_taylor", "residual")


# ----------------------------------------------------------------------------- arms


def format_arm_label(regime: str, lam: float | None = None, calibrator: str | None = None) -> str:
    """An arm's label: the calibrator's name when one sets lambda (``occ-paper``,
    ``oracle``), ``<regime>-<lam>`` for a fixed lambda (``policy-0.5``), else the
    regime's name (``detach``). :func:`parse_arm_label` inverts it."""
    if calibrator is not None:
        return calibrator
    if lam is not None:
        return f"{regime}-{float(lam)}"
    return regime


OPTIMIZER_SEPARATOR = "@"  # an arm trained with another optimizer than its preset's: <label>@<optimizer>


def parse_arm_label(label: str, regimes, calibrators) -> tuple[str, float | None, str | None]:
    """(regime, lam, calibrator) of a label made by :func:`format_arm_label`, given
    the registered regimes (name -> Regime) and calibrator names; a ValueError names
    what it could not read. A calibrator label belongs to the calibrated regime that
    ``regimes`` lists first. A label that is a regime's name reads as that regime, so
    a calibrator named like a regime (``occ``) cannot be told apart by its label."""
    if label in regimes:
        return label, None, None
    # the longest regime name the label starts with: the lambda after it may carry its own "-"
    for regime in sorted((r for r in regimes if label.startswith(f"{r}-")), key=len, reverse=True):
        try:
            return regime, float(label[len(regime) + 1:]), None
        except ValueError:
            pass
    if label in calibrators:
        calibrated = [name for name, r in regimes.items() if r.lambda_rule == "calibrated"]
        if calibrated:
            return calibrated[0], None, label
    raise ValueError(
        f"arm label {label!r} is neither a regime ({sorted(regimes)}), nor <regime>-<lambda>, nor a calibrator "
        f"({sorted(calibrators)})"
    )


@dataclass(frozen=True)
class Arm:
    """One training setting of a job: a regime, its fixed lambda or its calibrator, and its
    label. ``diagnostics`` False trains the arm without the Probe (an arm that is there for
    its training metrics only, such as draft acceptance, at a training step's cost).
    ``optimizer`` and ``lr`` replace the preset's (None: the preset's); the label then
    ends in ``@<optimizer>`` (``occ-paper@adamw``)."""

    label: str
    regime: str
    lam: float | None = None
    calibrator: str | None = None
    diagnostics: bool = True
    optimizer: str | None = None
    lr: float | None = None

    @classmethod
    def of(cls, regime: str, lam: float | None = None, calibrator: str | None = None, diagnostics: bool = True,
           optimizer: str | None = None, lr: float | None = None) -> "Arm":
        label = format_arm_label(regime, lam, calibrator) + (f"{OPTIMIZER_SEPARATOR}{optimizer}" if optimizer else "")
        return cls(label, regime, lam, calibrator, diagnostics, optimizer, lr)


# ----------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it onto
    ``path``: a reader sees the old file or the whole new one, never half of it.
    The temporary name carries the process id, so two writers never share it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
