"""F6: per-block c and v^2 over training for the policy arms.

Usage: python analyses/per_block.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis

if __name__ == "__main__":
    sys.exit(run_analysis(figures.per_block, __doc__.splitlines()[0]))
