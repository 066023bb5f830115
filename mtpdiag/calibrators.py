"""How the ``occ`` regime picks the MTP coefficient lambda_t (docs/theory.md s.5).

The trainer calls a calibrator once per optimiser mini-batch, before the update,
with :class:`CalibrationInputs`; the calibrator returns one lambda per MTP head
and an ``info`` dict that the trainer logs as ``calib_<key>``.

Calibrators:

* :class:`FixedLambda`: the same lambda every step.
* :class:`OCC`: lambda_t = lambda_plus * c_hat / (v_hat^2 + eps) from a per-token
  log-prob proxy (``ratio``: the log-probs the trainer already holds; ``step``:
  the first-order log-prob change of the RL step and of the MTP step).
  Presets :meth:`OCC.paper` and :meth:`OCC.reference`.
* :class:`Oracle`: lambda*_taylor or lambda*_meas from the :class:`~mtpdiag.diagnostics.Probe`.
* :class:`AmortisedTaylor`: lambda*_taylor from fresh gradients and curvatures
  measured every k-th call and carried in between.
* :class:`CosineGate`: lambda0 * max(0, cos(g, m)) (Du et al. 2018).
* :class:`WithShadows`: trains with one calibrator and logs what others would
  have chosen on the same mini-batch (proxies against the oracle, row by row).

A proxy whose v_hat^2 is zero or non-finite, or whose result is non-finite, gives
lambda = 0 for that head and counts a warning (``info["warnings"]``), so NaN never
reaches the loss.

Every calibrator that needs gradients stands on :mod:`mtpdiag.diagnostics.functional`,
as the Probe does: the same forward wrapper, isolation, S discovery and shared
gradients.

Under ``torch.distributed`` each rank passes its shard of the mini-batch and every
rank gets the lambda of the whole mini-batch: OCC sums its token sums over ranks
(and the step proxy its gradients), the Probe-based calibrators inherit the
Probe's reductions (see :mod:`mtpdiag.distributed`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from .diagnostics import Probe, UpdateGradients
from .diagnostics.functional import FunctionalModel, find_shared, fork_rng, isolated, values_and_gradients
from .distributed import all_reduce_tree
from .losses import AlignedLogprobs, token_logprobs

# the fixed MTP coefficient when a regime or calibrator is given none (the trainer's and FixedLambda's default)
DEFAULT_LAMBDA = 1.0
PROXIES = ("ratio", "step")
AGGREGATES = ("sum", "tokenwise")


@dataclass
class CalibrationInputs:
    """What a calibrator may read on one mini-batch. Tensors are detached.

    ``logprobs`` are the current log-probs (main head and MTP heads aligned to
    the main positions), ``old_logprobs`` the main head's rollout-time log-probs.
    ``model``, ``batch``, ``forward``, ``objective`` and ``aux_loss`` are there for
    calibrators that need gradients; they must not mutate the model.
    ``forward(model, batch) -> GPTOutput``; ``objective(out, batch)`` is J_batch (to
    maximise); ``aux_loss(out, batch, head_weights=None)`` is the unweighted MTP loss
    (per-head calibrators call it with a one-hot ``head_weights``).
    ``gradients``: for a calibrator that ``reads_gradients``, the trainer's own g and per-head
    aux gradients of this mini-batch (:class:`~mtpdiag.diagnostics.UpdateGradients`, from
    its backward passes over the forward it trains on), where that forward is the one the
    calibrator would differentiate; None: the calibrator takes its own.
    """

    step: int
    minibatch: int
    logprobs: AlignedLogprobs
    old_logprobs: torch.Tensor
    response_mask: torch.Tensor
    lr: float
    model: torch.nn.Module | None = None
    batch: dict | None = None
    forward: Callable | None = None
    objective: Callable | None = None
    aux_loss: Callable | None = None
    gradients: UpdateGradients | None = None


@dataclass
class Calibration:
    lambdas: torch.Tensor  # [K]
    info: dict[str, Any] = field(default_factory=dict)  # logged as calib_<key>


class Calibrator(ABC):
    name: str
    # reads g and the aux gradients: the trainer then takes them in its own backward passes
    # and hands them over (CalibrationInputs.gradients) instead of one backward over the sum
    reads_gradients: bool = False

    @abstractmethod
    def __call__(self, inputs: CalibrationInputs) -> Calibration: ...

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (plain Python values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class FixedLambda(Calibrator):
    """The same lambda on every step and head."""

    def __init__(self, lam: float):
        self.lam = float(lam)
        self.name = f"fixed({self.lam:g})"

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        K = inputs.logprobs.mtp.size(0)
        return Calibration(torch.full((K,), self.lam))


def response_block(response_mask: torch.Tensor) -> torch.Tensor:
    """Every position from the first response column to the end, padding included.

    This is the [batch, response_len] tensor that verl-style trainers (and the
    RL-MTP reference code) average over when they do not mask: the prompt is not
    part of it (all prompts of a task have the same length), padding is.
    """
    columns = response_mask.bool().any(dim=0)
    if not columns.any():
        return torch.zeros_like(response_mask, dtype=torch.bool)
    first = int(columns.nonzero()[0])
    block = torch.zeros_like(response_mask, dtype=torch.bool)
    block[:, first:] = True
    return block


def per_head_info(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{key: v}`` for one head, ``{key_0: v0, key_1: v1, ...}`` for several; one
    device-to-host copy for all keys."""
    keys = list(values)
    rows = torch.stack([values[k].to(torch.float64) for k in keys]).tolist()
    if len(rows[0]) == 1:
        return {key: row[0] for key, row in zip(keys, rows)}
    return {f"{key}_{k}": v for key, row in zip(keys, rows) for k, v in enumerate(row)}


