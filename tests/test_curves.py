"""The lambda grid, both quadratic fits, the refined search and the replay of the optimizer's step on hand-checkable problems."""
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


def test_the_free_fit_and_the_fit_through_the_origin_recover_their_parabolas():
    grid = np.linspace(-1.0, 3.0, 9)
    free = curves.quadratic_fit(grid, -2.0 * grid**2 + 3.0 * grid + 0.5)
    np.testing.assert_allclose(free.coefficients, [-2.0, 3.0, 0.5], rtol=1e-12, atol=1e-12)
    assert free.r2 == pytest.approx(1.0, abs=1e-12) and free.vertex == pytest.approx(0.75, rel=1e-12)
    origin = curves.origin_fit(grid, -2.0 * grid**2 + 3.0 * grid)
    np.testing.assert_allclose(origin.coefficients, [-2.0, 3.0], rtol=1e-12, atol=1e-12)
    assert origin.r2 == pytest.approx(1.0, abs=1e-12) and origin.vertex == pytest.approx(0.75, rel=1e-12)
    # an offset the origin fit may not absorb: its R^2 (about the mean, as the free fit's) drops below the free one
    shifted = -2.0 * grid**2 + 3.0 * grid + 5.0
    assert curves.quadratic_fit(grid, shifted).r2 == pytest.approx(1.0, abs=1e-12)
    assert curves.origin_fit(grid, shifted).r2 < 0.9
    assert curves.quadratic_fit(grid, grid**2).vertex is None and curves.origin_fit(grid, grid**2).vertex is None
    assert curves.quadratic_fit(grid, np.zeros_like(grid)).r2 is None  # constant: R^2 undefined


def test_measure_curve_refines_the_argmax_and_counts_every_evaluation():
    calls = []

    def delta(lam):
        calls.append(lam)
        return float(np.sin(lam))  # not a parabola: the search, not the fit, finds pi/2

    def delta_s(lam):
        calls.append(lam)
        return float(np.sin(lam)) - 0.1 * lam

    grid = np.linspace(0.0, 3.0, 7)
    curve = curves.measure_curve(delta, delta_s, grid)
    assert curve.n_evaluations == len(calls)
    np.testing.assert_array_equal(curve.delta, np.sin(grid))
    np.testing.assert_allclose(curve.delta_jonly, 0.1 * grid, rtol=1e-12, atol=1e-15)
    assert curve.lambda_star == pytest.approx(np.pi / 2, abs=1e-5 * 3.0)
    assert curve.delta_jonly_star == pytest.approx(0.1 * curve.lambda_star, rel=1e-12)
    assert abs(curve.fit.vertex - np.pi / 2) > abs(curve.lambda_star - np.pi / 2)


def test_replay_takes_adams_real_step_from_a_clone_and_leaves_the_optimizer_alone():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    unreached = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer = torch.optim.AdamW([weight, frozen, unreached], lr=0.05, weight_decay=0.1)
    weight.grad = torch.ones(3, dtype=torch.float64)
    unreached.grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    parameters = {"weight": weight, "frozen": frozen, "unreached": unreached}
    replay = curves.Replay(optimizer, parameters)
    grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    stepped = replay({"weight": grad})

    twin = torch.nn.Parameter(weight.detach().clone())
    twin_rest = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in (frozen, unreached)]
    twin_optimizer = torch.optim.AdamW([twin, *twin_rest], lr=0.05, weight_decay=0.1)
    twin_optimizer.load_state_dict(copy.deepcopy(state))
    twin.grad = grad.clone()
    twin_optimizer.step()
    assert torch.equal(stepped["weight"], twin.detach())
    # no .grad: skipped (no weight decay either, as in training)
    assert torch.equal(stepped["frozen"], frozen.detach()) and torch.equal(stepped["unreached"], unreached.detach())
    assert str(optimizer.state_dict()) == str(state) and weight.grad is not None and frozen.grad is None
    stranger = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="pass that model's optimizer"):
        curves.Replay(stranger, parameters)


@pytest.mark.parametrize("max_grad_norm", [0.5, 100.0], ids=["clips", "does-not-clip"])
def test_replay_clips_the_gradient_as_the_trainer_does_before_its_step(max_grad_norm):
    """Hugging Face's Trainer clips the total gradient norm before the optimizer steps
    (TRL's default max_grad_norm is 1.0): the replayed step is that step, bit for bit, and
    the given gradients are left unscaled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    parameters = dict(model.named_parameters())
    grads = {n: torch.randn_like(p) for n, p in parameters.items()}
    given = {n: g.clone() for n, g in grads.items()}
    stepped = curves.Replay(optimizer, parameters, max_grad_norm)(grads)

    for n, p in parameters.items():
        p.grad = grads[n].clone()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    assert (norm > max_grad_norm) == (max_grad_norm == 0.5)
    optimizer.step()
    assert all(torch.equal(stepped[n], p.detach()) for n, p in parameters.items())
    assert all(torch.equal(grads[n], given[n]) for n in grads)
    with pytest.raises(ValueError, match="positive clipping norm"):
        curves.Replay(optimizer, parameters, 0.0)
