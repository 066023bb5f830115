"""F2: c, cos, v^2 and -h_mm over training per arm (seed mean, 95% band).

Usage: python analyses/decomposition.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis

if __name__ == "__main__":
    sys.exit(run_analysis(figures.decomposition, __doc__.splitlines()[0]))
