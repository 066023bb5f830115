"""The exact decomposition of an MTP loss's effect on an RL objective, for the update that is trained.

:class:`Probe` measures, at the current parameters and for one (mini-)batch, every
quantity of docs/theory.md sections 2-4, 6 and 8 (c, v^2, h_gm, h_mm, lambda*, the
L-smooth form, the frozen-preconditioner lambda*, the cross-fitted correlations and
the measured curve Delta(lambda) of the optimizer's real step) as pure functions of
(parameters, batch): it calls the model through :class:`~.functional.FunctionalModel`
and never touches the model's parameters, ``.grad``, buffers, the optimizer or the RNG.

:meth:`Probe.measure_update` measures the update a trainer is about to take: the
trainer's optimizer (replayed from a clone of its state), the trained lambda, every
parameter the update moves (S, J-only, MTP-only) and one curve per objective.
:meth:`Probe.measure` is the same measurement for one plain SGD step of a given size.

It is orchestration: S and the losses as functions of the parameters come from
:mod:`.functional`, Hessian-vector products and L from :mod:`.hvp`, every derived
scalar from :mod:`.quantities` (adding one: see there), the curves and the replay of the
step from :mod:`.curves`, Adam's frozen preconditioner from :mod:`.precond`.

It works with any ``nn.Module``: ``forward(model, batch)`` produces outputs,
``objective(outputs, batch)`` is the scalar to maximise, ``aux_loss(outputs, batch)``
the MTP loss to minimise (called with ``head_weights=`` where the measurement needs the
loss at other head weights: see :class:`Probe`). Sign conventions: g = grad objective,
m = -grad aux_loss; the trainer's loss at coefficient lambda is
-objective + aux_loss(lambda), so one SGD step moves the parameters by lr (g + lambda m).
Parameters are named as in ``model.named_parameters()`` everywhere.

Under ``torch.distributed`` (more than one rank) each rank passes its shard of the
batch and every rank gets the numbers of the whole batch: each loss is evaluated as
this rank's share of the whole-batch loss (mtpdiag's losses do so inside
:func:`mtpdiag.distributed.global_means`, which the probe enters), and values,
gradients and Hessian-vector products are summed over ranks. Every rank calls the
Probe with the same arguments, on the raw (unwrapped) module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum
from ..integrations import require_unwrapped
from . import curves, quantities
from .curves import Curve, Replay
from .functional import (
    FunctionalModel, Loss, Params, check_finite, checked_value, checkpointing_enabled, checkpointing_error, find_shared,
    function_of, isolated, reached_by, values_and_gradients,
)
from .gradients import UpdateGradients, trained_weights
from .hvp import HVP_MODES, HessianAt, top_curvature, tree_dot
from .precond import frozen_preconditioner, unsupported

AUTO = "auto"
PROBE_HVP_MODES = (*HVP_MODES, AUTO)

NO_MTP_SIGNAL = "no MTP signal on shared parameters"
NOT_CONCAVE = "direction not concave (h_mm >= 0): no lambda*"
NO_SMOOTH_OPTIMUM = "L <= 0 (no negative curvature): no lambda*_smooth"
NO_CURVE_WITHOUT_M = "curve not measured: Delta(lambda) = 0 when m = 0"
NO_CROSSFIT_HALF = "one half of the prompt groups (even or odd group id) is empty: no cross-fit"
GROUPS_DIFFER_IN_LR = "the optimizer's parameter groups differ in lr: the Taylor quantities use the first group's"


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
    """One measurement of one curve objective. ``as_row`` flattens the scalars (and the
    curve's fits); ``curve_rows`` and ``block_rows`` give the long tables. ``None``
    means "not measured" or "undefined here" (``note`` says which).

    ``optimizer`` is the update's optimizer class, lower case (``sgd``, ``adamw``,
    ``adam``); ``lr`` its (first group's) learning rate, the eta of the Taylor
    quantities. ``hvp_mode`` is the Hessian-vector path that ran (``fwd_rev`` or
    ``rev_rev``; None without products); ``hvp_fallback`` is why ``rev_rev`` ran
    although the Probe was configured for ``fwd_rev`` or ``auto`` (the forward-mode error),
    else None. ``hvp_time_fwd_rev_s`` and ``hvp_time_rev_rev_s``: with ``hvp_mode="auto"``,
    the one-time timings of one HVP in each mode that chose ``hvp_mode`` (None for a mode
    that could not run, and without ``auto``).
    ``gradients_from`` is ``"trainer"`` where g and m are the trainer's own backward passes
    (``measure_update(gradients=...)``), else ``"probe"``. ``max_grad_norm`` is the
    trainer's gradient clipping the replayed step applied (None: none), and
    ``grad_norm_trained`` the trained gradient's total norm before it (it clipped where
    this exceeds ``max_grad_norm``).
    ``gradient_checkpointing`` is ``"suspended"`` when the model had Hugging Face
    gradient checkpointing on and the measurement ran with it off (restored after), else None.
    ``time_s`` is the time of the whole measurement, every objective included."""

    optimizer: str
    lr: float
    dtype: str
    hvp_mode: str | None
    n_shared: int
    n_shared_tensors: int
    n_moved: int
    objective_value: float
    c: float
    g_norm: float
    m_norm: float
    v2: float
    cos: float | None
    c_eval: float | None = None
    eval_grad_norm: float | None = None
    h_gm: float | None = None
    h_gm_jonly: float | None = None
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
    a_precond: float | None = None
    b_precond: float | None = None
    lambda_star_precond: float | None = None
    precond_new_share: float | None = None
    lambda_trained: float | None = None
    delta_trained: float | None = None
    clip_fraction: float | None = None
    c_crossfit: float | None = None
    cos_crossfit: float | None = None
    hvp_fallback: str | None = None
    hvp_time_fwd_rev_s: float | None = None
    hvp_time_rev_rev_s: float | None = None
    gradient_checkpointing: str | None = None
    gradients_from: str = "probe"
    max_grad_norm: float | None = None
    grad_norm_trained: float | None = None
    note: str = ""
    time_s: float = 0.0
    curve: Curve | None = None
    blocks: list[dict] = field(default_factory=list)

    def as_row(self) -> dict:
        """Every scalar field, then the curve's: ``lambda_star_meas`` (its refined argmax),
        ``delta_jonly`` (Delta - Delta_S there), the free fit ``fit_a2, fit_a1, fit_a0,
        fit_r2, lambda_star_meas_fit`` and the fit through the origin ``fit_origin_a2,
        fit_origin_a1, fit_origin_r2, lambda_star_meas_fit_origin`` (None without a curve)."""
        row = {k: v for k, v in self.__dict__.items() if k not in ("curve", "blocks")}
        curve = self.curve
        free = curve.fit.coefficients if curve else (None, None, None)
        origin = curve.fit_origin.coefficients if curve else (None, None)
        row.update(
            {
                "lambda_star_meas": curve.lambda_star if curve else None,
                "delta_jonly": curve.delta_jonly_star if curve else None,
                "fit_a2": _float(free[0]),
                "fit_a1": _float(free[1]),
                "fit_a0": _float(free[2]),
                "fit_r2": curve.fit.r2 if curve else None,
                "lambda_star_meas_fit": curve.fit.vertex if curve else None,
                "fit_origin_a2": _float(origin[0]),
                "fit_origin_a1": _float(origin[1]),
                "fit_origin_r2": curve.fit_origin.r2 if curve else None,
                "lambda_star_meas_fit_origin": curve.fit_origin.vertex if curve else None,
            }
        )
        return row

    def taylor_delta(self, lam: float) -> float | None:
        """The Taylor quadratic a lambda - b lambda^2 (docs/theory.md s.2)."""
        return quantities.taylor_delta(self.a, self.b, lam)

    def precond_delta(self, lam: float) -> float | None:
        """The frozen-preconditioner quadratic a_P lambda - b_P lambda^2 (docs/theory.md s.6)."""
        return quantities.taylor_delta(self.a_precond, self.b_precond, lam)

    def smooth_delta(self, lam: float) -> float | None:
        """The L-smooth expression of docs/theory.md s.3 (see :func:`.quantities.smooth_delta`)."""
        return quantities.smooth_delta(self.lr, self.c, self.c_eval, self.L, self.v2, lam)

    def curve_rows(self) -> list[dict]:
        """One row per grid point: ``delta_meas`` (every moved parameter), ``delta_meas_s``
        (S only), ``delta_jonly`` (their difference) and the three model curves."""
        if self.curve is None:
            return []
        curve = self.curve
        return [
            {
                "lambda": lam,
                "delta_meas": delta,
                "delta_meas_s": delta_s,
                "delta_jonly": delta - delta_s,
                "delta_taylor": self.taylor_delta(lam),
                "delta_precond": self.precond_delta(lam),
                "delta_smooth": self.smooth_delta(lam),
            }
            for lam, delta, delta_s in zip(curve.lambdas.tolist(), curve.delta.tolist(), curve.delta_s.tolist())
        ]

    def block_rows(self) -> list[dict]:
        return list(self.blocks)


def _synchronize(params: Params) -> None:
    """Wait for the CUDA kernels of ``params``' device, so a wall-clock timing covers them."""
    some = next(iter(params.values()))
    if some.is_cuda:
        torch.cuda.synchronize(some.device)


