"""Claims C1-C8 (docs/theory.md s.10): statistic per seed, 95% CI over seeds and verdict, as claims.md and claims.csv.

Usage: python analyses/claims_report.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import claims, run_analysis


def claims_files(job, out):
    paths, table = claims.write_claims(job, out)
    print(table[["claim", "verdict", "estimate", "ci_low", "ci_high", "n_units"]].to_string(index=False))
    return paths


if __name__ == "__main__":
    sys.exit(run_analysis(claims_files, __doc__.splitlines()[0]))
