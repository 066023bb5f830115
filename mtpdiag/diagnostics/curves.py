"""The measured curve Delta(lambda) (docs/theory.md s.4): its lambda grid, quadratic
fit and refined argmax, for the SGD step and for the optimizer's real step.

A curve is ``delta(lambda) -> float`` evaluated on a grid (:func:`measure_curve`);
:func:`sgd_curve` and :func:`optimizer_curve` build that function from parameters,
gradients and an objective, and neither touches a model or an optimizer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .functional import Params

# Default lambda grid in units of |lambda*_taylor|: both sides of 0, lambda*, and past the harm threshold 2 lambda*.
GRID_MULTIPLIERS = np.linspace(-1.0, 3.0, 9)


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


# ----------------------------------------------------------------------------- grid


def given_grid(lambdas: Iterable[float]) -> np.ndarray:
    """A caller's lambda values as a sorted grid of distinct values; at least 3 (a quadratic fit needs them)."""
    values = list(lambdas)
    grid = np.unique(np.asarray(values, dtype=np.float64))
    if grid.size < 3:
        raise ValueError(f"lambdas={values}: a quadratic fit needs at least 3 distinct lambda values")
    return grid


def default_grid(
    lambda_star: float | None, b: float | None, g_norm: float, m_norm: float, objective_value: float, eps: float
) -> np.ndarray:
    """``GRID_MULTIPLIERS`` times a scale.

    The scale is |lambda*_taylor|, but at least the lambda where the curvature term
    b lambda^2 stands 1e4 times above the rounding of the objective (``eps``: the
    dtype's machine epsilon), so a lambda* at 0 still gives a measurable curve;
    without lambda* it is |g| / |m|, where the MTP step is as long as the RL step
    (1 if either is 0)."""
    if lambda_star is None:
        balanced = g_norm > 0 and m_norm > 0
        return (g_norm / m_norm if balanced else 1.0) * GRID_MULTIPLIERS
    resolvable = math.sqrt(1e4 * eps * max(abs(objective_value), eps) / b)
    return max(abs(lambda_star), resolvable) * GRID_MULTIPLIERS


# ----------------------------------------------------------------------------- fit and search


def quadratic_fit(grid: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
    """(coefficients (a2, a1, a0), R^2, argmax -a1 / (2 a2)) of the least-squares parabola;
    R^2 is None on a constant curve, the argmax None unless the parabola is concave."""
    fit = np.polyfit(grid, values, 2)
    total = ((values - values.mean()) ** 2).sum()
    r2 = 1 - ((values - np.polyval(fit, grid)) ** 2).sum() / total if total > 0 else None
    argmax = -fit[1] / (2 * fit[0]) if fit[0] < 0 else None
    return fit, r2, argmax


def refined_argmax(delta: Callable[[float], float], grid: np.ndarray, values: np.ndarray) -> tuple[float, int]:
    """(argmax, evaluations): a bounded scalar search on the exact curve between the best
    grid point's neighbours, to within 1e-6 of the grid's width."""
    best = int(np.argmax(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    search = minimize_scalar(lambda lam: -delta(lam), bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-6 * (grid[-1] - grid[0])})
    return float(search.x), int(search.nfev)


def measure_curve(kind: str, delta: Callable[[float], float], grid: np.ndarray) -> Curve:
    """``delta`` on ``grid``, its quadratic fit and its refined argmax."""
    values = np.array([delta(lam) for lam in grid])
    fit, r2, lambda_fit = quadratic_fit(grid, values)
    lambda_search, n_search = refined_argmax(delta, grid, values)
    return Curve(kind, grid, values, fit, r2, lambda_fit, lambda_search, grid.size + n_search)


# ----------------------------------------------------------------------------- the two steps


def sgd_curve(
    objective: Callable[[Params], torch.Tensor], theta: Params, g: Params, m: Params, lr: float, grid: np.ndarray
) -> Curve:
    """Delta(lambda) = E(theta + eta (g + lambda m)) - E(theta + eta g) for ``objective`` E
    (the whole-batch value) as a function of S."""
    base = objective({k: t + lr * g[k] for k, t in theta.items()})

    def delta(lam: float) -> float:
        moved = {k: t + lr * (g[k] + lam * m[k]) for k, t in theta.items()}
        return (objective(moved) - base).item()

    return measure_curve("sgd", delta, grid)


def check_optimizer(optimizer: torch.optim.Optimizer, parameters: dict[str, torch.Tensor]) -> None:
    """Every tensor the optimizer holds must be one of ``parameters`` (the model's, by name).
    Frozen parameters are fine: the optimizer skips them, as in training."""
    known = {id(p) for p in parameters.values()}
    if any(id(p) not in known for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(
            "the optimizer holds a tensor that is not a parameter of the probed model: pass that model's optimizer"
        )


def optimizer_curve(
    optimizer: torch.optim.Optimizer,
    parameters: dict[str, torch.Tensor],
    step_grad: Callable[[str, float], torch.Tensor | None],
    objective: Callable[[Params], torch.Tensor],
    grid: np.ndarray,
) -> Curve:
    """Delta(lambda) for the optimizer's real step, each lambda from a fresh clone of its
    state; the optimizer itself is never stepped.

    ``parameters``: the model's parameters by name (read, never written);
    ``step_grad(name, lambda)``: the ``.grad`` the trainer's backward of -objective +
    lambda aux_loss would leave on that parameter (None where no loss reaches it:
    the optimizer then skips it, as it skips frozen parameters); ``objective``: the
    whole-batch curve objective as a function of all parameters.
    """
    check_optimizer(optimizer, parameters)
    name_of = {id(p): n for n, p in parameters.items()}
    start = {n: p.detach() for n, p in parameters.items()}
    state = optimizer.state_dict()

    def stepped(lam: float) -> Params:
        copies, groups = {}, []
        for group in optimizer.param_groups:
            tensors = []
            for p in group["params"]:
                n = name_of[id(p)]
                copy_ = start[n].clone()
                copy_.grad = step_grad(n, lam)
                copies[n] = copy_
                tensors.append(copy_)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": tensors})
        clone = type(optimizer)(groups)
        clone.load_state_dict(copy.deepcopy(state))  # deep copy: load_state_dict would alias the live moments
        with torch.no_grad():
            clone.step()
        return {n: copies.get(n, t) for n, t in start.items()}

    base = objective(stepped(0.0))
    return measure_curve("optimizer", lambda lam: (objective(stepped(lam)) - base).item(), grid)
