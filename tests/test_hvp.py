"""HessianAt (both paths, the fallback), HessianOperator and top_curvature against a
materialised Hessian (torch.autograd.functional.hessian, float64)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator

from mtpdiag.diagnostics.hvp import (HVP_MODES, HessianAt, HessianOperator, flatten, lacks_forward_ad, top_curvature,
                                   unflatten)


def small_problem(n_in=3, n_hidden=4, seed=0):
    """f(W, w, ln) = mean(tanh(LayerNorm(x W^T; ln)) w)^2: a LayerNorm weight crossed
    with its input, where torch.func.hessian gets the cross terms wrong in torch 2.13."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, n_in, generator=generator, dtype=torch.float64)
    params = {
        "W": torch.randn(n_hidden, n_in, generator=generator, dtype=torch.float64),
        "ln": 1 + 0.1 * torch.randn(n_hidden, generator=generator, dtype=torch.float64),
        "w": torch.randn(n_hidden, generator=generator, dtype=torch.float64),
    }

    def f(p):
        h = F.layer_norm(x @ p["W"].T, (n_hidden,), weight=p["ln"])
        return (torch.tanh(h) @ p["w"]).pow(2).mean()

    def flat_f(vector):
        return f(unflatten(vector, params))

    H = torch.autograd.functional.hessian(flat_f, flatten(params))
    return f, params, H


@pytest.mark.parametrize("mode", HVP_MODES)
def test_products_value_and_gradient_match_the_materialised_hessian(mode):
    f, params, H = small_problem()
    hessian = HessianAt(f, params, mode)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    product = hessian(unflatten(v, params))
    assert list(product) == list(params) and hessian.n_products == 1
    torch.testing.assert_close(flatten(product), H @ v, rtol=1e-10, atol=1e-12)
    assert hessian.value.item() == pytest.approx(f(params).item(), rel=1e-14)
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    expected = torch.autograd.grad(f(leaves), list(leaves.values()))
    torch.testing.assert_close(flatten(hessian.grad), torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12, atol=0)
    assert (hessian.mode, hessian.fallback) == (mode, None)