def head_losses(inputs: CalibrationInputs, num_heads: int) -> list[Callable]:
    """The MTP loss of each head as ``loss(out, batch)``; with one head, the whole MTP loss."""
    if num_heads == 1:
        return [inputs.aux_loss]
    return [partial(inputs.aux_loss, head_weights=torch.eye(num_heads)[k]) for k in range(num_heads)]


def require_gradient_inputs(inputs: CalibrationInputs, who: str) -> None:
    missing = [n for n in ("model", "batch", "forward", "objective", "aux_loss") if getattr(inputs, n) is None]
    if missing:
        raise ValueError(
            f"{who} needs CalibrationInputs.{', '.join(missing)}: the trainer must pass the model, the mini-batch "
            "and the forward / objective / aux_loss callables (or use OCC with proxy='ratio', which needs none)"
        )


def check_clip(clip) -> tuple[float, float] | None:
    """A calibrator's ``clip=(lo, hi)`` (None: no clipping), validated."""
    if clip is None:
        return None
    if not (len(clip) == 2 and clip[0] <= clip[1]):
        raise ValueError(f"clip={clip!r}: pass (lo, hi) with lo <= hi, or None for no clipping")
    return float(clip[0]), float(clip[1])


def clip_label(clip: tuple[float, float]) -> str:
    """How a calibrator's name records its clip: ``clip=(0,10)``."""
    return f"clip=({clip[0]:g},{clip[1]:g})"


class _WarningCounter:
    """Replaces unusable per-head values by 0 and counts them, per call and in total."""

    def __init__(self):
        self.warnings_total = 0

    def zero_unusable(self, lambdas: torch.Tensor, usable: torch.Tensor) -> tuple[torch.Tensor, dict]:
        usable = usable & torch.isfinite(lambdas)
        n_bad = int((~usable).sum())
        self.warnings_total += n_bad
        return torch.where(usable, lambdas, torch.zeros_like(lambdas)), {
            "warnings": n_bad,
            "warnings_total": self.warnings_total,
        }


