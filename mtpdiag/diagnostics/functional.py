"""Functionalisation and isolation: the layer every diagnostic and calibrator stands on.

* :class:`FunctionalModel`: a model and its ``forward(model, batch)`` as a pure
  function of a parameter dict keyed by the model's own parameter names
  (``blocks.0.attn.qkv.weight``); parameters left out keep their current values.
* :func:`isolated`: the context every measurement runs in: eval semantics
  (every module's ``training`` flag restored afterwards), a forked RNG (CPU and
  the model's CUDA devices, so the caller's random stream is unchanged), the
  math attention backend (fused kernels have neither forward-mode AD nor double
  backward) and Hugging Face gradient checkpointing suspended.
* :func:`find_shared`: S, the trainable parameters both losses reach in the autograd graph.
* :func:`function_of`: a loss as a pure function of S, the rest held fixed.
* :func:`values_and_gradients`: values and gradients of several losses from one forward
  (:func:`gradients_of` the backward passes, shared with the trainer's reused gradients).

Nothing here writes to the model, its ``.grad``, its buffers or the RNG.
Under ``torch.distributed`` losses are evaluated as this rank's share of the
whole-batch loss (inside :func:`mtpdiag.distributed.global_means`), and
:func:`values_and_gradients` returns the sums over ranks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import all_reduce_sum, all_reduce_tree, global_means

Params = dict[str, torch.Tensor]
Loss = Callable[..., torch.Tensor]  # loss(outputs, batch) -> scalar tensor


def default_forward(model: nn.Module, batch: dict):
    return model(batch["input_ids"])


def loss_name(fn: Callable) -> str:
    """What error messages call a loss: its function name, else its type's."""
    return getattr(fn, "__name__", None) or type(fn).__name__


class _OnBatch(nn.Module):
    """``forward(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, batch):
        return self.forward_fn(self.model, batch)


class FunctionalModel:
    """``forward(model, batch)`` at parameters of the caller's choosing, keyed by the model's own names.

    ``fm(params, batch)`` runs the forward with ``params`` in place of the
    model's parameters of those names (tied parameters follow, as in
    ``functional_call``); the others, and the buffers, keep their current values.
    """

    _PREFIX = "model."  # where _OnBatch holds the model: an implementation detail no caller sees

    def __init__(self, model: nn.Module, forward: Callable | None = None):
        self.model = model
        self.forward = forward or default_forward
        self._module = _OnBatch(model, self.forward)

    def __call__(self, params: Params, batch: dict):
        return functional_call(self._module, {self._PREFIX + n: t for n, t in params.items()}, (batch,))

    def trainable(self) -> Params:
        """The parameters that require a gradient, in ``named_parameters()`` order (tied ones once)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def split(self, names: Sequence[str]) -> tuple[Params, Params]:
        """(the parameters ``names``, the other trainable ones), both detached."""
        chosen = set(names)
        trainable = self.trainable()
        return (
            {n: p.detach() for n, p in trainable.items() if n in chosen},
            {n: p.detach() for n, p in trainable.items() if n not in chosen},
        )


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's parameters (their RNGs are forked too)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def fork_rng(model: nn.Module):
    """A context after which the CPU RNG and those of the model's CUDA devices are as before."""
    return torch.random.fork_rng(devices=cuda_devices(model))


# the forward hook that transformers' enable_input_require_grads puts on the input embedding
# (gradient checkpointing turns it on; re-enabling it leaves older copies behind, so it is found by name)
_REQUIRE_GRADS_HOOK = "make_inputs_require_grads"


def _require_grads_hooks(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if any(getattr(fn, "__name__", None) == _REQUIRE_GRADS_HOOK for fn in m._forward_hooks.values())
    ]  # fmt: skip


