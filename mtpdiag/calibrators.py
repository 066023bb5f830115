"""How the ``occ`` regime picks the MTP coefficient lambda_t.

The trainer calls a calibrator once per optimiser mini-batch, before the update,
with :class:`CalibrationInputs`; the calibrator returns one lambda per MTP head.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .losses import AlignedLogprobs


@dataclass
class CalibrationInputs:
    """What a calibrator may read on one mini-batch. Tensors are detached.

    ``logprobs`` are the current log-probs (main head and MTP heads aligned to
    the main positions), ``old_logprobs`` the main head's rollout-time log-probs.
    ``model``, ``batch``, ``forward``, ``objective`` and ``aux_loss`` are there for
    calibrators that need gradients; they must not mutate the model.
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


class FixedLambda(Calibrator):
    """The same lambda on every step and head."""

    def __init__(self, lam: float):
        self.lam = float(lam)
        self.name = f"fixed({self.lam:g})"

    def __call__(self, inputs: CalibrationInputs) -> Calibration:
        K = inputs.logprobs.mtp.size(0)
        return Calibration(torch.full((K,), self.lam))
