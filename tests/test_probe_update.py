"""Probe.measure_update, the trained update, against independent references (float64):
a replay of the real step on a copy of the model and optimizer, hand-derived Adam
algebra through a frozen preconditioner, the J-only shift of the curve in closed form,
and the bias of the same-sample correlation that cross-fitting removes."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import ortho_group

from mtpdiag import losses
from mtpdiag.diagnostics import Probe
from mtpdiag.model import GPT, GPTConfig

EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------- a quadratic with all three kinds of parameter


class ThreeKinds(nn.Module):
    """theta is shared (both losses read it), psi is J-only, phi is MTP-only."""

    def __init__(self, theta, psi, phi):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())
        self.psi = nn.Parameter(torch.as_tensor(psi, dtype=torch.float64).clone())
        self.phi = nn.Parameter(torch.as_tensor(phi, dtype=torch.float64).clone())


def three_kinds(model, batch):
    return model.theta, model.psi, model.phi


def coupled_objective(out, batch):
    """J = b.theta + theta^T A theta / 2 + psi^T B theta + psi^T D psi / 2."""
    theta, psi, _ = out
    return batch["b"] @ theta + theta @ batch["A"] @ theta / 2 + psi @ batch["B"] @ theta + psi @ batch["D"] @ psi / 2


def coupled_aux(out, batch):
    theta, _, phi = out
    return batch["d"] @ theta + phi @ theta + theta @ batch["C"] @ theta / 2


def coupled_problem(seed: int, n: int = 4, k: int = 3):
    rng = np.random.default_rng(seed)
    Q = ortho_group.rvs(n, random_state=rng)
    C = rng.standard_normal((n, n))
    p = {
        "A": -(Q * rng.uniform(0.5, 4.0, n)) @ Q.T, "B": 0.5 * rng.standard_normal((k, n)),
        "D": -np.diag(rng.uniform(0.5, 2.0, k)), "C": (C + C.T) / 2, "b": rng.standard_normal(n),
        "d": rng.standard_normal(n), "theta": rng.standard_normal(n), "psi": rng.standard_normal(k),
        "phi": rng.standard_normal(n),
    }  # fmt: skip
    model = ThreeKinds(p["theta"], p["psi"], p["phi"])
    batch = {key: torch.as_tensor(p[key]) for key in ("A", "B", "D", "C", "b", "d")}
    return p, model, batch


def closed_form(p):
    """g and m on (theta, psi, phi), and the objective's Hessian on (theta, psi)."""
    g = {"theta": p["b"] + p["A"] @ p["theta"] + p["B"].T @ p["psi"], "psi": p["B"] @ p["theta"] + p["D"] @ p["psi"],
         "phi": np.zeros_like(p["phi"])}  # fmt: skip
    m = {"theta": -(p["d"] + p["phi"] + p["C"] @ p["theta"]), "psi": np.zeros_like(p["psi"]), "phi": -p["theta"]}
    H = np.block([[p["A"], p["B"].T], [p["B"], p["D"]]])
    return g, m, H


def J_np(p, theta, psi):
    return p["b"] @ theta + theta @ p["A"] @ theta / 2 + psi @ p["B"] @ theta + psi @ p["D"] @ psi / 2


def test_the_j_only_parameters_shift_the_curve_by_exactly_the_recorded_delta_jonly():
    """SGD moves psi by eta g_psi whatever lambda is; J couples psi and theta through B, so
    Delta - Delta_S = eta^2 lambda g_psi^T B m_theta = eta^2 lambda h_gm_jonly exactly."""
    p, model, batch = coupled_problem(0)
    eta = 0.05
    record = Probe(model, coupled_objective, coupled_aux, three_kinds).measure(batch, eta, grid=[-1.0, 0.0, 1.0, 2.0])
    g, m, H = closed_form(p)
    jonly = g["psi"] @ p["B"] @ m["theta"]
    assert record.h_gm_jonly == pytest.approx(jonly, rel=1e-10)
    g_all, m_all = np.concatenate([g["theta"], g["psi"]]), np.concatenate([m["theta"], m["psi"]])
    assert record.h_gm == pytest.approx(g_all @ H @ m_all, rel=1e-10)  # S and J-only
    assert record.h_mm == pytest.approx(m["theta"] @ p["A"] @ m["theta"], rel=1e-10)  # S alone: m_psi = 0
    assert record.n_shared == 4 and record.n_moved == 4 + 3 + 4
    base = (p["theta"] + eta * g["theta"], p["psi"] + eta * g["psi"])
    for row in record.curve_rows():
        lam = row["lambda"]
        moved = p["theta"] + eta * (g["theta"] + lam * m["theta"])
        scale = 64 * EPS * (1 + abs(J_np(p, moved, base[1])))
        assert row["delta_meas"] == pytest.approx(J_np(p, moved, base[1]) - J_np(p, *base), abs=scale)
        assert row["delta_meas_s"] == pytest.approx(J_np(p, moved, p["psi"]) - J_np(p, base[0], p["psi"]), abs=scale)
        assert row["delta_jonly"] == pytest.approx(eta**2 * lam * jonly, abs=2 * scale)
        # the Taylor quadratic of every moved parameter is exact on a quadratic
        assert row["delta_taylor"] == pytest.approx(row["delta_meas"], abs=2 * scale)
    star = record.as_row()
    assert star["delta_jonly"] == pytest.approx(eta**2 * star["lambda_star_meas"] * jonly, abs=1e-12)


