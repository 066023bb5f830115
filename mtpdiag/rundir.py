"""A run directory (the files of :mod:`mtpdiag.schema`): ``config.json``,
``metrics.csv`` (one row per step), ``minibatch.csv`` (one row per optimiser
mini-batch), ``checkpoint.pt`` (the latest) and an ``.incomplete`` marker that
exists until the run finishes.

CSV rows live in memory and each file is rewritten atomically after every step,
so rows always describe completed steps and a step may add columns the earlier
rows lack (pandas reads those as NaN). The checkpoint carries the rows up to its
step, so resuming rewrites the CSVs from exactly those rows: a killed-and-resumed
run has neither lost nor duplicated rows.

While a process writes a run (or job) directory it holds its ``.lock``
(:class:`DirectoryLock`), so a second writer is refused while the first lives and
takes over once it is dead. :func:`check_output_dir` refuses a path that cannot be
a directory before anything is written.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pandas as pd
import torch

from .schema import CHECKPOINT, CONFIG, INCOMPLETE, LOCK, METRICS, MINIBATCH, atomic_write


class RunDirError(ValueError):
    pass


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before anything is written, an output directory that is a file, lies
    under a file, or sits in a directory this process cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {path} is a file, not a directory: choose a directory path")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{flag} {path} lies under {existing}, which is a file: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {path}: {existing} is not writable: choose a directory you can write, "
                          "or change its permissions")


def read_json(file: Path) -> dict | None:
    """A JSON file of a run or job directory (None when absent); a damaged one is an error naming it."""
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{file} is damaged ({err}): restore it, or delete the directory to start over") from err


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from Linux's /proc),
    None where it cannot be read or the process is a zombie; with the pid it names
    one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    started = _process_start(pid)
    if started is None:  # on Linux: a zombie, or gone since; elsewhere os.kill is all there is to go by
        return not Path("/proc").is_dir()
    return owner.get("started") in (None, started)  # another start time: the pid was reused


class DirectoryLock:
    """``<directory>/.lock`` while this process writes ``directory``: the lock holds
    its pid, start time and host. Acquiring refuses a directory whose lock belongs to
    a live process (a one-line error naming it) and takes over the lock of a dead
    one (a job killed with ``kill -9``, a worker killed with it)."""

    def __init__(self, directory: str | os.PathLike, what: str = "run directory"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK
        self.me = {"pid": os.getpid(), "started": _process_start(os.getpid()), "host": socket.gethostname()}

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # absent, or cut short by a crash: nobody holds it

    def acquire(self) -> "DirectoryLock":
        owner = self.owner()
        if owner is not None and owner.get("pid") != self.me["pid"] and _alive(owner):
            raise RunDirError(
                f"{self.what} {self.directory} is being written by process {owner['pid']} on {owner.get('host')}: "
                f"wait for it to finish or stop it (kill {owner['pid']}), then run again"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.me) + "\n"))
        if self.owner() != self.me:  # another process took the dead owner's lock at the same moment
            raise RunDirError(f"{self.what} {self.directory} was just taken over by process "
                              f"{(self.owner() or {}).get('pid')}: run again once it is done")
        return self

    def release(self) -> None:
        if self.owner() == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, list[dict]] = {METRICS: [], MINIBATCH: []}

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def is_complete(self) -> bool:
        return (self.path / CONFIG).exists() and not (self.path / INCOMPLETE).exists()

    def read_config(self) -> dict | None:
        return read_json(self.path / CONFIG)

    def open(self, resume: bool) -> dict | None:
        """Prepare the directory and return the checkpoint to resume from (or None).
        A non-empty directory is only reused with ``resume``. The checkpoint is read
        before anything is written, so a damaged one leaves the directory as it was."""
        exists = self.path.exists() and any(p.name != LOCK for p in self.path.iterdir())
        if exists and not resume:
            raise RunDirError(
                f"run directory {self.path} is not empty: pass --resume to continue that run, or choose a new --out"
            )
        checkpoint = self.read_checkpoint() if resume else None
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / INCOMPLETE).touch()
        if checkpoint is not None:
            self.rows = checkpoint["rows"]
        self._write_csv()
        return checkpoint

    def read_checkpoint(self) -> dict | None:
        """The last checkpoint (None when there is none); a damaged one is an error naming it."""
        if not self.checkpoint_path.exists():
            return None
        try:
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            # torch's first sentence says what is wrong; the rest is advice on saving
            checkpoint, reason = None, (str(err).split(". ")[0].splitlines() or [type(err).__name__])[0]
        else:
            reason = None if isinstance(checkpoint, dict) and {"step", "rows"} <= set(checkpoint) else "no step or rows"
        if reason is not None:
            raise RunDirError(
                f"{self.checkpoint_path} is damaged ({reason}): delete it to restart this run from step 0 with "
                "--resume, or choose a new --out"
            )
        return checkpoint

    def write_config(self, config: dict) -> None:
        atomic_write(self.path / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

    def append(self, metrics_row: dict, minibatch_rows: list[dict]) -> None:
        """Record one completed step."""
        self.rows[METRICS].append(metrics_row)
        self.rows[MINIBATCH].extend(minibatch_rows)
        self._write_csv()

    def save_checkpoint(self, state: dict) -> None:
        """Save ``state`` together with the rows recorded so far."""
        atomic_write(self.checkpoint_path, lambda tmp: torch.save({**state, "rows": self.rows}, tmp))

    def mark_complete(self) -> None:
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows[METRICS])

    def _write_csv(self) -> None:
        for name, rows in self.rows.items():
            if rows:
                atomic_write(self.path / name, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
            else:
                (self.path / name).unlink(missing_ok=True)


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The metrics of a run directory as a DataFrame, one row per step."""
    return pd.read_csv(Path(path) / METRICS)
