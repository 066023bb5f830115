"""Probe on a tiny GPT with MTP heads, against independently computed references (float64)."""
import copy
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from mtpdiag import losses
from mtpdiag.diagnostics.hvp import HessianAt
from mtpdiag.model import GPT, GPTConfig
from mtpdiag.diagnostics import NO_MTP_SIGNAL, Probe, block_of

VOCAB, T, B = 14, 8, 4


def tiny_gpt(wiring="parallel", dtype=torch.float64, **options):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, block_size=T, d_model=8, n_layer=1, n_head=2, n_mtp=2, mtp_wiring=wiring)
    return GPT(GPTConfig(**{**config, **options})).to(dtype)


def rl_batch(model, seed=1):
    """A rollout batch whose old log-probs are the model's own (on-policy), so no token starts clipped."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=generator)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(B, T - 1, dtype=dtype)
    mask[:, 2:] = 1.0
    with torch.no_grad():
        old = losses.token_logprobs(model(ids).main)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": torch.randn(B, generator=generator).to(dtype)}


def reference_gradients(model, batch):
    """g = grad J and m = -grad L_MTP by loss.backward() on a copy of the model, by parameter name."""
    grads = {}
    for key, loss_of in (("g", lambda out: -losses.rl_objective(out, batch)), ("m", lambda out: losses.mtp_policy_loss(out, batch))):
        twin = copy.deepcopy(model)
        loss_of(twin(batch["input_ids"])).backward()
        grads[key] = {n: -p.grad for n, p in twin.named_parameters() if p.grad is not None}
    return grads["g"], grads["m"]


def flat_objective(model, names, batch):
    """J as a function of one flat vector holding the parameters ``names`` (the rest fixed)."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    shapes = [params[n].shape for n in names]

    def J(x):
        pieces = dict(zip(names, (p.view(s) for p, s in zip(x.split([s.numel() for s in shapes]), shapes))))
        return losses.rl_objective(functional_call(model, {**fixed, **pieces}, (batch["input_ids"],)), batch)

    return J, torch.cat([params[n].detach().reshape(-1) for n in names])


def materialised_hessian(J, x0):
    """The Hessian column by column with torch.autograd.functional (no vmap). torch.func.hessian
    is not used: in torch 2.13 its vmapped double derivative of layer_norm gets the cross terms
    between a LayerNorm weight and the layer's input wrong (an asymmetric "Hessian")."""
    H = torch.autograd.functional.hessian(J, x0)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12 * H.abs().max().item())
    return H


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
def test_gradients_and_hvps_match_autograd_and_a_materialised_hessian(wiring):
    """c, v^2, h_mm, h_gg on S; h_gm on every parameter J reads (S and the J-only final norm),
    against a Hessian materialised over those."""
    model = tiny_gpt(wiring)
    batch = rl_batch(model)
    g, m = reference_gradients(model, batch)
    shared = [n for n in g if n in m and (g[n] != 0).any() and (m[n] != 0).any()]
    read = [n for n in g if (g[n] != 0).any()]  # S and the J-only parameters
    assert set(shared) < set(read) and "ln_f.weight" in read
    J, x0 = flat_objective(model, read, batch)
    H = materialised_hessian(J, x0)
    g_flat = torch.cat([g[n].reshape(-1) for n in read])
    m_flat = torch.cat([(m[n] if n in m else torch.zeros_like(g[n])).reshape(-1) for n in read])
    on_S = torch.cat([torch.full((g[n].numel(),), n in shared) for n in read])
    g_S = torch.where(on_S, g_flat, 0.0)

    for mode in ("fwd_rev", "rev_rev"):
        probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode)
        record = probe.measure(batch, 0.1, line_search=False)
        assert probe.shared_names == shared
        assert record.hvp_mode == mode
        assert record.c == pytest.approx((g_flat @ m_flat).item(), rel=1e-12)
        assert record.v2 == pytest.approx((m_flat @ m_flat).item(), rel=1e-12)
        assert record.g_norm == pytest.approx(g_S.norm().item(), rel=1e-12)
        for key, exact in (("h_gm", g_flat @ H @ m_flat), ("h_gm_jonly", torch.where(on_S, 0.0, g_flat) @ H @ m_flat),
                           ("h_mm", m_flat @ H @ m_flat), ("h_gg", g_S @ H @ g_S)):
            assert getattr(record, key) == pytest.approx(exact.item(), rel=1e-8), key
        assert record.h_gm_jonly != 0

        # and vector by vector, on a random direction in S
        f, theta = probe.function_of_shared(losses.rl_objective, batch)
        J_S, x_S = flat_objective(model, shared, batch)
        H_S = materialised_hessian(J_S, x_S)
        v = torch.randn_like(x_S)
        product = HessianAt(f, theta, mode)({n: t.view_as(theta[n]) for n, t in zip(theta, v.split([t.numel() for t in theta.values()]))})
        expected = H_S @ v
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in product.values()]), expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


