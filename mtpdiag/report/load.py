"""Read a job directory (``mtpdiag run``) or a single trainer run directory
(``mtpdiag train``) into one :class:`Job`, checking its layout first.

Every problem is a :class:`JobError` that names what is missing (file, expected
columns) and what to do, so an analysis never plots from half a job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import __version__, regimes, schema
from ..regimes import FIXED, Regime, fixed_lambda
from ..schema import CONFIG, ETA_SWEEP, ETA_SWEEP_COLUMNS, INCOMPLETE, JOB_FILE, METRICS, Arm

RUN_FILES = (CONFIG, METRICS)
# what every table must carry; a figure asks for more with Job.table(..., columns=...)
TABLES = {
    "metrics": (METRICS, ("step", "j_true", "pass1")),
    "minibatch": (schema.MINIBATCH, ("step", "minibatch")),
    "diag_steps": (schema.diag_file("steps"), ("step", "minibatch", "objective", "lr")),
    "diag_curves": (schema.diag_file("curves"), ("step", "minibatch", "objective", "lambda", "delta_meas")),
    "diag_blocks": (schema.diag_file("blocks"), ("step", "minibatch", "objective", "block", "c", "v2")),
    "regret_steps": (schema.diag_file("steps", prefix=schema.REGRET_PREFIX), ("step", "minibatch", "eta_scale",
                                                                            "choice", "regret", "gain_detach")),
}
# columns load_job adds to every row, naming where it came from
KEYS = ("arm", "regime", "lam", "calibrator", "seed")


class JobError(ValueError):
    """A job or run directory that an analysis cannot use as it is."""


@dataclass
class Job:
    """A loaded job: its arms, seeds and the run directory of each (arm, seed).

    ``kind`` is ``"job"`` or ``"run"`` (a single trainer run directory, seen as a
    job with one arm and one seed). Tables are read on first use and cached.
    """

    path: Path
    kind: str
    name: str
    arms: list[Arm]
    seeds: list[int]
    runs: dict[tuple[str, int], Path]
    version: str
    incomplete_runs: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def arm(self, label: str) -> Arm:
        for arm in self.arms:
            if arm.label == label:
                return arm
        raise JobError(f"arm {label!r} is not in {self.path}: it has {[a.label for a in self.arms]}")

    def regime_of(self, arm: Arm) -> Regime:
        return regimes.get(arm.regime)

    def arms_of(self, regime: Regime) -> list[Arm]:
        """The arms trained in ``regime`` (a :data:`~mtpdiag.regimes.REGIMES` entry), in job order."""
        return [a for a in self.arms if self.regime_of(a) is regime]

    def table(self, name: str, columns=(), needed_for: str = "this analysis", arms=None) -> pd.DataFrame:
        """One table of every run (or of ``arms``), concatenated, with the ``KEYS`` columns added.

        Runs without the file contribute no rows (a detached run measures no curve); if
        none of them has it, or a file lacks one of ``columns``, a JobError names it.
        """
        if name not in TABLES:
            raise ValueError(f"table {name!r}: choose one of {sorted(TABLES)}")
        filename, base_columns = TABLES[name]
        labels = [a.label for a in self.arms] if arms is None else [a if isinstance(a, str) else a.label for a in arms]
        frames, missing_files, missing_columns = [], [], {}
        for label in labels:
            arm = self.arm(label)
            for seed in self.seeds:
                path = self.runs[(label, seed)] / filename
                if not path.exists():
                    missing_files.append(str(path.relative_to(self.path)))
                    continue
                frame = self._read(path)
                lacking = [c for c in (*base_columns, *columns) if c not in frame.columns]
                if lacking:
                    missing_columns[str(path)] = lacking
                    continue
                frames.append(frame.assign(arm=arm.label, regime=arm.regime, lam=arm.lam, calibrator=arm.calibrator,
                                           seed=seed))
        if missing_columns:
            listing = "; ".join(f"{path} lacks {cols}" for path, cols in missing_columns.items())
            raise JobError(
                f"{needed_for} needs columns that are missing: {listing}. Was the run written by another mtpdiag "
                f"version, or with those diagnostics off? Re-run it with mtpdiag {__version__}."
            )
        if not frames:
            raise JobError(
                f"{needed_for} needs {filename} in the run directories, and none of {len(missing_files)} has it "
                f"(e.g. {missing_files[0] if missing_files else self.path}): "
                + ("run the job with the diagnostics hook on (DiagnosticsHook with CSVSink)" if name.startswith("diag_")
                   else "the runs did not finish a step")
            )
        return pd.concat(frames, ignore_index=True)

    def eta_sweep(self, needed_for: str = "this analysis") -> pd.DataFrame:
        path = self.path / ETA_SWEEP
        if self.kind == "run":
            raise JobError(
                f"{needed_for} needs {ETA_SWEEP}, which only a job directory of `mtpdiag run` has; "
                f"{self.path} is a single trainer run directory"
            )
        if not path.exists():
            raise JobError(f"{needed_for} needs {path}: the job has not run its eta sweep yet (or it was deleted)")
        frame = self._read(path)
        lacking = [c for c in ETA_SWEEP_COLUMNS if c not in frame.columns]
        if lacking:
            raise JobError(f"{path} lacks columns {lacking} (it has {list(frame.columns)}): re-run the eta sweep")
        return frame

    def _read(self, path: Path) -> pd.DataFrame:
        if path not in self._cache:
            try:
                self._cache[path] = pd.read_csv(path)
            except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError and EmptyDataError
                raise JobError(f"{path} is damaged ({' '.join(str(err).split())}): re-run that run, or restore "
                               "the file") from err
        return self._cache[path]


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise JobError(f"{file} is damaged, not valid JSON ({err}): restore it, or re-run what wrote it") from err


def _compatible(version: str) -> bool:
    """Same release series (major.minor): the CSV columns are a contract within a series."""
    return str(version).split(".")[:2] == __version__.split(".")[:2]


def _version_error(where: Path, version) -> JobError:
    return JobError(
        f"{where} was written by mtpdiag {version}, this is mtpdiag {__version__}: its tables may not have the "
        f"columns this version reads. Re-run it, or analyse it with `pip install mtpdiag=={version}`"
    )


def load_job(path: str | Path) -> Job:
    """A job directory (``job.json`` + ``runs/<arm>/seed<k>/``) or a single run
    directory (``config.json`` + ``metrics.csv``), validated."""
    root = Path(path)
    if not root.is_dir():
        raise JobError(f"{root} is not a directory: pass a job directory (mtpdiag run) or a run directory "
                       "(mtpdiag train)")
    if (root / JOB_FILE).exists():
        return _load_job_dir(root)
    if all((root / name).exists() for name in RUN_FILES):
        return _load_run_dir(root)
    raise JobError(
        f"{root} has neither {JOB_FILE} (a job directory of `mtpdiag run`) nor {' and '.join(RUN_FILES)} "
        f"(a run directory of `mtpdiag train`); it contains {sorted(p.name for p in root.iterdir())[:10]}"
    )


def _load_job_dir(root: Path) -> Job:
    spec = _read_json(root / JOB_FILE)
    preset = spec.get("preset", {})
    missing = [k for k in ("mtpdiag_version",) if k not in spec]
    missing += [f"preset.{k}" for k in ("name", "seeds", "arms") if k not in preset]
    if missing:
        raise JobError(f"{root / JOB_FILE} lacks {missing}: it was not written by this mtpdiag's `mtpdiag run`")
    if not _compatible(spec["mtpdiag_version"]):
        raise _version_error(root / JOB_FILE, spec["mtpdiag_version"])
    arms = [Arm(a["label"], a["regime"], a.get("lam"), a.get("calibrator"), a.get("diagnostics", True),
                a.get("optimizer"), a.get("lr")) for a in preset["arms"]]
    _check_regimes(root / JOB_FILE, [a.regime for a in arms])
    seeds = [int(s) for s in preset["seeds"]]
    runs = {(a.label, s): schema.run_dir(root, a.label, s) for a in arms for s in seeds}
    absent = [str(d.relative_to(root) / name) for d in runs.values() for name in RUN_FILES if not (d / name).exists()]
    if absent:
        raise JobError(
            f"{root} is missing {len(absent)} run file(s): {', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}. "
            "Resume the job (`mtpdiag run` on the same directory) to finish those runs"
        )
    for run in runs.values():
        version = _read_json(run / CONFIG).get("versions", {}).get("mtpdiag")
        if version is not None and not _compatible(version):
            raise _version_error(run, version)
    # the job's own .incomplete marker stays until its report is written, so only unfinished runs count
    job = Job(root, "job", preset["name"], arms, seeds, runs, spec["mtpdiag_version"],
              incomplete_runs=[str(d.relative_to(root)) for d in runs.values() if (d / INCOMPLETE).exists()])
    job.table("metrics", needed_for=f"the job {root}")  # every run has the columns every report reads
    return job


def _check_regimes(where: Path, names) -> None:
    unknown = sorted(set(names) - set(regimes.REGIMES))
    if unknown:
        raise JobError(
            f"{where} names regime(s) {unknown} that this mtpdiag does not register (it has "
            f"{sorted(regimes.REGIMES)}): register them (mtpdiag.regimes.register) before loading the job"
        )


def _load_run_dir(root: Path) -> Job:
    saved = _read_json(root / CONFIG)
    if "config" not in saved:
        raise JobError(f"{root / CONFIG} has no 'config' entry: it is not a run directory of `mtpdiag train`")
    version = saved.get("versions", {}).get("mtpdiag", "unknown")
    if not _compatible(version):
        raise _version_error(root, version)
    cfg = saved["config"]
    # the calibrator the config names, else the one train() was given (its shadows only log, under their labels)
    calibrator = cfg.get("calibrator") or saved.get("calibrator")
    _check_regimes(root / CONFIG, [cfg["regime"]])
    lam = cfg.get("lam")
    if regimes.get(cfg["regime"]).lambda_rule == FIXED:
        lam = fixed_lambda(lam)  # the lambda the run trained with, as `mtpdiag run` labels such an arm
    arm = Arm.of(cfg["regime"], lam, calibrator)
    seed = int(cfg.get("seed", 0))
    job = Job(root, "run", root.name, [arm], [seed], {(arm.label, seed): root}, version,
              incomplete_runs=["."] if (root / INCOMPLETE).exists() else [])
    job.table("metrics", needed_for=f"the run {root}")
    return job
