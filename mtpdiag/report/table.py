"""Table 1 in the shape of the paper's: final J_true and sampled pass@1 per arm
(mean and 95% t-interval over seeds), the paired difference from Detach, and
the fixed-lambda sweep of the policy arms. The seeds whose run the trainer
flagged (collapsed, lambda out of range) are named per arm: the means include
them, and the claims report shows what leaving them out changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import regimes
from ..regimes import FIXED, fixed_lambda
from ..schema import RUN_FLAGS, TABLE1_CSV, TABLE1_MD, atomic_write
from .data import FLAG_WORDS, PAPER_CALIBRATOR, final_values, flagged_runs, same_optimizer
from .load import Job
from .stats import t_interval


OPTIMIZER_DISPLAY = {"adamw": "AdamW", "sgd": "SGD"}


def display_name(arm) -> str:
    """The arm's name in tables and claims, as its regime gives it (``Policy (λ=0.5)``, ``OCC paper``),
    with its optimizer where the arm replaces the preset's (``OCC paper, AdamW``)."""
    name = regimes.get(arm.regime).display_name(arm.lam, arm.calibrator)
    optimizer = getattr(arm, "optimizer", None)
    return f"{name}, {OPTIMIZER_DISPLAY.get(optimizer, optimizer)}" if optimizer else name


def paired_difference(finals: pd.DataFrame, arm: str, reference: str) -> tuple[float, float, float, int]:
    """Final value of ``arm`` minus ``reference`` per seed (same seed = same SFT
    start), as a t-interval over the seeds both have."""
    a = finals[finals["arm"] == arm].set_index("seed")["value"]
    b = finals[finals["arm"] == reference].set_index("seed")["value"]
    common = a.index.intersection(b.index)
    return t_interval((a[common] - b[common]).to_numpy())


def _summary(finals: pd.DataFrame, arm: str, prefix: str) -> dict:
    rows = finals[finals["arm"] == arm]
    mean, low, high, n = t_interval(rows["value"])
    steps = sorted(rows["step"].unique())
    return {f"{prefix}_mean": mean, f"{prefix}_low": low, f"{prefix}_high": high, f"{prefix}_n_seeds": n,
            f"{prefix}_step": "-".join(str(int(s)) for s in (steps[0], steps[-1])) if len(steps) > 1 else int(steps[0])}


def table1(job: Job) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(main table, fixed-lambda sweep). Main: one row per arm in job order, its final
    J_true paired against the Detach and OCC paper arms of its own optimizer.
    Sweep: the policy arms by lambda, against Detach and OCC paper."""
    j_true = final_values(job, "j_true", "Table 1")
    pass1 = final_values(job, "pass1", "Table 1")
    detach = job.arms_of(regimes.DETACH)
    occ_paper = [a for a in job.arms if a.calibrator == PAPER_CALIBRATOR]
    flagged = flagged_runs(job)
    rows = []
    for arm in job.arms:
        fixed = job.regime_of(arm).lambda_rule == FIXED
        row = {"arm": arm.label, "name": display_name(arm), "regime": arm.regime,
               "lambda": fixed_lambda(arm.lam) if fixed else np.nan}
        row.update(_summary(j_true, arm.label, "j_true"))
        row.update(_summary(pass1, arm.label, "pass1"))
        for reference, name in ((same_optimizer(job, arm, detach), "detach"),
                                (same_optimizer(job, arm, occ_paper), "occ_paper")):
            compared = reference is not None and reference != arm.label
            mean, low, high, n = paired_difference(j_true, arm.label, reference) if compared else (np.nan,) * 3 + (0,)
            row.update({f"delta_vs_{name}": mean, f"delta_vs_{name}_low": low, f"delta_vs_{name}_high": high})
        of_arm = flagged[flagged["arm"] == arm.label]
        row.update({f"{flag}_seeds": ",".join(str(s) for s in of_arm.loc[of_arm[flag], "seed"]) for flag in RUN_FLAGS})
        rows.append(row)
    main = pd.DataFrame(rows)
    policy = [a.label for a in job.arms_of(regimes.POLICY)]
    sweep = main[main["arm"].isin(policy)].sort_values("lambda").reset_index(drop=True)
    return main, sweep


def fmt_ci(mean: float, low: float, high: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "—"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{mean:.{digits}f} (no CI)"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _readable(frame: pd.DataFrame, first: str) -> pd.DataFrame:
    return pd.DataFrame({
        first: frame["name"] if first == "Arm" else frame["lambda"].map("{:g}".format),
        "final J_true": [fmt_ci(*r) for r in frame[["j_true_mean", "j_true_low", "j_true_high"]].to_numpy()],
        "final pass@1": [fmt_ci(*r) for r in frame[["pass1_mean", "pass1_low", "pass1_high"]].to_numpy()],
        "Δ J_true vs Detach": [fmt_ci(*r) for r in frame[["delta_vs_detach", "delta_vs_detach_low",
                                                            "delta_vs_detach_high"]].to_numpy()],
        "Δ J_true vs OCC paper": [fmt_ci(*r) for r in frame[["delta_vs_occ_paper", "delta_vs_occ_paper_low",
                                                               "delta_vs_occ_paper_high"]].to_numpy()],
        "seeds": frame["j_true_n_seeds"],
        "step": frame["j_true_step"],
        "flagged runs": [_flags_cell(row) for _, row in frame.iterrows()],
    })


def _flags_cell(row) -> str:
    """``collapsed: seed 0; λ out of range: seeds 0,2``, or empty."""
    cells = []
    for flag in RUN_FLAGS:
        seeds = row[f"{flag}_seeds"]
        if seeds:
            cells.append(f"{FLAG_WORDS[flag]}: seed{'s' if ',' in seeds else ''} {seeds}")
    return "; ".join(cells)


def write_table1(job: Job, out_dir) -> list[Path]:
    """``table1.csv`` (both tables, column ``table``) and ``table1.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main, sweep = table1(job)
    both = pd.concat([main.assign(table="main"), sweep.assign(table="fixed_lambda_sweep")])
    text = (
        f"# Table 1: {job.name}\n\n"
        "Final exact J_true (probability of the target completion on the held-out prompts) and sampled pass@1, "
        "mean over seeds with a 95% t-interval; Δ is the paired per-seed difference of final J_true "
        "(the same seed starts every arm from the same SFT weights), against the Detach and OCC paper arms of the "
        "arm's own optimizer (an AdamW arm against the AdamW ones). 'flagged runs' names the seeds whose run "
        "collapsed or whose λ left the sane range (included in the means; see claims.md).\n\n"
        + markdown_table(_readable(main, "Arm"))
        + "\n\n## Fixed-λ sweep (policy loss)\n\n"
        + (markdown_table(_readable(sweep, "λ")) if len(sweep) else "No policy arm in this job.")
        + "\n"
    )
    csv = atomic_write(out_dir / TABLE1_CSV, lambda tmp: both.to_csv(tmp, index=False))
    md = atomic_write(out_dir / TABLE1_MD, lambda tmp: tmp.write_text(text))
    return [csv, md]
