"""Claims C1-C8 of docs/theory.md s.10, each tested on a job's CSVs with the seed as
the unit: a statistic per seed, its interval over seeds, and a verdict that comes
from the data through the claim's thresholds and margins (never typed by hand), by
the rule of :data:`.base.VERDICT_RULE`.

One module per claim, each a :class:`.base.Claim`; :data:`CLAIMS` lists them in
report order, and the claims report lists every claim's thresholds from there.
A new claim is one module and one entry in :data:`CLAIMS`.

``claims.csv`` has the columns :data:`.base.CSV_COLUMNS`: one row per claim, then
one row per part that has a statistic of its own, named ``<claim>.<part>``
(``C1.batch``, ``C1.slope``, ``C3.crossfit``, ...).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ... import regimes
from ...schema import ACCEPTANCE_MD, CLAIMS_CSV, CLAIMS_MD, FIGURE_FILES, atomic_write
from . import c6
from ..data import describe_flags, flagged_runs
from ..load import Job, JobError
from ..table import fmt_ci, markdown_table
from .base import (CSV_COLUMNS, EQUIVALENT, FAILS, HOLDS, INCONCLUSIVE, REPORTED, VERDICT_RULE, VERDICTS, Claim,
                   ClaimResult, Estimate, Part, Threshold)
from .c1 import TaylorAtTrainedEta
from .c2 import SmoothBound
from .c3 import CrossEntropyAtZero
from .c4 import PolicyDecay
from .c5 import OCCTracking
from .c6 import EndToEnd
from .c7 import PreconditionedTracking
from .c8 import EtaScaling

__all__ = [
    "CLAIMS", "CSV_COLUMNS", "EQUIVALENT", "FAILS", "HOLDS", "INCONCLUSIVE", "REPORTED", "VERDICTS", "Claim",
    "ClaimResult", "CrossEntropyAtZero", "EndToEnd", "Estimate", "EtaScaling", "OCCTracking", "Part", "PolicyDecay",
    "PreconditionedTracking", "SmoothBound", "TaylorAtTrainedEta", "Threshold", "claims", "write_claims",
]

CLAIMS: tuple[Claim, ...] = (TaylorAtTrainedEta(), SmoothBound(), CrossEntropyAtZero(), PolicyDecay(), OCCTracking(),
                             EndToEnd(), PreconditionedTracking(), EtaScaling())
TEXT_COLUMNS = ("statement", "reason", "figure")  # the claims table's columns beyond claims.csv's, for claims.md


def claims(job: Job) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The claims table (claims.csv's rows and columns, then ``statement, reason, figure``:
    a part's row has its part's text as reason) and every claim's detail tables (C4
    crossings, C5 tracking)."""
    rows, details = [], {}
    for claim in CLAIMS:
        result, tables = claim.evaluate(job)
        own, *parts = result.rows()
        rows.append({**own, "statement": result.statement, "reason": result.reason, "figure": result.figure})
        keyed = [p for p in result.parts if p.key is not None]
        rows += [{**row, "statement": "", "reason": part.text, "figure": result.figure}
                 for row, part in zip(parts, keyed, strict=True)]
        details.update(tables)
    return pd.DataFrame(rows, columns=[*CSV_COLUMNS, *TEXT_COLUMNS]), details


