"""F3: lambda_t of each OCC reading against lambda*_t over training, and their scatter with Spearman rho.

Usage: python analyses/occ_tracking.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis

if __name__ == "__main__":
    sys.exit(run_analysis(figures.occ_tracking, __doc__.splitlines()[0]))
