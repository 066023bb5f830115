"""The lambda grid, the quadratic fit, the refined search, and both curves on hand-checkable problems."""
import copy

import numpy as np
import pytest
import torch

from mtpdiag.diagnostics import GRID_MULTIPLIERS, curves


def test_given_grid_is_sorted_and_distinct_and_needs_three_values():
    np.testing.assert_array_equal(curves.given_grid([1, -1, 0, 1]), [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="at least 3 distinct"):
        curves.given_grid([0.0, 1.0, 1.0])


def test_default_grid_scales_the_multipliers():
    np.testing.assert_array_equal(curves.default_grid(None, None, 2.0, 4.0, 1.0, 1e-16), 0.5 * GRID_MULTIPLIERS)
    np.testing.assert_array_equal(curves.default_grid(None, None, 0.0, 4.0, 1.0, 1e-16), GRID_MULTIPLIERS)
    np.testing.assert_array_equal(curves.default_grid(-2.0, 1.0, 1.0, 1.0, 1.0, 1e-16), 2.0 * GRID_MULTIPLIERS)
    # a lambda* at 0 still gets a grid where b lambda^2 stands 1e4 times above the objective's rounding
    eps = np.finfo(np.float32).eps
    grid = curves.default_grid(0.0, 1e-6, 1.0, 1.0, 3.0, eps)
    assert 1e-6 * grid.max() ** 2 == pytest.approx(9 * 1e4 * eps * 3.0)


def test_quadratic_fit_recovers_a_parabola_and_its_argmax():
    grid = np.linspace(-1.0, 3.0, 9)
    fit, r2, argmax = curves.quadratic_fit(grid, -2.0 * grid**2 + 3.0 * grid + 0.5)
    np.testing.assert_allclose(fit, [-2.0, 3.0, 0.5], rtol=1e-12, atol=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12) and argmax == pytest.approx(0.75, rel=1e-12)
    assert curves.quadratic_fit(grid, grid**2)[2] is None  # convex: no argmax
    assert curves.quadratic_fit(grid, np.zeros_like(grid))[1] is None  # constant: R^2 undefined


def test_measure_curve_refines_the_argmax_and_counts_every_evaluation():
    calls = []

    def delta(lam):
        calls.append(lam)
        return float(np.sin(lam))  # not a parabola: the search, not the fit, finds pi/2

    grid = np.linspace(0.0, 3.0, 7)
    curve = curves.measure_curve("sgd", delta, grid)
    assert curve.kind == "sgd" and curve.n_evaluations == len(calls)
    np.testing.assert_array_equal(curve.delta, np.sin(grid))
    assert curve.lambda_star_search == pytest.approx(np.pi / 2, abs=1e-5 * 3.0)
    assert abs(curve.lambda_star_fit - np.pi / 2) > abs(curve.lambda_star_search - np.pi / 2)


def test_sgd_curve_is_the_exact_difference_of_the_objective():
    theta = {"x": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    g = {"x": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    m = {"x": torch.tensor([0.0, 2.0], dtype=torch.float64)}

    def objective(p):
        return -(p["x"] ** 2).sum()

    curve = curves.sgd_curve(objective, theta, g, m, 0.1, np.array([-1.0, 0.0, 1.0, 2.0]))
    # x = (1.1, -1 + 0.2 lambda): Delta = 1 - (1 - 0.2 lambda)^2 = 0.4 lambda - 0.04 lambda^2
    lam = curve.lambdas
    np.testing.assert_allclose(curve.delta, 0.4 * lam - 0.04 * lam**2, rtol=1e-12, atol=1e-15)
    assert curve.lambda_star_fit == pytest.approx(5.0, rel=1e-9)


def test_optimizer_curve_replays_adam_from_a_clone_and_leaves_the_optimizer_alone():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    optimizer = torch.optim.Adam([weight, frozen], lr=0.05)
    weight.grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    g = -2 * weight.detach()  # objective -|w|^2
    aux = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # aux loss <aux, w>

    def objective(p):
        return -(p["weight"] ** 2).sum() + 0 * p["frozen"].sum()

    def step_grad(name, lam):
        return -g + lam * aux if name == "weight" else None

    parameters = {"weight": weight, "frozen": frozen}
    curve = curves.optimizer_curve(optimizer, parameters, step_grad, objective, np.array([-1.0, 0.0, 1.0]))

    def replay(lam):
        twin = torch.nn.Parameter(weight.detach().clone())
        twin_frozen = torch.nn.Parameter(frozen.detach().clone(), requires_grad=False)
        twin_optimizer = torch.optim.Adam([twin, twin_frozen], lr=0.05)
        twin_optimizer.load_state_dict(copy.deepcopy(state))
        twin.grad = -g + lam * aux
        twin_optimizer.step()
        return -(twin.detach() ** 2).sum().item()

    for lam, delta in zip(curve.lambdas, curve.delta):
        assert delta == pytest.approx(replay(lam) - replay(0.0), rel=1e-12, abs=1e-15)
    assert str(optimizer.state_dict()) == str(state) and weight.grad is not None and frozen.grad is None
    stranger = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="pass that model's optimizer"):
        curves.check_optimizer(stranger, parameters)
