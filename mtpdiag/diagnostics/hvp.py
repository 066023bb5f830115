"""Exact Hessian-vector products of a scalar function of a parameter dict.

Directions and gradients are dicts ``{name: tensor}`` shaped like the parameters;
:class:`HessianOperator` is the same Hessian as a scipy ``LinearOperator`` on flat
float64 vectors (what :func:`top_curvature` and any other scipy solver run on).
Two ways to apply the Hessian (docs/theory.md s.7):

* ``fwd_rev``: forward-mode derivative of the gradient (``torch.func.jvp`` over
  ``torch.func.grad``); each product re-runs forward and backward.
* ``rev_rev``: reverse-mode derivative of the gradient (double backward with
  ``torch.autograd``); the first-order graph is built once and kept, and each
  product is one extra backward pass, the cheaper mode for many products
  (Lanczos), at the memory cost of the kept graph.

Both run under the math attention backend, because fused scaled-dot-product
attention kernels have neither forward-mode AD nor double backward.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..distributed import all_reduce_sum, all_reduce_tree
from .functional import Params

HVP_MODES = ("fwd_rev", "rev_rev")

ATTENTION_FIX = (
    "use an attention written out with softmax(QK^T)V: GPTConfig(attention='math') for mtpdiag's GPT, "
    "attn_implementation='eager' for a transformers model"
)


def tree_dot(a: Params, b: Params) -> torch.Tensor:
    """<a, b> summed over every tensor of two same-keyed dicts.

    Every inner product and norm the toolkit reports goes through here. Under
    data parallelism the parameters are replicated and the gradients already
    summed over ranks (``HessianAt(across_ranks=True)``), so no reduction is
    needed; a model whose parameters are sharded across ranks would need one
    all-reduce (sum) added at this point.
    """
    return sum((x * b[k]).sum() for k, x in a.items())


def flatten(tree: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    pieces = vector.split([t.numel() for t in like.values()])
    return {k: p.view_as(t) for (k, t), p in zip(like.items(), pieces)}


# torch's own words (2.4-2.13) when forward mode meets an operation it cannot differentiate:
# an aten op without a forward-AD formula, an autograd.Function without jvp, and an
# old-style autograd.Function (no setup_context) under torch.func. rev_rev runs all three.
MISSING_FORWARD_AD = (
    "Trying to use forward AD with ",
    "You must implement the jvp function for custom autograd.Function to use it with forward mode AD",
    "In order to use an autograd.Function with functorch transforms",
)
# the tail of an error that torch raised because an interrupt arrived inside it (e.g. the
# TorchScript interpreter running a forward-AD decomposition: "RuntimeError: KeyboardInterrupt")
INTERRUPTED = "KeyboardInterrupt"


def lacks_forward_ad(err: BaseException) -> bool:
    """True for torch's error for a missing forward-mode formula only (the first line,
    matched as torch words it): any other failure, an interrupt's included, is not a
    reason to switch modes."""
    first = str(err).splitlines()[0] if str(err) else ""
    return isinstance(err, (NotImplementedError, RuntimeError)) and first.startswith(MISSING_FORWARD_AD)


def raise_if_interrupted(err: BaseException) -> None:
    """Re-raise an error that an interrupt caused inside torch as the KeyboardInterrupt it is."""
    if isinstance(err, RuntimeError) and INTERRUPTED in str(err):
        raise KeyboardInterrupt(str(err).splitlines()[0]) from err


class HessianAt:
    """The Hessian of ``f`` at ``params``, applied to directions; also f's value and gradient there.

    ``mode`` is the path that runs: ``fwd_rev`` or ``rev_rev``. When forward mode
    meets an operation without a forward-mode derivative, the object switches to
    ``rev_rev``: ``mode`` then reads ``"rev_rev"`` and ``fallback`` holds the reason
    (the first line of the error), else None. ``n_products`` counts
    Hessian-vector products. :meth:`operator` gives the scipy ``LinearOperator``.

    ``across_ranks=True``: ``f`` is this rank's share of a function summed over the
    ranks of a process group (see :mod:`mtpdiag.distributed`); value, gradient and
    products are then all-reduced, so every rank holds those of the sum. Every
    rank must make the same calls.

    Caveat of ``rev_rev``: a custom ``autograd.Function`` whose backward is not
    itself differentiable (marked ``once_differentiable``, or computed by a
    kernel outside autograd) cuts the second-order graph, and autograd then
    silently drops those terms; ``fwd_rev`` refuses such functions instead.
    """

    def __init__(
        self, f: Callable[[Params], torch.Tensor], params: Params, mode: str = "fwd_rev", across_ranks: bool = False
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={mode!r}: choose one of {HVP_MODES}")
        self.f = f
        self.params = params
        self.mode = mode
        self.fallback: str | None = None
        self.across_ranks = across_ranks
        self.n_products = 0
        self._value: torch.Tensor | None = None
        self._grad: Params | None = None
        self._leaves: Params | None = None
        self._grad_graph: tuple[torch.Tensor, ...] | None = None

    def operator(self) -> "HessianOperator":
        """This Hessian as a scipy ``LinearOperator`` on flat float64 vectors."""
        return HessianOperator(self)

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            self._first_order()
        return self._value

    @property
    def grad(self) -> Params:
        if self._grad is None:
            self._first_order()
        return self._grad

    def __call__(self, direction: Params) -> Params:
        with sdpa_kernel(SDPBackend.MATH):
            if self.mode == "fwd_rev":
                try:
                    (grad, value), (product, _) = torch.func.jvp(
                        torch.func.grad_and_value(self.f), (self.params,), (direction,)
                    )
                except (NotImplementedError, RuntimeError) as err:
                    raise_if_interrupted(err)
                    if not lacks_forward_ad(err):
                        raise
                    self.mode, self.fallback = "rev_rev", str(err).splitlines()[0]
                    return self(direction)
                if self._grad is None:
                    self._grad, self._value = self._summed(grad), self._summed(value)
            else:
                product = self._reverse(direction)
        self.n_products += 1
        return self._summed(product)

    def products(self, directions: list[Params]) -> list[Params]:
        """H v for several directions, the same products as one call each. ``fwd_rev`` runs them
        in one pass, ``torch.func.vmap`` over the tangents (forward and backward of f shared);
        ``rev_rev`` runs one double backward each over the kept graph (a batched double
        backward, ``is_grads_batched``, measured slower on the GPT under torch 2.13)."""
        if len(directions) == 1 or self.mode == "rev_rev":
            return [self(direction) for direction in directions]
        stacked = {k: torch.stack([d[k] for d in directions]) for k in self.params}

        def product(tangent):
            return torch.func.jvp(torch.func.grad_and_value(self.f), (self.params,), (tangent,))

        try:
            with sdpa_kernel(SDPBackend.MATH):
                (grad, value), (batched, _) = torch.func.vmap(product, randomness="same")(stacked)
        except (NotImplementedError, RuntimeError) as err:
            raise_if_interrupted(err)
            if not lacks_forward_ad(err):
                raise
            self.mode, self.fallback = "rev_rev", str(err).splitlines()[0]
            return self.products(directions)
        if self._grad is None:  # the primal is the same in every batch entry
            self._grad = self._summed({k: t[0] for k, t in grad.items()})
            self._value = self._summed(value[0])
        self.n_products += len(directions)
        batched = self._summed(batched)
        return [{k: t[i] for k, t in batched.items()} for i in range(len(directions))]

    def _summed(self, x):
        """``x`` (a tensor or a dict of them) summed over ranks when ``across_ranks``."""
        if not self.across_ranks:
            return x
        return all_reduce_tree(x) if isinstance(x, dict) else all_reduce_sum(x)

    def _first_order(self) -> None:
        if self.mode == "fwd_rev":
            with sdpa_kernel(SDPBackend.MATH):
                grad, value = torch.func.grad_and_value(self.f)(self.params)
            self._grad, self._value = self._summed(grad), self._summed(value)
        else:
            self._build_reverse()

    def _build_reverse(self) -> None:
        # plain autograd, not torch.func: it also differentiates old-style autograd.Functions
        leaves = {k: t.detach().requires_grad_() for k, t in self.params.items()}
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            self.adopt(leaves, self.f(leaves))

    def adopt(self, leaves: Params, value: torch.Tensor) -> None:
        """For ``rev_rev``: take ``value`` = f(``leaves``), computed by the caller on a forward it
        shares (leaves: detached copies of ``params`` that require grad), as the point's value
        and build the gradient's graph from it, instead of running f's forward again."""
        if self.mode != "rev_rev":
            raise ValueError(f"adopt builds the graph of rev_rev products; this HessianAt runs {self.mode}")
        with torch.enable_grad():
            if value.requires_grad:
                grads = torch.autograd.grad(
                    value, list(leaves.values()), create_graph=True, allow_unused=True, materialize_grads=True
                )
            else:  # f does not read these parameters: zero gradient, zero Hessian
                grads = tuple(torch.zeros_like(t) for t in leaves.values())
        self._leaves, self._grad_graph = leaves, grads
        self._grad = self._summed({k: g.detach() for k, g in zip(leaves, grads)})
        self._value = self._summed(value.detach())

    def _reverse(self, direction: Params) -> Params:
        if self._grad_graph is None:
            self._build_reverse()
        # a gradient entry that does not depend on the parameters (f linear there) has a zero Hessian row
        pairs = [(g, direction[k]) for k, g in zip(self._leaves, self._grad_graph) if g.requires_grad]
        if not pairs:
            return {k: torch.zeros_like(t) for k, t in self.params.items()}
        try:
            products = torch.autograd.grad(
                [g for g, _ in pairs], list(self._leaves.values()), grad_outputs=[d for _, d in pairs],
                retain_graph=True, allow_unused=True, materialize_grads=True,
            )
        except (NotImplementedError, RuntimeError) as err:
            raise_if_interrupted(err)
            raise RuntimeError(
                f"exact Hessian-vector products need double backward through every operation of the model, "
                f"and one lacks it ({str(err).splitlines()[0]}). If it is attention: {ATTENTION_FIX}."
            ) from err
        return dict(zip(self._leaves, products))


class HessianOperator(LinearOperator):
    """A :class:`HessianAt` as a scipy ``LinearOperator``: flat float64 vectors in and
    out, in the order of ``hessian.params``; ``-op`` is -H. Each ``matvec`` is one
    Hessian-vector product in the parameters' own dtype and device."""

    def __init__(self, hessian: HessianAt):
        self.hessian = hessian
        n = sum(t.numel() for t in hessian.params.values())
        super().__init__(dtype=np.float64, shape=(n, n))

    def _matvec(self, vector: np.ndarray) -> np.ndarray:
        like = self.hessian.params
        some = next(iter(like.values()))
        direction = unflatten(torch.as_tensor(np.ravel(vector), dtype=some.dtype, device=some.device), like)
        return flatten(self.hessian(direction)).detach().to("cpu", torch.float64).numpy()

    def _adjoint(self) -> "HessianOperator":
        return self  # a Hessian is symmetric