def _float(x) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True, eq=False)
class MeasureOptions:
    """What one measurement includes (see :meth:`Probe.measure_update` for each option).
    Validated on construction, before any work; ``grid`` becomes the sorted grid."""

    grid: Iterable[float] | None = None
    hvp: bool = True
    gg_curvature: bool = True
    line_search: bool = True
    top_curvature: bool | tuple[str, ...] = False
    L: float | None = None
    per_block: bool = False
    crossfit: bool = True

    def __post_init__(self):
        if self.grid is not None:
            object.__setattr__(self, "grid", curves.given_grid(self.grid))
        if not isinstance(self.top_curvature, bool):
            object.__setattr__(self, "top_curvature", tuple(self.top_curvature))

    def top_curvature_of(self, objective: str) -> bool:
        """Whether this measurement takes L on ``objective``'s Hessian."""
        return self.top_curvature if isinstance(self.top_curvature, bool) else objective in self.top_curvature


def per_block(g: Params, m: Params, Hm: Params | None) -> list[dict]:
    """c, v^2, |g|^2 and h_mm per :func:`block_of` group (h_mm of a group is m_b . (H m)_b,
    so the groups sum to h_mm)."""
    groups: dict[str, list[str]] = {}
    for name in g:
        groups.setdefault(block_of(name), []).append(name)
    rows = []
    for block, names in groups.items():
        rows.append(
            {
                "block": block,
                "n_params": sum(g[n].numel() for n in names),
                "c": tree_dot(_sub(g, names), _sub(m, names)).item(),
                "v2": tree_dot(_sub(m, names), _sub(m, names)).item(),
                "g_norm2": tree_dot(_sub(g, names), _sub(g, names)).item(),
                "h_mm": tree_dot(_sub(m, names), _sub(Hm, names)).item() if Hm is not None else None,
            }
        )
    return rows


