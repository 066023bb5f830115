"""The exact per-step decomposition of an MTP loss's effect on an RL objective.

:class:`Probe` measures, at the current parameters and for one batch, every
quantity of docs/theory.md sections 2-4 (c, v^2, h_gm, h_mm, lambda*, the L-smooth
form, the measured curve Delta(lambda)) as pure functions of (parameters,
batch): it calls the model through :class:`~.functional.FunctionalModel` and
never touches the model's parameters, ``.grad``, buffers, the optimizer or the RNG.

It is orchestration: S and the losses as functions of S come from
:mod:`.functional`, Hessian-vector products and L from :mod:`.hvp`, every derived
scalar from :mod:`.quantities` (adding one: see there), the curves from
:mod:`.curves`. A :class:`MeasureOptions` says what one measurement includes.

It works with any ``nn.Module``: ``forward(model, batch)`` produces outputs,
``objective(outputs, batch)`` is the scalar to maximise, ``aux_loss(outputs,
batch)`` the MTP loss to minimise. Sign conventions: g = grad_S objective,
m = -grad_S aux_loss, one SGD step with coefficient lambda moves S by
lr * (g + lambda m); parameters outside S stay fixed. Parameters are named as
in ``model.named_parameters()`` everywhere.

Under ``torch.distributed`` (more than one rank) each rank passes its shard of
the batch and every rank gets the numbers of the whole batch: each loss is
evaluated as this rank's share of the whole-batch loss (mtpdiag's losses do so
inside :func:`mtpdiag.distributed.global_means`, which the probe enters), and
values, gradients and Hessian-vector products are summed over ranks. Every
rank calls ``measure`` with the same arguments, on the raw (unwrapped) module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..integrations import require_unwrapped
from . import curves, quantities
from .curves import Curve
from .functional import (
    FunctionalModel, Loss, Params, check_finite, checkpointing_enabled, checkpointing_error, find_shared, function_of, isolated, reached_by,
    values_and_gradients,
)
from .hvp import HVP_MODES, HessianAt, top_curvature, tree_dot

NO_MTP_SIGNAL = "no MTP signal on shared parameters"
NOT_CONCAVE = "direction not concave (h_mm >= 0): no lambda*"
NO_SMOOTH_OPTIMUM = "L <= 0 (no negative curvature): no lambda*_smooth"
NO_CURVE_WITHOUT_M = "curve not measured: Delta(lambda) = 0 when m = 0"


def block_of(name: str) -> str:
    """The group a parameter belongs to in the per-block breakdown: everything up to
    the first numeric path component (``blocks.3.attn.qkv.weight`` -> ``blocks.3``),
    else its module path (``wte.weight`` -> ``wte``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


@dataclass
class ProbeRecord:
    """One measurement. ``as_row`` flattens the scalars; ``curve_rows`` and
    ``block_rows`` give the long tables. ``None`` means "not measured" or
    "undefined here" (``note`` says which).

    ``hvp_mode`` is the Hessian-vector path that ran (``fwd_rev`` or ``rev_rev``;
    None without products); ``hvp_fallback`` is why ``rev_rev`` ran although the
    Probe was configured for ``fwd_rev`` (the forward-mode error), else None.
    ``gradient_checkpointing`` is ``"suspended"`` when the model had Hugging Face
    gradient checkpointing on and the measurement ran with it off (restored after), else None."""

    lr: float
    dtype: str
    hvp_mode: str | None
    n_shared: int
    n_shared_tensors: int
    objective_value: float
    c: float
    g_norm: float
    m_norm: float
    v2: float
    cos: float | None
    c_eval: float | None = None
    eval_grad_norm: float | None = None
    h_gm: float | None = None
    h_mm: float | None = None
    h_gg: float | None = None
    kappa_m: float | None = None
    kappa_g: float | None = None
    a: float | None = None
    b: float | None = None
    concave: bool | None = None
    lambda_star_taylor: float | None = None
    harm_threshold: float | None = None
    best_gain_taylor: float | None = None
    L: float | None = None
    L_source: str | None = None
    lambda_star_smooth: float | None = None
    hvp_fallback: str | None = None
    gradient_checkpointing: str | None = None
    note: str = ""
    time_s: float = 0.0
    curves: list[Curve] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)

    def curve(self, kind: str) -> Curve | None:
        return next((c for c in self.curves if c.kind == kind), None)

    def as_row(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k not in ("curves", "blocks")}
        for kind, prefix in (("sgd", ""), ("optimizer", "opt_")):
            curve = self.curve(kind)
            fit = curve.fit if curve is not None else (None, None, None)
            row.update(
                {
                    f"{prefix}fit_a2": _float(fit[0]),
                    f"{prefix}fit_a1": _float(fit[1]),
                    f"{prefix}fit_a0": _float(fit[2]),
                    f"{prefix}fit_r2": curve.r2 if curve else None,
                    f"{prefix}lambda_star_meas_fit": curve.lambda_star_fit if curve else None,
                    f"{prefix}lambda_star_meas_search": curve.lambda_star_search if curve else None,
                }
            )
        return row

    def taylor_delta(self, lam: float) -> float | None:
        """The Taylor quadratic a lambda - b lambda^2 (docs/theory.md s.2)."""
        return quantities.taylor_delta(self.a, self.b, lam)

    def smooth_delta(self, lam: float) -> float | None:
        """The L-smooth expression of docs/theory.md s.3 (see :func:`.quantities.smooth_delta`)."""
        return quantities.smooth_delta(self.lr, self.c, self.c_eval, self.L, self.v2, lam)

    def curve_rows(self) -> list[dict]:
        rows = []
        for curve in self.curves:
            for lam, delta in zip(curve.lambdas.tolist(), curve.delta.tolist()):
                sgd = curve.kind == "sgd"
                rows.append(
                    {
                        "kind": curve.kind,
                        "lambda": lam,
                        "delta_meas": delta,
                        "delta_taylor": self.taylor_delta(lam) if sgd else None,
                        "delta_smooth": self.smooth_delta(lam) if sgd else None,
                    }
                )
        return rows

    def block_rows(self) -> list[dict]:
        return list(self.blocks)


