"""F7: each calibrator's regret against lambda*_meas on the detach trajectories, and the regret summary (regret.csv, .md).

Usage: python analyses/regret.py <job_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, regret, run_analysis


def figure_and_summary(job, out):
    return [*figures.regret(job, out), *regret.write_regret(job, out)]


if __name__ == "__main__":
    sys.exit(run_analysis(figure_and_summary, __doc__.splitlines()[0]))