def test_function_of_shared_keys_are_the_models_own_parameter_names():
    """They once carried the wrapper's ``model.`` prefix that find_shared and shared_names do not."""
    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    f, theta = probe.function_of_shared(losses.rl_objective, batch)
    params = dict(model.named_parameters())
    assert list(theta) == probe.shared_names == probe.find_shared(batch)
    assert all(torch.equal(theta[n], params[n]) for n in theta)
    assert f(theta).item() == losses.rl_objective(model(batch["input_ids"]), batch).item()
    # the same names reach every layer: the per-block rows and the Hessian products use them
    record = probe.measure(batch, 0.1, line_search=False, per_block=True)
    assert {row["block"] for row in record.block_rows()} == {block_of(n) for n in theta}
    product = HessianAt(f, theta)({n: torch.ones_like(t) for n, t in theta.items()})
    assert list(product) == list(theta)


def test_shared_set_and_top_curvature_on_the_gpt():
    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode="rev_rev")
    record = probe.measure(batch, 0.1, top_curvature=True, line_search=False)
    # the main head's own final norm and the MTP heads are not shared; the tied embedding/unembedding is, once
    assert "ln_f.weight" not in probe.shared_names and not any(n.startswith("mtp_heads") for n in probe.shared_names)
    assert probe.shared_names[0] == "wte.weight" and "lm_head.weight" not in probe.shared_names
    assert record.n_shared == sum(p.numel() for n, p in model.named_parameters() if n in probe.shared_names)
    J, x0 = flat_objective(model, probe.shared_names, batch)
    top = torch.linalg.eigvalsh(-materialised_hessian(J, x0))[-1].item()
    assert record.L == pytest.approx(top, rel=1e-6)


def test_top_curvature_of_a_batch_with_zero_advantages_is_zero_not_an_arpack_error():
    """All groups with uniform reward give zero advantages: J_batch is flat, H = 0."""
    model = tiny_gpt("parallel")
    batch = {**rl_batch(model), "advantages": torch.zeros(B, dtype=torch.float64)}
    record = Probe(model, losses.rl_objective, losses.mtp_policy_loss).measure(batch, 0.1, top_curvature=True, line_search=False)
    assert record.L == 0.0 and record.g_norm == 0.0


@pytest.mark.parametrize("wiring", ["parallel", "sequential"])
def test_taylor_residual_scales_like_eta_cubed(wiring):
    model = tiny_gpt(wiring)
    batch = rl_batch(model)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    etas = np.geomspace(1e-4, 10**-2.5, 6)  # 1.5 decades, below the PPO clip boundaries
    residuals = []
    for eta in etas:
        record = probe.measure(batch, eta, grid=[-1.0, 0.0, 1.0], gg_curvature=False)
        residuals.append(max(abs(row["delta_meas"] - row["delta_taylor"]) for row in record.curve_rows()))
    slope = np.polyfit(np.log(etas), np.log(residuals), 1)[0]
    assert 2.7 <= slope <= 3.3


def snapshot(model, optimizer):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def test_measuring_the_update_mutates_nothing():
    """Every path of measure_update at once: AdamW's replay and preconditioner, both signs of a
    sign-dependent aux loss, per-head trained lambdas, the clip fraction, cross-fitting,
    L, per-block rows, a held-out objective; and measure's plain SGD step."""
    model = tiny_gpt("sequential", dropout=0.1)  # train mode with dropout: any stray forward would draw random masks
    batch = {**rl_batch(model), "group": torch.tensor([0, 0, 1, 1])}
    jtrue_batch = {"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    (-losses.rl_objective(model(batch["input_ids"]), batch)).backward()
    optimizer.step()
    (-losses.rl_objective(model(batch["input_ids"]), batch)).backward()  # leave a .grad in place
    before = snapshot(model, optimizer)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True)
    records = probe.measure_update(
        batch, optimizer, torch.tensor([0.5, -0.5]), objectives={"j_batch": losses.rl_objective, "j_true": (losses.j_true, jtrue_batch)},
        clip_fraction=losses.clip_fraction, top_curvature=True, per_block=True,
    )
    assert all(r.curve is not None and r.a_precond is not None and r.c_crossfit is not None for r in records.values())
    probe.measure(batch, 0.05, eval_objective=losses.j_true, eval_batch=jtrue_batch)
    assert_identical(before, snapshot(model, optimizer))


