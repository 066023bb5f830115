"""The gradients one update is made of, taken once and shared by the trainer, its calibrator and the Probe.

The trainer's loss on a mini-batch is -objective + aux_loss(lambda). One backward over that
sum gives the update but not g and m apart, so a Probe or a gradient-reading calibrator
would run its own forward and backward passes to get them. :meth:`UpdateGradients.take`
instead takes, over the trainer's own forward, one backward of the objective and one of
aux_loss at head weight +1 (plus the ones a measurement asks for: head weight -1, each
head alone, the trained weights), and the trainer steps on :meth:`UpdateGradients.update`,
the same combination the Probe replays (:class:`~.probe.Probe` ``gradients=``), so the
measured step is the trained one bit for bit. The update differs from the one backward over
the sum by rounding only: the two sum the same terms in another order.

Reuse is exact only where the trainer's forward is the function the Probe differentiates:
the Probe runs eval semantics and math attention, so a model whose training-mode forward
differs (dropout, batch statistics: :func:`training_differs`) keeps the one backward and
the Probe takes its own gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum, all_reduce_tree
from .functional import Params, gradients_of

# Hugging Face config fields of an attention dropout applied functionally (no nn.Dropout module)
ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def training_differs(model: nn.Module) -> str | None:
    """Why ``model``'s training-mode forward may differ from its eval-mode forward (what the
    Probe differentiates), or None: a dropout with p > 0, a batch norm, an attention dropout
    in a Hugging Face config."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{where} is a dropout with p={module.p:g}"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{where} is a batch norm (batch statistics in training)"
        config = getattr(module, "config", None)
        for key in ATTENTION_DROPOUT_FIELDS:
            value = getattr(config, key, 0.0)
            if isinstance(value, (int, float)) and value > 0:
                return f"{where}'s config has {key}={value:g}"
    return None


def trained_weights(lambdas) -> torch.Tensor | None:
    """The trained lambda (a scalar or one per head) as a 1-D float64 tensor (None: not known)."""
    if lambdas is None:
        return None
    weights = torch.as_tensor(lambdas, dtype=torch.float64).detach().cpu().reshape(-1)
    if weights.numel() == 0 or not torch.isfinite(weights).all():
        raise ValueError(f"lambdas={lambdas!r}: pass the trained MTP coefficient, a finite scalar or one per head")
    return weights


def _weight_of(trained: torch.Tensor) -> float | None:
    """The one head weight of ``trained`` (the trained lambdas, 1-D float64), None where heads differ."""
    first = trained[0]
    return first.item() if bool((trained == first).all()) else None


def needs_trained_aux(trained: torch.Tensor, sign_dependent: bool, has_minus: bool) -> bool:
    """Whether the update at head weights ``trained`` needs the aux gradient at those weights:
    where heads differ, or at a negative weight of a sign-dependent aux loss without its
    gradient at -1; elsewhere aux_loss(lambda) = lambda aux_loss(1) (or |lambda| aux_loss(-1))."""
    weight = _weight_of(trained)
    return weight is None or (weight < 0 and sign_dependent and not has_minus)


