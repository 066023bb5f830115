"""Adam and AdamW through a frozen diagonal preconditioner (docs/theory.md s.6).

PyTorch's Adam step at coefficient lambda moves theta by u(lambda); with the normaliser
frozen at lambda = 0 it is affine in lambda, u(lambda) = u0 + lambda Q m, where
Q = eta_A P per coordinate, P = 1 / (sqrt(v_t(0) / (1 - beta2^t)) + eps) and
eta_A = lr (1 - beta1) / (1 - beta1^t). :func:`frozen_preconditioner` reads Q from the
optimizer's state and hyperparameters at this step (never writing them), with the share
sum (1 - beta2) d^2 / sum v_t that the current gradient has in the second moment: how far
the real step is from the frozen one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .functional import Params


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the frozen-preconditioner reading does not apply to ``optimizer``, or None."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam (decoupled_weight_decay=True)
        return f"lambda*_precond is derived for Adam and AdamW, not {type(optimizer).__name__}"
    for option in ("amsgrad", "maximize"):
        if any(group.get(option) for group in optimizer.param_groups):
            return f"lambda*_precond is derived for Adam without {option}"
    return None


@dataclass
class Preconditioner:
    """Q = eta_A P per moved parameter, and ``new_share``: sum (1 - beta2) d_i^2 / sum v_t,i
    over the coordinates of S at lambda = 0, the share of the second moment that the
    current gradient contributes (1 on the first step; None where v_t = 0 on all of S).

    A ratio of sums, not a median over coordinates: a coordinate whose gradient is
    rounding noise and whose v_{t-1} is 0 has a share of exactly 1 or, at a gradient of
    exactly 0, none, so a median would jump with the summation order (across ranks)."""

    scale: Params
    new_share: float | None


def frozen_preconditioner(
    optimizer: torch.optim.Adam, parameters: dict[str, torch.Tensor], d0: Params, shared: Iterable[str]
) -> Preconditioner:
    """Q of Adam's step at this point, for the parameters that get the loss gradient ``d0``
    (the trainer's ``.grad`` at lambda = 0, keyed by name; the others do not move).
    ``new_share`` is taken on ``shared`` (S): there the MTP term's move is what E sees
    (E does not read the MTP-only parameters, whose d is 0 at lambda = 0)."""
    shared = set(shared)
    name_of = {id(p): n for n, p in parameters.items()}
    scale, new, total = {}, 0.0, 0.0
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        for p in group["params"]:
            name = name_of[id(p)]
            if name not in d0:
                continue
            state = optimizer.state.get(p, {})
            t = int(state["step"]) + 1 if "step" in state else 1
            d = d0[name]
            if weight_decay and not group["decoupled_weight_decay"]:  # Adam's L2 term joins the gradient
                d = d + weight_decay * p.detach()
            v_previous = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(d)
            fresh = (1 - beta2) * d * d  # one tensor in both sums: on a first step new / total is exactly 1
            v = beta2 * v_previous + fresh
            P = 1 / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
            scale[name] = lr * (1 - beta1) / (1 - beta1**t) * P
            if name in shared:
                new += fresh.sum().item()
                total += v.sum().item()
    return Preconditioner(scale, new / total if total > 0 else None)
