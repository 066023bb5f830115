"""The trainer's own backward passes as the Probe's and the step proxy's gradients (issue 13, item 2):
bit for bit what they would take themselves, exact against a materialised Hessian, and the
trained step is the replayed one."""
import copy
import dataclasses
import math

import pytest
import torch

from mtpdiag import losses
from mtpdiag.calibrators import OCC
from mtpdiag.diagnostics import Probe, Replay, UpdateGradients, training_differs
from mtpdiag.diagnostics.functional import FunctionalModel, isolated, values_and_gradients
from mtpdiag.diagnostics.gradients import needs_trained_aux, trained_weights
from mtpdiag.hook import DiagnosticsHook, MemorySink

from test_calibrators import model_inputs
from test_probe_gpt import assert_identical, flat_objective, materialised_hessian, rl_batch, snapshot, tiny_gpt


def hf_model():
    transformers = pytest.importorskip("transformers")
    from mtpdiag.integrations.hf import MTPCausalLM

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=14, n_layer=1, n_embd=8, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    return MTPCausalLM.from_config(config, n_mtp=2).double()


MODELS = {
    "parallel": lambda: tiny_gpt("parallel"),
    "sequential": lambda: tiny_gpt("sequential"),
    "hf-gpt2": hf_model,
}


def trainer_gradients(model, batch):
    """What mtpdiag's trainer takes on a measured mini-batch: one forward in training mode, then
    the backward of J, of the MTP loss at head weight +1 and at -1."""
    model.train()
    out = model(batch["input_ids"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return UpdateGradients.take(losses.rl_objective(out, batch), losses.mtp_policy_loss(out, batch), trainable,
                                aux_minus=losses.mtp_policy_loss(out, batch, -1.0))  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_reused_trainer_gradients_equal_the_probes_own_bit_for_bit(name):
    model = MODELS[name]()
    batch = rl_batch(model)
    assert training_differs(model) is None
    given = trainer_gradients(model, batch)
    fm = FunctionalModel(model)
    params = {n: p.detach() for n, p in fm.trainable().items()}
    with isolated(model):
        losses_ = [losses.rl_objective, losses.mtp_policy_loss, lambda out, b: losses.mtp_policy_loss(out, b, -1.0)]
        (value, *_), (g, aux, aux_minus) = values_and_gradients(fm, losses_, batch, params, {})
    assert torch.equal(given.value, value)
    for own, reused in ((g, given.g), (aux, given.aux), (aux_minus, given.aux_minus)):
        assert own.keys() == reused.keys()
        for n in own:
            assert torch.equal(own[n], reused[n]), n
    assert given.source == "trainer" and given.reached == set(params)


@pytest.mark.parametrize("name", MODELS)
def test_a_measure_from_trainer_gradients_equals_the_materialised_hessian(name):
    """h_gm, h_mm and h_gg (one batched product of H m and H g_S) from the trainer's g and m, in
    both HVP modes, against the Hessian materialised over every parameter J reads; the rest
    of the record equals the Probe's own measurement."""
    model = MODELS[name]()
    batch = rl_batch(model)
    given = trainer_gradients(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for mode in ("fwd_rev", "rev_rev"):
        probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode, aux_sign_dependent=True)
        record = probe.measure_update(batch, optimizer, 0.5, gradients=given, crossfit=False)["objective"]
        own = probe.measure_update(batch, optimizer, 0.5, crossfit=False)["objective"]
        assert (record.gradients_from, own.gradients_from) == ("trainer", "probe")
        read = [n for n, t in given.g.items() if (t != 0).any()]
        J, x0 = flat_objective(model, read, batch)
        H = materialised_hessian(J, x0)
        shared = set(probe.shared_names)
        g = torch.cat([given.g[n].reshape(-1) for n in read])
        m = torch.cat([-given.aux[n].reshape(-1) for n in read])
        on_S = torch.cat([torch.full((given.g[n].numel(),), n in shared) for n in read])
        g_S, m_S = torch.where(on_S, g, 0.0), torch.where(on_S, m, 0.0)
        for key, exact in (("h_gm", g @ H @ m), ("h_mm", m_S @ H @ m_S), ("h_gg", g_S @ H @ g_S)):
            assert getattr(record, key) == pytest.approx(exact.item(), rel=1e-8), (mode, key)
        for key in ("c", "v2", "g_norm", "h_gm", "h_mm", "h_gg", "lambda_star_taylor", "delta_trained",
                    "lambda_star_meas"):  # fmt: skip
            assert record.as_row()[key] == pytest.approx(own.as_row()[key], rel=1e-10, abs=1e-14), (mode, key)


def test_the_trainer_steps_on_the_update_the_probe_replays_and_it_is_the_one_backward_to_rounding():
    """AdamW after a step (moments in place), a sign-dependent aux loss at a negative lambda
    and at lambdas that differ by head: the .grad the trainer assembles moves the parameters
    exactly as the Probe's replay does, and equals one backward over the sum to rounding."""
    for lambdas in (torch.tensor([-0.4, -0.4]), torch.tensor([0.7, 0.2])):
        model = tiny_gpt("sequential")
        batch = rl_batch(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        (-losses.rl_objective(model(batch["input_ids"]), batch)).backward()
        optimizer.step()
        twin = copy.deepcopy(model)
        out = model(batch["input_ids"])
        trainable = dict(model.named_parameters())
        grads = UpdateGradients.take(losses.rl_objective(out, batch), losses.mtp_policy_loss(out, batch), trainable)
        trained = trained_weights(lambdas)
        assert needs_trained_aux(trained, sign_dependent=True, has_minus=False)
        grads.with_trained(losses.mtp_policy_loss(out, batch, lambdas), trainable)
        update = grads.update(trained, list(trainable))
        replayed = Replay(optimizer, trainable)(update)
        optimizer.zero_grad()
        for n, p in trainable.items():
            p.grad = update[n]
        optimizer.step()
        twin_out = twin(batch["input_ids"])
        (losses.mtp_policy_loss(twin_out, batch, lambdas) - losses.rl_objective(twin_out, batch)).backward()
        for n, p in twin.named_parameters():
            assert torch.equal(replayed[n], trainable[n].detach()), n
            torch.testing.assert_close(update[n], p.grad, rtol=1e-12, atol=1e-15)


def test_measuring_with_trainer_gradients_mutates_nothing():
    model = tiny_gpt("sequential")
    batch = {**rl_batch(model), "group": torch.tensor([0, 0, 1, 1])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    given = trainer_gradients(model, batch)
    (-losses.rl_objective(model(batch["input_ids"]), batch)).backward()  # a .grad in place
    before = snapshot(model, optimizer)
    hook = DiagnosticsHook(Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True), 1,
                           MemorySink(), per_block=True)  # fmt: skip
    assert hook.measures(3, 0) and hook.wants_aux_minus()
    records = hook.on_update(3, 0, batch, optimizer, torch.tensor([0.5, -0.5]), gradients=given)
    assert records["j_batch"].gradients_from == "trainer" and records["j_batch"].curve is not None
    assert_identical(before, snapshot(model, optimizer))
    with pytest.raises(ValueError, match="UpdateGradients.take"):
        hook.on_update(3, 0, batch, optimizer, 0.5, gradients={"g": {}})


def test_a_dropout_model_keeps_its_own_gradients():
    assert "dropout with p=0.1" in training_differs(tiny_gpt(dropout=0.1))
    assert training_differs(tiny_gpt()) is None


def calibration_inputs_with_gradients(heads):
    """A calibrator's inputs on a tiny GPT with ``heads`` MTP heads, and the gradients the trainer
    would hand over with them (g, the aux gradient and, with several heads, each head's)."""
    model = tiny_gpt(n_mtp=heads)
    batch = rl_batch(model)
    inputs = model_inputs(model, batch, 0.3, forward=lambda m, b: m(b["input_ids"]))
    out = model(batch["input_ids"])
    trainable = dict(model.named_parameters())
    per_head = [losses.mtp_policy_loss(out, batch, torch.eye(heads)[k]) for k in range(heads)] if heads > 1 else None
    given = UpdateGradients.take(losses.rl_objective(out, batch), losses.mtp_policy_loss(out, batch), trainable,
                                 aux_heads=per_head)  # fmt: skip
    return inputs, given


@pytest.mark.parametrize("heads", [1, 2])
def test_the_step_proxy_from_trainer_gradients_equals_its_own_bit_for_bit(heads):
    inputs, given = calibration_inputs_with_gradients(heads)
    proxy = OCC(proxy="step")
    assert proxy.reads_gradients
    own, reused = proxy(inputs), OCC(proxy="step")(dataclasses.replace(inputs, gradients=given))
    assert torch.equal(own.lambdas, reused.lambdas) and not math.isnan(own.lambdas[0].item())
    assert own.info == reused.info


def test_the_readmes_plain_loop_with_reused_gradients_trains_what_the_one_backward_trains():
    from test_hook import minibatches

    def train(reuse):
        model = tiny_gpt("parallel")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True)
        hook = DiagnosticsHook(probe, 2, MemorySink(), crossfit=False)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        lambdas = torch.tensor([0.3, 0.6])
        for step in range(1, 4):
            for mb, rows in enumerate(minibatches(model, step)):
                out = model(rows["input_ids"])
                aux = losses.mtp_policy_loss(out, rows, lambdas)
                optimizer.zero_grad()
                if reuse and hook.measures(step, mb):
                    grads = UpdateGradients.take(losses.rl_objective(out, rows), losses.mtp_policy_loss(out, rows),
                                                 params, aux_minus=losses.mtp_policy_loss(out, rows, -1.0))  # fmt: skip
                    grads.set_grad(params, lambdas, aux, sign_dependent=True)
                    hook.on_update(step, mb, rows, optimizer, lambdas, gradients=grads)
                else:
                    (aux - losses.rl_objective(out, rows)).backward()
                optimizer.step()
        return model, hook.sink.frame("steps")

    (reused, rows), (plain, _) = train(True), train(False)
    assert rows["gradients_from"].tolist() == ["trainer", "trainer"] and rows["delta_trained"].notna().all()
    for (name, a), b in zip(reused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("heads", [1, 2])
def test_probe_calibrators_from_trainer_gradients_equal_their_own(heads):
    """The Taylor oracle, the amortised Taylor calibrator (measuring and carrying) and the
    cosine gate read the trainer's g and head k's aux gradient; their lambdas match their own."""
    from mtpdiag.calibrators import AmortisedTaylor, CosineGate, Oracle

    inputs, given = calibration_inputs_with_gradients(heads)
    for make in (Oracle, lambda: AmortisedTaylor(every=2), lambda: CosineGate(1.0)):
        own, reused = make(), make()
        assert reused.reads_gradients
        for _ in range(2):  # the amortised calibrator measures, then carries
            a, b = own(inputs), reused(dataclasses.replace(inputs, gradients=given))
            torch.testing.assert_close(b.lambdas, a.lambdas, rtol=1e-10, atol=0)
            assert torch.isfinite(a.lambdas).all() and (a.lambdas != 0).any()
