"""The regret experiment's summary (``regret.csv``, ``regret.md``) and figure F7.

The rows are the SGD detach arm's ``regret_steps.csv`` (:mod:`mtpdiag.regret`): one per
(seed, step, mini-batch, eta scale, calibrator). A state's regret is put in units of
the detach step's gain on that seed and eta scale, mean |gain_detach| over the seed's
states (a per-state ratio explodes where one detach step barely moves J_true). An OCC
reading's rows are per mini-batch (``occ-paper[mb1]``) and, all together, the calibrator
on every state (``occ-paper``):

    r = (Delta_true(lambda*_meas) - Delta_true(lambda_k)) / mean |gain_detach|.

Per seed (the unit: states within a run share the trajectory) the median r over its
states; ``regret_median`` is the mean of those medians over seeds with a 95% t-interval
(``ci_low``, ``ci_high``). ``cost_over_detach`` is the median over states of (detach
step + the choice's own computation) / detach step, timed on the same mini-batch;
``spearman_vs_meas`` the mean over seeds of the per-seed rank correlation of lambda_k
with lambda*_meas over states. ``proposed`` marks mtpdiag's own calibrators.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..schema import REGRET_CSV, REGRET_DETACH, REGRET_MD, REGRET_ORACLE, REGRET_PROPOSED, atomic_write
from .load import Job
from .stats import over_seeds, spearman

COLUMNS = ("calibrator", "eta_scale", "regret_median", "ci_low", "ci_high", "cost_over_detach", "proposed",
           "spearman_vs_meas", "n_seeds", "n_states")
ROW_COLUMNS = ("eta_scale", "choice", "lambda", "regret", "gain_detach", "lambda_star_meas", "cost_s", "detach_s")
PROPOSED = frozenset(REGRET_PROPOSED)  # mtpdiag's own calibrators, as the regret rows name them
ORACLE = REGRET_ORACLE


def regret_rows(job: Job) -> pd.DataFrame:
    """Every regret row of the job, with the normalised regret ``r`` (see the module docstring)."""
    rows = job.table("regret_steps", columns=ROW_COLUMNS, needed_for="the regret experiment (regret.csv, F7)")
    # an OCC reading's choice on mini-batch j is occ-<reading>[mbj]: together they are the calibrator on every state
    per_minibatch = rows[rows["choice"].str.contains(r"\[mb\d+\]$", regex=True)]
    rows = pd.concat([rows, per_minibatch.assign(choice=per_minibatch["choice"].str.replace(r"\[mb\d+\]$", "",
                                                                                             regex=True))],
                     ignore_index=True)
    detach = rows[rows["choice"] == REGRET_DETACH].assign(scale=lambda f: f["gain_detach"].abs())
    rows = rows.join(detach.groupby(["seed", "eta_scale"])["scale"].mean(), on=["seed", "eta_scale"])
    rows["r"] = pd.to_numeric(rows["regret"], errors="coerce") / rows["scale"].where(rows["scale"] > 0)
    return rows


def summary(job: Job) -> pd.DataFrame:
    """One row per (calibrator, eta scale), in the rows' own order of calibrators."""
    rows = regret_rows(job)
    order = list(dict.fromkeys(rows["choice"]))
    out = []
    for (calibrator, scale), group in rows.groupby(["choice", "eta_scale"], sort=False):
        medians = group.groupby("seed")["r"].median()
        interval = over_seeds(medians.to_numpy())
        rho = [spearman(g["lambda"], g["lambda_star_meas"]) for _, g in group.groupby("seed")]
        cost = ((group["detach_s"] + group["cost_s"]) / group["detach_s"]).median()
        out.append({"calibrator": calibrator, "eta_scale": scale, "regret_median": interval.estimate,
                    "ci_low": interval.low, "ci_high": interval.high, "cost_over_detach": float(cost),
                    "proposed": calibrator in PROPOSED, "spearman_vs_meas": float(np.nanmean(rho)) if np.isfinite(rho).any()
                    else np.nan, "n_seeds": interval.n, "n_states": int(group.groupby("seed").size().median())})
    frame = pd.DataFrame(out, columns=COLUMNS)
    # the rows' own order of choices, each OCC reading's mini-batches together (occ-paper[mb0..3])
    bases = list(dict.fromkeys(name.split("[")[0] for name in order))
    frame["order"] = frame["calibrator"].map(lambda c: (bases.index(c.split("[")[0]), c))
    return frame.sort_values(["eta_scale", "order"]).drop(columns="order").reset_index(drop=True)


