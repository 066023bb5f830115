"""The exact per-step decomposition of an MTP loss's effect on an RL objective.

:class:`Probe` measures, at the current parameters and for one batch, every
quantity of docs/theory.md sections 2-4 (c, v^2, h_gm, h_mm, lambda*, the L-smooth
form, the measured curve Delta(lambda)) as pure functions of (parameters,
batch): it calls the model through ``torch.func.functional_call`` and never
touches the model's parameters, ``.grad``, buffers, the optimizer or the RNG.

It works with any ``nn.Module``: ``forward(model, batch)`` produces outputs,
``objective(outputs, batch)`` is the scalar to maximise, ``aux_loss(outputs,
batch)`` the MTP loss to minimise. Sign conventions: g = grad_S objective,
m = -grad_S aux_loss, one SGD step with coefficient lambda moves S by
lr * (g + lambda m); parameters outside S stay fixed.

Under ``torch.distributed`` (more than one rank) each rank passes its shard of
the batch and every rank gets the numbers of the whole batch: each loss is
evaluated as this rank's share of the whole-batch loss (mtpdiag's losses do so
inside :func:`mtpdiag.distributed.global_means`, which the probe enters), and
values, gradients and Hessian-vector products are summed over ranks. Every
rank calls ``measure`` with the same arguments, on the raw (unwrapped) module.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import minimize_scalar
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import all_reduce_sum, all_reduce_tree, global_means
from . import quantities
from .hvp import HVP_MODES, HessianAt, Params, top_curvature, tree_dot
from ..integrations import require_unwrapped

NO_MTP_SIGNAL = "no MTP signal on shared parameters"
NOT_CONCAVE = "direction not concave (h_mm >= 0): no lambda*"
# Default lambda grid in units of |lambda*_taylor|: both sides of 0, lambda*, and past the harm threshold 2 lambda*.
GRID_MULTIPLIERS = np.linspace(-1.0, 3.0, 9)


def default_forward(model: nn.Module, batch: dict):
    return model(batch["input_ids"])


class _ForwardModule(nn.Module):
    """Makes ``forward(model, batch)`` a module, so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, batch):
        return self.forward_fn(self.model, batch)


_PREFIX = "model."


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
class Curve:
    """Delta(lambda) measured on a grid, its quadratic fit and the refined argmax.

    ``kind`` is ``sgd`` (the SGD step of docs/theory.md s.2) or ``optimizer`` (the real
    optimizer step from a clone of its state). ``fit`` holds the coefficients
    (a2, a1, a0) of a2 lambda^2 + a1 lambda + a0.
    """

    kind: str
    lambdas: np.ndarray
    delta: np.ndarray
    fit: np.ndarray
    r2: float | None
    lambda_star_fit: float | None
    lambda_star_search: float | None
    n_evaluations: int


