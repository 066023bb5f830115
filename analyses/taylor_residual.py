"""F4: Taylor residual against eta (log-log) with the fitted slope (needs the job's eta_sweep.csv).

Usage: python analyses/taylor_residual.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import figures, run_analysis

if __name__ == "__main__":
    sys.exit(run_analysis(figures.taylor_residual, __doc__.splitlines()[0]))
