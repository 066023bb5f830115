"""F5: exact J_true and sampled pass@1 against step per arm, and Table 1 (CSV and Markdown).

Usage: python analyses/performance.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis, table


def figure_and_table(job, out):
    return [*figures.performance(job, out), *table.write_table1(job, out)]


if __name__ == "__main__":
    sys.exit(run_analysis(figure_and_table, __doc__.splitlines()[0]))
