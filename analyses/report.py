"""Every figure (F1-F6, F8), Table 1, the claims report and the acceptance section of a job,
into <job>/figures or --out.

Usage: python analyses/report.py <job_dir or run_dir> [--out DIR]
"""
import sys

from mtpdiag.report import build_report, run_analysis


def everything(job, out):
    result = build_report(job.path, out)
    paths = [p for group in result["figures"].values() for p in group] + result["table1"] + result["claims"]
    paths += result["acceptance"]
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    sys.exit(run_analysis(everything, __doc__.splitlines()[0]))
