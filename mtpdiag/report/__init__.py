"""Figures F1-F8, Table 1, the claims report, the acceptance section and the regret summary of a job
(or of one trainer run).

    from mtpdiag.report import build_report
    build_report("runs/my-job")            # writes runs/my-job/figures/

Each figure alone: ``figures.concave_curves(load_job(path), out_dir)`` and so on;
``analyses/*.py`` are the same calls from the command line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..progress import Progress
from ..schema import FIGURES_DIR
from . import acceptance, claims, figures, regret, table
from .load import Job, JobError, load_job

__all__ = ["Job", "JobError", "acceptance", "build_report", "claims", "figures", "load_job", "run_analysis", "table"]


def build_report(job_dir, out_dir=None, progress: bool | None = False) -> dict:
    """Every figure, Table 1, the claims report, the acceptance section and the regret summary into ``out_dir``
    (default ``<job>/figures``). A figure whose inputs are missing is not made: the returned
    ``skipped`` and the claims report say why, and a warning is raised.
    ``progress``: a bar (or lines) over its parts, see :class:`~mtpdiag.progress.Progress`.

    Returns ``{"out_dir", "figures": {F1: [paths]...}, "table1": [paths],
    "claims": [paths], "claims_table": DataFrame, "acceptance": [paths], "regret": [paths],
    "skipped": {F4: reason...}}``.
    """
    job = load_job(job_dir)
    out = Path(out_dir) if out_dir is not None else job.path / FIGURES_DIR
    made, skipped = {}, {}
    with Progress(len(figures.FIGURES) + 4, "report", unit="part", show=progress) as bar:
        for name, make in figures.FIGURES.items():
            bar.set_postfix(making=name)
            try:
                made[name] = make(job, out)
            except JobError as err:
                skipped[name] = str(err)
                warnings.warn(f"{name} not made: {err}", stacklevel=2)
            bar.update()
        bar.set_postfix(making="table1")
        table_paths = table.write_table1(job, out)
        bar.update()
        bar.set_postfix(making="claims")
        claim_paths, claims_table = claims.write_claims(job, out, skipped)
        bar.update()
        bar.set_postfix(making="acceptance")
        acceptance_paths = acceptance.write_acceptance(job, out)
        bar.update()
        bar.set_postfix(making="regret")
        regret_paths = []
        if "F7" not in skipped:  # F7's reason, when the job has no regret rows, says so for both
            regret_paths = regret.write_regret(job, out)
        bar.update()
    return {"out_dir": out, "figures": made, "table1": table_paths, "claims": claim_paths,
            "claims_table": claims_table, "acceptance": acceptance_paths, "regret": regret_paths, "skipped": skipped}


def run_analysis(make, description: str, argv=None) -> int:
    """The command line of an ``analyses/`` script: ``<job_dir> [--out DIR]``; ``make(job, out)``
    returns the paths written. Bad input exits with status 2 and the reason."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("job_dir", help="a job directory (mtpdiag run) or a run directory (mtpdiag train)")
    parser.add_argument("--out", default=None, help=f"output folder (default: <job_dir>/{FIGURES_DIR})")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job_dir)
        paths = make(job, Path(args.out) if args.out else job.path / FIGURES_DIR)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