def write_claims(job: Job, out_dir, skipped: dict[str, str] | None = None) -> tuple[list[Path], pd.DataFrame]:
    """``claims.csv`` and ``claims.md``; ``skipped`` lists figures that could not be made, and why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, details = claims(job)
    text = _markdown(job, table, details, skipped or {})
    csv = atomic_write(out_dir / CLAIMS_CSV, lambda tmp: table[list(CSV_COLUMNS)].to_csv(tmp, index=False))
    md = atomic_write(out_dir / CLAIMS_MD, lambda tmp: tmp.write_text(text))
    return [csv, md], table


def _flagged(job: Job) -> list[str]:
    """The runs the trainer flagged, named before any verdict: their numbers are in every statistic."""
    flagged = flagged_runs(job)
    if flagged.empty:
        return []
    rows = [f"- {r.arm} seed {r.seed}: {describe_flags(r._asdict())} from step {r.first_step} (J_true "
            f"{r.j_true_start:.4f} after SFT, {r.j_true_last:.4f} at the end)" for r in flagged.itertuples()]
    return ["", f"**Flagged runs** ({len(flagged)}): the statistics below include them; C6 also reports "
                "itself without the collapsed ones.", "", *rows]


def _hvp_fallbacks(job: Job) -> list[str]:
    """Runs whose Hessian-vector products fell back from fwd_rev to rev_rev, and why."""
    try:
        steps = job.table("diag_steps", columns=("hvp_fallback",), needed_for="the HVP fallbacks")
    except JobError:
        return []  # no diagnostics, or written before the column existed
    fell = steps[steps["hvp_fallback"].notna() & (steps["hvp_fallback"].astype(str) != "")]
    if fell.empty:
        return []
    first = fell.sort_values("step").groupby(["arm", "seed"], sort=False).head(1)
    return ["", "**HVP fallback**: these runs switched from fwd_rev to rev_rev mid-run (the same Hessian by "
                "another path, so their numbers may differ from an uninterrupted fwd_rev run in the last digits):",
            "", *(f"- {r.arm} seed {r.seed}: from step {r.step}: {r.hvp_fallback}" for r in first.itertuples())]


def _thresholds() -> pd.DataFrame:
    rows = [(name, f"{t.value:g}", t.meaning) for claim in CLAIMS for name, t in type(claim).thresholds()]
    return pd.DataFrame(rows, columns=["name", "value", "meaning"])


def _markdown(job: Job, table: pd.DataFrame, details: dict, skipped: dict[str, str]) -> str:
    arms = [a.label for a in job.arms]
    lines = [f"# Claims report: {job.name}", "",
             f"Job `{job.path}` ({job.kind}), mtpdiag {job.version}; arms {arms}; seeds {job.seeds}."]
    if job.incomplete_runs:
        lines.append(f"\n**Incomplete**: these runs have not finished (still running, or stopped): "
                     f"{job.incomplete_runs}.")
    lines += _flagged(job) + _hvp_fallbacks(job)
    lines += ["", VERDICT_RULE, ""]
    shown = pd.DataFrame({
        "Claim": table["claim"], "Statement": table["statement"], "Statistic": table["statistic"],
        "Estimate [95% CI]": [fmt_ci(v, lo, hi) for v, lo, hi in table[["estimate", "ci_low", "ci_high"]].to_numpy()],
        "Margin": table["margin"], "n": table["n_units"].astype(str) + " " + table["unit"] + "s",
        "Verdict": "**" + table["verdict"] + "**", "Figure": table["figure"],
    })
    lines += [markdown_table(shown), "", "## Why each verdict", ""]
    lines += [f"- **{r.claim}** ({r.verdict}): {r.reason}" for r in table.itertuples() if "." not in r.claim]
    crossings = details["c4_crossings"]
    if len(crossings):
        lines += ["", "## C4: first measured step where 2λ*_t < λ (per policy arm and seed; empty: never)", "",
                  markdown_table(crossings.astype(object).where(crossings.notna(), ""))]
    tracking = details["c5_tracking"]
    if len(tracking):
        columns = ["proxy", "star_col", "n", "spearman", "spearman_lo", "spearman_hi", "ratio_median", "ratio_iqr",
                   "sign_agreement", "lambda_plus", "best_lambda_plus"]
        lines += ["", "## C5: tracking of λ*_t by each OCC reading (pooled over occ arms and seeds)", "",
                  markdown_table(tracking[columns].round(4))]
    mb_tracking = details["c5_minibatch_tracking"]
    if len(mb_tracking):
        columns = ["minibatch", "proxy", "n", "spearman", "spearman_lo", "spearman_hi", "ratio_median", "ratio_iqr",
                   "sign_agreement", "best_lambda_plus"]
        lines += ["", "## C5 per mini-batch: each OCC reading against λ*_Taylor of the same mini-batch (oracle arm)", "",
                  "On mini-batch 0 π_old has just been recomputed, so the ratio readings' δ_RL is 0 there.", "",
                  markdown_table(mb_tracking[columns].round(4))]
        effect = details["c5_minibatch_effect"]
        columns = ["minibatch", "column", "n", "median", "q25", "q75", "median_abs", "frac_zero"]
        lines += ["", "## The first-mini-batch effect: λ of each reading per mini-batch index (oracle arm)", "",
                  markdown_table(effect[columns].round(4))]
    power = c6.power_table(job) if any(job.arms_of(regimes.DETACH)) else pd.DataFrame()
    if len(power):
        lines += ["", "## Power: paired seeds for a difference in final J_true", "",
                  f"Per arm against the detach arm of its optimizer: the SD over this job's {len(job.seeds)} seed(s) "
                  "of the paired final J_true differences, and the paired seeds a two-sided t-test at 0.05 needs to "
                  f"detect each gap (J_true units; {c6.POWER_GAPS[0]:g} is the paper's OCC gain) with 80% power at "
                  "that SD. An SD from 3 seeds is itself uncertain: read these as the order of magnitude.", "",
                  markdown_table(power.round(4))]
    lines += ["", "## Speculative-decoding acceptance (not a claim)", "",
              f"Which regimes keep the MTP heads' draft acceptance and what each costs in J_true: "
              f"[{ACCEPTANCE_MD}]({ACCEPTANCE_MD}), figure {FIGURE_FILES['F8']}."]
    lines += ["", "## Thresholds (mtpdiag/report/claims/)", "", markdown_table(_thresholds())]
    if skipped:
        lines += ["", "## Figures not made", ""] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"