def _sub(tree: Params, names: Iterable[str]) -> Params:
    return {n: tree[n] for n in names}


def _along(g: Params, shared: Sequence[str], params: Params) -> Params:
    """g on S and 0 elsewhere, keyed like ``params``: the direction of h_gg."""
    chosen = set(shared)
    return {n: g[n] if n in chosen else torch.zeros_like(t) for n, t in params.items()}


class _Step:
    """The trained update at coefficient lambda, replayed: the gradient the trainer's
    backward of -objective + aux_loss(lambda) leaves on each parameter (None where no
    loss reaches it), and the parameters after the optimizer's step, kept for lambda = 0
    and the trained lambda (which every objective reads) and for the last lambda asked
    (Delta and Delta_S read the same step)."""

    def __init__(self, replay: Replay, grads: UpdateGradients, moved: Sequence[str], trained: torch.Tensor | None):
        self.replay, self.grads, self.moved, self.trained = replay, grads, list(moved), trained
        self._kept: dict = {}
        self._last: tuple[float, Params] | None = None

    def gradient(self, lam: float) -> dict[str, torch.Tensor]:
        return self.grads.at(lam, self.moved)

    def at(self, lam: float) -> Params:
        if lam == 0.0:
            return self._keep(0.0, lambda: self.replay(self.gradient(0.0)))
        if self._last is None or self._last[0] != lam:
            self._last = (lam, self.replay(self.gradient(lam)))
        return self._last[1]

    def at_trained(self) -> Params:
        return self._keep("trained", lambda: self.replay(self.grads.update(self.trained, self.moved)))

    def trained_norm(self) -> float:
        """The total norm of the trained gradient (what a trainer's clipping compares with its bound)."""
        update = self.grads.update(self.trained, self.moved)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in update.values()])).item()

    def _keep(self, key, compute) -> Params:
        if key not in self._kept:
            self._kept[key] = compute()
        return self._kept[key]