def _checkpointed(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether Hugging Face gradient checkpointing is on anywhere in ``model`` (a layer's
    ``gradient_checkpointing`` flag, or the input-embedding hook it installs)."""
    return bool(_checkpointed(model) or _require_grads_hooks(model))


@contextmanager
def checkpointing_suspended(model: nn.Module) -> Iterator[None]:
    """Hugging Face gradient checkpointing off inside, restored on exit.

    Both of its pieces break torch.func's forward-over-reverse products: the
    input-embedding hook calls ``requires_grad_`` on an activation, which a
    transform rejects, and checkpointed layers run under saved-tensor hooks,
    which transforms do not support. Checkpointing changes memory, not values,
    so a measurement without it is the same function."""
    flagged = _checkpointed(model)
    hooked = {m: dict(m._forward_hooks) for m in _require_grads_hooks(model)}
    for module in flagged:
        module.gradient_checkpointing = False
    for module, hooks in hooked.items():
        for key, fn in hooks.items():
            if getattr(fn, "__name__", None) == _REQUIRE_GRADS_HOOK:
                del module._forward_hooks[key]
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True
        for module, hooks in hooked.items():
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)


def checkpointing_error(err: RuntimeError) -> RuntimeError | None:
    """The error naming the fix when a measurement failed on activation checkpointing that
    :func:`checkpointing_suspended` cannot turn off (``torch.utils.checkpoint`` in a model's own
    code: its recomputation does not see the parameters ``functional_call`` swaps in, and torch.func
    transforms reject its saved-tensor hooks), else None."""
    from torch.utils.checkpoint import CheckpointError

    text = str(err)
    if not isinstance(err, CheckpointError) and "saved tensor hooks" not in text and "requires_grad_()" not in text:
        return None
    return RuntimeError(
        f"the measurement met activation checkpointing inside the model ({text.strip().splitlines()[0]}), which "
        "mtpdiag only suspends for Hugging Face's gradient_checkpointing: turn it off while measuring"
    )


@contextmanager
def isolated(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Forked RNG, math attention and no gradient checkpointing (:func:`checkpointing_suspended`);
    with ``eval_mode`` also eval semantics (dropout
    off), every module's ``training`` flag restored afterwards. ``eval_mode=False``
    keeps the caller's mode (the step proxy measures the trainer's own forward);
    a buffer a forward updated there (BatchNorm's running statistics) gets its old
    values back. Buffers that did not change are not written, so a graph the caller
    holds through them stays valid."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    if eval_mode:
        model.eval()
    try:
        with fork_rng(model), sdpa_kernel(SDPBackend.MATH), checkpointing_suspended(model):
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and not torch.equal(b, buffers[name]):
                    b.copy_(buffers[name])


def checked_value(loss: Loss, outputs, batch: dict) -> torch.Tensor:
    """``loss(outputs, batch)`` as this rank's share of the whole-batch loss; a clear error unless a scalar tensor."""
    with global_means():
        value = loss(outputs, batch)
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise ValueError(
            f"{loss_name(loss)} must return a scalar tensor, got {type(value).__name__} {getattr(value, 'shape', '')}"
        )
    return value


def reached_by(fm: FunctionalModel, loss: Loss, batch: dict) -> set[str]:
    """Names of the trainable parameters ``loss`` reaches in the autograd graph of ``fm``'s forward."""
    params = {n: p.detach().requires_grad_() for n, p in fm.trainable().items()}
    with torch.enable_grad():
        value = checked_value(loss, fm(params, batch), batch)
        if not value.requires_grad:
            return set()
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {n for n, grad in zip(params, grads) if grad is not None}


def find_shared(fm: FunctionalModel, objective: Loss, aux_loss: Loss, batch: dict) -> list[str]:
    """S: the trainable parameters that both ``objective`` and ``aux_loss`` reach, in
    ``named_parameters()`` order. Structural reachability: a parameter connected to
    both losses counts even where one gradient is numerically zero on this batch.
    Runs :func:`isolated`."""
    with isolated(fm.model):
        reached = [reached_by(fm, objective, batch), reached_by(fm, aux_loss, batch)]
    shared = [n for n in fm.trainable() if all(n in r for r in reached)]
    if not shared:
        raise ValueError(
            f"the objective ({loss_name(objective)}) and aux_loss ({loss_name(aux_loss)}) reach no common "
            f"trainable parameter, so there is no shared set S to measure on (a fully detached MTP head?). "
            f"Pass shared=<list of names> or shared=<predicate>, e.g. names found with a joint forward."
        )
    return shared


def function_of(
    fm: FunctionalModel, loss: Loss, batch: dict, fixed: Params, summed: bool = False
) -> Callable[[Params], torch.Tensor]:
    """``loss`` on ``batch`` at (the argument's parameters, ``fixed`` for the others) as
    a pure function of the argument; ``summed``: the whole-batch value (summed over
    ranks), not this rank's share."""

    def f(shared: Params) -> torch.Tensor:
        value = checked_value(loss, fm({**fixed, **shared}, batch), batch)
        return all_reduce_sum(value) if summed else value

    return f


def gradients_of(values: Sequence[torch.Tensor], leaves: Params, retain_graph: bool) -> list[dict]:
    """The gradient of each of ``values`` with respect to ``leaves`` (None where a value does
    not reach a leaf), one backward each over their shared graph, kept after the last with
    ``retain_graph``. The trainer's reused gradients and the Probe's own come from here, so
    the two are the same computation."""
    grads = []
    for i, value in enumerate(values):
        if not value.requires_grad:
            grads.append(dict.fromkeys(leaves))
            continue
        grad = torch.autograd.grad(
            value, list(leaves.values()), retain_graph=retain_graph or i < len(values) - 1, allow_unused=True
        )
        grads.append(dict(zip(leaves, grad)))
    return grads


def values_and_gradients(
    fm: FunctionalModel, losses: Sequence[Loss], batch: dict, params: Params, fixed: Params,
    then: Callable[[Params, object], None] | None = None,
) -> tuple[list[torch.Tensor], list[Params]]:
    """Values of several losses of the same outputs and their gradients with respect to
    ``params`` (``fixed`` held): one forward, one backward per loss; both summed over
    ranks. A loss that does not read ``params`` (a detached MTP head) has a zero gradient.
    ``then(leaves, outputs)`` runs last on the same forward's graph (kept for it), e.g. to
    build a Hessian's first-order graph without another forward."""
    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    with torch.enable_grad():
        outputs = fm({**fixed, **leaves}, batch)
        values = [checked_value(loss, outputs, batch) for loss in losses]
        found = gradients_of(values, leaves, retain_graph=then is not None)
        grads = [{k: torch.zeros_like(params[k]) if t is None else t for k, t in grad.items()} for grad in found]
        if then is not None:
            then(leaves, outputs)
    values = all_reduce_sum(torch.stack([v.detach() for v in values])).unbind()
    return list(values), [all_reduce_tree(grad) for grad in grads]


def check_finite(grad: Params, role: str, loss: Loss) -> None:
    """A clear error naming the loss when its gradient has inf or nan entries."""
    bad = [n for n, t in grad.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(
            f"the gradient of the {role} ({loss_name(loss)}) has non-finite entries in {bad[:5]}"
            f"{' and more' if len(bad) > 5 else ''}: check that loss for inf/nan (log of 0, overflow in float16)"
        )
