"""A run directory (the files of :mod:`mtpdiag.schema`): ``config.json``,
``metrics.csv`` (one row per step), ``minibatch.csv`` (one row per optimiser
mini-batch), ``checkpoint.pt`` (the latest) and an ``.incomplete`` marker that
exists until the run finishes.

CSV rows live in memory and each file is rewritten atomically after every step,
so rows always describe completed steps and a step may add columns the earlier
rows lack (pandas reads those as NaN). The checkpoint carries the rows up to its
step, so resuming rewrites the CSVs from exactly those rows: a killed-and-resumed
run has neither lost nor duplicated rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from .schema import CHECKPOINT, CONFIG, INCOMPLETE, METRICS, MINIBATCH, atomic_write


class RunDirError(ValueError):
    pass


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
        file = self.path / CONFIG
        return json.loads(file.read_text()) if file.exists() else None

    def open(self, resume: bool) -> dict | None:
        """Prepare the directory and return the checkpoint to resume from (or None).
        A non-empty directory is only reused with ``resume``."""
        exists = self.path.exists() and any(self.path.iterdir())
        if exists and not resume:
            raise RunDirError(
                f"run directory {self.path} is not empty: pass --resume to continue that run, or choose a new --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / INCOMPLETE).touch()
        checkpoint = None
        if resume and self.checkpoint_path.exists():
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
            self.rows = checkpoint["rows"]
        self._write_csv()
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