def test_detach_gives_no_mtp_signal_and_trunk_only_detach_leaks_through_the_tied_head():
    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    joint_shared = Probe(model, losses.rl_objective, losses.mtp_policy_loss).find_shared(batch)

    def detached(model, batch):
        return model(batch["input_ids"], mtp_detach="detach")

    with pytest.raises(ValueError, match="shared="):
        Probe(model, losses.rl_objective, losses.mtp_policy_loss, forward=detached).measure(batch, 0.1)
    by_names = Probe(model, losses.rl_objective, losses.mtp_policy_loss, forward=detached, shared=joint_shared)
    by_joint_graph = Probe(model, losses.rl_objective, losses.mtp_policy_loss, forward=detached, shared_forward=lambda m, b: m(b["input_ids"]))
    record = by_names.measure(batch, 0.1, top_curvature=True)
    assert by_joint_graph.measure(batch, 0.1, line_search=False).n_shared == record.n_shared
    assert by_joint_graph.shared_names == joint_shared
    assert record.v2 == 0.0 and record.c == 0.0 and record.h_mm == 0.0
    assert NO_MTP_SIGNAL in record.note
    assert record.cos is None and record.kappa_m is None and record.lambda_star_taylor is None and record.lambda_star_smooth is None

    def trunk_detached(model, batch):
        return model(batch["input_ids"], mtp_detach="detach_trunk_only")

    leaky = Probe(model, losses.rl_objective, losses.mtp_policy_loss, forward=trunk_detached)
    record = leaky.measure(batch, 0.1, line_search=False)
    assert leaky.shared_names == ["wte.weight"]  # = lm_head.weight, tied
    assert record.v2 > 0


def test_sdpa_attention_runs_on_the_math_path_with_the_same_hessian():
    math_model = tiny_gpt("parallel")
    sdpa_model = tiny_gpt("parallel", attention="sdpa")
    sdpa_model.load_state_dict(math_model.state_dict())
    batch = rl_batch(math_model)
    for mode in ("fwd_rev", "rev_rev"):
        records = [
            Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode).measure(batch, 0.1, line_search=False)
            for model in (math_model, sdpa_model)
        ]
        assert records[1].hvp_mode == mode
        for key in ("c", "v2", "h_gm", "h_mm", "h_gg"):
            assert getattr(records[1], key) == pytest.approx(getattr(records[0], key), rel=1e-10)


def test_float32_runs_and_records_its_dtype():
    model64 = tiny_gpt("parallel")
    batch64 = rl_batch(model64)
    model32 = tiny_gpt("parallel", dtype=torch.float32)
    batch32 = {k: v.float() if v.is_floating_point() else v for k, v in batch64.items()}
    r64, r32 = (Probe(m, losses.rl_objective, losses.mtp_policy_loss).measure(b, 0.1) for m, b in ((model64, batch64), (model32, batch32)))
    assert r32.dtype == "float32" and r64.dtype == "float64"
    # float32 rounding (eps ~ 1e-7) accumulated through the network: 1e-4 of the terms' size
    assert r32.c == pytest.approx(r64.c, abs=1e-4 * r64.g_norm * r64.m_norm)
    assert r32.h_mm == pytest.approx(r64.h_mm, abs=1e-3 * abs(r64.h_mm) + 1e-4 * r64.v2)
    assert len(r32.curve.delta) == len(r64.curve.delta)


