"""How the ``occ`` regime picks the MTP coefficient lambda_t (THEORY.md s.5).

The trainer calls a calibrator once per optimiser mini-batch, before the update,
with :class:`CalibrationInputs`; the calibrator returns one lambda per MTP head
and an ``info`` dict that the trainer logs as ``calib_<key>``.

Calibrators:

* :class:`FixedLambda`: the same lambda every step.
* :class:`OCC`: lambda_t = lambda_plus * c_hat / (v_hat^2 + eps) from a per-token
  log-prob proxy (``ratio``: the log-probs the trainer already holds; ``step``:
  the first-order log-prob change of the RL step and of the MTP step).
  Presets :meth:`OCC.paper` and :meth:`OCC.reference`.
* :class:`Oracle`: lambda*_taylor or lambda*_meas from the :class:`~mtpdiag.probe.Probe`.
* :class:`CosineGate`: lambda0 * max(0, cos(g, m)) (Du et al. 2018).

A proxy whose v_hat^2 is zero or non-finite, or whose result is non-finite, gives
lambda = 0 for that head and counts a warning (``info["warnings"]``), so NaN never
reaches the loss.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .losses import AlignedLogprobs, token_logprobs

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


@dataclass
class Calibration:
    lambdas: torch.Tensor  # [K]
    info: dict[str, Any] = field(default_factory=dict)  # logged as calib_<key>


class Calibrator(ABC):
    name: str

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


def per_head_keys(values: torch.Tensor, key: str) -> dict[str, float]:
    """``{key: v}`` for one head, ``{key_0: v0, key_1: v1, ...}`` for several."""
    values = values.tolist()
    if len(values) == 1:
        return {key: values[0]}
    return {f"{key}_{k}": v for k, v in enumerate(values)}


class _ForwardOnBatch(torch.nn.Module):
    """``forward(model, batch)`` as a module, so functional_call can swap its parameters."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, batch: dict):
        return self.forward_fn(self.model, batch)


def rng_untouched(model: torch.nn.Module):
    """A context after which the CPU and the model's CUDA RNG are as they were before."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def functional_forward(inputs: CalibrationInputs, params: dict):
    """``inputs.forward`` at the given parameters (names as in ``model.named_parameters()``);
    parameters not in ``params`` keep their current values. The model is not touched."""
    wrapper = _ForwardOnBatch(inputs.model, inputs.forward)
    return torch.func.functional_call(wrapper, {f"model.{n}": p for n, p in params.items()}, (inputs.batch,))


def main_logprobs_of(inputs: CalibrationInputs, shared_names) -> Callable:
    """theta_S -> the main head's per-token log-probs [B, T-1], other parameters fixed."""
    frozen = {n: p.detach() for n, p in inputs.model.named_parameters() if n not in shared_names}

    def main_logprobs(shared: dict) -> torch.Tensor:
        return token_logprobs(functional_forward(inputs, {**frozen, **shared}).main)

    return main_logprobs


