"""The measured curve Delta(lambda) of the trained update (docs/theory.md s.4): the replay
of the optimizer's real step, the lambda grid, the two quadratic fits and the refined argmax.

A curve is ``delta(lambda) -> float`` evaluated on a grid (:func:`measure_curve`), with
``delta_s``, the same update with only S moved, beside it. :class:`Replay` takes the
optimizer's step on clones of the parameters; nothing here touches a model or an optimizer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .functional import Params

# Default lambda grid in units of |lambda*|: both sides of 0, lambda*, and past the harm threshold 2 lambda*.
GRID_MULTIPLIERS = np.linspace(-1.0, 3.0, 9)


@dataclass
class Fit:
    """A least-squares parabola through the measured points: ``coefficients`` highest power
    first ((a2, a1, a0) for the free fit, (a2, a1) for the fit through the origin), its R^2
    (None on a constant curve) and its vertex, the argmax (None unless concave)."""

    coefficients: np.ndarray
    r2: float | None
    vertex: float | None


@dataclass
class Curve:
    """Delta(lambda) measured on a grid: ``delta`` with every parameter the update moves,
    ``delta_s`` with only S moved (the rest kept at theta), the free quadratic fit and the
    one through the origin (Delta(0) = 0 exactly), the refined argmax ``lambda_star``
    (``lambda_star_meas``), ``delta_star`` = Delta there and ``delta_jonly_star`` = Delta - Delta_S there."""

    lambdas: np.ndarray
    delta: np.ndarray
    delta_s: np.ndarray
    fit: Fit
    fit_origin: Fit
    lambda_star: float
    delta_jonly_star: float
    n_evaluations: int
    delta_star: float

    @property
    def delta_jonly(self) -> np.ndarray:
        """Delta - Delta_S per grid point: what moving the parameters outside S adds."""
        return self.delta - self.delta_s


# ----------------------------------------------------------------------------- grid


def given_grid(lambdas: Iterable[float]) -> np.ndarray:
    """A caller's lambda values as a sorted grid of distinct values; at least 3 (a quadratic fit needs them)."""
    values = list(lambdas)
    grid = np.unique(np.asarray(values, dtype=np.float64))
    if grid.size < 3:
        raise ValueError(f"grid={values}: a quadratic fit needs at least 3 distinct lambda values")
    return grid


def default_grid(
    lambda_star: float | None, b: float | None, g_norm: float, m_norm: float, objective_value: float, eps: float
) -> np.ndarray:
    """``GRID_MULTIPLIERS`` times a scale.

    The scale is |lambda*| (the Probe passes lambda*_precond with its b on an Adam step,
    else lambda*_taylor), but at least the lambda where the curvature term b lambda^2
    stands 1e4 times above the rounding of the objective (``eps``: the dtype's machine
    epsilon), so a lambda* at 0 still gives a measurable curve; without lambda* it is
    |g| / |m|, where the MTP step is as long as the RL step (1 if either is 0)."""
    if lambda_star is None:
        balanced = g_norm > 0 and m_norm > 0
        return (g_norm / m_norm if balanced else 1.0) * GRID_MULTIPLIERS
    resolvable = math.sqrt(1e4 * eps * max(abs(objective_value), eps) / b)
    return max(abs(lambda_star), resolvable) * GRID_MULTIPLIERS


# ----------------------------------------------------------------------------- fits and search


def _r2(values: np.ndarray, fitted: np.ndarray) -> float | None:
    """1 - residual / total sum of squares (about the mean, for both fits, so they compare)."""
    total = ((values - values.mean()) ** 2).sum()
    return float(1 - ((values - fitted) ** 2).sum() / total) if total > 0 else None


def _vertex(a2: float, a1: float) -> float | None:
    return float(-a1 / (2 * a2)) if a2 < 0 else None


def quadratic_fit(grid: np.ndarray, values: np.ndarray) -> Fit:
    """The free least-squares parabola a2 lambda^2 + a1 lambda + a0."""
    coefficients = np.polyfit(grid, values, 2)
    return Fit(coefficients, _r2(values, np.polyval(coefficients, grid)), _vertex(*coefficients[:2]))