def hand_set_adam(model, make, state_scale: float, seed: int, step: float = 5.0):
    """An Adam/AdamW over the model with a hand-set state after ``step`` steps (moments ``state_scale``-sized)."""
    optimizer = make(model.parameters())
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(step, dtype=torch.float64),
            "exp_avg": torch.as_tensor(0.1 * rng.standard_normal(p.shape)),
            "exp_avg_sq": torch.as_tensor(state_scale * rng.uniform(0.5, 2.0, p.shape)),
        }
    return optimizer


ADAMS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "adam-l2": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(ADAMS))
def test_lambda_star_precond_equals_the_hand_derived_value(name):
    """docs/theory.md s.6 by hand: P = 1/(sqrt(v_t(0)/(1 - b2^t)) + eps), Q = lr (1 - b1)/(1 - b1^t) P,
    u0 the lambda = 0 update, a_P = <g, Q m> + u0^T H Q m, b_P = -(Q m)^T H (Q m) / 2."""
    p, model, batch = coupled_problem(1)
    optimizer = hand_set_adam(model, ADAMS[name], state_scale=0.5, seed=2)
    group = optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    decoupled = group["decoupled_weight_decay"]
    g, m, H = closed_form(p)
    t = 6
    Q, u0 = {}, {}
    for key, param in (("theta", model.theta), ("psi", model.psi), ("phi", model.phi)):
        state = optimizer.state[param]
        x = p[key]
        d = -g[key] + (0 if decoupled else wd * x)
        v = b2 * state["exp_avg_sq"].numpy() + (1 - b2) * d**2
        P = 1 / (np.sqrt(v / (1 - b2**t)) + eps)
        Q[key] = lr * (1 - b1) / (1 - b1**t) * P
        momentum = b1 * state["exp_avg"].numpy() + (1 - b1) * d
        u0[key] = -(lr * wd * x if decoupled else 0) - lr / (1 - b1**t) * P * momentum
    Qm = np.concatenate([Q["theta"] * m["theta"], Q["psi"] * m["psi"]])
    u = np.concatenate([u0["theta"], u0["psi"]])
    a_P = np.concatenate([g["theta"], g["psi"]]) @ Qm + u @ H @ Qm
    b_P = -(Qm @ H @ Qm) / 2
    assert b_P > 0
    record = Probe(model, coupled_objective, coupled_aux, three_kinds).measure_update(
        batch, optimizer, 1.0, line_search=False
    )["objective"]
    assert record.optimizer == type(optimizer).__name__.lower()
    assert record.a_precond == pytest.approx(a_P, rel=1e-10)
    assert record.b_precond == pytest.approx(b_P, rel=1e-10)
    assert record.lambda_star_precond == pytest.approx(a_P / (2 * b_P), rel=1e-10)


def test_where_the_new_gradient_barely_enters_v_the_frozen_preconditioner_is_the_real_step():
    """With 1 - b2 = 1e-8, long after the bias correction has faded, the step's gradient at any
    lambda on the grid takes a negligible share of v_t, so on a quadratic E the real AdamW
    curve's argmax is lambda*_precond. A large v_{t-1} alone would not do (docs/theory.md s.6):
    lambda* grows like sqrt(v), and the MTP term's share (1 - b2) (lambda* m)^2 / v with it."""
    p, model, batch = coupled_problem(3)
    slow = lambda params: torch.optim.AdamW(params, lr=0.5, betas=(0.8, 1 - 1e-8), weight_decay=0.1)  # noqa: E731
    optimizer = hand_set_adam(model, slow, state_scale=1.0, seed=4, step=1e10)
    record = Probe(model, coupled_objective, coupled_aux, three_kinds).measure_update(batch, optimizer, 1.0)["objective"]
    assert record.precond_new_share < 1e-7
    assert record.as_row()["lambda_star_meas"] == pytest.approx(record.lambda_star_precond, rel=1e-5)
    # the grid is scaled by |lambda*_precond| on an Adam step
    np.testing.assert_allclose(record.curve.lambdas[-1], 3 * abs(record.lambda_star_precond), rtol=1e-12)
    fresh = Probe(model, coupled_objective, coupled_aux, three_kinds).measure_update(
        batch, ADAMS["adamw"](model.parameters()), 1.0, line_search=False
    )["objective"]
    assert fresh.precond_new_share == 1.0  # the first step: v_t is the new gradient's alone