class OCC(Calibrator, _WarningCounter):
    """Optimal Coefficient Calibration: lambda_t = lambda_plus * c_hat / (v_hat^2 + eps).

    Per head k, with per-token log-prob changes delta_RL and delta_MTP_k:

    * ``proxy="ratio"``: delta_RL = log pi_theta - log pi_old (main head, current vs
      rollout time), delta_MTP_k = log q_k,theta - log pi_old (head k's current
      log-prob of the same token minus the main head's old one). No extra compute.
    * ``proxy="step"``: delta_RL = J (eta g), delta_MTP_k = J (eta m_k), J the
      Jacobian of the main head's per-token log-probs w.r.t. the shared parameters
      S, g = grad J_batch, m_k = -grad of head k's MTP loss (both on S), eta =
      ``inputs.lr``. One forward-mode JVP each, or a central finite difference
      (logp(theta + h u) - logp(theta - h u)) / 2h with h = ``finite_difference``:
      h = 1 is the whole step on both sides (two forwards, no forward-mode AD).
      A small h cancels catastrophically in float32 when eta u is small (with
      eta = 1e-4 and h = 1e-3 the log-probs move by 1e-7 |J u|, near their
      rounding error), so keep h near 1 there; the JVP has no such limit. The
      step deltas scale with eta: with eta ~ 1e-4 a token's delta_MTP^2 can be
      as small as eps = 1e-8, which then shrinks the ``tokenwise`` ratios.
    * ``aggregate="sum"``: c_hat / (v_hat^2 + eps) with c_hat = sum delta_RL *
      delta_MTP, v_hat^2 = sum delta_MTP^2; ``"tokenwise"``: the mean over tokens of
      delta_RL * delta_MTP / (delta_MTP^2 + eps) (what the reference code does).
    * ``masked=True``: tokens = response tokens (and, for ``ratio``, positions where
      head k has a prediction). ``masked=False``: the whole response block,
      padding included (see :func:`response_block`); positions where head k has no
      prediction are still left out, since ``aligned_logprobs`` fills them with 0,
      not with a log-prob.
    * ``clip=(lo, hi)`` clamps each step's lambda; ``ema=beta`` then smooths it over
      calls (one call per mini-batch): lambda = beta * previous + (1 - beta) * new.

    ``info`` per head (suffix ``_k`` when K > 1): ``c_hat``, ``v_hat2``, ``r_hat2``
    (|delta_RL|^2, ~0 on the first mini-batch after pi_old is recomputed),
    ``lambda_raw`` (before clip and EMA), ``n_tokens``; and ``lambda_plus``,
    ``warnings`` (heads set to 0 on this call), ``warnings_total``.
    """

    def __init__(
        self,
        proxy: str = "ratio",
        aggregate: str = "sum",
        masked: bool = True,
        lambda_plus: float = 1.0,
        eps: float = 1e-8,
        clip: tuple[float, float] | None = None,
        ema: float | None = None,
        finite_difference: float | None = None,
        label: str | None = None,
    ):
        _WarningCounter.__init__(self)
        if proxy not in PROXIES:
            raise ValueError(f"proxy={proxy!r}: choose one of {PROXIES}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={aggregate!r}: choose one of {AGGREGATES}")
        if not eps > 0:
            raise ValueError(f"eps={eps}: use a small positive number such as 1e-8")
        clip = check_clip(clip)
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema}: pass a smoothing factor beta in [0, 1), or None for no smoothing")
        if finite_difference is not None and (proxy != "step" or not finite_difference > 0):
            raise ValueError(
                f"finite_difference={finite_difference}: only the step proxy takes it, as a positive step h"
            )
        self.proxy, self.aggregate, self.masked = proxy, aggregate, bool(masked)
        self.lambda_plus, self.eps = float(lambda_plus), float(eps)
        self.clip, self.ema, self.finite_difference = clip, ema, finite_difference
        self._ema_value: torch.Tensor | None = None
        self._shared: tuple[torch.nn.Module, list[str]] | None = None  # (model, S names) for the step proxy
        options = [proxy, aggregate, "masked" if self.masked else "unmasked", f"lambda_plus={self.lambda_plus:g}"]
        if finite_difference is not None:
            options.append(f"fd={finite_difference:g}")
        if clip is not None:
            options.append(clip_label(clip))
        if ema is not None:
            options.append(f"ema={ema:g}")
        self.name = label or f"occ[{','.join(options)}]"

    @classmethod
    def paper(cls) -> "OCC":
        """The summary's formula: ratio proxy, <.,.>/|.|^2 over response tokens, lambda_plus 1."""
        return cls(proxy="ratio", aggregate="sum", masked=True, lambda_plus=1.0, label="occ-paper")

    @classmethod
    def reference(cls, num_heads: int, scaling_factor: float = 0.1) -> "OCC":
        """What the public RL-MTP code does: ratio proxy, tokenwise mean over the
        unmasked response block, lambda_plus = mtp_loss_scaling_factor / num_heads."""
        return cls(
            proxy="ratio", aggregate="tokenwise", masked=False, lambda_plus=scaling_factor / num_heads,
            label="occ-reference",
        )

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        if self.proxy == "ratio":
            d_rl, d_mtp, mask = self._ratio_deltas(inputs)
        else:
            d_rl, d_mtp, mask = self._step_deltas(inputs)
        zero = torch.zeros((), dtype=d_mtp.dtype, device=d_mtp.device)
        dims = tuple(range(1, d_mtp.dim()))
        # where(), not multiplication: a non-finite value outside the mask must not leak in
        sums = {
            "c_hat": torch.where(mask, d_rl * d_mtp, zero).sum(dims),
            "v_hat2": torch.where(mask, d_mtp.square(), zero).sum(dims),
            "r_hat2": torch.where(mask, d_rl.square(), zero).sum(dims),  # |delta_RL|^2: ~0 on a fresh pi_old
            "n_tokens": mask.sum(dims),
        }
        if self.aggregate == "tokenwise":
            sums["ratios"] = torch.where(mask, d_rl * d_mtp / (d_mtp.square() + self.eps), zero).sum(dims)
        sums = all_reduce_tree(sums)  # on several ranks: the sums over the whole mini-batch
        c_hat, v_hat2, r_hat2, n_tokens = sums["c_hat"], sums["v_hat2"], sums["r_hat2"], sums["n_tokens"]
        if self.aggregate == "sum":
            raw = c_hat / (v_hat2 + self.eps)
        else:
            raw = sums["ratios"] / n_tokens.clamp_min(1)
        raw = self.lambda_plus * raw
        usable = torch.isfinite(v_hat2) & (v_hat2 > 0)
        lambdas, info = self.zero_unusable(raw, usable)
        lambdas = self._smooth(lambdas, usable & torch.isfinite(raw))
        info.update(per_head_info(
            {"c_hat": c_hat, "v_hat2": v_hat2, "r_hat2": r_hat2, "lambda_raw": raw, "n_tokens": n_tokens}
        ))
        info["lambda_plus"] = self.lambda_plus
        return Calibration(lambdas, info)

    @property
    def reads_gradients(self) -> bool:
        return self.proxy == "step"

    def _ratio_deltas(self, inputs: CalibrationInputs):
        lp = inputs.logprobs
        d_rl = (lp.main - inputs.old_logprobs).unsqueeze(0)  # [1, B, T-1]
        d_mtp = lp.mtp - inputs.old_logprobs  # [K, B, T-1]
        tokens = inputs.response_mask.bool() if self.masked else response_block(inputs.response_mask)
        mask = tokens.unsqueeze(0) & lp.mtp_valid.to(tokens.device).unsqueeze(1)  # [K, B, T-1]
        return d_rl, d_mtp, mask

    def _step_deltas(self, inputs: CalibrationInputs):
        require_gradient_inputs(inputs, "the step proxy")
        K = inputs.logprobs.mtp.size(0)
        fm = FunctionalModel(inputs.model, inputs.forward)
        # the model's own train/eval mode: the proxy is of the trainer's forward, dropout included
        with isolated(inputs.model, eval_mode=False):
            theta, fixed, g, ms = self._shared_gradients(inputs, fm, K)
            eta = inputs.lr
            tangents = [{n: eta * g[n] for n in theta}] + [{n: eta * m[n] for n in theta} for m in ms]
            deltas = self._logprob_changes(inputs, fm, theta, fixed, tangents)
        d_rl, d_mtp = deltas[0].unsqueeze(0), torch.stack(deltas[1:])
        tokens = inputs.response_mask.bool() if self.masked else response_block(inputs.response_mask)
        return d_rl, d_mtp, tokens.unsqueeze(0).expand_as(d_mtp)

    def _shared_names(self, inputs: CalibrationInputs, fm: FunctionalModel) -> list[str]:
        """S as the Probe finds it (from the autograd graph), on the first batch, then kept."""
        if self._shared is None or self._shared[0] is not inputs.model:
            self._shared = (inputs.model, find_shared(fm, inputs.objective, inputs.aux_loss, inputs.batch))
        return self._shared[1]

    def _shared_gradients(self, inputs: CalibrationInputs, fm: FunctionalModel, num_heads: int):
        """theta_S, the other trainable parameters, g = grad J_batch on S and m_k = -grad
        of head k's MTP loss on S (the trainer's, or one forward and one backward per loss);
        on several ranks, those of the whole mini-batch."""
        theta, fixed = fm.split(self._shared_names(inputs, fm))
        given = inputs.gradients
        if given is not None:
            g = {n: given.g[n] for n in theta}
            aux_grads = [{n: given.head(k)[n] for n in theta} for k in range(num_heads)]
        else:
            losses = [inputs.objective, *head_losses(inputs, num_heads)]
            _, (g, *aux_grads) = values_and_gradients(fm, losses, inputs.batch, theta, fixed)
        return theta, fixed, g, [{n: -t for n, t in grad.items()} for grad in aux_grads]

    def _logprob_changes(
        self, inputs: CalibrationInputs, fm: FunctionalModel, shared: dict, fixed: dict, tangents: list[dict]
    ) -> list[torch.Tensor]:
        """J @ tangent for each tangent: the first-order change of the main head's per-token
        log-probs (forward-mode AD, which the math attention of :func:`isolated` has), all
        tangents in one pass (``torch.func.vmap``; dropout draws one mask for all of them, so
        the RL and the MTP directions are judged on the same function)."""

        def main_logprobs(theta: dict) -> torch.Tensor:
            return token_logprobs(fm({**fixed, **theta}, inputs.batch).main)

        with torch.no_grad():
            if self.finite_difference is None:
                stacked = {n: torch.stack([t[n] for t in tangents]) for n in shared}
                changes = torch.func.vmap(lambda t: torch.func.jvp(main_logprobs, (shared,), (t,))[1],
                                          randomness="same")(stacked)  # fmt: skip
                return list(changes.unbind())
            h = self.finite_difference
            changes = []
            for tangent in tangents:
                sides = []
                for sign in (1, -1):
                    with fork_rng(inputs.model):  # every side of every tangent draws the same dropout masks
                        sides.append(main_logprobs({n: p + sign * h * tangent[n] for n, p in shared.items()}))
                changes.append((sides[0] - sides[1]) / (2 * h))
            return changes

    def _smooth(self, lambdas: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """Clip, then EMA. A head with an unusable value this call outputs 0 and
        leaves the EMA state as it was."""
        if self.clip is not None:
            lambdas = torch.where(updated, lambdas.clamp(*self.clip), lambdas)
        if self.ema is None:
            return lambdas
        if self._ema_value is None:  # NaN marks a head that has had no usable value yet
            self._ema_value = torch.full_like(lambdas, float("nan"))
        previous = self._ema_value.to(lambdas)
        previous = torch.where(torch.isnan(previous), lambdas, previous)
        smoothed = self.ema * previous + (1 - self.ema) * lambdas
        self._ema_value = torch.where(updated, smoothed, self._ema_value.to(lambdas))
        return torch.where(updated, smoothed, torch.zeros_like(smoothed))

    def state_dict(self) -> dict:
        ema = None if self._ema_value is None else self._ema_value.tolist()
        return {"ema_value": ema, "warnings_total": self.warnings_total}

    def load_state_dict(self, state: dict) -> None:
        ema = state["ema_value"]
        self._ema_value = None if ema is None else torch.tensor(ema, dtype=torch.float64)
        self.warnings_total = int(state["warnings_total"])


class _ProbeCalibrator(Calibrator, _WarningCounter):
    """A calibrator that measures g and m with one :class:`~mtpdiag.diagnostics.Probe` per head
    (head k's probe uses head k's MTP loss alone; with one head, the whole MTP loss).
    ``clip=(lo, hi)`` clamps each lambda (off by default); ``info["lambda_raw"]`` is
    the value before it. The probes read the trainer's gradients where it hands them over
    (``CalibrationInputs.gradients``: g and head k's aux gradient)."""

    reads_gradients = True

    def __init__(self, clip: tuple[float, float] | None = None):
        _WarningCounter.__init__(self)
        self.clip = check_clip(clip)
        self._probes: tuple[torch.nn.Module, list[Probe]] | None = None

    @staticmethod
    def _measure(inputs: CalibrationInputs, k: int, probe: Probe, **options):
        """Head ``k``'s ``probe.measure`` on the mini-batch at the step size ``inputs.lr``."""
        given = inputs.gradients
        if given is not None:
            given = UpdateGradients(given.value, given.g, given.head(k), reached=given.reached, source=given.source)
        return probe.measure(inputs.batch, inputs.lr, gradients=given, **options)

    def _probes_for(self, inputs: CalibrationInputs) -> list[Probe]:
        require_gradient_inputs(inputs, self.name)
        if self._probes is None or self._probes[0] is not inputs.model:
            K = inputs.logprobs.mtp.size(0)
            probes = [Probe(inputs.model, inputs.objective, loss, inputs.forward) for loss in head_losses(inputs, K)]
            self._probes = (inputs.model, probes)
        return self._probes[1]

    def _finish(self, values: list[float | None], info: dict[str, list]) -> Calibration:
        """lambda per head from ``values`` (None where undefined: 0 and a warning)."""
        def as_tensor(per_head):
            return torch.tensor([float("nan") if v is None else v for v in per_head], dtype=torch.float64)

        raw = as_tensor(values)
        usable = torch.isfinite(raw)
        lambdas, counts = self.zero_unusable(raw, usable)
        if self.clip is not None:  # an unusable head keeps its 0
            lambdas = torch.where(usable, lambdas.clamp(*self.clip), lambdas)
            info = {**info, "lambda_raw": raw.tolist()}
        counts.update(per_head_info({key: as_tensor(per_head) for key, per_head in info.items()}))
        return Calibration(lambdas, counts)

    def state_dict(self) -> dict:
        return {"warnings_total": self.warnings_total}

    def load_state_dict(self, state: dict) -> None:
        self.warnings_total = int(state["warnings_total"])


class Oracle(_ProbeCalibrator):
    """lambda_t = scale * lambda*, measured by the Probe on the calibrator's own mini-batch
    at the current parameters (small models only: it costs Hessian-vector products).

    ``source="taylor"``: lambda*_taylor = (c + eta h_gm) / (-eta h_mm) (docs/theory.md s.2);
    ``"measured"``: the argmax of the exact curve Delta(lambda) (a 1-D search refined
    from a grid around lambda*_taylor; docs/theory.md s.4). Both are for one plain SGD
    step of size ``inputs.lr`` moving every parameter the losses reach. A direction that
    is not concave has no lambda*: 0 and a warning.
    With K > 1 heads each head's lambda* is measured for that head's loss alone.
    ``clip=(lo, hi)`` clamps scale * lambda* (off by default; the name says it).
    """

    SOURCES = ("taylor", "measured")

    def __init__(self, source: str = "taylor", scale: float = 1.0, clip: tuple[float, float] | None = None):
        if source not in self.SOURCES:
            raise ValueError(f"source={source!r}: choose one of {self.SOURCES}")
        super().__init__(clip)
        self.source, self.scale = source, float(scale)
        options = [source] + ([f"scale={self.scale:g}"] if self.scale != 1.0 else [])
        options += [clip_label(self.clip)] if self.clip is not None else []
        self.name = f"oracle[{','.join(options)}]"

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        records = [
            self._measure(inputs, k, probe, gg_curvature=False, line_search=self.source == "measured", crossfit=False)
            for k, probe in enumerate(self._probes_for(inputs))
        ]
        taylor = [r.lambda_star_taylor for r in records]
        info = {"lambda_star_taylor": taylor, "c": [r.c for r in records], "v2": [r.v2 for r in records],
                "h_mm": [r.h_mm for r in records]}
        chosen = taylor
        if self.source == "measured":
            curves = [r.curve for r in records]
            chosen = [c.lambda_star if c is not None else None for c in curves]
            info["lambda_star_meas"] = chosen
            info["lambda_star_meas_fit"] = [c.fit.vertex if c is not None else None for c in curves]
        return self._finish([None if v is None else self.scale * v for v in chosen], info)


class AmortisedTaylor(_ProbeCalibrator):
    """lambda*_taylor with its curvatures measured every ``every``-th call and carried in
    between (docs/theory.md s.5, "Amortised Taylor").

    Per head k, on every call, from one gradient of the objective and of head k's MTP
    loss (the Probe without Hessian-vector products): c_k = <g, m_k>, |g|, |m_k| on S.
    On a measuring call one Hessian-vector product H m_k more gives h_gm and h_mm, and

        lambda_k = scale * (c_k + eta h_gm) / (-eta h_mm),

    which is exactly :class:`Oracle` ``("taylor")``'s lambda*. The curvatures are then kept
    as scale-free numbers, the Rayleigh curvature kappa_m = -h_mm / |m|^2 and the cross
    curvature r_gm = h_gm / (|g| |m|); on the calls in between

        lambda_k = scale * (c_k + eta r_gm |g| |m_k|) / (eta kappa_m |m_k|^2),

    with eta = ``inputs.lr`` of that call, so a learning-rate schedule moves lambda like
    1/eta. ``ema=beta`` carries beta * carried + (1 - beta) * measured instead of the last
    measurement (a measuring call still uses its own fresh values). A head measures on
    the calls where ``calls % every == 0`` and on any call while it has nothing carried
    (its last measurements had m = 0). A carried kappa_m <= 0 (not concave) or m = 0
    gives 0 and a warning, as in Oracle.

    ``eval_objective`` (and its ``eval_batch``; default: the mini-batch): the curve
    objective E whose Taylor lambda* is wanted, e.g. the held-out J_true; c_k is then
    <grad E, m_k> and the curvatures are E's (one more gradient per call, on E's batch).
    Without it E is the objective the trainer differentiates (J_batch).

    ``info`` per head (suffix ``_k`` when K > 1): ``measured`` (1.0 on a call with the HVP),
    ``c`` (the c_e used), ``v2``, and ``kappa_m``, ``r_gm`` as used on this call.

    Cost per call and head: one forward and two backward passes (like :class:`CosineGate`;
    inside mtpdiag's trainer they are its own split backward, one backward more than its
    plain step), plus one Hessian-vector product (about three gradients) on measuring calls,
    and one more gradient of E per call with ``eval_objective``.
    """

    def __init__(
        self,
        every: int = 4,
        ema: float | None = None,
        scale: float = 1.0,
        clip: tuple[float, float] | None = None,
        eval_objective: Callable | None = None,
        eval_batch: dict | None = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: pass a whole number of calls >= 1 between curvature measurements")
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema}: pass a smoothing factor beta in [0, 1), or None to carry the last measured")
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale={scale}: pass a finite non-zero factor on lambda*")
        if eval_objective is not None and not callable(eval_objective):
            raise ValueError("eval_objective: pass a loss(out, batch) to maximise, or None for the trainer's objective")
        if eval_batch is not None and eval_objective is None:
            raise ValueError("eval_batch is the batch of eval_objective: pass eval_objective=<the curve objective> too")
        super().__init__(clip)
        self.every, self.ema, self.scale = every, ema, float(scale)
        self.eval_objective, self.eval_batch = eval_objective, eval_batch
        self.calls = 0
        self._kappa: list[float | None] | None = None  # per head: the carried -h_mm / |m|^2
        self._r_gm: list[float | None] | None = None  # per head: the carried h_gm / (|g| |m|)
        options = [f"every={every}"] + ([f"ema={ema:g}"] if ema is not None else [])
        options += [f"scale={self.scale:g}"] if self.scale != 1.0 else []
        options += ["eval_objective"] if eval_objective is not None else []
        options += [clip_label(self.clip)] if self.clip is not None else []
        self.name = f"amortised-taylor[{','.join(options)}]"

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        probes = self._probes_for(inputs)
        K = len(probes)
        if self._kappa is None:
            self._kappa, self._r_gm = [None] * K, [None] * K
        if len(self._kappa) != K:
            raise ValueError(f"this calibrator carries curvatures for {len(self._kappa)} heads, the model has {K}: "
                             "build a new calibrator for a model with another number of MTP heads")
        scheduled = self.calls % self.every == 0
        eval_options = {} if self.eval_objective is None else {
            "eval_objective": self.eval_objective, "eval_batch": self.eval_batch}
        values, info = [], {key: [] for key in ("measured", "c", "v2", "kappa_m", "r_gm")}
        for k, probe in enumerate(probes):
            measure = scheduled or self._kappa[k] is None
            record = self._measure(inputs, k, probe, hvp=measure, gg_curvature=False, line_search=False,
                                   crossfit=False, **eval_options)
            c = record.c if self.eval_objective is None else record.c_eval
            r_gm = None
            if measure and record.v2 > 0:
                r_gm = self._cross(record)
                self._carry(k, -record.h_mm / record.v2, r_gm)
                h_gm, h_mm = record.h_gm, record.h_mm
            elif self._kappa[k] is not None:
                r_gm = self._r_gm[k]
                h_gm = r_gm * record.g_norm * record.m_norm
                h_mm = -self._kappa[k] * record.v2
            else:
                h_gm = h_mm = None
            eta = float(inputs.lr)
            usable = record.v2 > 0 and h_mm is not None and h_mm < 0
            values.append(self.scale * (c + eta * h_gm) / (-eta * h_mm) if usable else None)
            info["measured"].append(1.0 if measure else 0.0)
            info["c"].append(c)
            info["v2"].append(record.v2)
            info["kappa_m"].append(None if h_mm is None or record.v2 == 0 else -h_mm / record.v2)
            info["r_gm"].append(r_gm)
        self.calls += 1
        return self._finish(values, info)

    @staticmethod
    def _cross(record) -> float:
        """h_gm / (|g| |m|), or 0 when g = 0 on S: h_gm then has no scale to be carried by,
        and the cross term is left out until the next measurement."""
        norms = record.g_norm * record.m_norm
        return record.h_gm / norms if norms > 0 else 0.0

    def _carry(self, k: int, kappa: float, r_gm: float) -> None:
        if self.ema is None or self._kappa[k] is None:
            self._kappa[k], self._r_gm[k] = kappa, r_gm
        else:
            self._kappa[k] = self.ema * self._kappa[k] + (1 - self.ema) * kappa
            self._r_gm[k] = self.ema * self._r_gm[k] + (1 - self.ema) * r_gm

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calls": self.calls, "kappa_m": self._kappa, "r_gm": self._r_gm}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calls = int(state["calls"])
        self._kappa = None if state["kappa_m"] is None else [None if v is None else float(v) for v in state["kappa_m"]]
        self._r_gm = None if state["r_gm"] is None else [None if v is None else float(v) for v in state["r_gm"]]


class CosineGate(_ProbeCalibrator):
    """lambda_t = lambda0 * max(0, cos(g, m)) on the shared parameters (Du et al. 2018,
    arXiv 1812.02224): the MTP gradient is kept, scaled down, while it points the same
    way as the RL gradient, and dropped when it points against it. Gradients only.
    ``clip=(lo, hi)`` clamps lambda_t (off by default; the name says it)."""

    def __init__(self, lambda0: float = 1.0, clip: tuple[float, float] | None = None):
        super().__init__(clip)
        self.lambda0 = float(lambda0)
        self.name = f"cosine[lambda0={self.lambda0:g}" + (f",{clip_label(self.clip)}]" if self.clip else "]")

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        records = [
            self._measure(inputs, k, probe, hvp=False, line_search=False, crossfit=False)
            for k, probe in enumerate(self._probes_for(inputs))
        ]
        cos = [r.cos for r in records]  # None when g = 0 or m = 0
        values = [None if c is None else self.lambda0 * max(0.0, c) for c in cos]
        return self._finish(values, {"cos": cos, "c": [r.c for r in records], "v2": [r.v2 for r in records]})


class WithShadows(Calibrator):
    """Trains with ``primary`` and also runs ``shadows`` on the same inputs (same
    mini-batch, same parameters), logging what they would have chosen: shadow
    ``label``'s lambdas as ``<label>_lambda`` and its info as ``<label>_<key>``.
    This compares proxies with each other and with an :class:`Oracle` on one
    trajectory, row by row. ``every``: run the shadows on every n-th call only.
    """

    def __init__(self, primary: Calibrator, shadows: dict[str, Calibrator], every: int = 1):
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        self.primary, self.shadows, self.every = primary, dict(shadows), int(every)
        self.calls = 0
        self.name = f"{primary.name}+shadows({','.join(f'{k}={c.name}' for k, c in self.shadows.items())})"
        self.reads_gradients = primary.reads_gradients or any(c.reads_gradients for c in self.shadows.values())

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        result = self.primary(inputs)
        info = dict(result.info)
        if self.calls % self.every == 0:
            for label, shadow in self.shadows.items():
                shadowed = shadow(inputs)
                info.update({f"{label}_{key}": v for key, v in per_head_info({"lambda": shadowed.lambdas}).items()})
                info.update({f"{label}_{key}": v for key, v in shadowed.info.items()})
        self.calls += 1
        return Calibration(result.lambdas, info)

    def state_dict(self) -> dict:
        return {
            "calls": self.calls,
            "primary": self.primary.state_dict(),
            "shadows": {label: c.state_dict() for label, c in self.shadows.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.primary.load_state_dict(state["primary"])
        for label, c in self.shadows.items():
            c.load_state_dict(state["shadows"][label])


CALIBRATORS: dict[str, Callable[..., Calibrator]] = {
    "fixed": lambda num_heads, lam=DEFAULT_LAMBDA: FixedLambda(lam),
    "occ-paper": lambda num_heads: OCC.paper(),
    "occ-reference": lambda num_heads, scaling_factor=0.1: OCC.reference(num_heads, scaling_factor),
    "occ": lambda num_heads, **options: OCC(**options),
    "oracle": lambda num_heads, **options: Oracle(**options),
    "cosine": lambda num_heads, **options: CosineGate(**options),
    "amortised-taylor": lambda num_heads, **options: AmortisedTaylor(**options),
}


def make_calibrator(name: str, num_heads: int = 1, **options) -> Calibrator:
    """A calibrator by name (see ``CALIBRATORS``), e.g. ``make_calibrator("occ-reference",
    num_heads=2)`` or ``make_calibrator("occ", proxy="step", aggregate="tokenwise")``."""
    if name not in CALIBRATORS:
        raise ValueError(f"calibrator {name!r}: choose one of {sorted(CALIBRATORS)}")
    return CALIBRATORS[name](num_heads, **options)
