"""What practitioners watch: the speculative-decoding acceptance of the MTP heads'
drafts per arm, and what each regime costs in J_true (docs/theory.md s.9). A report
of the data, not a claim of the theory: ``acceptance.md`` and ``acceptance.csv``,
and the numbers figure F8 plots.

Per run, the last evaluation step with both J_true and head 1's acceptance
(``accept_tv_1``, held out, teacher forced on the target completions) gives the
final pair; the first evaluation (step 0, the SFT start) gives the acceptance the
run started from. Per arm: the mean over seeds with a 95% t-interval, the change
of acceptance over RL (paired within each seed), and the paired per-seed
differences against the detach arm (the same seed starts both from the same SFT
weights). Each sentence of the section follows from an interval by
:func:`direction`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..schema import (ACCEPTANCE_CSV, ACCEPTANCE_MD, ENTROPY, FIGURE_FILES, accept_greedy_column, accept_tv_column,
                      atomic_write)
from .. import regimes
from .load import Job
from .stats import t_interval
from .data import same_optimizer
from .table import display_name, fmt_ci, markdown_table

ACCEPT = accept_tv_column(1)  # the acceptance F8 and the verdicts are about: head 1, the draft every MTP decoder uses
GREEDY = accept_greedy_column(1)
_HEAD_COLUMN = re.compile(r"^accept_tv_(\d+)$")
ROSE, FELL, UNCHANGED, NO_INTERVAL = "rose", "fell", "no change detectable", "no interval (fewer than 2 seeds)"


def direction(low: float, high: float) -> str:
    """The sign a 95% interval of a difference shows: ``rose`` (all above 0), ``fell``
    (all below 0), else ``no change detectable``; no interval, no direction."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return NO_INTERVAL
    return ROSE if low > 0 else FELL if high < 0 else UNCHANGED


def head_columns(frame: pd.DataFrame) -> list[str]:
    """The ``accept_tv_k`` columns of a metrics frame, by head."""
    found = [(int(m[1]), c) for c in frame.columns if (m := _HEAD_COLUMN.match(c))]
    return [c for _, c in sorted(found)]


def final_runs(job: Job) -> tuple[pd.DataFrame, list[str]]:
    """(one row per run that logs acceptance: ``arm, seed, step, j_true``, every
    ``accept_tv_k``, ``accept_greedy_1``, ``entropy`` at its last evaluation step with
    J_true and accept_tv_1 finite, and ``accept_start``, accept_tv_1 at its first;
    the labels of the arms none of whose runs logs it)."""
    metrics = job.table("metrics", needed_for="the acceptance report")
    columns = [c for c in (*head_columns(metrics), GREEDY, ENTROPY) if c in metrics]
    if ACCEPT not in metrics:
        empty = pd.DataFrame(columns=["arm", "seed", "step", "j_true", *columns, "accept_start"])
        return empty, [a.label for a in job.arms]
    numeric = metrics.assign(**{c: pd.to_numeric(metrics[c], errors="coerce") for c in ("j_true", *columns)})
    evaluated = numeric[np.isfinite(numeric["j_true"]) & np.isfinite(numeric[ACCEPT])].sort_values("step")
    runs = evaluated.groupby(["arm", "seed"], sort=False)
    final = runs.tail(1)[["arm", "seed", "step", "j_true", *columns]]
    start = runs.head(1)[["arm", "seed", ACCEPT]].rename(columns={ACCEPT: "accept_start"})
    frame = final.merge(start, on=["arm", "seed"])
    order = {a.label: i for i, a in enumerate(job.arms)}
    frame = frame.sort_values(["arm", "seed"], key=lambda c: c.map(order) if c.name == "arm" else c)
    return frame.reset_index(drop=True), [a.label for a in job.arms if a.label not in set(frame["arm"])]


def _paired(frame: pd.DataFrame, arm: str, reference: str | None, column: str) -> tuple[float, float, float, int]:
    """Per seed, ``column`` of ``arm`` minus that of ``reference``, as a t-interval over the seeds both have."""
    if reference is None or reference == arm:
        return np.nan, np.nan, np.nan, 0
    a = frame[frame["arm"] == arm].set_index("seed")[column]
    b = frame[frame["arm"] == reference].set_index("seed")[column]
    common = a.index.intersection(b.index)
    return t_interval((a[common] - b[common]).to_numpy())


def _interval(prefix: str, values) -> dict:
    mean, low, high, n = t_interval(values)
    return {f"{prefix}_mean": mean, f"{prefix}_low": low, f"{prefix}_high": high, f"{prefix}_n": n}