def top_curvature(hessian: HessianAt, tol: float = 1e-6, dense_below: int = 64) -> float:
    """L = the largest eigenvalue of -H (docs/theory.md s.3), in float64.

    With fewer than ``dense_below`` coordinates the Hessian is materialised one
    column per product and solved exactly (ARPACK needs more coordinates than
    Lanczos vectors); otherwise ARPACK Lanczos (scipy ``eigsh``, largest
    algebraic) runs on the operator -H.
    """
    minus_h = -hessian.operator()
    n = minus_h.shape[0]
    if n < dense_below:
        columns = np.stack([minus_h.matvec(e) for e in np.eye(n)], axis=1)
        return float(eigh((columns + columns.T) / 2, eigvals_only=True)[-1])
    # a fixed start vector from a private generator: reproducible, and numpy's global RNG is left alone
    start = np.random.default_rng(0).standard_normal(n)
    try:
        return float(eigsh(minus_h, k=1, which="LA", tol=tol, v0=start, return_eigenvectors=False)[0])
    except ArpackError:
        # ARPACK stops ("starting vector is zero") when H maps its random start
        # vector to 0, i.e. H = 0 (a batch whose advantages are all 0 has a flat
        # objective); then every eigenvalue is 0
        if not np.any(minus_h.matvec(start)):
            return 0.0
        raise