def write_regret(job: Job, out_dir) -> list[Path]:
    """``regret.csv`` and ``regret.md`` into ``out_dir``."""
    frame = summary(job)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = atomic_write(out_dir / REGRET_CSV, lambda tmp: frame.to_csv(tmp, index=False))
    md = atomic_write(out_dir / REGRET_MD, lambda tmp: tmp.write_text(_markdown(frame), encoding="utf-8"))
    return [csv, md]


# issue 16's goals for a proposed calibrator, against the OCC paper reading on every state
GOAL_RHO, GOAL_REGRET_SHARE, GOAL_COST = 0.9, 0.1, 1.1
OCC_PAPER = "occ-paper"


def _goals(frame: pd.DataFrame) -> list[str]:
    """Per proposed calibrator and eta scale: met or missed, for each goal, with the numbers."""
    proposed = frame[frame["proposed"]]
    if proposed.empty:
        return []
    lines = ["## mtpdiag's own calibrators against their goals", "",
             f"Goals: ρ with λ*_meas ≥ {GOAL_RHO:g}, regret ≤ {GOAL_REGRET_SHARE:g} × OCC paper's (on every state), "
             f"cost ≤ {GOAL_COST:g} × a detach step.", "",
             "| calibrator | η scale | ρ | regret / OCC paper's | cost | goals met |", "|---|---|---|---|---|---|"]
    occ = frame[frame["calibrator"] == OCC_PAPER].set_index("eta_scale")["regret_median"]
    for row in proposed.itertuples():
        share = row.regret_median / occ.get(row.eta_scale, np.nan)
        met = [row.spearman_vs_meas >= GOAL_RHO, share <= GOAL_REGRET_SHARE, row.cost_over_detach <= GOAL_COST]
        names = ["ρ", "regret", "cost"]
        said = ", ".join(n for n, ok in zip(names, met, strict=True) if ok) or "none"
        lines.append(f"| {row.calibrator} | {row.eta_scale:g} | {row.spearman_vs_meas:.2f} | {share:.3g} | "
                     f"{row.cost_over_detach:.3g} | {said} |")
    return lines + [""]


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["# The regret experiment", "",
             textwrap.fill(
                 "On the states of the SGD detach trajectories (before every mini-batch update of the scheduled "
                 "steps), each calibrator chooses λ for the joint CE-MTP step of size η = scale × lr, and the "
                 "step's change of the held-out J_true is measured exactly. Regret = ΔJ_true(λ*_meas) − "
                 "ΔJ_true(λ_k), in units of the seed's mean |ΔJ_true| of a detach step; per seed the median over "
                 "its states, then the mean over seeds with a 95% t-interval (the seed is the unit). cost: "
                 "(detach step + the choice's own computation) / detach step, median over states. ρ: rank "
                 "correlation of λ_k with λ*_meas over states, mean over seeds.", 100), ""]
    lines += _goals(frame)
    for scale, group in frame.groupby("eta_scale", sort=True):
        lines += [f"## η = {scale:g} × lr", "", "| calibrator | regret (detach gains) | 95% CI | cost / detach | ρ with λ*_meas | seeds |",
                  "|---|---|---|---|---|---|"]
        for row in group.itertuples():
            name = f"**{row.calibrator}** (proposed)" if row.proposed else row.calibrator
            lines.append(f"| {name} | {row.regret_median:.3g} | [{row.ci_low:.3g}, {row.ci_high:.3g}] | "
                         f"{row.cost_over_detach:.3g} | {row.spearman_vs_meas:.2f} | {row.n_seeds} |")
        lines.append("")
    return "\n".join(lines)