def _float(x) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True, eq=False)
class MeasureOptions:
    """What one :meth:`Probe.measure` includes (see there for each option).
    Validated on construction, before any work; ``lambdas`` becomes the sorted grid."""

    lambdas: Iterable[float] | None = None
    hvp: bool = True
    gg_curvature: bool = True
    line_search: bool = True
    top_curvature: bool = False
    L: float | None = None
    per_block: bool = False
    eval_objective: Loss | None = None
    eval_batch: dict | None = None
    optimizer: torch.optim.Optimizer | None = None

    def __post_init__(self):
        if self.lambdas is not None:
            object.__setattr__(self, "lambdas", curves.given_grid(self.lambdas))
        if self.eval_batch is not None and self.eval_objective is None:
            raise ValueError("eval_batch is the batch of eval_objective: pass eval_objective=<the curve objective> too")

    @property
    def needs_hessian(self) -> bool:
        return self.hvp or self.top_curvature

    @property
    def needs_grid(self) -> bool:
        return self.line_search or self.optimizer is not None


@dataclass
class _Derivatives:
    """First and second derivatives of one measurement, on S."""

    g: Params  # grad of the objective
    m: Params  # minus grad of the aux loss
    e: Params  # grad of the curve objective (g without an eval objective)
    value: torch.Tensor  # the curve objective's value
    Hm: Params | None  # the curve objective's Hessian times m (None without hvp)


def per_block(g: Params, m: Params, Hm: Params | None) -> list[dict]:
    """c, v^2, |g|^2 and h_mm per :func:`block_of` group (h_mm of a group is m_b . (H m)_b,
    so the groups sum to h_mm)."""
    groups: dict[str, list[str]] = {}
    for name in g:
        groups.setdefault(block_of(name), []).append(name)
    rows = []
    for block, names in groups.items():
        sub = lambda tree: {n: tree[n] for n in names}  # noqa: E731
        rows.append(
            {
                "block": block,
                "n_params": sum(g[n].numel() for n in names),
                "c": tree_dot(sub(g), sub(m)).item(),
                "v2": tree_dot(sub(m), sub(m)).item(),
                "g_norm2": tree_dot(sub(g), sub(g)).item(),
                "h_mm": tree_dot(sub(m), sub(Hm)).item() if Hm is not None else None,
            }
        )
    return rows


