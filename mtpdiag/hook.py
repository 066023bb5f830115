"""Run a :class:`~mtpdiag.diagnostics.Probe` inside any training loop, on a schedule, into tidy tables.

Three tables, all keyed by ``step`` and ``objective`` (the curve objective's name):
``steps`` (one row per measured step and objective: every scalar of the record),
``curves`` (one row per lambda of each measured curve) and ``blocks`` (one row per
parameter group, when ``per_block=True``). pandas reads each file directly.

Plain PyTorch loop::

    hook = DiagnosticsHook(Probe(model, objective, aux_loss), every(10), CSVSink("diag/"))
    for step in range(1, steps + 1):
        hook.on_step(step, batch, lr)
        ...  # the usual update

As a trainer callback, ``hook(ctx)`` reads ``ctx.step``, ``ctx.batch``, ``ctx.lr``,
``ctx.model``, ``ctx.optimizer``, ``ctx.j_true_batch`` and the losses from
``ctx.losses`` (or ``ctx`` itself): ``forward``, ``objective``, ``aux_loss``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import schema
from .diagnostics import MeasureOptions, Probe, ProbeRecord

TABLES = schema.DIAG_TABLES
# the few scalars a trainer callback returns for its own metrics table (all of them go to the sink)
SUMMARY_FIELDS = ("c", "cos", "v2", "h_mm", "lambda_star_taylor", "lambda_star_meas_fit")
# the options a hook passes to every measurement; the curve objective and the optimizer it sets per call
MEASURE_OPTIONS = {f.name for f in dataclasses.fields(MeasureOptions)} - {"eval_objective", "eval_batch", "optimizer"}


# ----------------------------------------------------------------------------- schedules


def every(k: int) -> Callable[[int], bool]:
    """Measure steps k, 2k, 3k, ..."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"every({k!r}): k must be a positive integer, the number of steps between measurements")
    return lambda step: step % k == 0


def log_spaced(start: int, stop: int, n: int) -> Callable[[int], bool]:
    """Measure about ``n`` steps from ``start`` to ``stop`` (both included), evenly spaced
    in log(step + 1), dense early when the dynamics move fast. Rounding merges
    neighbours at small steps, so fewer than ``n`` steps can result."""
    if not (0 <= start < stop) or n < 2:
        raise ValueError(f"log_spaced({start}, {stop}, {n}): need 0 <= start < stop and n >= 2")
    steps = frozenset(int(s) for s in np.rint(np.geomspace(start + 1, stop + 1, n)) - 1)
    return steps.__contains__


def _as_schedule(schedule) -> Callable[[int], bool]:
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        return every(schedule)
    if callable(schedule):
        return schedule
    raise ValueError(f"schedule={schedule!r}: pass every(k), log_spaced(start, stop, n), an int k, or a callable step -> bool")


# ----------------------------------------------------------------------------- sinks


class MemorySink:
    """Keeps the tables in memory; ``frame(name)`` gives a DataFrame.

    Writing step s first drops rows at steps >= s, so a run resumed from an
    earlier checkpoint rewrites the steps it repeats instead of duplicating them.
    """

    def __init__(self):
        self.rows: dict[str, list[dict]] = {name: [] for name in TABLES}

    def write(self, step: int, tables: dict[str, list[dict]]) -> None:
        for name in TABLES:
            self.rows[name] = [row for row in self.rows[name] if row["step"] < step] + tables.get(name, [])
        self._persist()

    def frame(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise ValueError(f"table {name!r}: choose one of {TABLES}")
        return pd.DataFrame(self.rows[name])

    def _persist(self) -> None:
        """Files: nothing to write for the in-memory sink."""


class _FileSink(MemorySink):
    suffix: str

    def __init__(self, directory: str | os.PathLike, prefix: str = schema.DIAG_PREFIX):
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        for name in TABLES:  # continue the tables of a resumed run
            if self.path(name).exists():
                try:
                    self.rows[name] = self._read(self.path(name)).to_dict("records")
                except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError and EmptyDataError
                    raise ValueError(f"{self.path(name)} is damaged ({' '.join(str(err).split())}): delete it "
                                     "(its rows are lost) or restore it, then resume") from err

    def path(self, name: str) -> Path:
        return self.directory / schema.diag_file(name, self.suffix, self.prefix)

    def _persist(self) -> None:
        for name in TABLES:
            if self.rows[name]:
                frame = pd.DataFrame(self.rows[name])
                schema.atomic_write(self.path(name), lambda tmp: self._write(frame, tmp))


class CSVSink(_FileSink):
    """``<directory>/diag_{steps,curves,blocks}.csv``, rewritten after every measured step."""

    suffix = ".csv"

    @staticmethod
    def _read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path)

    @staticmethod
    def _write(frame: pd.DataFrame, path: Path) -> None:
        frame.to_csv(path, index=False)


