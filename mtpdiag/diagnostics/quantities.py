"""The decomposition's formulas as pure functions of measured scalars (docs/theory.md, sections 2, 3 and 6).

The Probe measures a few raw scalars per step (:data:`MEASURED`: inner products,
curvatures, L) and fills every other field of its record with the formulas here,
through :data:`QUANTITIES`; the figures draw the Taylor and L-smooth parabolas
with :func:`taylor_delta` and :func:`smooth_delta` from a diagnostics CSV row.
One formula, one home. Undefined values (no concave direction, no L) are ``None``.

Adding a derived quantity is one function and one record field:

1. write its formula here, a pure function of scalars, and give it its line in
   :data:`QUANTITIES`: ``Quantity("<field>", <function>, (<inputs>))``, the inputs
   named after :data:`MEASURED` scalars or earlier entries;
2. add ``<field>: float | None = None`` to :class:`~mtpdiag.diagnostics.ProbeRecord`.

The Probe then computes it on every measurement, ``as_row`` writes it as a
column of ``diag_steps.csv``, and it is ``None`` wherever one of its inputs was
not measured (``hvp=False``, no ``L``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# What the Probe measures directly, by name: the step size eta, <g, m>, |g|^2,
# |m|^2, <grad E, m> of the curve objective E (= c without an eval objective),
# g^T H m (g on every moved parameter), m^T H m, g^T H g (H: E's Hessian), the
# top curvature L and, through Adam's frozen preconditioner Q = eta_A P (s.6),
# <grad E, Q m>, u0^T H Q m (u0: the update at lambda = 0) and (Q m)^T H (Q m).
MEASURED = ("lr", "c", "g2", "v2", "c_e", "h_gm", "h_mm", "h_gg", "L", "c_eq", "h_uq", "h_qq")


def cosine(c: float, g2: float, v2: float) -> float | None:
    """cos(g, m) = c / (|g| |m|), undefined when g = 0 or m = 0."""
    return c / math.sqrt(g2 * v2) if g2 > 0 and v2 > 0 else None


def curvature(h: float, norm2: float) -> float | None:
    """The Rayleigh curvature -u^T H u / |u|^2 of a direction u, undefined for u = 0."""
    return -h / norm2 if norm2 > 0 else None


def taylor_a(lr: float, c_eval: float, h_gm: float) -> float:
    """a = eta (c_eval + eta h_gm), the linear coefficient of the Taylor quadratic."""
    return lr * (c_eval + lr * h_gm)


def taylor_b(lr: float, h_mm: float) -> float:
    """b = -(eta^2 / 2) h_mm, the quadratic one (positive on a concave direction)."""
    return -(lr**2 / 2) * h_mm


def taylor_coefficients(lr: float, c_eval: float, h_gm: float, h_mm: float) -> tuple[float, float]:
    """(a, b) of the Taylor quadratic Delta(lambda) ~ a lambda - b lambda^2."""
    return taylor_a(lr, c_eval, h_gm), taylor_b(lr, h_mm)


def concave(h_mm: float) -> bool:
    """Whether the objective curves down along m (h_mm < 0): only then is there a lambda*."""
    return h_mm < 0


def taylor_delta(a, b, lam):
    """The Taylor quadratic a lambda - b lambda^2 (``lam`` may be an array); None without a."""
    return None if a is None else a * lam - b * lam**2


def lambda_star_taylor(a: float, b: float) -> float | None:
    """The Taylor quadratic's argmax a / (2b), defined only when it is concave (b > 0)."""
    return a / (2 * b) if b > 0 else None


def harm_threshold(lambda_star: float | None) -> float | None:
    """2 lambda*: past it the concave Taylor step does worse than detaching."""
    return None if lambda_star is None else 2 * lambda_star


def best_gain(a: float, b: float) -> float | None:
    """a^2 / (4b), the Taylor gain at lambda*, when concave."""
    return a**2 / (4 * b) if b > 0 else None


def smooth_delta(lr, c, c_eval, L, v2, lam):
    """The L-smooth expression eta lambda (c_e - L eta c) - L eta^2 lambda^2 v^2 / 2,
    which is the paper's eta lambda (1 - L eta) c - ... when the curve objective is
    the gradient's own (c_e = c). None without L."""
    if L is None:
        return None
    c_e = c if c_eval is None else c_eval
    return lr * lam * (c_e - L * lr * c) - L * lr**2 * lam**2 * v2 / 2


def lambda_star_smooth(lr: float, c: float, c_eval: float | None, L: float | None, v2: float) -> float | None:
    """The L-smooth expression's argmax (c_e - L eta c) / (L eta v^2), defined for L > 0 and v^2 > 0."""
    if L is None or L <= 0 or v2 <= 0:
        return None
    c_e = c if c_eval is None else c_eval
    return (c_e - L * lr * c) / (L * lr * v2)


def precond_a(c_eq: float, h_uq: float) -> float:
    """a_P = <grad E, Q m> + u0^T H Q m, the linear coefficient through the frozen preconditioner."""
    return c_eq + h_uq


def precond_b(h_qq: float) -> float:
    """b_P = -(Q m)^T H (Q m) / 2, its quadratic one (positive on a concave direction)."""
    return -h_qq / 2


@dataclass(frozen=True)
class Quantity:
    """A record field and its formula: ``field = formula(*inputs)``, the inputs named after
    :data:`MEASURED` scalars or earlier quantities. When an input is None (not
    measured), the quantity is None and the formula is not called."""

    field: str
    formula: Callable[..., object]
    inputs: tuple[str, ...]


# In dependency order: an entry may read the entries above it.
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("cos", cosine, ("c", "g2", "v2")),
    Quantity("kappa_m", curvature, ("h_mm", "v2")),
    Quantity("kappa_g", curvature, ("h_gg", "g2")),
    Quantity("a", taylor_a, ("lr", "c_e", "h_gm")),
    Quantity("b", taylor_b, ("lr", "h_mm")),
    Quantity("concave", concave, ("h_mm",)),
    Quantity("lambda_star_taylor", lambda_star_taylor, ("a", "b")),
    Quantity("harm_threshold", harm_threshold, ("lambda_star_taylor",)),
    Quantity("best_gain_taylor", best_gain, ("a", "b")),
    Quantity("lambda_star_smooth", lambda_star_smooth, ("lr", "c", "c_e", "L", "v2")),
    Quantity("a_precond", precond_a, ("c_eq", "h_uq")),
    Quantity("b_precond", precond_b, ("h_qq",)),
    Quantity("lambda_star_precond", lambda_star_taylor, ("a_precond", "b_precond")),
)


def derive(measured: dict[str, float | None]) -> dict[str, object]:
    """Every :data:`QUANTITIES` field from the measured scalars (missing ones count as not measured)."""
    unknown = sorted(set(measured) - set(MEASURED))
    if unknown:
        raise ValueError(f"measured scalars {unknown} are not in MEASURED {MEASURED}: add them there first")
    values: dict[str, object] = {name: measured.get(name) for name in MEASURED}
    for quantity in QUANTITIES:
        args = [values[name] for name in quantity.inputs]
        values[quantity.field] = None if any(arg is None for arg in args) else quantity.formula(*args)
    return {quantity.field: values[quantity.field] for quantity in QUANTITIES}
