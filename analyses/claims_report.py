"""Claims C1-C6 (docs/theory.md s.6): statistic, 95% CI and verdict per claim, as claims.md and claims.csv.

Usage: python analyses/claims_report.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import claims, run_analysis


def claims_files(job, out):
    paths, table = claims.write_claims(job, out)
    print(table[["claim", "verdict", "value", "ci_low", "ci_high"]].to_string(index=False))
    return paths


if __name__ == "__main__":
    sys.exit(run_analysis(claims_files, __doc__.splitlines()[0]))