def shared_gradients(inputs: CalibrationInputs, num_heads: int):
    """S (found from the autograd graph: parameters both losses reach), g = grad J_batch
    on S and m_k = -grad of head k's MTP loss on S (one head: of the whole MTP loss).

    Returns ``(shared, g, [m_1, ..., m_K])``: ``shared`` maps names to detached values.
    """
    params = {n: p.detach().requires_grad_(True) for n, p in inputs.model.named_parameters()}
    names = list(params)
    with torch.enable_grad():
        out = functional_forward(inputs, params)
        objective = inputs.objective(out, inputs.batch)
        aux_losses = [inputs.aux_loss(out, inputs.batch)] if num_heads == 1 else [
            inputs.aux_loss(out, inputs.batch, head_weights=torch.eye(num_heads)[k]) for k in range(num_heads)
        ]
        g = torch.autograd.grad(objective, list(params.values()), retain_graph=True, allow_unused=True)
        ms = [
            torch.autograd.grad(loss, list(params.values()), retain_graph=k + 1 < num_heads, allow_unused=True)
            for k, loss in enumerate(aux_losses)
        ]
    reached_by_mtp = [any(m[i] is not None for m in ms) for i in range(len(names))]
    shared = {n: params[n].detach() for i, n in enumerate(names) if g[i] is not None and reached_by_mtp[i]}
    index = {n: i for i, n in enumerate(names)}

    def on_shared(grads, sign):
        return {
            n: sign * grads[index[n]] if grads[index[n]] is not None else torch.zeros_like(shared[n])
            for n in shared
        }

    return shared, on_shared(g, 1.0), [on_shared(m, -1.0) for m in ms]


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
      with step ``finite_difference`` (h = 1 is the whole step).
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
        if clip is not None and not (len(clip) == 2 and clip[0] <= clip[1]):
            raise ValueError(f"clip={clip!r}: pass (lo, hi) with lo <= hi, or None for no clipping")
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
        options = [proxy, aggregate, "masked" if self.masked else "unmasked", f"lambda_plus={self.lambda_plus:g}"]
        if finite_difference is not None:
            options.append(f"fd={finite_difference:g}")
        if clip is not None:
            options.append(f"clip=({clip[0]:g},{clip[1]:g})")
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
        c_hat = torch.where(mask, d_rl * d_mtp, zero).sum(dims)
        v_hat2 = torch.where(mask, d_mtp.square(), zero).sum(dims)
        n_tokens = mask.sum(dims)
        if self.aggregate == "sum":
            raw = c_hat / (v_hat2 + self.eps)
        else:
            per_token = d_rl * d_mtp / (d_mtp.square() + self.eps)
            raw = torch.where(mask, per_token, zero).sum(dims) / n_tokens.clamp_min(1)
        raw = self.lambda_plus * raw
        usable = torch.isfinite(v_hat2) & (v_hat2 > 0)
        lambdas, info = self.zero_unusable(raw, usable)
        lambdas = self._smooth(lambdas, usable & torch.isfinite(raw))
        info.update(per_head_keys(c_hat, "c_hat"))
        info.update(per_head_keys(v_hat2, "v_hat2"))
        info.update(per_head_keys(raw, "lambda_raw"))
        info.update(per_head_keys(n_tokens, "n_tokens"))
        info["lambda_plus"] = self.lambda_plus
        return Calibration(lambdas, info)

    def _ratio_deltas(self, inputs: CalibrationInputs):
        lp = inputs.logprobs
        d_rl = (lp.main - inputs.old_logprobs).unsqueeze(0)  # [1, B, T-1]
        d_mtp = lp.mtp - inputs.old_logprobs  # [K, B, T-1]
        tokens = inputs.response_mask.bool() if self.masked else response_block(inputs.response_mask)
        mask = tokens.unsqueeze(0) & lp.mtp_valid.to(tokens.device).unsqueeze(1)  # [K, B, T-1]
        return d_rl, d_mtp, mask

    def _step_deltas(self, inputs: CalibrationInputs):
        missing = [n for n in ("model", "batch", "forward", "objective", "aux_loss") if getattr(inputs, n) is None]
        if missing:
            raise ValueError(
                f"the step proxy needs CalibrationInputs.{', '.join(missing)}: the trainer must pass the model, "
                "the mini-batch and the forward / objective / aux_loss callables (or use proxy='ratio')"
            )
        K = inputs.logprobs.mtp.size(0)
        with rng_untouched(inputs.model):
            shared, g, ms = shared_gradients(inputs, K)
            eta = inputs.lr
            tangents = [{n: eta * g[n] for n in shared}] + [{n: eta * m[n] for n in shared} for m in ms]
            deltas = [self._logprob_change(inputs, shared, t) for t in tangents]
        d_rl, d_mtp = deltas[0].unsqueeze(0), torch.stack(deltas[1:])
        tokens = inputs.response_mask.bool() if self.masked else response_block(inputs.response_mask)
        return d_rl, d_mtp, tokens.unsqueeze(0).expand_as(d_mtp)

    def _logprob_change(self, inputs: CalibrationInputs, shared: dict, tangent: dict) -> torch.Tensor:
        """J @ tangent: the first-order change of the main head's per-token log-probs."""
        if not shared:  # nothing both losses reach (e.g. a fully detached MTP head): no change
            return torch.zeros_like(inputs.logprobs.main)
        main_logprobs = main_logprobs_of(inputs, set(shared))
        # fused SDPA kernels lack forward-mode AD (THEORY.md s.7); the math backend has it
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            if self.finite_difference is None:
                return torch.func.jvp(main_logprobs, (shared,), (tangent,))[1]
            h = self.finite_difference
            with rng_untouched(inputs.model):  # so both sides draw the same dropout masks
                plus = main_logprobs({n: p + h * tangent[n] for n, p in shared.items()})
            minus = main_logprobs({n: p - h * tangent[n] for n, p in shared.items()})
            return (plus - minus) / (2 * h)

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