class OldStyleSquare(torch.autograd.Function):
    """x^2 with a differentiable backward but no forward-mode rule (like many custom kernels)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareBackwardKernel(torch.autograd.Function):
    """A backward pass with no derivative of its own, as fused attention kernels have."""

    @staticmethod
    def forward(ctx, x, grad):
        return 2 * x * grad

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("the derivative for 'square_backward' is not implemented")


class FusedSquare(OldStyleSquare):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return SquareBackwardKernel.apply(x, grad)


class SquareNet(nn.Module):
    def __init__(self, square):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 1).double()
        self.square = square

    def forward(self, x):
        h = self.square.apply(self.trunk(x))
        return self.head(h), h


def square_objective(out, batch):
    return -(out[0] ** 2).mean()


def square_aux(out, batch):
    return (out[1].sum(-1) - 1).pow(2).mean()


def test_forward_mode_failure_falls_back_to_rev_rev_records_why_and_keeps_the_configured_mode():
    """The fallback once rewrote the Probe's hvp_mode to the label "rev_rev (fallback: ...)"."""
    batch = {"input_ids": torch.randn(6, 3, dtype=torch.float64)}
    fallback = Probe(SquareNet(OldStyleSquare), square_objective, square_aux)
    record = fallback.measure(batch, 0.1, line_search=False)
    assert record.hvp_mode == "rev_rev"
    assert "jvp" in record.hvp_fallback and "\n" not in record.hvp_fallback
    assert fallback.hvp_mode == "fwd_rev" and fallback.hvp_fallback == record.hvp_fallback
    reference = Probe(SquareNet(OldStyleSquare), square_objective, square_aux, hvp_mode="rev_rev").measure(batch, 0.1, line_search=False)
    assert reference.hvp_mode == "rev_rev" and reference.hvp_fallback is None
    assert record.h_mm == reference.h_mm and record.h_gm == reference.h_gm
    again = fallback.measure(batch, 0.1, line_search=False)  # remembered: straight to rev_rev, and said so
    assert (again.hvp_mode, again.hvp_fallback, again.h_mm) == ("rev_rev", record.hvp_fallback, record.h_mm)
    assert fallback.measure(batch, 0.1, hvp=False, line_search=False).hvp_fallback is None  # no products ran


def test_missing_double_backward_names_the_attention_fix():
    batch = {"input_ids": torch.randn(6, 3, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match="attention='math'"):
        Probe(SquareNet(FusedSquare), square_objective, square_aux).measure(batch, 0.1)


def test_non_finite_gradients_name_the_loss():
    model = tiny_gpt("parallel")
    batch = rl_batch(model)

    def exploding_mtp_loss(out, batch):
        return losses.mtp_policy_loss(out, batch) * float("inf")

    with pytest.raises(FloatingPointError, match="aux_loss.*exploding_mtp_loss"):
        Probe(model, losses.rl_objective, exploding_mtp_loss).measure(batch, 0.1)

    def nan_objective(out, batch):
        return losses.rl_objective(out, batch) * float("nan")

    for hvp in (True, False):
        with pytest.raises(FloatingPointError, match="objective.*nan_objective"):
            Probe(model, nan_objective, losses.mtp_policy_loss).measure(batch, 0.1, hvp=hvp)


def test_bad_inputs_get_messages_that_name_the_fix():
    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    with pytest.raises(ValueError, match="hvp_mode"):
        Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode="finite_differences")
    with pytest.raises(ValueError, match="a list of parameter names"):
        Probe(model, losses.rl_objective, losses.mtp_policy_loss, shared="wte.weight")
    with pytest.raises(ValueError, match="not trainable parameters"):
        Probe(model, losses.rl_objective, losses.mtp_policy_loss, shared=["wte.weight", "no.such"]).measure(batch, 0.1)
    with pytest.raises(ValueError, match="S would be empty"):
        Probe(model, losses.rl_objective, losses.mtp_policy_loss, shared=lambda name: False).measure(batch, 0.1)
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, shared=lambda name: name.startswith("blocks."))
    assert probe.measure(batch, 0.1, line_search=False).n_shared_tensors == len([n for n, _ in model.named_parameters() if n.startswith("blocks.")])
    with pytest.raises(ValueError, match="positive finite"):
        probe.measure(batch, 0.0)
    with pytest.raises(ValueError, match="at least 3 distinct"):
        probe.measure(batch, 0.1, grid=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scalar tensor"):
        Probe(model, lambda out, b: losses.token_logprobs(out.main), losses.mtp_policy_loss).measure(batch, 0.1)
    other = tiny_gpt("parallel")
    with pytest.raises(ValueError, match="that model's optimizer"):
        probe.measure_update(batch, torch.optim.SGD(other.parameters(), lr=0.1), 1.0)


def test_auto_hvp_mode_times_both_once_picks_the_faster_and_gives_that_modes_numbers(monkeypatch):
    """hvp_mode="auto" equals the mode it chose bit for bit, and that mode the materialised Hessian."""
    from mtpdiag.diagnostics import probe as probe_module

    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    for slow, fast in (("rev_rev", "fwd_rev"), ("fwd_rev", "rev_rev")):

        class Slowed(HessianAt):
            def __call__(self, direction):
                if self.mode == slow:
                    time.sleep(0.3)
                return super().__call__(direction)

        monkeypatch.setattr(probe_module, "HessianAt", Slowed)
        auto = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode="auto")
        record = auto.measure(batch, 0.1, line_search=False)
        assert record.hvp_mode == fast and auto.hvp_mode == "auto" and record.hvp_fallback is None
        assert record.hvp_time_fwd_rev_s == auto.hvp_timings["fwd_rev"] and record.hvp_time_rev_rev_s == auto.hvp_timings["rev_rev"]
        assert auto.hvp_timings[slow] > 0.3 > auto.hvp_timings[fast] > 0
        timings = dict(auto.hvp_timings)
        again = auto.measure(batch, 0.1, line_search=False)
        assert auto.hvp_timings == timings and again.hvp_mode == fast, "timed once, on the first batch"
        monkeypatch.undo()
        chosen = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=fast).measure(batch, 0.1, line_search=False)
        assert chosen.hvp_time_fwd_rev_s is None and chosen.hvp_time_rev_rev_s is None
        for key in ("c", "v2", "h_gm", "h_mm", "h_gg", "lambda_star_taylor"):
            assert getattr(record, key) == getattr(chosen, key), key

    g, m = reference_gradients(model, batch)
    read = [n for n in g if (g[n] != 0).any()]
    J, x0 = flat_objective(model, read, batch)
    m_flat = torch.cat([(m[n] if n in m else torch.zeros_like(g[n])).reshape(-1) for n in read])
    assert record.h_mm == pytest.approx((m_flat @ materialised_hessian(J, x0) @ m_flat).item(), rel=1e-8)


