"""The decomposition's formulas as pure functions of measured scalars (docs/theory.md, sections 2-3).

The Probe fills its record with these, and the figures draw the Taylor and
L-smooth parabolas with them from a diagnostics CSV row: one formula, one home.
Undefined values (no concave direction, no L) are ``None``.
"""
from __future__ import annotations


def taylor_coefficients(lr: float, c_eval: float, h_gm: float, h_mm: float) -> tuple[float, float]:
    """(a, b) of the Taylor quadratic Delta(lambda) ~ a lambda - b lambda^2:
    a = eta (c_eval + eta h_gm), b = -(eta^2 / 2) h_mm."""
    return lr * (c_eval + lr * h_gm), -(lr**2 / 2) * h_mm


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