class Probe:
    """Measures the MTP decomposition of an update for any ``nn.Module``.

    ``shared`` picks S: ``"auto"`` (the default) takes the trainable parameters
    that both losses reach in the autograd graph, found on the first batch and
    kept (structural reachability: a parameter connected to both losses counts
    even where one gradient is numerically zero on some batch); a list of names
    or a predicate ``name -> bool`` chooses S by hand, e.g. to measure a
    detached regime, whose MTP loss reaches no shared parameter by design.

    ``shared_forward`` is the forward that ``"auto"`` finds S with (default:
    ``forward``): pass the joint forward to measure a detached regime on the S
    of the joint model.

    ``aux_sign_dependent``: the aux loss at negative head weights is not minus the
    loss at positive ones (mtpdiag's policy loss with lambda on the advantages, whose
    clip acts on the other side for lambda < 0). Then the curve's lambda < 0 side uses
    the gradient of ``aux_loss(out, batch, head_weights=-1.0)``; otherwise
    aux_loss(lambda) = lambda aux_loss. ``aux_loss`` is also called with
    ``head_weights=`` the trained lambdas where they differ by head.

    ``hvp_mode`` is ``fwd_rev`` (default), ``rev_rev`` (see :mod:`mtpdiag.diagnostics.hvp`)
    or ``auto``: the first measurement that needs products times one HVP of the objective's
    Hessian in each mode (each after an untimed call, so fwd_rev's one-time setup is not
    counted; the times summed over ranks, so every rank picks the same), and this Probe uses
    the faster from then on (``hvp_timings``; every record carries both times). Both modes
    are exact; they differ only in rounding. ``hvp_mode`` is the configuration and never changes. When ``fwd_rev`` fails on an
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
        aux_sign_dependent: bool = False,
    ):
        if hvp_mode not in PROBE_HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: choose one of {PROBE_HVP_MODES}")
        if isinstance(shared, str) and shared != "auto":
            raise ValueError(f"shared={shared!r}: pass 'auto', a list of parameter names, or a predicate name -> bool")
        self.model = require_unwrapped(model)
        self.objective = objective
        self.aux_loss = aux_loss
        self.aux_sign_dependent = bool(aux_sign_dependent)
        self.functional = FunctionalModel(model, forward)
        self._shared_functional = FunctionalModel(model, shared_forward) if shared_forward else self.functional
        self._shared_spec = shared
        self.hvp_mode = hvp_mode
        self.hvp_fallback: str | None = None
        self.hvp_timings: dict[str, float | None] | None = None  # hvp_mode="auto": seconds of one HVP per mode
        self.shared_names: list[str] | None = None
        self._moved: set[str] | None = None  # what either loss reaches through ``forward``: what the update moves

    # ----------------------------------------------------------------- S and the moved parameters

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

    def moved_names(self, batch: dict) -> list[str]:
        """The parameters the update moves: those the objective or the aux loss reaches through
        ``forward`` (the others get no ``.grad`` in training), in ``named_parameters()`` order."""
        if self._moved is None:
            fm = self.functional
            self._moved = reached_by(fm, self.objective, batch) | reached_by(fm, self.aux_loss, batch)
        return [n for n in self.functional.trainable() if n in self._moved]

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
        self, batch: dict, lr: float, *, eval_objective: Callable | None = None, eval_batch: dict | None = None,
        **options,
    ) -> ProbeRecord:
        """:meth:`measure_update` for one plain SGD step of size ``lr`` (eta), no weight
        decay or momentum, and no trained lambda, on one curve objective: ``eval_objective``
        (on ``eval_batch``, default ``batch``) while g still comes from ``objective``, or
        ``objective`` itself. The other options are :meth:`measure_update`'s."""
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr}: the step size must be a positive finite number")
        if eval_batch is not None and eval_objective is None:
            raise ValueError("eval_batch is the batch of eval_objective: pass eval_objective=<the curve objective> too")
        sgd = torch.optim.SGD(list(self.functional.trainable().values()), lr=float(lr))
        name = "objective" if eval_objective is None else "eval_objective"
        objective = self.objective if eval_objective is None else (eval_objective, eval_batch)
        return self.measure_update(batch, sgd, None, objectives={name: objective}, **options)[name]

    def measure_update(
        self,
        batch: dict,
        optimizer: torch.optim.Optimizer,
        lambdas=None,
        *,
        objectives: Mapping[str, Loss | tuple[Loss, dict | None]] | None = None,
        clip_fraction: Loss | None = None,
        grid: Iterable[float] | None = None,
        hvp: bool = True,
        gg_curvature: bool = True,
        line_search: bool = True,
        top_curvature: bool | Iterable[str] = False,
        L: float | None = None,
        per_block: bool = False,
        crossfit: bool = True,
        gradients: UpdateGradients | None = None,
        max_grad_norm: float | None = None,
    ) -> dict[str, ProbeRecord]:
        """Measure the update the trainer is about to take on ``batch``: one step of
        ``optimizer`` (replayed by a clone of it; its own state, learning rates and weight
        decay apply; it is never stepped) on the gradient of -objective + aux_loss(lambda),
        over every parameter either loss reaches, clipped to the total norm
        ``max_grad_norm`` first where the trainer clips (None: it does not); ``lambdas`` is the coefficient the
        trainer uses (a scalar or one per head; None: not known). One record per
        curve objective E in ``objectives``, by name: a ``loss(out, batch)`` on ``batch``,
        or a ``(loss, its batch)`` pair (default ``{"objective": objective}``).

        Per record: g = grad objective and m = -grad aux_loss on the moved parameters
        (c, v^2, cos and h_mm on S, where every term E reads lives); with ``hvp`` one
        Hessian-vector product of E's Hessian gives h_gm (its part outside S:
        ``h_gm_jonly``), h_mm and lambda*_taylor (docs/theory.md s.2), ``gg_curvature``
        adds h_gg (a second product, on S); on an Adam/AdamW step one more product gives
        lambda*_precond through the frozen preconditioner (s.6). ``top_curvature``
        (True, or the names of the objectives to take it on): L by Lanczos on S; ``L``
        given instead is used as is; either gives lambda*_smooth. ``per_block``: c, v^2,
        |g|^2 and h_mm per parameter group.

        ``line_search``: Delta(lambda) = E(step(lambda)) - E(step(0)) on ``grid``
        (default: ``GRID_MULTIPLIERS`` times |lambda*_precond| on an Adam step, else
        |lambda*_taylor|, floored where the curve is resolvable, else times |g|/|m|),
        with every moved parameter and with only S moved, both quadratic fits, and
        ``lambda_star_meas``, a bounded scalar search around the best grid point; with
        ``lambdas``, ``delta_trained`` = Delta at the trained lambda, and ``clip_fraction``
        (a ``loss(out, batch)``-like function, e.g. the share of tokens past the PPO clip)
        on ``batch`` at the end of the trained step.

        ``crossfit`` (when ``batch["group"]`` holds each row's prompt-group id, every
        tensor of the batch having its rows first): g and m on the rows of the even and of
        the odd group ids, each half its own mean, and c_crossfit, cos_crossfit (s.8).

        ``gradients``: the trainer's own g and aux gradients on ``batch`` at these parameters
        (:meth:`UpdateGradients.take` over its forward, which must be the function the Probe
        differentiates: no training-mode randomness, math attention); the Probe then takes no
        first derivatives of its own except those missing (G- or the trained head weights'),
        and with ``gg_curvature`` runs H m and H g_S as one batched product. Records say so
        (``gradients_from``).

        With ``max_grad_norm`` the curve, ``delta_trained`` and ``clip_fraction`` are of the
        clipped step (the record's ``max_grad_norm`` and ``grad_norm_trained``, the trained
        gradient's norm before clipping, say whether it clipped); the Taylor readings stay
        those of the unclipped update, which clipping rescales by a factor that depends on
        lambda.
        """
        options = MeasureOptions(
            grid=grid, hvp=hvp, gg_curvature=gg_curvature, line_search=line_search, top_curvature=top_curvature,
            L=L, per_block=per_block, crossfit=crossfit,
        )
        if gradients is not None and not isinstance(gradients, UpdateGradients):
            raise ValueError(f"gradients={type(gradients).__name__}: pass UpdateGradients.take(...) of the trainer's "
                             "forward, or None for the Probe's own")
        specs = self._objective_specs(objectives)
        if not isinstance(options.top_curvature, bool):
            unknown = sorted(set(options.top_curvature) - set(specs))
            if unknown:
                raise ValueError(f"top_curvature names objectives {unknown} that are not measured: {sorted(specs)}")
        trained = trained_weights(lambdas)
        parameters = dict(self.model.named_parameters())
        curves.check_optimizer(optimizer, parameters)
        started = time.perf_counter()
        suspended = checkpointing_enabled(self.model)
        with isolated(self.model), torch.enable_grad():
            try:
                records = self._measure_update(batch, optimizer, trained, specs, clip_fraction, options, gradients,
                                               max_grad_norm)  # fmt: skip
            except RuntimeError as err:
                if checkpointing_error(err) is None:
                    raise
                raise checkpointing_error(err) from err
        elapsed = time.perf_counter() - started
        for record in records.values():
            record.gradient_checkpointing = "suspended" if suspended else None
            record.time_s = elapsed
        return records

    def _objective_specs(self, objectives) -> dict[str, tuple[Loss, dict | None]]:
        if objectives is None:
            return {"objective": (self.objective, None)}
        specs = {}
        for name, spec in objectives.items():
            loss, batch = spec if isinstance(spec, tuple) else (spec, None)
            if not callable(loss) or not (batch is None or isinstance(batch, dict)):
                raise ValueError(f"objectives[{name!r}]: pass a loss(out, batch), or a (loss, batch) pair")
            specs[name] = (loss, batch)
        if not specs:
            raise ValueError("objectives is empty: name at least one curve objective")
        return specs

    def _measure_update(self, batch, optimizer, trained, specs, clip_fraction, options, given,
                        max_grad_norm) -> dict[str, ProbeRecord]:
        fm = self.functional
        shared = self._resolve_shared(batch)
        moved = self.moved_names(batch)
        theta = {n: p.detach() for n, p in fm.trainable().items()}
        # gradients and products on every moved parameter and on S (a hand-picked S may hold an unmoved one)
        params = {n: t for n, t in theta.items() if n in set(moved) | set(shared)}
        rest = {n: t for n, t in theta.items() if n not in params}
        own = next((name for name, (loss, b) in specs.items() if loss is self.objective and b is None), None)
        if self.hvp_mode == AUTO and self.hvp_timings is None and (options.hvp or options.top_curvature):
            self._choose_mode(function_of(fm, self.objective, batch, rest), params)
        mode = self._mode()
        hessians = {
            name: HessianAt(function_of(fm, loss, batch if b is None else b, rest), params, mode, across_ranks=True)
            for name, (loss, b) in specs.items()
        } if options.hvp else {}

        grads, own_value, own_Hm, own_Hg = self._gradients(
            batch, params, rest, shared, trained, options, hessians.get(own), given
        )
        g, m = grads.g, grads.m
        step = _Step(Replay(optimizer, dict(self.model.named_parameters()), max_grad_norm), grads, moved, trained)
        precond = self._precond(optimizer, m, shared, theta, step)
        crossfit = self._crossfit(batch, shared, rest | {n: t for n, t in params.items() if n not in shared}, options)
        clipped = self._clip_fraction(clip_fraction, batch, step) if clip_fraction and trained is not None else None

        lrs = {float(group["lr"]) for group in optimizer.param_groups}
        lr = float(optimizer.param_groups[0]["lr"])
        g_S, m_S = _sub(g, shared), _sub(m, shared)
        common = {
            "optimizer": type(optimizer).__name__.lower(),
            "lr": lr,
            "dtype": str(next(iter(theta.values())).dtype).removeprefix("torch."),
            "n_shared": sum(theta[n].numel() for n in shared),
            "n_shared_tensors": len(shared),
            "n_moved": sum(theta[n].numel() for n in moved),
            "lambda_trained": None if trained is None else trained[0].item(),
            "clip_fraction": clipped,
            "c_crossfit": crossfit[0] if crossfit else None,
            "cos_crossfit": crossfit[1] if crossfit else None,
            "precond_new_share": precond[0].new_share if precond else None,
            "hvp_time_fwd_rev_s": self.hvp_timings.get("fwd_rev") if self.hvp_timings else None,
            "hvp_time_rev_rev_s": self.hvp_timings.get("rev_rev") if self.hvp_timings else None,
            "gradients_from": grads.source,
            "max_grad_norm": max_grad_norm,
            "grad_norm_trained": step.trained_norm() if max_grad_norm is not None and trained is not None else None,
        }
        notes = []
        if len(lrs) > 1:
            notes.append(GROUPS_DIFFER_IN_LR)
        if precond is None and not isinstance(optimizer, torch.optim.SGD):
            notes.append(unsupported(optimizer))
        if options.crossfit and "group" in batch and crossfit is None:
            notes.append(NO_CROSSFIT_HALF)

        records = {}
        for name, (loss, b) in specs.items():
            ebatch = batch if b is None else b
            hessian = hessians.get(name)
            Hg = None
            if name == own:
                e, value, Hm, Hg = g, own_value, own_Hm, own_Hg
            elif hessian is not None:
                if options.gg_curvature:
                    Hm, Hg = hessian.products([m, _along(g, shared, params)])
                else:
                    Hm = hessian(m)
                e, value = hessian.grad, hessian.value
            else:
                (value,), (e,) = values_and_gradients(fm, [loss], ebatch, params, rest)
                Hm = None
            check_finite(e, "eval objective" if name != own else "objective", loss)
            e_S = _sub(e, shared)
            measured = {"lr": lr, "c": tree_dot(g_S, m_S).item(), "g2": tree_dot(g_S, g_S).item(),
                        "v2": tree_dot(m_S, m_S).item(), "c_e": tree_dot(e_S, m_S).item()}
            extra = {}
            if Hm is not None:
                measured["h_gm"] = tree_dot(g, Hm).item()
                extra["h_gm_jonly"] = measured["h_gm"] - tree_dot(g_S, _sub(Hm, shared)).item()
                measured["h_mm"] = tree_dot(m_S, _sub(Hm, shared)).item()
                if Hg is not None:
                    measured["h_gg"] = tree_dot(g_S, _sub(Hg, shared)).item()
                if precond is not None:
                    Q, Qm, u0 = precond
                    HQm = hessian(Qm)
                    measured.update(c_eq=tree_dot(e, Qm).item(), h_uq=tree_dot(u0, HQm).item(),
                                    h_qq=tree_dot(Qm, HQm).item())
            L_source, ran = None, [hessian] if hessian is not None else []
            if options.L is not None:
                measured["L"], L_source = float(options.L), "given"
            elif options.top_curvature_of(name):
                theta_S, fixed_S = fm.split(shared)
                ran.append(HessianAt(function_of(fm, loss, ebatch, fixed_S), theta_S, mode, across_ranks=True))
                measured["L"], L_source = top_curvature(ran[-1]), "measured"
            for products in ran:
                if products.fallback is not None:
                    self.hvp_fallback = products.fallback
            record = ProbeRecord(
                **common,
                hvp_mode=ran[0].mode if ran else None,
                hvp_fallback=self.hvp_fallback if ran else None,
                objective_value=value.item(),
                c=measured["c"],
                g_norm=math.sqrt(measured["g2"]),
                m_norm=math.sqrt(measured["v2"]),
                v2=measured["v2"],
                h_gm=measured.get("h_gm"),
                h_mm=measured.get("h_mm"),
                h_gg=measured.get("h_gg"),
                L=measured.get("L"),
                L_source=L_source,
                **extra,
                **quantities.derive(measured),
            )
            if name != own:
                record.c_eval, record.eval_grad_norm = measured["c_e"], math.sqrt(tree_dot(e_S, e_S).item())
            if options.per_block:
                record.blocks = per_block(g_S, m_S, _sub(Hm, shared) if Hm is not None else None)
            if record.v2 > 0 and (options.line_search or trained is not None):
                self._curve(record, loss, ebatch, shared, theta, step, options)
            record.note = "; ".join(self._notes(record, options) + notes)
            records[name] = record
        return records

    def _mode(self) -> str:
        """The HVP mode a measurement runs: rev_rev after a remembered fallback (which skips the
        failing attempt), else the configured one, or for ``auto`` the faster one timed."""
        if self.hvp_fallback:
            return "rev_rev"
        if self.hvp_mode == AUTO:
            timings = self.hvp_timings or {}
            return min((mode for mode in HVP_MODES if timings.get(mode) is not None), key=timings.get, default="fwd_rev")
        return self.hvp_mode

    def _choose_mode(self, f, params: Params) -> None:
        """``hvp_mode="auto"``: time one product of ``f``'s Hessian in each mode (the second of
        two calls), summed over ranks; a mode that fell back to rev_rev is not timed."""
        timings = {}
        for mode in HVP_MODES:
            for _ in range(2):
                hessian = HessianAt(f, params, mode, across_ranks=True)
                _synchronize(params)
                started = time.perf_counter()
                hessian(params)  # the direction's values do not change the cost
                _synchronize(params)
                timings[mode] = time.perf_counter() - started
            if hessian.fallback is not None:
                self.hvp_fallback, timings[mode] = hessian.fallback, None
        device = next(iter(params.values())).device  # the collective's device (NCCL reduces CUDA tensors only)
        summed = all_reduce_sum(torch.tensor([t or 0.0 for t in timings.values()], dtype=torch.float64, device=device))
        summed = summed.tolist()
        self.hvp_timings = {mode: None if timings[mode] is None else float(t) for mode, t in zip(timings, summed)}

    def wants_aux_minus(self, trained: torch.Tensor | None, options: MeasureOptions) -> bool:
        """Whether a measurement needs G- (the aux gradient at head weight -1): a sign-dependent
        aux loss, and a curve reaching below lambda = 0 or a negative trained lambda (one for
        every head; where they differ, the trained step reads their own gradient)."""
        if not self.aux_sign_dependent:
            return False
        uniform = trained is not None and bool((trained == trained[0]).all())
        return (options.line_search and (options.grid is None or options.grid[0] < 0)) or (
            uniform and bool(trained[0] < 0)
        )

    def _gradients(self, batch, params, rest, shared, trained, options, own_hessian, given):
        """(the :class:`UpdateGradients`, the objective's value, H m and H g_S of the objective or None).

        Without ``given``: one forward for the aux gradients, and g and the value from the
        objective's own Hessian with its first product H m where that is measured (else from
        the same forward; reverse over reverse builds the objective's first-order graph on that
        forward too). With ``gg_curvature`` also H g_S: reverse over reverse over the same
        graph; forward over reverse in a second product, as g comes from the first.

        With the trainer's ``given`` gradients: only the missing aux gradients from one
        forward, and H m with H g_S in one batched product (g is known before it)."""
        fm = self.functional
        varied = trained is not None and trained.numel() > 1 and not bool((trained == trained[0]).all())
        aux_losses = {}
        if self.wants_aux_minus(trained, options) and (given is None or given.aux_minus is None):
            aux_losses["aux_minus"] = partial(self.aux_loss, head_weights=-1.0)
        if varied and (given is None or given.aux_trained is None):
            aux_losses["aux_trained"] = partial(self.aux_loss, head_weights=trained)
        if given is not None:
            missing = sorted(set(params) - set(given.g) | set(params) - set(given.aux))
            if missing:
                raise ValueError(f"the given gradients lack parameters {missing} that the update moves or S holds: "
                                 "take them over every trainable parameter")
            found = values_and_gradients(fm, list(aux_losses.values()), batch, params, rest)[1] if aux_losses else []
            extra = dict(zip(aux_losses, found))
            grads = UpdateGradients(
                given.value, {n: given.g[n] for n in params}, {n: given.aux[n] for n in params},
                extra.get("aux_minus", given.aux_minus), None, extra.get("aux_trained", given.aux_trained),
                given.reached, given.source,
            )
            for key, grad in extra.items():
                check_finite(grad, "aux_loss", aux_losses[key])
            check_finite(grads.g, "objective", self.objective)
            check_finite(grads.aux, "aux_loss", self.aux_loss)
            Hm = Hg = None
            if own_hessian is not None:
                directions = [grads.m] + ([_along(grads.g, shared, params)] if options.gg_curvature else [])
                Hm, Hg = (own_hessian.products(directions) + [None])[:2]
            return grads, grads.value, Hm, Hg
        aux_losses = {"aux": self.aux_loss, **aux_losses}
        losses = list(aux_losses.values()) if own_hessian is not None else [self.objective, *aux_losses.values()]
        then = None
        if own_hessian is not None and own_hessian.mode == "rev_rev":  # its first-order graph from the same forward

            def then(leaves, outputs):
                own_hessian.adopt(leaves, checked_value(self.objective, outputs, batch))

        values, found = values_and_gradients(fm, losses, batch, params, rest, then=then)
        if own_hessian is None:
            value, g = values[0], found[0]
            found = found[1:]
        aux = dict(zip(aux_losses, found))
        for key, grad in aux.items():
            check_finite(grad, "aux_loss", aux_losses[key])
        Hm = Hg = None
        if own_hessian is not None:
            Hm = own_hessian({n: -t for n, t in aux["aux"].items()})  # forward over reverse yields g and the value too
            g, value = own_hessian.grad, own_hessian.value
        check_finite(g, "objective", self.objective)
        if own_hessian is not None and options.gg_curvature:
            Hg = own_hessian(_along(g, shared, params))
        grads = UpdateGradients(value, g, aux["aux"], aux.get("aux_minus"), None, aux.get("aux_trained"))
        return grads, value, Hm, Hg

    def _precond(self, optimizer, m, shared, theta, step: _Step):
        """(Q, Q m, u0) of an Adam step (docs/theory.md s.6), None for another optimizer."""
        if unsupported(optimizer) is not None:
            return None
        Q = frozen_preconditioner(optimizer, dict(self.model.named_parameters()), step.gradient(0.0), shared)
        Qm = {n: Q.scale[n] * m[n] if n in Q.scale else torch.zeros_like(t) for n, t in m.items()}
        stepped = step.at(0.0)
        u0 = {n: stepped[n] - theta[n] for n in m}
        return Q, Qm, u0

    def _crossfit(self, batch, shared, fixed, options) -> tuple[float | None, float | None] | None:
        """(c_crossfit, cos_crossfit) from the rows of the even and of the odd prompt-group
        ids, each half's losses their own means; None without groups or with an empty half."""
        if not options.crossfit or "group" not in batch:
            return None
        fm, theta_S = self.functional, {n: p.detach() for n, p in self.functional.trainable().items() if n in shared}
        halves = [batch["group"] % 2 == parity for parity in (0, 1)]
        counts = all_reduce_sum(torch.stack([half.sum() for half in halves]).to(torch.float64))
        if (counts == 0).any():
            return None
        g, m = [], []
        for half in halves:
            rows = {key: value[half] for key, value in batch.items()}
            _, (g_half, aux_half) = values_and_gradients(fm, [self.objective, self.aux_loss], rows, theta_S, fixed)
            g.append(g_half)
            m.append({n: -t for n, t in aux_half.items()})
        c = (tree_dot(g[0], m[1]).item() + tree_dot(g[1], m[0]).item()) / 2
        cosines = [quantities.cosine(tree_dot(a, b).item(), tree_dot(a, a).item(), tree_dot(b, b).item())
                   for a, b in ((g[0], m[1]), (g[1], m[0]))]
        return c, None if None in cosines else sum(cosines) / 2

    def _clip_fraction(self, clip_fraction, batch, step: _Step) -> float:
        """``clip_fraction`` on ``batch`` at the end of the trained step (one forward)."""
        with torch.no_grad():
            outputs = self.functional(step.at_trained(), batch)
            return all_reduce_sum(checked_value(clip_fraction, outputs, batch)).item()

    def _curve(self, record: ProbeRecord, loss, ebatch, shared, theta, step: _Step, options) -> None:
        """The measured curve of ``record``'s objective and Delta at the trained lambda."""
        E = function_of(self.functional, loss, ebatch, {}, summed=True)

        def only_S(stepped: Params) -> Params:
            return {**theta, **{n: stepped[n] for n in shared}}

        with torch.no_grad():
            base, base_S = E(step.at(0.0)), E(only_S(step.at(0.0)))
            if step.trained is not None:
                record.delta_trained = (E(step.at_trained()) - base).item()
            if not options.line_search:
                return
            if options.grid is not None:
                grid = options.grid
            else:
                adam = record.lambda_star_precond is not None
                grid = curves.default_grid(
                    record.lambda_star_precond if adam else record.lambda_star_taylor,
                    record.b_precond if adam else record.b, record.g_norm, record.m_norm, record.objective_value,
                    torch.finfo(next(iter(theta.values())).dtype).eps,
                )
            record.curve = curves.measure_curve(
                lambda lam: (E(step.at(lam)) - base).item(), lambda lam: (E(only_S(step.at(lam))) - base_S).item(), grid
            )

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