class Probe:
    """Measures the MTP decomposition of one batch for any ``nn.Module``.

    ``shared`` picks S: ``"auto"`` (the default) takes the trainable parameters
    that both losses reach in the autograd graph, found on the first batch and
    kept (structural reachability: a parameter connected to both losses counts
    even where one gradient is numerically zero on some batch); a list of names
    or a predicate ``name -> bool`` chooses S by hand, e.g. to measure a
    detached regime, whose MTP loss reaches no shared parameter by design.

    ``shared_forward`` is the forward that ``"auto"`` finds S with (default:
    ``forward``): pass the joint forward to measure a detached regime on the S
    of the joint model.

    ``hvp_mode`` is ``fwd_rev`` (default) or ``rev_rev``; see :mod:`mtpdiag.diagnostics.hvp`.
    It is the configuration and never changes. When ``fwd_rev`` fails on an
    operation without a forward-mode derivative, the measurement falls back to
    ``rev_rev``, the Probe keeps the reason in ``hvp_fallback`` so later
    measurements go straight to ``rev_rev``, and every such record says so
    (``record.hvp_mode == "rev_rev"``, ``record.hvp_fallback`` = the reason).

    Diagnostics run with eval semantics (dropout off; every module's ``training``
    flag is restored afterwards) and inside a forked RNG, so the caller's random
    stream is unchanged (:func:`~.functional.isolated`).

    Data parallel: ``objective`` and ``aux_loss`` must return this rank's share
    of the whole-batch value (the shares sum over ranks to it). mtpdiag's losses
    do; in a loss of your own divide by
    :func:`mtpdiag.distributed.global_count` or use
    :func:`~mtpdiag.distributed.global_mean`.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable,
        aux_loss: Callable,
        forward: Callable | None = None,
        shared: str | Sequence[str] | Callable[[str], bool] = "auto",
        hvp_mode: str = "fwd_rev",
        shared_forward: Callable | None = None,
    ):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: choose one of {HVP_MODES}")
        if isinstance(shared, str) and shared != "auto":
            raise ValueError(f"shared={shared!r}: pass 'auto', a list of parameter names, or a predicate name -> bool")
        self.model = require_unwrapped(model)
        self.objective = objective
        self.aux_loss = aux_loss
        self.functional = FunctionalModel(model, forward)
        self._shared_functional = FunctionalModel(model, shared_forward) if shared_forward else self.functional
        self._shared_spec = shared
        self.hvp_mode = hvp_mode
        self.hvp_fallback: str | None = None
        self.shared_names: list[str] | None = None
        self._reached: set[str] | None = None  # what either loss reaches through ``forward`` (the optimizer curve's .grad)

    # ----------------------------------------------------------------- S

    def find_shared(self, batch: dict) -> list[str]:
        """S from the autograd graph: names of the parameters both the objective and the aux loss reach."""
        return find_shared(self._shared_functional, self.objective, self.aux_loss, batch)

    def _resolve_shared(self, batch: dict) -> list[str]:
        if self.shared_names is not None:
            return self.shared_names
        spec = self._shared_spec
        names = list(self.functional.trainable())
        if spec == "auto":
            chosen = self.find_shared(batch)
        elif callable(spec):
            chosen = [n for n in names if spec(n)]
        else:
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"shared names {unknown} are not trainable parameters of the model; known: {names}")
            chosen = [n for n in names if n in set(spec)]
        if not chosen:
            raise ValueError(f"shared={spec!r} selects no trainable parameter: S would be empty")
        self.shared_names = chosen
        return chosen

    def function_of_shared(self, loss: Callable, batch: dict) -> tuple[Callable[[Params], torch.Tensor], Params]:
        """``loss`` on ``batch`` as a pure function of S (the rest held at its current
        values), and S's current values, keyed by the model's parameter names; e.g. for
        :class:`~mtpdiag.diagnostics.hvp.HessianAt` on directions of your own.
        Call it under the model's eval semantics (dropout off) for exact results.
        On several ranks the function is this rank's share: build
        ``HessianAt(..., across_ranks=True)`` on it."""
        theta, fixed = self.functional.split(self._resolve_shared(batch))
        return function_of(self.functional, loss, batch, fixed), theta

    # ----------------------------------------------------------------- measure

    def measure(
        self,
        batch: dict,
        lr: float,
        *,
        lambdas: Iterable[float] | None = None,
        hvp: bool = True,
        gg_curvature: bool = True,
        line_search: bool = True,
        top_curvature: bool = False,
        L: float | None = None,
        per_block: bool = False,
        eval_objective: Callable | None = None,
        eval_batch: dict | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> ProbeRecord:
        """Measure one step at learning rate ``lr`` (eta).

        ``hvp``: h_gm and h_mm (one Hessian-vector product), and with
        ``gg_curvature`` also h_gg / kappa_g (a second one). ``line_search``:
        Delta(lambda) on ``lambdas`` (default: ``GRID_MULTIPLIERS`` times
        |lambda*_taylor|, floored where the curve is resolvable, else times
        |g|/|m|), a quadratic fit and a bounded scalar search around the best
        grid point. ``top_curvature``: L by
        Lanczos; ``L`` given instead is used as is; either gives lambda*_smooth.
        ``per_block``: c, v^2, |g|^2 and h_mm per parameter group (h_mm of a
        group is m_b . (H m)_b, so the groups sum to h_mm).

        ``eval_objective`` (on ``eval_batch``, default ``batch``) is the
        objective E whose curve is measured while g still comes from
        ``objective``: then Delta(lambda) = E(theta + eta(g + lambda m)) -
        E(theta + eta g), the Hessians are E's, c_eval = <grad E, m> and
        a = eta (c_eval + eta g^T H_E m). ``optimizer``: also the curve for the
        optimizer's real step on -objective + lambda * aux_loss over all its
        parameters, from a clone of its state (its own learning rate applies;
        frozen parameters are skipped, as the optimizer skips them).
        """
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr={lr}: the step size must be a positive finite number")
        options = MeasureOptions(
            lambdas=lambdas, hvp=hvp, gg_curvature=gg_curvature, line_search=line_search,
            top_curvature=top_curvature, L=L, per_block=per_block, eval_objective=eval_objective,
            eval_batch=eval_batch, optimizer=optimizer,
        )
        if optimizer is not None:
            curves.check_optimizer(optimizer, dict(self.model.named_parameters()))
        started = time.perf_counter()
        suspended = checkpointing_enabled(self.model)
        with isolated(self.model), torch.enable_grad():
            try:
                record = self._measure(batch, float(lr), options)
            except RuntimeError as err:
                if checkpointing_error(err) is None:
                    raise
                raise checkpointing_error(err) from err
        record.gradient_checkpointing = "suspended" if suspended else None
        record.time_s = time.perf_counter() - started
        return record

    def _measure(self, batch: dict, lr: float, options: MeasureOptions) -> ProbeRecord:
        theta, fixed = self.functional.split(self._resolve_shared(batch))
        eval_batch = batch if options.eval_batch is None else options.eval_batch
        evaluated = options.eval_objective or self.objective
        hessian = None
        if options.needs_hessian:
            E = function_of(self.functional, evaluated, eval_batch, fixed)
            # a fallback remembered from an earlier measurement skips the failing forward-mode attempt
            mode = "rev_rev" if self.hvp_fallback else self.hvp_mode
            hessian = HessianAt(E, theta, mode, across_ranks=True)
        d = self._derivatives(batch, theta, fixed, options, eval_batch, hessian)

        measured = {
            "lr": lr,
            "c": tree_dot(d.g, d.m).item(),
            "g2": tree_dot(d.g, d.g).item(),
            "v2": tree_dot(d.m, d.m).item(),
            "c_e": tree_dot(d.e, d.m).item(),
        }
        if options.hvp:
            measured["h_gm"] = tree_dot(d.g, d.Hm).item()
            measured["h_mm"] = tree_dot(d.m, d.Hm).item()
            if options.gg_curvature:
                measured["h_gg"] = tree_dot(d.g, hessian(d.g)).item()
        L_source = None
        if options.L is not None:
            measured["L"], L_source = float(options.L), "given"
        elif options.top_curvature:
            measured["L"], L_source = top_curvature(hessian), "measured"
        if hessian is not None and hessian.fallback is not None:
            self.hvp_fallback = hessian.fallback

        v2 = measured["v2"]
        some = next(iter(theta.values()))
        record = ProbeRecord(
            lr=lr,
            dtype=str(some.dtype).removeprefix("torch."),
            hvp_mode=hessian.mode if hessian is not None else None,
            hvp_fallback=self.hvp_fallback if hessian is not None else None,
            n_shared=sum(t.numel() for t in theta.values()),
            n_shared_tensors=len(theta),
            objective_value=d.value.item(),
            c=measured["c"],
            g_norm=math.sqrt(measured["g2"]),
            m_norm=math.sqrt(v2),
            v2=v2,
            h_gm=measured.get("h_gm"),
            h_mm=measured.get("h_mm"),
            h_gg=measured.get("h_gg"),
            L=measured.get("L"),
            L_source=L_source,
            **quantities.derive(measured),
        )
        if options.eval_objective is not None:
            record.c_eval, record.eval_grad_norm = measured["c_e"], math.sqrt(tree_dot(d.e, d.e).item())
        if options.per_block:
            record.blocks = per_block(d.g, d.m, d.Hm)
        if options.needs_grid:
            record.curves = self._curves(batch, eval_batch, evaluated, theta, fixed, d, record, options)
        record.note = "; ".join(self._notes(record, options))
        return record

    @staticmethod
    def _notes(record: ProbeRecord, options: MeasureOptions) -> list[str]:
        """Why a quantity is undefined on this measurement."""
        notes = [NO_MTP_SIGNAL] if record.v2 == 0 else []
        if options.hvp and record.v2 > 0 and not record.concave:
            notes.append(NOT_CONCAVE)
        if record.L is not None and record.L <= 0:
            notes.append(NO_SMOOTH_OPTIMUM)
        if record.v2 == 0 and options.line_search:
            notes.append(NO_CURVE_WITHOUT_M)
        return notes

    def _derivatives(self, batch, theta, fixed, options: MeasureOptions, eval_batch, hessian) -> _Derivatives:
        """g, m, the value and gradient e of the curve objective and H m."""
        fm, eval_objective = self.functional, options.eval_objective
        if eval_objective is None and hessian is not None:
            _, (aux_grad,) = values_and_gradients(fm, [self.aux_loss], batch, theta, fixed)
            check_finite(aux_grad, "aux_loss", self.aux_loss)
            m = {k: -t for k, t in aux_grad.items()}
            # H m first: forward-over-reverse yields the objective's value and gradient with it, so g is free
            Hm = hessian(m) if options.hvp else None
            g = e = hessian.grad
            value = hessian.value
        else:
            (value, _), (g, aux_grad) = values_and_gradients(fm, [self.objective, self.aux_loss], batch, theta, fixed)
            check_finite(aux_grad, "aux_loss", self.aux_loss)
            m = {k: -t for k, t in aux_grad.items()}
            Hm = hessian(m) if options.hvp else None
            e = g
            if eval_objective is not None and hessian is not None:
                e, value = hessian.grad, hessian.value
            elif eval_objective is not None:
                (value,), (e,) = values_and_gradients(fm, [eval_objective], eval_batch, theta, fixed)
            if eval_objective is not None:
                check_finite(e, "eval_objective", eval_objective)
        check_finite(g, "objective", self.objective)
        return _Derivatives(g, m, e, value, Hm)

    def _curves(self, batch, eval_batch, evaluated, theta, fixed, d: _Derivatives, record, options) -> list[Curve]:
        if options.lambdas is not None:
            grid = options.lambdas
        else:
            grid = curves.default_grid(
                record.lambda_star_taylor, record.b, record.g_norm, record.m_norm, record.objective_value,
                torch.finfo(next(iter(theta.values())).dtype).eps,
            )
        measured = []
        if options.line_search and record.v2 > 0:
            whole_batch = function_of(self.functional, evaluated, eval_batch, fixed, summed=True)
            measured.append(curves.sgd_curve(whole_batch, theta, d.g, d.m, record.lr, grid))
        if options.optimizer is not None:
            measured.append(self._optimizer_curve(options.optimizer, batch, evaluated, eval_batch, grid))
        return measured

    def _optimizer_curve(self, optimizer, batch, evaluated, eval_batch, grid) -> Curve:
        """The optimizer's real step on -objective + lambda aux_loss over all the model's
        parameters; a parameter no loss reaches through ``forward`` gets no .grad,
        as in the trainer's backward."""
        fm = self.functional
        if self._reached is None:
            self._reached = reached_by(fm, self.objective, batch) | reached_by(fm, self.aux_loss, batch)
        params = {n: p.detach() for n, p in fm.trainable().items()}
        _, (g_all, aux_all) = values_and_gradients(fm, [self.objective, self.aux_loss], batch, params, {})
        reached = self._reached

        def step_grad(name: str, lam: float) -> torch.Tensor | None:
            return (-g_all[name] + lam * aux_all[name]) if name in reached else None

        objective = function_of(fm, evaluated, eval_batch, {}, summed=True)
        return curves.optimizer_curve(optimizer, dict(self.model.named_parameters()), step_grad, objective, grid)