def test_auto_hvp_mode_without_forward_mode_runs_rev_rev_and_says_why():
    batch = {"input_ids": torch.randn(6, 3, dtype=torch.float64)}
    auto = Probe(SquareNet(OldStyleSquare), square_objective, square_aux, hvp_mode="auto")
    record = auto.measure(batch, 0.1, line_search=False)
    assert record.hvp_mode == "rev_rev" and "jvp" in record.hvp_fallback
    assert record.hvp_time_fwd_rev_s is None and record.hvp_time_rev_rev_s > 0
    reference = Probe(SquareNet(OldStyleSquare), square_objective, square_aux, hvp_mode="rev_rev").measure(batch, 0.1, line_search=False)
    assert record.h_mm == reference.h_mm and record.h_gm == reference.h_gm


def test_nested_forward_mode_is_wrong_on_the_gpt_and_the_probes_h_mm_is_not():
    """Why no HVP path uses jvp of jvp: on this GPT under torch 2.13 it gives a wrong m^T H m
    (docs/theory.md s.7); the Probe's h_mm, in both modes, is the materialised Hessian's."""
    model = tiny_gpt("parallel")
    batch = rl_batch(model)
    g, m = reference_gradients(model, batch)
    read = [n for n in g if (g[n] != 0).any()]
    J, x0 = flat_objective(model, read, batch)
    m_flat = torch.cat([(m[n] if n in m else torch.zeros_like(g[n])).reshape(-1) for n in read])
    exact = (m_flat @ materialised_hessian(J, x0) @ m_flat).item()
    nested = torch.func.jvp(lambda x: torch.func.jvp(J, (x,), (m_flat,))[1], (x0,), (m_flat,))[1].item()
    assert abs(nested - exact) > 1e-3 * abs(exact), "torch fixed nested forward mode: docs/theory.md s.7's caveat can go"
    for mode in ("fwd_rev", "rev_rev"):
        record = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode).measure(batch, 0.1, line_search=False)
        assert record.h_mm == pytest.approx(exact, rel=1e-8), mode
