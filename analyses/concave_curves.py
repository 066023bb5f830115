"""F1: measured Delta(lambda), Taylor and L-smooth parabolas, lambda* and the harm threshold, early/middle/late.

Usage: python analyses/concave_curves.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis

if __name__ == "__main__":
    sys.exit(run_analysis(figures.concave_curves, __doc__.splitlines()[0]))
