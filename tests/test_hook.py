"""Schedules, sinks and DiagnosticsHook in a plain PyTorch loop: every mini-batch's update, keyed rows."""
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from mtpdiag import losses, schema
from mtpdiag.hook import SUMMARY_FIELDS, CSVSink, DiagnosticsHook, MemorySink, ParquetSink, every, log_spaced
from mtpdiag.model import GPT, GPTConfig
from mtpdiag.diagnostics import Probe

VOCAB, T, B = 14, 8, 4


def tiny_gpt(**options):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=T, d_model=8, n_layer=1, n_head=2, **options)).double()


def rl_batch(model, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=generator)
    mask = torch.zeros(B, T - 1, dtype=torch.float64)
    mask[:, 2:] = 1.0
    with torch.no_grad():
        old = losses.token_logprobs(model(ids).main)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old, "advantages": torch.randn(B, generator=generator).double()}


def test_every_and_log_spaced_schedules():
    assert [s for s in range(1, 11) if every(3)(s)] == [3, 6, 9]
    steps = [s for s in range(0, 1001) if log_spaced(0, 1000, 7)(s)]
    assert steps[0] == 0 and steps[-1] == 1000 and len(steps) == 7
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps)  # denser early
    assert [s for s in range(1, 6) if log_spaced(1, 3, 10)(s)] == [1, 2, 3]  # rounding merges neighbours
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            every(bad)
    with pytest.raises(ValueError, match="start < stop"):
        log_spaced(10, 5, 4)
    with pytest.raises(ValueError, match="every\\(k\\)"):
        DiagnosticsHook(None, schedule="often")


def minibatches(model, step, n=2):
    """Step ``step``'s rollout batch in ``n`` mini-batches of two prompt groups each."""
    batch = rl_batch(model, seed=step)
    batch["group"] = torch.arange(B) // 2
    return [{key: value[i::n] for key, value in batch.items()} for i in range(n)]


def test_plain_loop_writes_tidy_tables_that_pandas_reads(tmp_path):
    """The README loop: measuring every mini-batch of every 2nd step leaves the training
    trajectory bit-identical, and the rows are keyed by (step, mini-batch, objective)."""

    def train(hook):
        model = tiny_gpt(dropout=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if hook is not None:
            hook.probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True)
        torch.manual_seed(1)
        for step in range(1, 5):
            for mb, minibatch in enumerate(minibatches(model, step)):
                model.train()
                out = model(minibatch["input_ids"])
                loss = -losses.rl_objective(out, minibatch) + losses.mtp_policy_loss(out, minibatch, 0.3)
                optimizer.zero_grad()
                loss.backward()
                if hook is not None:
                    jtrue_batch = {"input_ids": minibatch["input_ids"], "response_mask": minibatch["response_mask"]}
                    hook.on_update(step, mb, minibatch, optimizer, 0.3, eval_batch=jtrue_batch)
                optimizer.step()
        return model

    hook = DiagnosticsHook(None, every(2), CSVSink(tmp_path), eval_objective=losses.j_true, per_block=True,
                           extra_objectives={"j_unclipped": losses.rl_objective_unclipped},
                           clip_fraction=losses.clip_fraction)  # fmt: skip
    with_hook, without = train(hook), train(None)
    for (name, a), b in zip(with_hook.named_parameters(), without.parameters()):
        assert torch.equal(a, b), name

    steps = pd.read_csv(tmp_path / "diag_steps.csv")
    objectives = ["j_batch", "j_unclipped", "j_true"]
    assert list(zip(steps.step, steps.minibatch, steps.objective)) == [
        (s, mb, o) for s in (2, 4) for mb in (0, 1) for o in objectives
    ]
    assert {"c", "v2", "h_mm", "lambda_star_taylor", "fit_r2", "fit_origin_r2", "hvp_mode", "dtype", "note",
            "lambda_star_meas", "lambda_star_precond", "delta_jonly", "c_crossfit", "c_true"} <= set(steps.columns)
    assert (steps.optimizer == "adamw").all() and (steps.lambda_trained == 0.3).all()
    assert steps.c_eval.isna().tolist() == [o == "j_batch" for o in steps.objective]  # <grad E, m> of every other E
    # c_true is J_true's c_eval, on every objective's row of the mini-batch
    for _, rows in steps.groupby(["step", "minibatch"]):
        assert (rows.c_true == rows.set_index("objective").loc["j_true", "c_eval"]).all()
        assert rows.clip_fraction.nunique() == 1 and rows.c_crossfit.notna().all()
    curves = pd.read_csv(tmp_path / "diag_curves.csv")
    assert curves.groupby(["step", "minibatch", "objective"]).size().tolist() == [9] * 12
    assert (curves.loc[curves["lambda"] == 0, ["delta_meas", "delta_meas_s"]] == 0).all().all()
    np.testing.assert_allclose(curves.delta_jonly, curves.delta_meas - curves.delta_meas_s, rtol=0, atol=1e-15)
    blocks = pd.read_csv(tmp_path / "diag_blocks.csv")
    assert set(blocks.block) == {"wte", "wpe", "blocks.0"}
    per_step = blocks.groupby(["step", "minibatch", "objective"], sort=False).v2.sum().to_numpy()
    assert per_step == pytest.approx(steps.v2.to_numpy(), rel=1e-12)