def summary(job: Job) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(one row per arm that logs acceptance, in job order: ``arm, name, regime, seeds,
    step`` and, each as ``<x>_mean/_low/_high/_n`` over seeds, ``accept`` (final
    accept_tv_1), ``j_true``, ``greedy``, ``entropy``, ``accept_change`` (final minus
    start), ``accept_vs_detach`` and ``j_true_vs_detach`` (paired per seed with the detach
    arm of the arm's own optimizer), and
    ``accept_tv_<k>`` for each head; the per-run rows; the arms without acceptance)."""
    runs, missing = final_runs(job)
    detach = [a for a in job.arms_of(regimes.DETACH) if a.label not in missing]
    rows = []
    for arm in job.arms:
        of_arm = runs[runs["arm"] == arm.label]
        if of_arm.empty:
            continue
        steps = sorted(of_arm["step"].astype(int).unique())
        row = {"arm": arm.label, "name": display_name(arm), "regime": arm.regime, "seeds": len(of_arm),
               "step": f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])}
        row.update(_interval("accept", of_arm[ACCEPT]))
        row.update(_interval("j_true", of_arm["j_true"]))
        for prefix, column in (("greedy", GREEDY), ("entropy", ENTROPY)):
            row.update(_interval(prefix, of_arm[column] if column in of_arm else []))
        row.update(_interval("accept_change", of_arm[ACCEPT] - of_arm["accept_start"]))
        for prefix, column in (("accept_vs_detach", ACCEPT), ("j_true_vs_detach", "j_true")):
            mean, low, high, n = _paired(runs, arm.label, same_optimizer(job, arm, detach), column)
            row.update({f"{prefix}_mean": mean, f"{prefix}_low": low, f"{prefix}_high": high, f"{prefix}_n": n})
        for column in head_columns(runs):
            row.update(_interval(column, of_arm[column]))
        rows.append(row)
    return pd.DataFrame(rows), runs, missing


def _ci(frame: pd.DataFrame, prefix: str) -> list[str]:
    return [fmt_ci(*values) for values in frame[[f"{prefix}_mean", f"{prefix}_low", f"{prefix}_high"]].to_numpy()]


def _sentence(row: pd.Series, has_detach: bool) -> str:
    """What the intervals say about one arm: did its acceptance hold over RL, against detach, and its J_true."""
    def said(prefix: str, words: dict) -> str:
        low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
        return f"{words.get(direction(low, high), direction(low, high))} ({fmt_ci(row[f'{prefix}_mean'], low, high)})"

    text = f"- **{row['name']}**: acceptance over RL {said('accept_change', {})}"
    if has_detach and row["regime"] != regimes.DETACH.name:
        against = {ROSE: "higher", FELL: "lower", UNCHANGED: "no difference detectable"}
        text += (f"; final acceptance against Detach: {said('accept_vs_detach', against)}"
                 f"; J_true against Detach: {said('j_true_vs_detach', against)}")
    return text + "."


def markdown(job: Job, table: pd.DataFrame, missing: list[str]) -> str:
    lines = [f"# Speculative-decoding acceptance: {job.name}", "",
             "What practitioners watch when they keep MTP heads through RL (docs/theory.md s.9); a report of the "
             "data, not a claim of the theory. accept_tv_k: mean over the held-out target tokens of 1 − TV(p_main "
             "at t+k, q_k at t), the probability that speculative rejection sampling accepts head k's draft; "
             "accept_greedy_1: the fraction where argmax q_1 = argmax p_main; entropy: the main head's (nats). "
             "Final: the last evaluation step of each run; mean over seeds with a 95% t-interval; Δ over RL: final "
             "minus the SFT start, paired within each seed; vs Detach: paired per-seed differences (the same seed "
             f"starts every arm from the same SFT weights). Figure: {FIGURE_FILES['F8']}.", ""]
    if table.empty:
        lines += [f"No run of this job logs {ACCEPT} (runs written before mtpdiag measured acceptance, or without "
                  "an evaluation step): nothing to report."]
        return "\n".join(lines) + "\n"
    has_detach = table["regime"].eq(regimes.DETACH.name).any()
    shown = pd.DataFrame({
        "Arm": table["name"], "final accept_tv_1": _ci(table, "accept"), "Δ over RL": _ci(table, "accept_change"),
        "Δ vs Detach": _ci(table, "accept_vs_detach"), "final J_true": _ci(table, "j_true"),
        "Δ J_true vs Detach": _ci(table, "j_true_vs_detach"), "accept_greedy_1": _ci(table, "greedy"),
        "entropy": _ci(table, "entropy"), "seeds": table["seeds"], "step": table["step"],
    })
    lines += [markdown_table(shown), "", "## Which regimes keep acceptance, and what each costs in J_true", ""]
    if not has_detach:
        lines += ["No detach arm in this job: no paired differences against it.", ""]
    lines += [_sentence(row, has_detach) for _, row in table.iterrows()]
    heads = [c.removesuffix("_mean") for c in table.columns
             if c.endswith("_mean") and _HEAD_COLUMN.match(c.removesuffix("_mean"))]
    if len(heads) > 1:
        per_head = pd.DataFrame({"Arm": table["name"], **{c: _ci(table, c) for c in heads}})
        lines += ["", "## Final acceptance per head", "", markdown_table(per_head)]
    if missing:
        lines += ["", f"Arms without {ACCEPT} in their metrics.csv (left out above): {missing}."]
    return "\n".join(lines) + "\n"


def write_acceptance(job: Job, out_dir) -> list[Path]:
    """``acceptance.csv`` (the per-arm table) and ``acceptance.md`` (the section)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, _, missing = summary(job)
    text = markdown(job, table, missing)
    csv = atomic_write(out_dir / ACCEPTANCE_CSV, lambda tmp: table.to_csv(tmp, index=False))
    md = atomic_write(out_dir / ACCEPTANCE_MD, lambda tmp: tmp.write_text(text))
    return [csv, md]
