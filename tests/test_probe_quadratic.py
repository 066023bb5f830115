"""Probe.measure (one plain SGD step) against closed forms on quadratic problems (float64).

J(theta) = b.theta + theta^T A theta / 2 with A negative definite; the auxiliary
loss is d.theta + phi.theta (+ theta^T C theta / 2), where phi is an "MTP-only"
parameter the objective never reads. Then g = b + A theta, m = -(d + phi + C theta),
H = A, and Delta(lambda) is exactly the Taylor quadratic. The trained update
(optimizer replay, J-only parameters, Adam, cross-fitting) is in test_probe_update.py.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from mtpdiag.diagnostics import NO_MTP_SIGNAL, NOT_CONCAVE, MeasureOptions, Probe

EPS = np.finfo(np.float64).eps


class QuadraticModel(nn.Module):
    def __init__(self, theta, phi):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())
        self.phi = nn.Parameter(torch.as_tensor(phi, dtype=torch.float64).clone())


def parameters_of(model, batch):
    return model.theta, model.phi


def quadratic_objective(outputs, batch):
    theta, _ = outputs
    return batch["b"] @ theta + theta @ batch["A"] @ theta / 2


def quadratic_aux_loss(outputs, batch):
    theta, phi = outputs
    return batch["d"] @ theta + phi @ theta + theta @ batch["C"] @ theta / 2


def draw_problem(seed, spectrum, aux_quadratic):
    rng = np.random.default_rng(seed)
    n = len(spectrum)
    Q = ortho_group.rvs(n, random_state=rng)
    A = -(Q * np.asarray(spectrum)) @ Q.T
    C = rng.standard_normal((n, n)) if aux_quadratic else np.zeros((n, n))
    problem = {
        "A": A,
        "b": rng.standard_normal(n),
        "C": (C + C.T) / 2,
        "d": rng.standard_normal(n),
        "theta": rng.standard_normal(n),
        "phi": rng.standard_normal(n),
    }
    batch = {k: torch.as_tensor(problem[k]) for k in ("A", "b", "C", "d")}
    return problem, batch


def closed_form(p):
    g = p["b"] + p["A"] @ p["theta"]
    m = -(p["d"] + p["phi"] + p["C"] @ p["theta"])
    return g, m


def J_np(p, theta):
    return p["b"] @ theta + theta @ p["A"] @ theta / 2


def rounding_scale(p, theta):
    """Bound on the size of the terms J sums at theta (Cauchy-Schwarz), for rounding tolerances."""
    return np.linalg.norm(p["b"]) * np.linalg.norm(theta) + np.linalg.norm(p["A"]) * (theta @ theta) / 2


problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "spectrum": st.lists(st.floats(0.05, 20.0), min_size=2, max_size=8),
        "aux_quadratic": st.booleans(),
        "eta": st.floats(1e-3, 1.0),
    }
)


@settings(max_examples=25, deadline=None)
@given(problems)
def test_decomposition_is_exact_on_quadratics(draw):
    p, batch = draw_problem(draw["seed"], draw["spectrum"], draw["aux_quadratic"])
    eta = draw["eta"]
    model = QuadraticModel(p["theta"], p["phi"])
    probe = Probe(model, quadratic_objective, quadratic_aux_loss, forward=parameters_of)
    record = probe.measure(batch, eta)

    assert probe.shared_names == ["theta"]
    g, m = closed_form(p)
    A = p["A"]
    c, h_gm, h_mm = g @ m, g @ A @ m, m @ A @ m
    assert record.c == pytest.approx(c, rel=1e-10, abs=1e-10 * np.linalg.norm(g) * np.linalg.norm(m))
    assert record.v2 == pytest.approx(m @ m, rel=1e-10)
    assert record.h_gm == pytest.approx(h_gm, rel=1e-10, abs=1e-10 * np.linalg.norm(A, 2) * np.linalg.norm(g) * np.linalg.norm(m))
    assert record.h_mm == pytest.approx(h_mm, rel=1e-10)
    assert record.h_gg == pytest.approx(g @ A @ g, rel=1e-10)
    assert record.concave
    lambda_star = (c + eta * h_gm) / (-eta * h_mm)
    # lambda* inherits the absolute error of its numerator c + eta h_gm
    numerator_scale = np.linalg.norm(m) * (np.linalg.norm(g) + eta * np.linalg.norm(A, 2) * np.linalg.norm(g))
    assert record.lambda_star_taylor == pytest.approx(lambda_star, rel=1e-10, abs=1e-10 * numerator_scale / (eta * -h_mm))
    assert record.harm_threshold == pytest.approx(2 * record.lambda_star_taylor, rel=1e-15)

    # the measured curve is the Taylor quadratic up to the rounding of J's evaluation; phi, the only
    # parameter outside S, moves too, but J does not read it: Delta_S is Delta exactly
    n = len(g)
    base_theta = p["theta"] + eta * g
    tolerances = []
    for row in record.curve_rows():
        moved = p["theta"] + eta * (g + row["lambda"] * m)
        tolerance = 16 * n * EPS * (
            rounding_scale(p, moved) + rounding_scale(p, base_theta) + abs(record.a * row["lambda"]) + abs(record.b * row["lambda"] ** 2)
        )
        assert abs(row["delta_meas"] - row["delta_taylor"]) <= tolerance
        assert row["delta_meas"] == pytest.approx(J_np(p, moved) - J_np(p, base_theta), abs=tolerance)
        assert row["delta_meas_s"] == row["delta_meas"] and row["delta_jonly"] == 0.0
        tolerances.append(tolerance)
    check_fit(record, record.a, record.b, np.array(tolerances))


def check_fit(record, a, b, tolerances):
    """Both quadratic fits recover (-b, a, 0) and (-b, a) to within what the curve's rounding
    (|error| <= tolerances pointwise) can move a least-squares fit."""
    curve = record.curve
    lambda_star = a / (2 * b)
    total = ((curve.delta - curve.delta.mean()) ** 2).sum()
    for fit, basis, exact in ((curve.fit, np.vander(curve.lambdas, 3), [-b, a, 0.0]),
                              (curve.fit_origin, np.vander(curve.lambdas, 3)[:, :2], [-b, a])):
        coefficient_error = (np.linalg.norm(np.linalg.pinv(basis), 2) * np.linalg.norm(tolerances)
                             + 1e3 * EPS * np.abs(fit.coefficients).sum())
        np.testing.assert_allclose(fit.coefficients, exact, rtol=0, atol=coefficient_error)
        assert 1 - (tolerances**2).sum() / total <= fit.r2 <= 1 + 1e-12
        # lambda* = -a1 / (2 a2) moves by at most this when both coefficients move by coefficient_error
        fit_error = coefficient_error * (1 + 2 * abs(lambda_star)) / (2 * (b - coefficient_error))
        assert fit.vertex == pytest.approx(lambda_star, abs=fit_error)
    # the search stops within xatol; near the top the exact curve is flat to within its rounding
    flat = np.sqrt(2 * tolerances.max() / b)
    assert curve.lambda_star == pytest.approx(lambda_star, abs=1e-5 * np.ptp(curve.lambdas) + flat)
    row = record.as_row()
    assert (row["lambda_star_meas"], row["fit_origin_r2"]) == (curve.lambda_star, curve.fit_origin.r2)


@settings(max_examples=25, deadline=None)
@given(problems)
def test_both_hvp_modes_agree_on_quadratics(draw):
    p, batch = draw_problem(draw["seed"], draw["spectrum"], draw["aux_quadratic"])
    records = {
        mode: Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of, hvp_mode=mode).measure(
            batch, draw["eta"], line_search=False
        )
        for mode in ("fwd_rev", "rev_rev")
    }
    assert records["fwd_rev"].hvp_mode == "fwd_rev" and records["rev_rev"].hvp_mode == "rev_rev"
    g, m = closed_form(p)
    for key, exact in (("h_mm", m @ p["A"] @ m), ("h_gg", g @ p["A"] @ g)):
        assert records["fwd_rev"].__dict__[key] == pytest.approx(records["rev_rev"].__dict__[key], rel=1e-12)
        assert records["rev_rev"].__dict__[key] == pytest.approx(exact, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(problems)
def test_eval_objective_uses_its_own_gradient_and_hessian(draw):
    """Gradient from J, curve on another quadratic E: a = eta (<grad E, m> + eta g^T H_E m)."""
    p, batch = draw_problem(draw["seed"], draw["spectrum"], draw["aux_quadratic"])
    rng = np.random.default_rng(draw["seed"] + 1)
    n, eta = len(p["b"]), draw["eta"]
    A_eval = -np.diag(rng.uniform(0.1, 5.0, n))
    eval_batch = {"A": torch.as_tensor(A_eval), "b": torch.as_tensor(rng.standard_normal(n))}
    probe = Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of)
    record = probe.measure(batch, eta, eval_objective=quadratic_objective, eval_batch=eval_batch, top_curvature=True)

    g, m = closed_form(p)
    e = eval_batch["b"].numpy() + A_eval @ p["theta"]
    assert record.c == pytest.approx(g @ m, rel=1e-10, abs=1e-10 * np.linalg.norm(g) * np.linalg.norm(m))
    assert record.c_eval == pytest.approx(e @ m, rel=1e-10, abs=1e-10 * np.linalg.norm(e) * np.linalg.norm(m))
    assert record.h_gm == pytest.approx(g @ A_eval @ m, rel=1e-10, abs=1e-10 * np.abs(A_eval).max() * np.linalg.norm(g) * np.linalg.norm(m))
    assert record.h_mm == pytest.approx(m @ A_eval @ m, rel=1e-10)
    assert record.objective_value == pytest.approx(J_np({"A": A_eval, "b": eval_batch["b"].numpy()}, p["theta"]), rel=1e-12, abs=1e-12)
    # the L-smooth form of E: lambda*_smooth = (<grad E, m> - L eta <g, m>) / (L eta v^2), L from H_E
    L = -np.diag(A_eval).min()
    assert record.L == pytest.approx(L, rel=1e-10)
    smooth_numerator_scale = np.linalg.norm(m) * (np.linalg.norm(e) + L * eta * np.linalg.norm(g))
    assert record.lambda_star_smooth == pytest.approx(
        (e @ m - L * eta * g @ m) / (L * eta * m @ m), rel=1e-10, abs=1e-10 * smooth_numerator_scale / (L * eta * m @ m)
    )
    eval_problem = {"A": A_eval, "b": eval_batch["b"].numpy()}
    for row in record.curve_rows():
        exact = J_np(eval_problem, p["theta"] + eta * (g + row["lambda"] * m)) - J_np(eval_problem, p["theta"] + eta * g)
        scale = rounding_scale(eval_problem, p["theta"] + eta * (g + row["lambda"] * m)) + rounding_scale(eval_problem, p["theta"] + eta * g)
        assert row["delta_taylor"] == pytest.approx(exact, abs=64 * n * EPS * (scale + 1))
        assert row["delta_meas"] == pytest.approx(exact, abs=64 * n * EPS * (scale + 1))


@settings(max_examples=25, deadline=None)
@given(problems)
def test_top_curvature_and_the_l_smooth_form(draw):
    """L = largest eigenvalue of -A. The L-smooth bound holds point by point:
    J(theta + eta u) >= J(theta) + eta <g, u> - L eta^2 |u|^2 / 2. Its difference
    between u = g + lambda m and u = g (the paper's Delta_MTP) differs from the
    exact Delta by eta^2/2 [2 lambda g^T M m + lambda^2 m^T M m], M = H + L I."""
    p, batch = draw_problem(draw["seed"], draw["spectrum"], draw["aux_quadratic"])
    eta = draw["eta"]
    record = Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of).measure(
        batch, eta, top_curvature=True
    )
    L = max(draw["spectrum"])
    assert record.L_source == "measured"
    assert record.L == pytest.approx(L, rel=1e-10)
    g, m = closed_form(p)
    c, v2 = g @ m, m @ m
    assert record.lambda_star_smooth == pytest.approx((1 - L * eta) * c / (L * eta * v2), rel=1e-8, abs=1e-8 * np.linalg.norm(g) / np.linalg.norm(m) / (L * eta))

    M = p["A"] + L * np.eye(len(g))
    J0 = J_np(p, p["theta"])
    for row in record.curve_rows():
        lam = row["lambda"]
        u = g + lam * m
        moved = p["theta"] + eta * u
        tolerance = 64 * len(g) * EPS * (rounding_scale(p, moved) + rounding_scale(p, p["theta"]) + eta * abs(g @ u) + L * eta**2 * (u @ u))
        assert J_np(p, moved) >= J0 + eta * (g @ u) - L * eta**2 * (u @ u) / 2 - tolerance
        gap = eta**2 / 2 * (2 * lam * g @ M @ m + lam**2 * m @ M @ m)
        assert row["delta_meas"] - row["delta_smooth"] == pytest.approx(gap, abs=tolerance + 1e-9 * abs(gap))


def test_the_paper_expression_is_not_a_lower_bound_of_delta_in_general():
    """With L the top curvature, Delta_MTP <= Delta_meas fails for 0 < lambda < -2 g^T M m / m^T M m
    when g^T M m < 0, even with c > 0: here A = diag(-1, -10), g = (1, 1), m = (-1, 2)."""
    A = np.diag([-1.0, -10.0])
    p = {"A": A, "b": np.array([1.0, 1.0]), "theta": np.zeros(2), "phi": np.array([1.0, -2.0]), "d": np.zeros(2), "C": np.zeros((2, 2))}
    batch = {k: torch.as_tensor(p[k]) for k in ("A", "b", "C", "d")}
    record = Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of).measure(
        batch, 0.01, top_curvature=True, grid=[0.0, 0.5, 1.0, 1.5]
    )
    assert record.c > 0 and record.L == pytest.approx(10.0)
    # g^T M m = -9, m^T M m = 9: the expression overshoots the exact Delta on (0, 2)
    for row in record.curve_rows():
        if row["lambda"] > 0:
            assert row["delta_smooth"] > row["delta_meas"]


def test_non_concave_direction_is_flagged_without_lambda_star():
    A = np.diag([-2.0, 3.0])  # saddle: m along the second axis has positive curvature
    p = {"A": A, "b": np.array([1.0, 0.5]), "theta": np.zeros(2), "phi": np.array([0.0, -1.0]), "d": np.zeros(2), "C": np.zeros((2, 2))}
    batch = {k: torch.as_tensor(p[k]) for k in ("A", "b", "C", "d")}
    record = Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of).measure(batch, 0.1)
    assert record.h_mm == pytest.approx(3.0) and record.concave is False
    assert record.lambda_star_taylor is None and record.harm_threshold is None and record.best_gain_taylor is None
    assert NOT_CONCAVE in record.note
    assert record.curve.fit.vertex is None and record.curve.fit_origin.vertex is None  # the measured curve is convex too


def test_no_mtp_signal_on_shared_parameters_is_reported_not_divided():
    p = {"A": -np.eye(2), "b": np.ones(2), "theta": np.zeros(2), "phi": np.zeros(2), "d": np.zeros(2), "C": np.zeros((2, 2))}
    batch = {k: torch.as_tensor(p[k]) for k in ("A", "b", "C", "d")}
    record = Probe(QuadraticModel(p["theta"], p["phi"]), quadratic_objective, quadratic_aux_loss, parameters_of).measure(
        batch, 0.1, top_curvature=True
    )
    assert record.v2 == 0.0 and record.c == 0.0
    assert NO_MTP_SIGNAL in record.note
    assert record.cos is None and record.kappa_m is None and record.lambda_star_taylor is None and record.lambda_star_smooth is None
    assert record.curve is None and record.curve_rows() == []


def test_per_block_rows_sum_to_the_totals():
    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
            self.head = nn.Linear(3, 1)

    def forward(model, batch):
        x = batch["x"]
        for block in model.blocks:
            x = torch.tanh(block(x))
        return x, model.head(x)

    torch.manual_seed(0)
    model = TwoBlocks().double()
    batch = {"x": torch.randn(5, 3, dtype=torch.float64)}
    record = Probe(
        model,
        lambda out, b: -(out[1] ** 2).mean(),
        lambda out, b: (out[0].sum(-1) - 1).pow(2).mean(),
        forward=forward,
    ).measure(batch, 0.1, per_block=True, line_search=False)
    blocks = {row["block"]: row for row in record.block_rows()}
    assert set(blocks) == {"blocks.0", "blocks.1"}  # the head is reached by the objective only
    assert blocks["blocks.0"]["n_params"] == 12
    for key, total in (("c", record.c), ("v2", record.v2), ("h_mm", record.h_mm)):
        assert sum(row[key] for row in blocks.values()) == pytest.approx(total, rel=1e-12, abs=1e-15)


def test_bad_measure_options_fail_before_any_forward():
    p, batch = draw_problem(2, [1.0, 2.0], aux_quadratic=False)
    model = QuadraticModel(p["theta"], p["phi"])
    calls = []

    def counting_forward(model, batch):
        calls.append(1)
        return parameters_of(model, batch)

    probe = Probe(model, quadratic_objective, quadratic_aux_loss, forward=counting_forward)
    stranger = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for options, fix in (
        ({"grid": [0.0, 1.0, 1.0], "line_search": False}, "at least 3 distinct"),
        ({"eval_batch": batch}, "pass eval_objective"),
    ):
        with pytest.raises(ValueError, match=fix):
            probe.measure(batch, 0.1, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for call, fix in (
        (lambda: probe.measure_update(batch, stranger, 1.0), "pass that model's optimizer"),
        (lambda: probe.measure_update(batch, optimizer, float("nan")), "finite scalar or one per head"),
        (lambda: probe.measure_update(batch, optimizer, 1.0, objectives={}), "at least one curve objective"),
        (lambda: probe.measure_update(batch, optimizer, 1.0, objectives={"e": (quadratic_objective, 3)}), "pair"),
        (lambda: probe.measure_update(batch, optimizer, 1.0, top_curvature=["j_true"]), "not measured"),
    ):
        with pytest.raises(ValueError, match=fix):
            call()
    assert calls == []
    options = MeasureOptions(grid=[2, 0, 1], top_curvature=["objective"])
    np.testing.assert_array_equal(options.grid, [0.0, 1.0, 2.0])
    assert options.top_curvature_of("objective") and not options.top_curvature_of("j_true")
    assert MeasureOptions(top_curvature=True).top_curvature_of("j_true")
