"""F8: final J_true against final draft acceptance per arm, and the acceptance section (acceptance.md, .csv).

Usage: python analyses/acceptance.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import acceptance, figures, run_analysis


def figure_and_section(job, out):
    return [*figures.acceptance_tradeoff(job, out), *acceptance.write_acceptance(job, out)]


if __name__ == "__main__":
    sys.exit(run_analysis(figure_and_section, __doc__.splitlines()[0]))