def test_the_operator_is_the_hessian_as_a_scipy_linear_operator():
    f, params, H = small_problem()
    hessian = HessianAt(f, params, "rev_rev")
    operator = hessian.operator()
    assert isinstance(operator, LinearOperator) and isinstance(operator, HessianOperator)
    n = H.shape[0]
    assert operator.shape == (n, n) and operator.dtype == np.float64
    X = np.random.default_rng(0).standard_normal((n, 3))
    np.testing.assert_allclose(operator.matmat(X), H.numpy() @ X, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(operator.rmatvec(X[:, 0]), H.numpy() @ X[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((-operator).matvec(X[:, 1]), -(H.numpy() @ X[:, 1]), rtol=1e-10, atol=1e-12)
    assert hessian.n_products == 5


@pytest.mark.parametrize("n_hidden, dense_below", [(4, 64), (24, 64)], ids=["dense", "lanczos"])
def test_top_curvature_is_the_largest_eigenvalue_of_minus_h(n_hidden, dense_below):
    f, params, H = small_problem(n_hidden=n_hidden)
    n = H.shape[0]
    assert (n < dense_below) == (n_hidden == 4)
    top = torch.linalg.eigvalsh(-H)[-1].item()
    assert top_curvature(HessianAt(f, params, "rev_rev"), dense_below=dense_below) == pytest.approx(top, rel=1e-6)


def test_top_curvature_of_a_flat_function_is_zero():
    params = {"x": torch.randn(80, dtype=torch.float64)}
    assert top_curvature(HessianAt(lambda p: p["x"].sum(), params, "rev_rev")) == 0.0


class NoForwardMode(torch.autograd.Function):
    """x^2 with a differentiable backward and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_forward_mode_failure_switches_to_rev_rev_with_the_reason_in_its_own_field():
    params = {"x": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}

    def f(p):
        return NoForwardMode.apply(p["x"]).pow(2).sum()  # x^4: H = diag(12 x^2)

    hessian = HessianAt(f, params, "fwd_rev")
    product = hessian({"x": torch.ones(3, dtype=torch.float64)})
    torch.testing.assert_close(product["x"], 12 * params["x"] ** 2, rtol=1e-14, atol=0)
    assert hessian.mode == "rev_rev"
    assert hessian.fallback and "jvp" in hessian.fallback and "\n" not in hessian.fallback
    hessian({"x": torch.ones(3, dtype=torch.float64)})
    assert hessian.n_products == 2 and hessian.mode == "rev_rev"


def test_a_mode_label_is_not_a_mode():
    params = {"x": torch.ones(2, dtype=torch.float64)}
    for bad in ("finite_differences", "rev_rev (fallback: no jvp)"):
        with pytest.raises(ValueError, match="choose one of \\('fwd_rev', 'rev_rev'\\)"):
            HessianAt(lambda p: p["x"].sum(), params, bad)


class NoJvp(torch.autograd.Function):
    """A new-style Function (setup_context) without a jvp: torch.func runs it, forward AD cannot."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def torch_error(f) -> BaseException:
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises((NotImplementedError, RuntimeError)) as info:
        torch.func.jvp(f, (x,), (x,))
    return info.value


# what torch raised when Ctrl-C arrived inside a forward-AD decomposition (issue 10, abridged)
INTERRUPTED_IN_TORCHSCRIPT = (
    "The following operation failed in the TorchScript interpreter.\n"
    "Traceback of TorchScript (most recent call last):\n"
    '  File ".../torch/_decomp/decompositions_for_jvp.py", line 165, in aten::native_layer_norm_backward\n'
    "    mean_, rstd_ = recompute_mean_var(input, rstd, inner_dim_indices, keepdim=True)\n"
    "RuntimeError: KeyboardInterrupt: <EMPTY MESSAGE>\n"
)


def test_only_a_missing_forward_ad_formula_falls_back():
    # torch's own errors: an aten op without a forward-AD formula, Functions without jvp (new and old style)
    assert lacks_forward_ad(torch_error(lambda t: torch.cdist(t.view(1, 3, 1), t.view(1, 3, 1) + 1).sum()))
    assert lacks_forward_ad(torch_error(lambda t: NoJvp.apply(t).sum()))
    assert lacks_forward_ad(torch_error(lambda t: NoForwardMode.apply(t).sum()))
    # errors that merely mention jvp or forward AD are not a missing formula
    assert not lacks_forward_ad(RuntimeError(INTERRUPTED_IN_TORCHSCRIPT))
    assert not lacks_forward_ad(RuntimeError("shape mismatch in jvp of my layer (forward AD)"))
    assert not lacks_forward_ad(NotImplementedError("my kernel is not written yet"))


def test_an_interrupt_inside_the_hvp_interrupts_and_never_falls_back():
    params = {"x": torch.ones(2, dtype=torch.float64)}

    def interrupted(p):
        raise RuntimeError(INTERRUPTED_IN_TORCHSCRIPT)

    hessian = HessianAt(interrupted, params, "fwd_rev")  # the TorchScript decompositions are forward mode's
    with pytest.raises(KeyboardInterrupt):
        hessian({"x": torch.ones(2, dtype=torch.float64)})
    assert hessian.mode == "fwd_rev" and hessian.fallback is None

    def broken(p):
        raise RuntimeError("a bug that mentions jvp")

    with pytest.raises(RuntimeError, match="a bug that mentions jvp"):  # raised as it is, no silent switch
        HessianAt(broken, params, "fwd_rev")({"x": torch.ones(2, dtype=torch.float64)})


@pytest.mark.parametrize("mode", HVP_MODES)
def test_batched_products_match_the_materialised_hessian_column_for_column(mode):
    """``products`` (vmap over forward-mode tangents, or one double backward each) is H v
    for each direction, also for a parameter f does not read (a zero row of H)."""
    f, params, H = small_problem()
    unused = {**params, "unused": torch.ones(2, dtype=torch.float64)}
    generator = torch.Generator().manual_seed(4)
    vectors = [torch.randn(H.shape[0] + 2, generator=generator, dtype=torch.float64) for _ in range(3)]
    hessian = HessianAt(f, unused, mode)
    products = hessian.products([unflatten(v, unused) for v in vectors])
    assert hessian.n_products == 3 and (hessian.mode, hessian.fallback) == (mode, None)
    for v, product in zip(vectors, products):
        assert list(product) == list(unused)
        expected = torch.cat([H @ v[: H.shape[0]], torch.zeros(2, dtype=torch.float64)])
        torch.testing.assert_close(flatten(product), expected, rtol=1e-10, atol=1e-12)
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    expected = torch.autograd.grad(f(leaves), list(leaves.values()))
    torch.testing.assert_close(flatten({k: hessian.grad[k] for k in params}), torch.cat([g.reshape(-1) for g in expected]),
                               rtol=1e-12, atol=0)
    assert hessian.value.item() == pytest.approx(f(params).item(), rel=1e-14)


def test_batched_products_without_forward_mode_switch_to_rev_rev_with_the_reason():
    params = {"x": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}

    def f(p):
        return NoForwardMode.apply(p["x"]).pow(2).sum()  # x^4: H = diag(12 x^2)

    hessian = HessianAt(f, params, "fwd_rev")
    ones, basis = torch.ones(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[1]
    along_ones, along_basis = hessian.products([{"x": ones}, {"x": basis}])
    torch.testing.assert_close(along_ones["x"], 12 * params["x"] ** 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(along_basis["x"], 12 * params["x"] ** 2 * basis, rtol=1e-14, atol=0)
    assert hessian.mode == "rev_rev" and "jvp" in hessian.fallback and hessian.n_products == 2