@dataclass
class UpdateGradients:
    """First derivatives of one mini-batch's losses at the parameters the update starts from,
    keyed by parameter name, summed over ranks: ``g`` = grad objective, ``aux`` = grad
    aux_loss at head weight +1 (G+, so m = -aux), ``aux_minus`` at head weight -1 (G-, where
    the aux loss depends on the sign), ``aux_heads`` per head alone (K > 1 heads), and
    ``aux_trained`` at the trained head weights where the update needs it
    (:func:`needs_trained_aux`). ``value`` is the objective's whole-batch value. ``reached``
    names the parameters some loss reaches (the others get no ``.grad``). ``source``:
    ``"trainer"`` (its backward passes) or ``"probe"``."""

    value: torch.Tensor
    g: Params
    aux: Params
    aux_minus: Params | None = None
    aux_heads: list[Params] | None = None
    aux_trained: Params | None = None
    reached: frozenset[str] | None = None
    source: str = "probe"

    @property
    def m(self) -> Params:
        return {n: -t for n, t in self.aux.items()}

    def head(self, k: int) -> Params:
        """The aux gradient of head ``k`` alone (with one head, ``aux``)."""
        return self.aux if self.aux_heads is None else self.aux_heads[k]

    def at(self, lam: float, names) -> Params:
        """The gradient of -objective + aux_loss(lam) on ``names``: aux_loss is positively
        homogeneous in lambda, so lam G+ above 0 and |lam| G- below (where G- is known)."""
        if lam < 0 and self.aux_minus is not None:
            aux, weight = self.aux_minus, -lam
        else:
            aux, weight = self.aux, lam
        return {n: weight * aux[n] - self.g[n] for n in names}

    def update(self, trained: torch.Tensor, names) -> Params:
        """The gradient the trainer steps on at head weights ``trained`` (1-D), on ``names``."""
        if self.aux_trained is not None:
            return {n: self.aux_trained[n] - self.g[n] for n in names}
        weight = _weight_of(trained)
        if weight is None:
            raise ValueError("the trained head weights differ by head: take aux_trained first (with_trained)")
        return self.at(weight, names)

    @classmethod
    def take(
        cls, objective: torch.Tensor, aux: torch.Tensor, parameters: Params, *, aux_minus: torch.Tensor | None = None,
        aux_heads: list[torch.Tensor] | None = None,
    ) -> "UpdateGradients":
        """The trainer's backward passes over its one forward: ``objective`` and ``aux`` (head
        weight +1) and the optional ``aux_minus`` (head weight -1) and ``aux_heads`` (each
        head alone) are this rank's shares of the losses, with graphs to ``parameters`` (the
        trainable ones by name). The graph is kept for :meth:`with_trained`."""
        values = [objective, aux, *([aux_minus] if aux_minus is not None else []), *(aux_heads or [])]
        found = gradients_of(values, parameters, retain_graph=True)
        reached = frozenset(n for grads in found for n, grad in grads.items() if grad is not None)
        g, G, *rest = [cls._summed(grads, parameters) for grads in found]
        minus = rest.pop(0) if aux_minus is not None else None
        return cls(all_reduce_sum(objective.detach()), g, G, minus, rest or None, None, reached, "trainer")

    def with_trained(self, aux_trained: torch.Tensor, parameters: Params) -> None:
        """Adds the aux gradient at the trained head weights (``aux_trained``: this rank's
        share of aux_loss at them, on the same forward); frees the forward's graph."""
        (grads,) = gradients_of([aux_trained], parameters, retain_graph=False)
        self.aux_trained = self._summed(grads, parameters)

    def set_grad(self, parameters: Params, lambdas, aux_at_lambdas: torch.Tensor, sign_dependent: bool) -> None:
        """Sets ``.grad`` of every reached parameter of ``parameters`` (the trainable ones by
        name) to the gradient of -objective + aux_loss(``lambdas``), assembled as the Probe
        replays it; ``aux_at_lambdas`` (this rank's aux_loss at ``lambdas`` on the same
        forward) is differentiated only where :func:`needs_trained_aux` says so."""
        trained = trained_weights(lambdas)
        if needs_trained_aux(trained, sign_dependent, self.aux_minus is not None):
            self.with_trained(aux_at_lambdas, parameters)
        for name, grad in self.update(trained, [n for n in parameters if n in self.reached]).items():
            parameters[name].grad = grad

    @staticmethod
    def _summed(grads: dict, parameters: Params) -> Params:
        """Zeros where the loss does not reach a parameter, summed over ranks."""
        return all_reduce_tree({n: torch.zeros_like(parameters[n]) if t is None else t for n, t in grads.items()})
