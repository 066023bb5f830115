"""The functional layer under the Probe and the calibrators: forward wrapper, isolation,
S discovery, losses as functions of S and shared gradients; none of it mutates anything."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpdiag.diagnostics.functional import (
    FunctionalModel, check_finite, checked_value, find_shared, function_of, isolated, values_and_gradients,
)
from mtpdiag.model import GPT, GPTConfig


class TwoHeads(nn.Module):
    """A trunk both losses read, a main head only the objective reads, an aux head only
    the aux loss reads, a frozen scale, and train-mode state (dropout, BatchNorm)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.3)
        self.main = nn.Linear(4, 1)
        self.aux = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.double()

    def forward(self, x, detach_aux=False):
        h = self.drop(torch.tanh(self.norm(self.trunk(x)))) * self.scale
        return self.main(h), self.aux(h.detach() if detach_aux else h)


def forward(model, batch):
    return model(batch["x"])


def objective(out, batch):
    return -(out[0] - batch["y"]).pow(2).mean()


def aux_loss(out, batch):
    return out[1].pow(2).mean()


BATCH = {"x": torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
         "y": torch.randn(6, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
TRUNK = ["trunk.weight", "trunk.bias", "norm.weight", "norm.bias"]


def snapshot(model):
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same(a, b):
    assert a["training"] == b["training"]
    assert torch.equal(a["rng"], b["rng"])
    for key in ("params", "grads", "buffers"):
        assert a[key].keys() == b[key].keys()
        for name, x in a[key].items():
            y = b[key][name]
            if isinstance(x, tuple):
                assert torch.equal(x[0], y[0]) and x[1] == y[1], name
            else:
                assert (x is None and y is None) or torch.equal(x, y), name


def train_mode_model_with_a_grad():
    model = TwoHeads()
    model.train()
    model.main.eval()  # a mixed mode, which isolation must restore module by module
    objective(model(BATCH["x"]), BATCH).backward()  # leaves .grad and moves the BatchNorm statistics
    return model


def test_functional_model_swaps_named_parameters_and_keeps_the_rest():
    model = TwoHeads().eval()
    fm = FunctionalModel(model, forward)
    assert list(fm.trainable()) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert "scale" not in fm.trainable()
    new_trunk = {"trunk.weight": torch.ones(4, 3, dtype=torch.float64)}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.trunk.weight.fill_(1.0)
    out = fm(new_trunk, BATCH)
    expected = twin(BATCH["x"])
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    assert torch.equal(model.trunk.weight, TwoHeads().trunk.weight)  # the model itself is untouched
    theta, fixed = fm.split(["trunk.weight", "aux.bias"])
    assert list(theta) == ["trunk.weight", "aux.bias"] and "scale" not in fixed
    assert set(theta) | set(fixed) == set(fm.trainable()) and not set(theta) & set(fixed)
    assert not any(t.requires_grad for t in {**theta, **fixed}.values())


def test_functional_model_replaces_a_tied_weight_everywhere():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, d_model=8, n_layer=1, n_head=2, n_mtp=1)).double()
    ids = torch.randint(0, 11, (2, 6))
    fm = FunctionalModel(model)
    assert "lm_head.weight" not in fm.trainable()  # tied to wte.weight: one name
    zero = {"wte.weight": torch.zeros_like(model.wte.weight)}
    logits = fm(zero, {"input_ids": ids}).main.logits
    assert torch.equal(logits, torch.zeros_like(logits))  # the unembedding went to zero with the embedding


def test_isolated_restores_modes_rng_and_uses_the_math_attention():
    model = train_mode_model_with_a_grad()
    q = torch.randn(1, 2, 5, 4)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="forward AD"):  # the fused CPU kernel
        torch.func.jvp(lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True), (q,), (q,))
    with isolated(model):
        assert not any(m.training for m in model.modules())
        torch.rand(3)  # draws move the forked stream only
        torch.func.jvp(lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True), (q,), (q,))
    assert_same(before, snapshot(model))
    with isolated(model, eval_mode=False):
        assert [m.training for m in model.modules()] == before["training"]


def test_isolated_in_train_mode_gives_updated_buffers_their_values_back_and_leaves_the_others_unwritten():
    model = train_mode_model_with_a_grad()
    before = snapshot(model)
    with isolated(model, eval_mode=False):
        model(BATCH["x"])  # train-mode BatchNorm updates its running statistics
        assert not torch.equal(model.norm.running_mean, before["buffers"]["norm.running_mean"])
    assert_same(before, snapshot(model))
    versions = {n: b._version for n, b in model.named_buffers()}
    with isolated(model):
        model(BATCH["x"])
    assert {n: b._version for n, b in model.named_buffers()} == versions  # nothing changed, nothing written


def test_find_shared_takes_what_both_losses_reach_and_mutates_nothing():
    model = train_mode_model_with_a_grad()
    before = snapshot(model)
    assert find_shared(FunctionalModel(model, forward), objective, aux_loss, BATCH) == TRUNK
    assert_same(before, snapshot(model))

    def detached(model, batch):
        return model(batch["x"], detach_aux=True)

    with pytest.raises(ValueError, match="aux_loss.*reach no common.*shared="):
        find_shared(FunctionalModel(model, detached), objective, aux_loss, BATCH)


def test_function_of_and_values_and_gradients_match_autograd_on_a_copy():
    model = train_mode_model_with_a_grad()
    before = snapshot(model)
    fm = FunctionalModel(model, forward)
    with isolated(model):
        theta, fixed = fm.split(TRUNK)
        at_theta = function_of(fm, objective, BATCH, fixed)(theta)
        (value, aux_value, aux_only), (g, m, zero) = values_and_gradients(
            fm, [objective, aux_loss, lambda out, b: out[1].sum() * 0 + model.scale], BATCH, theta, fixed
        )
        summed = function_of(fm, objective, BATCH, fixed, summed=True)(theta)
    assert_same(before, snapshot(model))

    twin = copy.deepcopy(model).eval()
    twin.zero_grad()
    out = twin(BATCH["x"])
    assert value.item() == at_theta.item() == summed.item() == objective(out, BATCH).item()
    assert aux_value.item() == aux_loss(out, BATCH).item() and aux_only.item() == 2.0
    params = dict(twin.named_parameters())
    expected_g = torch.autograd.grad(objective(out, BATCH), [params[n] for n in TRUNK], retain_graph=True)
    expected_m = torch.autograd.grad(aux_loss(out, BATCH), [params[n] for n in TRUNK])
    for n, eg, em in zip(TRUNK, expected_g, expected_m):
        torch.testing.assert_close(g[n], eg, rtol=1e-14, atol=0)
        torch.testing.assert_close(m[n], em, rtol=1e-14, atol=0)
    # a loss that reads no parameter of S (only the frozen scale) has a zero gradient, not an error
    assert list(zero) == TRUNK and all(not t.any() for t in zero.values())


def test_bad_losses_and_non_finite_gradients_name_the_loss():
    model = TwoHeads().eval()
    out = model(BATCH["x"])

    def per_token(out, batch):
        return out[0].squeeze(-1)

    with pytest.raises(ValueError, match="per_token must return a scalar tensor"):
        checked_value(per_token, out, BATCH)
    with pytest.raises(FloatingPointError, match="aux_loss \\(aux_loss\\).*trunk.weight"):
        check_finite({"trunk.weight": torch.tensor([1.0, float("nan")])}, "aux_loss", aux_loss)
    check_finite({"trunk.weight": torch.ones(2)}, "aux_loss", aux_loss)  # finite: no error
