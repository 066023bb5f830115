"""Run a :class:`~mtpdiag.diagnostics.Probe` inside any training loop, on a schedule, into tidy tables.

On a scheduled step the hook measures the update of every mini-batch, at the
parameters that mini-batch starts from, with the trainer's own optimizer and lambda
(:meth:`~mtpdiag.diagnostics.Probe.measure_update`). Three tables, all keyed by
``step``, ``minibatch`` and ``objective`` (the curve objective's name):
``steps`` (one row per measured mini-batch and objective: every scalar of the record,
see :class:`DiagnosticsHook` for the columns), ``curves`` (one row per lambda of each
measured curve) and ``blocks`` (one row per parameter group, when ``per_block=True``).
pandas reads each file directly.

Plain PyTorch loop::

    hook = DiagnosticsHook(Probe(model, objective, aux_loss), every(10), CSVSink("diag/"))
    for step in range(1, steps + 1):
        for mb, minibatch in enumerate(minibatches):
            out = model(minibatch["input_ids"])
            loss = aux_loss(out, minibatch, lam) - objective(out, minibatch)
            optimizer.zero_grad(); loss.backward()
            hook.on_update(step, mb, minibatch, optimizer, lam)   # before the step it measures
            optimizer.step()

The built-in trainer calls :meth:`DiagnosticsHook.on_update` the same way, from its
:class:`~mtpdiag.train.Updater` (:meth:`mtpdiag.config.DiagnosticsConfig.hook` builds it).
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
from .diagnostics import MeasureOptions, Probe, ProbeRecord, UpdateGradients

TABLES = schema.DIAG_TABLES
KEYS = ("step", "minibatch", "objective")  # every row of every table starts with these
# the few scalars the trainer also logs per mini-batch (minibatch.csv, and their step means in metrics.csv)
SUMMARY_FIELDS = ("c", "cos", "v2", "h_mm", "lambda_star_taylor", "lambda_star_precond", "lambda_star_meas",
                  "delta_trained")
# the options a hook passes to every measurement
MEASURE_OPTIONS = {f.name for f in dataclasses.fields(MeasureOptions)}


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

    Writing mini-batch b of step s first drops the rows at (step, minibatch) >= (s, b),
    so a run resumed from an earlier checkpoint rewrites the steps it repeats instead
    of duplicating them.
    """

    def __init__(self):
        self.rows: dict[str, list[dict]] = {name: [] for name in TABLES}

    def write(self, step: int, minibatch: int, tables: dict[str, list[dict]]) -> None:
        for name in TABLES:
            kept = [row for row in self.rows[name] if (row["step"], row["minibatch"]) < (step, minibatch)]
            self.rows[name] = kept + tables.get(name, [])
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
    """Measures the trained update of every mini-batch of the scheduled steps and writes
    the records to ``sink``.

    Each measurement has a curve on the probe's own objective (named
    ``objective_name``), on each of ``extra_objectives`` (name -> ``loss(out, batch)``
    on the mini-batch, e.g. ``{"j_unclipped": rl_objective_unclipped}``) and, when
    ``eval_objective`` is set and an eval batch comes with the call, on it
    (``eval_name``), e.g. J_true on held-out prompts. ``clip_fraction`` (a
    ``loss(out, batch)``-like function of the mini-batch) is read at the end of the
    trained step. ``top_curvature_schedule`` picks the steps on which the probe's own
    objective also gets its top curvature L (Lanczos: about ten times the cost of a
    measurement without it). ``minibatches`` (indices; None: all) picks the mini-batches of
    a scheduled step that are measured. ``reuse_gradients``: a trainer that can (mtpdiag's)
    hands its own g and aux gradients to :meth:`on_update` (``gradients=``); a plain loop's
    call without them has the Probe take its own. Other keyword options go to
    :meth:`~mtpdiag.diagnostics.Probe.measure_update` (``grid``, ``hvp``,
    ``gg_curvature``, ``line_search``, ``top_curvature``, ``L``, ``per_block``, ``crossfit``).

    Columns of ``steps``: ``step, minibatch, objective``, then every field of
    :class:`~mtpdiag.diagnostics.ProbeRecord` (``optimizer``, ``lr``, ``c``, ``cos``,
    ``v2``, ``h_gm``, ``h_gm_jonly``, ``h_mm``, ``h_gg``, ``kappa_m``, ``kappa_g``, ``a``,
    ``b``, ``lambda_star_taylor``, ``harm_threshold``, ``L``, ``lambda_star_smooth``,
    ``a_precond``, ``b_precond``, ``lambda_star_precond``, ``precond_new_share``,
    ``lambda_trained`` (head 0), ``delta_trained``, ``clip_fraction``, ``c_crossfit``,
    ``cos_crossfit``, ``note``, ...), its curve's (``lambda_star_meas``,
    ``delta_jonly``, ``fit_a2, fit_a1, fit_a0, fit_r2, lambda_star_meas_fit``,
    ``fit_origin_a2, fit_origin_a1, fit_origin_r2, lambda_star_meas_fit_origin``) and
    ``c_true``: <grad J_true, m>, the eval objective's c_eval, on every row of the
    mini-batch (None without an eval objective). Columns of ``curves``: the keys,
    ``lambda, delta_meas, delta_meas_s, delta_jonly, delta_taylor, delta_precond,
    delta_smooth``.

    ``probe`` may be None for a trainer that builds it on its own losses before the
    first call (:class:`mtpdiag.integrations.trl.MTPGRPOTrainer`), with ``probe_options``
    (``shared``, ``shared_forward``, ``hvp_mode``, ``aux_sign_dependent``).
    """

    def __init__(
        self,
        probe: Probe | None,
        schedule: int | Callable[[int], bool] = 1,
        sink: MemorySink | None = None,
        *,
        objective_name: str = "j_batch",
        eval_objective: Callable | None = None,
        eval_name: str = "j_true",
        extra_objectives: dict[str, Callable] | None = None,
        clip_fraction: Callable | None = None,
        top_curvature_schedule: int | Callable[[int], bool] | None = None,
        probe_options: dict | None = None,
        minibatches=None,
        reuse_gradients: bool = True,
        **measure_options,
    ):
        if probe is not None and not isinstance(probe, Probe):
            raise ValueError(f"DiagnosticsHook needs a Probe, got {type(probe).__name__}: "
                             "pass DiagnosticsHook(Probe(model, objective, aux_loss), ...)")
        unknown = sorted(set(measure_options) - MEASURE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown measure options {unknown}: choose from {sorted(MEASURE_OPTIONS)}")
        self.extra_objectives = dict(extra_objectives or {})
        names = [objective_name, eval_name, *self.extra_objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"curve objective names {names} repeat: rows could not tell the curves apart")
        self.probe = probe
        self.schedule = _as_schedule(schedule)
        self.sink = sink if sink is not None else MemorySink()
        self.objective_name = objective_name
        self.eval_objective = eval_objective
        self.eval_name = eval_name
        self.clip_fraction = clip_fraction
        self.top_curvature_schedule = None if top_curvature_schedule is None else _as_schedule(top_curvature_schedule)
        self.probe_options = probe_options or {}
        self.minibatches = None if minibatches is None else frozenset(int(i) for i in minibatches)
        self.reuse_gradients = bool(reuse_gradients)
        self.measure_options = measure_options

    def measures(self, step: int, minibatch: int) -> bool:
        """Whether :meth:`on_update` measures mini-batch ``minibatch`` of ``step``: a trainer
        asks first, to take the gradients it hands over (``gradients=``)."""
        return self.schedule(step) and (self.minibatches is None or minibatch in self.minibatches)

    def wants_aux_minus(self) -> bool:
        """Whether the measurements need the aux gradient at head weight -1 whatever lambda
        is trained (a sign-dependent aux loss and a curve reaching below 0): a trainer that
        hands its gradients over takes it too."""
        options = MeasureOptions(**self.measure_options)
        return self.probe is not None and self.probe.wants_aux_minus(None, options)

    def on_update(
        self, step: int, minibatch: int, batch: dict, optimizer, lambdas, *, eval_batch: dict | None = None,
        gradients: UpdateGradients | None = None, max_grad_norm: float | None = None,
    ) -> dict[str, ProbeRecord]:
        """Measure the update ``optimizer`` is about to take on mini-batch ``minibatch`` of
        ``step`` (call it before ``optimizer.step()``) with the trained ``lambdas`` (a scalar
        or one per head), if ``step`` is scheduled; returns the records by objective name
        (empty otherwise). ``batch`` is this mini-batch (on several ranks, this rank's rows
        of it); ``batch["group"]``, the prompt-group id of each row, enables cross-fitting.
        ``gradients``: the trainer's own, and ``max_grad_norm`` the total norm it clips the
        gradient to before its step, if it clips (see :meth:`~mtpdiag.diagnostics.Probe.measure_update`)."""
        if not self.measures(step, minibatch):
            return {}
        if self.probe is None:
            raise ValueError("DiagnosticsHook has no probe: pass DiagnosticsHook(Probe(model, objective, aux_loss), ...)")
        options = dict(self.measure_options)
        if self.top_curvature_schedule is not None and self.top_curvature_schedule(step):
            options["top_curvature"] = (self.objective_name,)
        objectives = {self.objective_name: self.probe.objective, **self.extra_objectives}
        if self.eval_objective is not None and eval_batch is not None:
            objectives[self.eval_name] = (self.eval_objective, eval_batch)
        measured = self.probe.measure_update(
            batch, optimizer, lambdas, objectives=objectives, clip_fraction=self.clip_fraction, gradients=gradients,
            max_grad_norm=max_grad_norm, **options,
        )
        c_true = measured[self.eval_name].c_eval if self.eval_name in measured else None
        tables = {name: [] for name in TABLES}
        for name, record in measured.items():
            key = {"step": step, "minibatch": minibatch, "objective": name}
            tables["steps"].append({**key, **record.as_row(), "c_true": c_true})
            tables["curves"].extend({**key, **row} for row in record.curve_rows())
            tables["blocks"].extend({**key, **row} for row in record.block_rows())
        self.sink.write(step, minibatch, tables)
        return measured

    @staticmethod
    def summary(measured: dict[str, ProbeRecord]) -> dict:
        """A few scalars of the records for a trainer's metrics row: ``diag_<objective>_<field>``."""
        return {
            schema.hook_column(name, field): record.as_row()[field] for name, record in measured.items()
            for field in SUMMARY_FIELDS
        }