# ----------------------------------------------------------------------------- the GPT: an independent replay of the real step

VOCAB, T, B = 14, 8, 8


def tiny_gpt(**options):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, block_size=T, d_model=8, n_layer=1, n_head=2, n_mtp=2)
    return GPT(GPTConfig(**{**config, **options})).double()


def rl_batch(model, seed=1):
    """Old log-probs off the current ones (some ratios start past the clip), two rows per prompt group."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=generator)
    mask = torch.zeros(B, T - 1, dtype=torch.float64)
    mask[:, 2:] = 1.0
    with torch.no_grad():
        current = losses.token_logprobs(model(ids).main)
    old = current + 0.2 * torch.randn(current.shape, generator=generator, dtype=torch.float64)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old,
            "advantages": torch.randn(B, generator=generator, dtype=torch.float64), "group": torch.arange(B) // 2}


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def warmed_up(make, model, batch):
    """The optimizer after two real steps (momentum / moments in its state)."""
    optimizer = make(model.parameters())
    for _ in range(2):
        out = model(batch["input_ids"])
        (losses.mtp_policy_loss(out, batch, 0.3) - losses.rl_objective(out, batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def independent_replay(model, optimizer, make, batch, heldout, weights, shared):
    """Copy the model and its optimizer, take the trainer's step on -J_batch + L_MTP(weights)
    (lambda on the advantages), and read J_batch, J_true and the clip fraction after it,
    with every parameter moved and with only S moved."""
    twin = copy.deepcopy(model)
    twin_optimizer = make(twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    out = twin(batch["input_ids"])
    (losses.mtp_policy_loss(out, batch, weights) - losses.rl_objective(out, batch)).backward()
    twin_optimizer.step()
    with torch.no_grad():
        after = twin(batch["input_ids"])
        values = {"j_batch": losses.rl_objective(after, batch).item(),
                  "j_true": losses.j_true(twin(heldout["input_ids"]), heldout).item(),
                  "clip_fraction": losses.clip_fraction(after, batch).item()}  # fmt: skip
        start = dict(model.named_parameters())
        for name, param in twin.named_parameters():
            if name not in shared:
                param.copy_(start[name])
        values["j_batch_s"] = losses.rl_objective(twin(batch["input_ids"]), batch).item()
        values["j_true_s"] = losses.j_true(twin(heldout["input_ids"]), heldout).item()
    return values


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_measured_curve_equals_an_independent_replay_of_the_real_step(name):
    model = tiny_gpt()
    batch = rl_batch(model)
    heldout = {"input_ids": batch["input_ids"][:5], "response_mask": batch["response_mask"][:5]}
    make = OPTIMIZERS[name]
    optimizer = warmed_up(make, model, batch)
    trained = torch.tensor([0.4, -0.2])  # per head, of both signs: the trained point is off the curve's diagonal
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True)
    records = probe.measure_update(
        batch, optimizer, trained, objectives={"j_batch": losses.rl_objective, "j_true": (losses.j_true, heldout)},
        clip_fraction=losses.clip_fraction, gg_curvature=False,
    )
    shared = set(probe.shared_names)
    assert "ln_f.weight" in probe.moved_names(batch) and "ln_f.weight" not in shared  # a J-only parameter moves
    replay = {}

    def at(lam):
        if lam not in replay:
            weights = trained if lam == "trained" else lam
            replay[lam] = independent_replay(model, optimizer, make, batch, heldout, weights, shared)
        return replay[lam]

    for objective, record in records.items():
        assert record.optimizer == name and record.lambda_trained == pytest.approx(0.4)
        rows = record.curve_rows()
        assert min(r["lambda"] for r in rows) < 0 < max(r["lambda"] for r in rows)  # both sides of the kink at 0
        for row in rows:
            lam = row["lambda"]
            exact = at(lam)[objective] - at(0.0)[objective]
            exact_s = at(lam)[f"{objective}_s"] - at(0.0)[f"{objective}_s"]
            assert row["delta_meas"] == pytest.approx(exact, rel=1e-10, abs=1e-15), (objective, lam)
            assert row["delta_meas_s"] == pytest.approx(exact_s, rel=1e-10, abs=1e-15), (objective, lam)
            assert row["delta_jonly"] == pytest.approx(exact - exact_s, rel=1e-8, abs=1e-15), (objective, lam)
        exact = at("trained")[objective] - at(0.0)[objective]
        assert record.delta_trained == pytest.approx(exact, rel=1e-10, abs=1e-15)
        assert record.clip_fraction == at("trained")["clip_fraction"] > 0
    assert records["j_true"].curve.delta_jonly.any()  # the J-only move is measured, not 0


def test_without_sign_dependence_the_negative_side_is_the_linear_extension():
    """The same GPT with lambda times the objective: aux(-lambda) = -aux(lambda), so the probe
    needs no second aux gradient and the curve still equals the replay."""
    model = tiny_gpt()
    batch = rl_batch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    aux = lambda out, b, head_weights=None: losses.mtp_policy_loss(out, b, head_weights, placement="objective")  # noqa: E731
    record = Probe(model, losses.rl_objective, aux).measure_update(batch, optimizer, 0.5, grid=[-1.0, 0.0, 1.0])
    record = record["objective"]

    def after(lam):
        twin = copy.deepcopy(model)
        out = twin(batch["input_ids"])
        (aux(out, batch, lam) - losses.rl_objective(out, batch)).backward()
        torch.optim.SGD(twin.parameters(), lr=0.05).step()
        with torch.no_grad():
            return losses.rl_objective(twin(batch["input_ids"]), batch).item()

    for row in record.curve_rows():
        assert row["delta_meas"] == pytest.approx(after(row["lambda"]) - after(0.0), rel=1e-10, abs=1e-15)


# ----------------------------------------------------------------------------- cross-fitting


class Linear(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def linear_objective(out, batch):
    return (batch["x"] @ out).mean()


def linear_aux(out, batch):
    return -(batch["y"] @ out).mean()


def test_cross_fitted_c_is_unbiased_where_the_same_sample_c_is_not():
    """g = mean_i x_i and m = mean_i y_i with x_i = mu_g + e_i, y_i = mu_m + d_i, Cov(e_i, d_i) = rho I
    within a row: E<g, m> = <mu_g, mu_m> + rho n / N, while the halves (by prompt group) are
    independent and E c_crossfit = <mu_g, mu_m>. Here <mu_g, mu_m> = 0.3 and the bias is 0.45."""
    n, N, rho, draws = 4, 8, 0.9, 400
    mu_g, mu_m = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.3, 1.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    model = Linear(n)
    probe = Probe(model, linear_objective, linear_aux, forward=lambda model, batch: model.w)
    same, crossed = [], []
    for _ in range(draws):
        e = rng.standard_normal((N, n))
        d = rho * e + np.sqrt(1 - rho**2) * rng.standard_normal((N, n))
        batch = {"x": torch.as_tensor(mu_g + e), "y": torch.as_tensor(mu_m + d), "group": torch.arange(N) // 2}
        record = probe.measure(batch, 0.1, hvp=False, line_search=False)
        same.append(record.c)
        crossed.append(record.c_crossfit)
    # the last draw by hand: halves are the even and the odd groups, each its own mean
    x, y = batch["x"].numpy(), batch["y"].numpy()
    even = (np.arange(N) // 2) % 2 == 0
    g_a, g_b, m_a, m_b = x[even].mean(0), x[~even].mean(0), y[even].mean(0), y[~even].mean(0)
    assert record.c_crossfit == pytest.approx((g_a @ m_b + g_b @ m_a) / 2, rel=1e-12)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    assert record.cos_crossfit == pytest.approx((cos(g_a, m_b) + cos(g_b, m_a)) / 2, rel=1e-12)
    assert record.c == pytest.approx(x.mean(0) @ y.mean(0), rel=1e-12)
    expected, bias = mu_g @ mu_m, rho * n / N
    for values, target in ((crossed, expected), (same, expected + bias)):
        mean, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(draws)
        assert abs(mean - target) < 4 * se, (mean, target, se)
    assert np.mean(same) - expected > 8 * np.std(same, ddof=1) / np.sqrt(draws)  # the bias is resolved


def test_cross_fitting_needs_both_halves():
    model = Linear(2)
    probe = Probe(model, linear_objective, linear_aux, forward=lambda model, batch: model.w)
    batch = {"x": torch.ones(4, 2, dtype=torch.float64), "y": torch.ones(4, 2, dtype=torch.float64)}
    record = probe.measure({**batch, "group": torch.tensor([0, 0, 2, 2])}, 0.1, hvp=False, line_search=False)
    assert record.c_crossfit is None and "no cross-fit" in record.note
    without_groups = probe.measure(batch, 0.1, hvp=False, line_search=False)
    assert without_groups.c_crossfit is None and "cross-fit" not in without_groups.note