def origin_fit(grid: np.ndarray, values: np.ndarray) -> Fit:
    """The least-squares parabola through the origin a2 lambda^2 + a1 lambda (Delta(0) = 0 exactly)."""
    basis = np.stack([grid**2, grid], axis=1)
    coefficients = np.linalg.lstsq(basis, values, rcond=None)[0]
    return Fit(coefficients, _r2(values, basis @ coefficients), _vertex(*coefficients))


def refined_argmax(delta: Callable[[float], float], grid: np.ndarray, values: np.ndarray) -> tuple[float, int]:
    """(argmax, evaluations): a bounded scalar search on the exact curve between the best
    grid point's neighbours, to within 1e-6 of the grid's width."""
    best = int(np.argmax(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    search = minimize_scalar(lambda lam: -delta(lam), bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-6 * (grid[-1] - grid[0])})
    return float(search.x), int(search.nfev)


def measure_curve(delta: Callable[[float], float], delta_s: Callable[[float], float], grid: np.ndarray) -> Curve:
    """``delta`` and ``delta_s`` on ``grid``, both fits and the refined argmax of ``delta``
    (with ``delta_s`` there too)."""
    values, values_s = np.array([(delta(lam), delta_s(lam)) for lam in grid]).T  # the same step, read twice
    lambda_star, n_search = refined_argmax(delta, grid, values)
    delta_star = delta(lambda_star)
    return Curve(grid, values, values_s, quadratic_fit(grid, values), origin_fit(grid, values), lambda_star,
                 delta_star - delta_s(lambda_star), 2 * grid.size + n_search + 2, delta_star)


# ----------------------------------------------------------------------------- the update


def check_optimizer(optimizer: torch.optim.Optimizer, parameters: dict[str, torch.Tensor]) -> None:
    """Every tensor the optimizer holds must be one of ``parameters`` (the model's, by name).
    Frozen parameters are fine: the optimizer skips them, as in training."""
    known = {id(p) for p in parameters.values()}
    if any(id(p) not in known for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            "the optimizer holds a tensor that is not a parameter of the probed model: pass that model's optimizer"
        )


class Replay:
    """The optimizer's real step, taken by a fresh clone of it (its state deep-copied) on
    clones of the parameters; the optimizer and the parameters are never written.

    ``parameters``: the model's parameters by name. ``replay(grads)`` returns every
    parameter after one step with ``.grad = grads[name]`` (None or absent: no gradient,
    so the optimizer skips the parameter, as it skips one no loss reaches in training);
    parameters the optimizer does not hold keep their values. ``max_grad_norm``: the
    trainer clips the gradient to this total norm before its step
    (``torch.nn.utils.clip_grad_norm_`` over the parameters in ``parameters``' order, as
    Hugging Face's Trainer does over ``model.parameters()``); None: no clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: dict[str, torch.Tensor],
                 max_grad_norm: float | None = None):
        check_optimizer(optimizer, parameters)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm}: pass the trainer's positive clipping norm, or None")
        self.optimizer = optimizer
        self.name_of = {id(p): n for n, p in parameters.items()}
        self.start = {n: p.detach() for n, p in parameters.items()}
        self.state = optimizer.state_dict()
        self.max_grad_norm = max_grad_norm

    def __call__(self, grads: Mapping[str, torch.Tensor | None]) -> Params:
        copies, groups = {}, []
        for group in self.optimizer.param_groups:
            tensors = []
            for p in group["params"]:
                name = self.name_of[id(p)]
                copy_ = self.start[name].clone()
                copy_.grad = grads.get(name)
                copies[name] = copy_
                tensors.append(copy_)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": tensors})
        clone = type(self.optimizer)(groups)
        clone.load_state_dict(copy.deepcopy(self.state))  # deep copy: load_state_dict would alias the live moments
        with torch.no_grad():
            if self.max_grad_norm is not None:
                for copy_ in copies.values():  # clipping scales .grad in place: the caller's tensors stay as given
                    copy_.grad = None if copy_.grad is None else copy_.grad.clone()
                torch.nn.utils.clip_grad_norm_([copies[n] for n in self.start if n in copies], self.max_grad_norm)
            clone.step()
        return {n: copies.get(n, t) for n, t in self.start.items()}