class ParquetSink(_FileSink):
    """``<directory>/diag_{steps,curves,blocks}.parquet``; needs pyarrow or fastparquet."""

    suffix = ".parquet"

    def __init__(self, directory: str | os.PathLike, prefix: str = schema.DIAG_PREFIX):
        if not any(importlib.util.find_spec(engine) for engine in ("pyarrow", "fastparquet")):
            raise ImportError("ParquetSink needs a Parquet engine: pip install pyarrow (or use CSVSink)")
        super().__init__(directory, prefix)

    @staticmethod
    def _read(path: Path) -> pd.DataFrame:
        return pd.read_parquet(path)

    @staticmethod
    def _write(frame: pd.DataFrame, path: Path) -> None:
        frame.to_parquet(path, index=False)


# ----------------------------------------------------------------------------- hook


class DiagnosticsHook:
    """Measures on scheduled steps and writes the records to ``sink``.

    Each scheduled step measures the curve of the gradient's own objective
    (named ``objective_name``) and, when ``eval_objective`` is set and an eval
    batch comes with the step, a second curve on it (``eval_name``), e.g. J_true
    on held-out prompts. ``optimizer_faithful`` adds the optimizer's real-step
    curve. ``top_curvature_schedule`` picks the steps on which the gradient's own
    objective also gets its top curvature L (Lanczos: about ten times the cost of
    a measurement without it). Other keyword options go to :meth:`Probe.measure` (``lambdas``,
    ``hvp``, ``gg_curvature``, ``line_search``, ``top_curvature``, ``L``,
    ``per_block``).

    ``probe`` may be None when the hook is a trainer callback: it is then built
    at the first call from the context's model and losses, with ``probe_options``
    (``shared``, ``shared_forward``, ``hvp_mode``).
    """

    def __init__(
        self,
        probe: Probe | None = None,
        schedule: int | Callable[[int], bool] = 1,
        sink: MemorySink | None = None,
        *,
        objective_name: str = "j_batch",
        eval_objective: Callable | None = None,
        eval_name: str = "j_true",
        optimizer_faithful: bool = False,
        top_curvature_schedule: int | Callable[[int], bool] | None = None,
        probe_options: dict | None = None,
        **measure_options,
    ):
        unknown = sorted(set(measure_options) - MEASURE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown measure options {unknown}: choose from {sorted(MEASURE_OPTIONS)}")
        if objective_name == eval_name:
            raise ValueError(f"objective_name and eval_name are both {eval_name!r}: rows could not tell the curves apart")
        self.probe = probe
        self.schedule = _as_schedule(schedule)
        self.sink = sink if sink is not None else MemorySink()
        self.objective_name = objective_name
        self.eval_objective = eval_objective
        self.eval_name = eval_name
        self.optimizer_faithful = optimizer_faithful
        self.top_curvature_schedule = None if top_curvature_schedule is None else _as_schedule(top_curvature_schedule)
        self.probe_options = probe_options or {}
        self.measure_options = measure_options

    def on_step(
        self, step: int, batch: dict, lr: float, *, eval_batch: dict | None = None, optimizer=None
    ) -> dict[str, ProbeRecord]:
        """Measure if ``step`` is scheduled; returns the records by objective name (empty otherwise)."""
        if not self.schedule(step):
            return {}
        if self.probe is None:
            raise ValueError("DiagnosticsHook has no probe: pass DiagnosticsHook(Probe(model, objective, aux_loss), ...)")
        if self.optimizer_faithful and optimizer is None:
            raise ValueError("optimizer_faithful=True needs on_step(..., optimizer=<the training optimizer>)")
        optimizer = optimizer if self.optimizer_faithful else None
        options = dict(self.measure_options)
        if self.top_curvature_schedule is not None and self.top_curvature_schedule(step):
            options["top_curvature"] = True
        measured = {self.objective_name: self.probe.measure(batch, lr, optimizer=optimizer, **options)}
        if self.eval_objective is not None and eval_batch is not None:
            measured[self.eval_name] = self.probe.measure(
                batch, lr, eval_objective=self.eval_objective, eval_batch=eval_batch, optimizer=optimizer, **self.measure_options
            )
        tables = {name: [] for name in TABLES}
        for name, record in measured.items():
            key = {"step": step, "objective": name}
            tables["steps"].append({**key, **record.as_row()})
            tables["curves"].extend({**key, **row} for row in record.curve_rows())
            tables["blocks"].extend({**key, **row} for row in record.block_rows())
        self.sink.write(step, tables)
        return measured

    def __call__(self, ctx) -> dict | None:
        """Trainer callback: measure per the schedule; return a few scalars for the trainer's
        metrics row (``diag_<objective>_<field>``), or None on unscheduled steps."""
        if not self.schedule(ctx.step):
            return None
        if self.probe is None:
            losses = getattr(ctx, "losses", ctx)
            self.probe = Probe(ctx.model, losses.objective, losses.aux_loss, forward=losses.forward, **self.probe_options)
        measured = self.on_step(
            ctx.step, ctx.batch, ctx.lr, eval_batch=getattr(ctx, "j_true_batch", None), optimizer=getattr(ctx, "optimizer", None)
        )
        return {
            schema.hook_column(name, field): record.as_row()[field] for name, record in measured.items() for field in SUMMARY_FIELDS
        }