def test_records_round_trip_through_csv_and_a_resumed_run_rewrites_repeated_steps(tmp_path):
    model = tiny_gpt()
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = DiagnosticsHook(probe, 1, CSVSink(tmp_path), line_search=False)
    records = {(step, mb): hook.on_update(step, mb, batch, optimizer, 1.0)["j_batch"]
               for step in (1, 2, 3) for mb, batch in enumerate(minibatches(model, step))}  # fmt: skip
    resumed = DiagnosticsHook(probe, 1, CSVSink(tmp_path), line_search=False)  # as if killed after step 3, resumed at 2
    records[(2, 0)] = resumed.on_update(2, 0, rl_batch(model, seed=20), optimizer, 1.0)["j_batch"]
    steps = pd.read_csv(tmp_path / "diag_steps.csv")
    assert list(zip(steps.step, steps.minibatch)) == [(1, 0), (1, 1), (2, 0)]
    for row in steps.itertuples():
        record = records[(row.step, row.minibatch)]
        assert row.c == record.c and row.h_mm == record.h_mm  # exact: pandas writes 17 digits


def test_file_sinks_use_the_schema_names_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = tiny_gpt()
    sink = CSVSink(tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = DiagnosticsHook(Probe(model, losses.rl_objective, losses.mtp_policy_loss), 1, sink, per_block=True, grid=[-1, 0, 1])
    for step in (1, 2):
        hook.on_update(step, 0, rl_batch(model, seed=step), optimizer, 1.0)
    names = sorted(schema.diag_file(table) for table in schema.DIAG_TABLES)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert CSVSink(tmp_path, prefix="probe_").path("curves") == tmp_path / "probe_curves.csv"
    steps = pd.read_csv(sink.path("steps"))
    assert steps.hvp_mode.tolist() == ["fwd_rev"] * 2 and steps.hvp_fallback.isna().all()
    old = {name: (tmp_path / name).read_bytes() for name in names}

    def fails_halfway(frame, path):
        path.write_text("step,objective\n3,")
        raise OSError("disk full")

    monkeypatch.setattr(CSVSink, "_write", staticmethod(fails_halfway))
    with pytest.raises(OSError, match="disk full"):
        hook.on_update(3, 0, rl_batch(model, seed=3), optimizer, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in names} == old


def test_summary_names_the_fields_per_objective_and_unscheduled_steps_measure_nothing():
    model = tiny_gpt()
    batch = rl_batch(model, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = Probe(model, losses.rl_objective, losses.mtp_ce_loss, hvp_mode="rev_rev")
    sink = MemorySink()
    hook = DiagnosticsHook(probe, every(5), sink, eval_objective=losses.j_true, grid=[-1.0, 0.0, 1.0, 2.0])
    jtrue_batch = {"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]}
    measured = hook.on_update(5, 0, batch, optimizer, 0.5, eval_batch=jtrue_batch)
    metrics = hook.summary(measured)
    assert set(metrics) == {f"diag_{o}_{f}" for o in ("j_batch", "j_true") for f in SUMMARY_FIELDS}
    assert metrics["diag_j_batch_v2"] == metrics["diag_j_true_v2"] > 0  # same m, two curve objectives
    assert sorted(set(sink.frame("curves")["lambda"])) == [-1.0, 0.0, 1.0, 2.0]
    assert hook.on_update(6, 0, batch, optimizer, 0.5, eval_batch=jtrue_batch) == {} and len(sink.frame("steps")) == 2
    assert hook.summary({}) == {}


def test_hook_errors_name_the_fix(monkeypatch, tmp_path):
    model = tiny_gpt()
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    with pytest.raises(ValueError, match="unknown measure options \\['lamdbas'\\]"):
        DiagnosticsHook(probe, lamdbas=[0, 1, 2])
    with pytest.raises(ValueError, match="tell the curves apart"):
        DiagnosticsHook(probe, objective_name="j", eval_name="j")
    with pytest.raises(ValueError, match="tell the curves apart"):
        DiagnosticsHook(probe, extra_objectives={"j_batch": losses.rl_objective_unclipped})
    with pytest.raises(ValueError, match="needs a Probe"):
        DiagnosticsHook(model)
    with pytest.raises(ValueError, match="has no probe"):
        DiagnosticsHook(None).on_update(1, 0, rl_batch(model, seed=1), torch.optim.SGD(model.parameters(), lr=0.1), 1.0)
    with pytest.raises(ValueError, match="choose one of"):
        MemorySink().frame("step")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        ParquetSink(tmp_path)


def test_top_curvature_schedule_measures_L_of_the_gradients_objective_on_its_steps_only():
    model = tiny_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    hook = DiagnosticsHook(
        Probe(model, losses.rl_objective, losses.mtp_policy_loss), every(1), top_curvature_schedule={2}.__contains__,
        eval_objective=losses.j_true, line_search=False,
    )
    for step in (1, 2):
        batch = rl_batch(model, seed=step)
        hook.on_update(step, 0, batch, optimizer, 1.0,
                       eval_batch={"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]})
    L = hook.sink.frame("steps").set_index(["step", "objective"])["L"]
    assert pd.isna(L[(1, "j_batch")]) and pd.isna(L[(2, "j_true")])
    # L is the top eigenvalue of -H, so it bounds every Rayleigh curvature
    record = hook.probe.measure(rl_batch(model, seed=2), 1e-2, top_curvature=True, line_search=False)
    assert L[(2, "j_batch")] == pytest.approx(record.L, rel=1e-6)
    assert record.L >= record.kappa_m and record.L >= record.kappa_g