@dataclass
class ProbeRecord:
    """One measurement. ``as_row`` flattens the scalars; ``curve_rows`` and
    ``block_rows`` give the long tables. ``None`` means "not measured" or
    "undefined here" (``note`` says which)."""

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


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


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

    Diagnostics run with eval semantics (dropout off; every module's ``training``
    flag is restored afterwards) and inside a forked RNG, so the caller's random
    stream is unchanged.

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
        self._module = _ForwardModule(model, forward or default_forward)
        self._shared_module = _ForwardModule(model, shared_forward) if shared_forward else self._module
        self._shared_spec = shared
        self.hvp_mode = hvp_mode
        self.shared_names: list[str] | None = None
        self._reached: dict[str, set[str]] = {}

    # ----------------------------------------------------------------- setup

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self._module.named_parameters() if p.requires_grad}

    def _reached_by(self, loss: Callable, batch: dict, module: nn.Module) -> set[str]:
        """Names of the parameters ``loss`` reaches in the autograd graph of ``module``."""
        params = {n: p.detach().requires_grad_() for n, p in self._trainable().items()}
        value = self._checked_value(loss, functional_call(module, params, (batch,)), batch)
        if not value.requires_grad:
            return set()
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        return {n for n, grad in zip(params, grads) if grad is not None}

    def find_shared(self, batch: dict) -> list[str]:
        """S from the autograd graph: names of the parameters both the objective and the aux loss reach."""
        with self._isolated(), torch.enable_grad():
            return self._find_shared(batch)

    def _find_shared(self, batch: dict) -> list[str]:
        module = self._shared_module
        reached = {"objective": self._reached_by(self.objective, batch, module), "aux": self._reached_by(self.aux_loss, batch, module)}
        shared = [n for n in self._trainable() if n in reached["objective"] and n in reached["aux"]]
        if not shared:
            raise ValueError(
                f"the objective ({_name(self.objective)}) and aux_loss ({_name(self.aux_loss)}) reach no common "
                f"trainable parameter, so there is no shared set S to measure on (a fully detached MTP head?). "
                f"Pass shared=<list of names> or shared=<predicate>, e.g. names found with a joint forward."
            )
        return [n[len(_PREFIX) :] for n in shared]

    def _resolve_shared(self, batch: dict) -> list[str]:
        if self.shared_names is not None:
            return self.shared_names
        spec = self._shared_spec
        names = [n[len(_PREFIX) :] for n in self._trainable()]
        if spec == "auto":
            chosen = self._find_shared(batch)
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

    # ------------------------------------------------------------- functions

    def function_of_shared(self, loss: Callable, batch: dict) -> tuple[Callable[[Params], torch.Tensor], Params]:
        """``loss`` on ``batch`` as a pure function of S (the rest held at its current
        values), and S's current values; e.g. for :class:`~mtpdiag.diagnostics.hvp.HessianAt`
        on directions of your own. Keys carry the wrapper prefix ``model.``.
        Call it under the model's eval semantics (dropout off) for exact results.
        On several ranks the function is this rank's share: build
        ``HessianAt(..., across_ranks=True)`` on it."""
        with self._isolated(), torch.enable_grad():
            theta, fixed = self._split(batch)
        return self._as_function(loss, batch, fixed), theta

    def _split(self, batch: dict) -> tuple[Params, Params]:
        """(S, the other trainable parameters), detached, keyed by wrapper names."""
        shared = {_PREFIX + n for n in self._resolve_shared(batch)}
        trainable = self._trainable()
        return (
            {n: p.detach() for n, p in trainable.items() if n in shared},
            {n: p.detach() for n, p in trainable.items() if n not in shared},
        )

    def _checked_value(self, loss: Callable, outputs, batch: dict) -> torch.Tensor:
        with global_means():  # on several ranks: this rank's share of the whole-batch loss
            value = loss(outputs, batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError(f"{_name(loss)} must return a scalar tensor, got {type(value).__name__} {getattr(value, 'shape', '')}")
        return value

    def _as_function(
        self, loss: Callable, batch: dict, fixed: Params, summed: bool = False
    ) -> Callable[[Params], torch.Tensor]:
        """loss at (S = argument, everything else = ``fixed``) as a pure function of S;
        ``summed``: the whole-batch value (summed over ranks), not this rank's share."""

        def f(shared: Params) -> torch.Tensor:
            value = self._checked_value(loss, functional_call(self._module, {**fixed, **shared}, (batch,)), batch)
            return all_reduce_sum(value) if summed else value

        return f

    def _gradients(self, losses: Sequence[Callable], batch: dict, params: Params, fixed: Params):
        """Values and gradients of several losses of the same outputs: one forward, one backward
        each; both summed over ranks."""
        leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
        outputs = functional_call(self._module, {**fixed, **leaves}, (batch,))
        values = [self._checked_value(loss, outputs, batch) for loss in losses]
        grads = []
        for i, value in enumerate(values):
            if not value.requires_grad:  # the loss does not read S at all (e.g. a detached MTP head)
                grads.append({k: torch.zeros_like(t) for k, t in params.items()})
                continue
            grad = torch.autograd.grad(
                value, list(leaves.values()), retain_graph=i < len(values) - 1, allow_unused=True, materialize_grads=True
            )
            grads.append(dict(zip(leaves, grad)))
        values = all_reduce_sum(torch.stack([v.detach() for v in values])).unbind()
        return list(values), [all_reduce_tree(grad) for grad in grads]

    @staticmethod
    def _check_finite(grad: Params, role: str, loss: Callable) -> None:
        bad = [n for n, t in grad.items() if not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(
                f"the gradient of the {role} ({_name(loss)}) has non-finite entries in {bad[:5]}"
                f"{' and more' if len(bad) > 5 else ''}: check that loss for inf/nan (log of 0, overflow in float16)"
            )

    # --------------------------------------------------------------- measure

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
        parameters, from a clone of its state (its own learning rate applies).
        """
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr={lr}: the step size must be a positive finite number")
        started = time.perf_counter()
        with self._isolated(), torch.enable_grad():
            record = self._measure(
                batch, float(lr), lambdas, hvp, gg_curvature, line_search, top_curvature, L, per_block,
                eval_objective, eval_batch if eval_batch is not None else batch, optimizer,
            )
        record.time_s = time.perf_counter() - started
        return record

    @contextmanager
    def _isolated(self):
        modes = [(m, m.training) for m in self.model.modules()]
        cuda = sorted({p.device.index or 0 for p in self.model.parameters() if p.is_cuda})
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=cuda), sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            for module, mode in modes:
                module.training = mode

    def _measure(self, batch, lr, lambdas, hvp, gg_curvature, line_search, want_top, L, per_block,
                 eval_objective, eval_batch, optimizer) -> ProbeRecord:
        theta, fixed = self._split(batch)
        E = self._as_function(eval_objective or self.objective, eval_batch, fixed)
        hessian = HessianAt(E, theta, self.hvp_mode, across_ranks=True) if hvp or want_top else None
        g, m, e, value, Hm = self._derivatives(batch, theta, fixed, eval_objective, eval_batch, hessian, hvp)
        c = tree_dot(g, m).item()
        g2 = tree_dot(g, g).item()
        v2 = tree_dot(m, m).item()
        c_e = tree_dot(e, m).item()
        notes = [NO_MTP_SIGNAL] if v2 == 0 else []
        some = next(iter(theta.values()))
        record = ProbeRecord(
            lr=lr,
            dtype=str(some.dtype).removeprefix("torch."),
            hvp_mode=None,
            n_shared=sum(t.numel() for t in theta.values()),
            n_shared_tensors=len(theta),
            objective_value=value.item(),
            c=c,
            g_norm=math.sqrt(g2),
            m_norm=math.sqrt(v2),
            v2=v2,
            cos=c / math.sqrt(g2 * v2) if g2 > 0 and v2 > 0 else None,
        )
        if eval_objective is not None:
            record.c_eval, record.eval_grad_norm = c_e, math.sqrt(tree_dot(e, e).item())

        if hvp:
            self._taylor(record, g, m, Hm, hessian, gg_curvature, c_e, g2, notes)
        if L is not None:
            record.L, record.L_source = float(L), "given"
        elif want_top:
            record.L, record.L_source = top_curvature(hessian), "measured"
        if record.L is not None and record.L <= 0:
            notes.append("L <= 0 (no negative curvature): no lambda*_smooth")
        elif record.L is not None and v2 > 0:
            record.lambda_star_smooth = quantities.lambda_star_smooth(lr, c, c_e, record.L, v2)
        if per_block:
            record.blocks = self._blocks(g, m, Hm)

        if line_search or optimizer is not None:
            grid = self._grid(lambdas, record)
            if line_search and v2 > 0:
                E_total = self._as_function(eval_objective or self.objective, eval_batch, fixed, summed=True)
                base = E_total({k: t + lr * g[k] for k, t in theta.items()})

                def sgd_delta(lam: float) -> float:
                    moved = {k: t + lr * (g[k] + lam * m[k]) for k, t in theta.items()}
                    return (E_total(moved) - base).item()

                record.curves.append(self._curve("sgd", sgd_delta, grid))
            if optimizer is not None:
                record.curves.append(self._optimizer_curve(optimizer, batch, eval_objective, eval_batch, grid))
        if v2 == 0 and line_search:
            notes.append("curve not measured: Delta(lambda) = 0 when m = 0")
        record.note = "; ".join(notes)
        if hessian is not None:
            record.hvp_mode = hessian.mode
            self.hvp_mode = hessian.mode  # remember a fallback so later steps skip the failing attempt
        return record

    def _derivatives(self, batch, theta, fixed, eval_objective, eval_batch, hessian, hvp):
        """g, m, the value and gradient e of the curve objective (e = g without
        eval_objective) and H m (None without ``hvp``)."""
        if eval_objective is None and hessian is not None:
            _, (aux_grad,) = self._gradients([self.aux_loss], batch, theta, fixed)
            self._check_finite(aux_grad, "aux_loss", self.aux_loss)
            m = {k: -t for k, t in aux_grad.items()}
            # H m first: forward-over-reverse yields the objective's value and gradient with it, so g is free
            Hm = hessian(m) if hvp else None
            g = e = hessian.grad
            value = hessian.value
        else:
            (value, _), (g, aux_grad) = self._gradients([self.objective, self.aux_loss], batch, theta, fixed)
            self._check_finite(aux_grad, "aux_loss", self.aux_loss)
            m = {k: -t for k, t in aux_grad.items()}
            Hm = hessian(m) if hvp else None
            e = g
            if eval_objective is not None and hessian is not None:
                e, value = hessian.grad, hessian.value
            elif eval_objective is not None:
                (value,), (e,) = self._gradients([eval_objective], eval_batch, theta, fixed)
            if eval_objective is not None:
                self._check_finite(e, "eval_objective", eval_objective)
        self._check_finite(g, "objective", self.objective)
        return g, m, e, value, Hm

    def _taylor(self, record, g, m, Hm, hessian, gg_curvature, c_e, g2, notes) -> None:
        eta, v2 = record.lr, record.v2
        record.h_gm = tree_dot(g, Hm).item()
        record.h_mm = tree_dot(m, Hm).item()
        if gg_curvature:
            record.h_gg = tree_dot(g, hessian(g)).item()
            record.kappa_g = -record.h_gg / g2 if g2 > 0 else None
        record.a, record.b = quantities.taylor_coefficients(eta, c_e, record.h_gm, record.h_mm)
        record.concave = record.h_mm < 0
        if v2 > 0:
            record.kappa_m = -record.h_mm / v2
            if record.concave:
                record.lambda_star_taylor = quantities.lambda_star_taylor(record.a, record.b)
                record.harm_threshold = quantities.harm_threshold(record.lambda_star_taylor)
                record.best_gain_taylor = quantities.best_gain(record.a, record.b)
            else:
                notes.append(NOT_CONCAVE)

    def _blocks(self, g: Params, m: Params, Hm: Params | None) -> list[dict]:
        groups: dict[str, list[str]] = {}
        for name in g:
            groups.setdefault(block_of(name[len(_PREFIX) :]), []).append(name)
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

    # ---------------------------------------------------------------- curves

    @staticmethod
    def _grid(lambdas, record: ProbeRecord) -> np.ndarray:
        """The lambda grid: ``lambdas`` as given, else ``GRID_MULTIPLIERS`` times a scale.

        The scale is |lambda*_taylor|, but at least the lambda where the curvature
        term b lambda^2 stands 1e4 times above the rounding of the objective (so a
        lambda* at 0 still gives a measurable curve); without lambda* it is
        |g| / |m|, where the MTP step is as long as the RL step (1 if either is 0)."""
        if lambdas is not None:
            grid = np.unique(np.asarray(list(lambdas), dtype=np.float64))
            if grid.size < 3:
                raise ValueError(f"lambdas={list(lambdas)}: a quadratic fit needs at least 3 distinct lambda values")
            return grid
        if record.lambda_star_taylor is None:
            balanced = record.g_norm > 0 and record.m_norm > 0
            return (record.g_norm / record.m_norm if balanced else 1.0) * GRID_MULTIPLIERS
        eps = torch.finfo(getattr(torch, record.dtype)).eps
        resolvable = math.sqrt(1e4 * eps * max(abs(record.objective_value), eps) / record.b)
        return max(abs(record.lambda_star_taylor), resolvable) * GRID_MULTIPLIERS

    @staticmethod
    def _curve(kind: str, delta: Callable[[float], float], grid: np.ndarray) -> Curve:
        values = np.array([delta(lam) for lam in grid])
        fit = np.polyfit(grid, values, 2)
        total = ((values - values.mean()) ** 2).sum()
        r2 = 1 - ((values - np.polyval(fit, grid)) ** 2).sum() / total if total > 0 else None
        lambda_fit = -fit[1] / (2 * fit[0]) if fit[0] < 0 else None
        # refine around the best grid point on the exact curve
        best = int(np.argmax(values))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        search = minimize_scalar(lambda lam: -delta(lam), bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-6 * (grid[-1] - grid[0])})
        return Curve(kind, grid, values, fit, r2, lambda_fit, float(search.x), grid.size + int(search.nfev))

    def _optimizer_curve(self, optimizer, batch, eval_objective, eval_batch, grid) -> Curve:
        """Delta(lambda) for the optimizer's real step on -objective + lambda aux_loss,
        each from a fresh clone of its state; the optimizer itself is never stepped."""
        if not self._reached:  # what the trainer's own forward reaches decides which .grad would be None
            self._reached = {
                "objective": self._reached_by(self.objective, batch, self._module),
                "aux": self._reached_by(self.aux_loss, batch, self._module),
            }
        trainable = self._trainable()
        name_of = {id(p): n for n, p in trainable.items()}
        if any(id(p) not in name_of for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer holds a tensor that is not a trainable parameter of the probed model: pass that model's optimizer"
            )
        params = {n: p.detach() for n, p in trainable.items()}
        _, (g_all, aux_all) = self._gradients([self.objective, self.aux_loss], batch, params, {})
        evaluate = self.objective if eval_objective is None else eval_objective
        state = optimizer.state_dict()

        def stepped(lam: float) -> Params:
            copies, groups = {}, []
            for group in optimizer.param_groups:
                tensors = []
                for p in group["params"]:
                    n = name_of[id(p)]
                    copy_ = params[n].clone()
                    reached = n in self._reached["objective"] or n in self._reached["aux"]
                    # a parameter no loss reaches has grad None in the trainer, so the optimizer skips it
                    copy_.grad = (-g_all[n] + lam * aux_all[n]) if reached else None
                    copies[n] = copy_
                    tensors.append(copy_)
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": tensors})
            clone = type(optimizer)(groups)
            clone.load_state_dict(copy.deepcopy(state))  # deep copy: load_state_dict would alias the live moments
            with torch.no_grad():
                clone.step()
            return {n: copies.get(n, t) for n, t in params.items()}

        def value(lam: float) -> torch.Tensor:
            outputs = functional_call(self._module, stepped(lam), (eval_batch,))
            return all_reduce_sum(self._checked_value(evaluate, outputs, eval_batch))

        base = value(0.0)
        return self._curve("optimizer", lambda lam: (value(lam) - base).item(), grid)
