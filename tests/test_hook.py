"""Schedules, sinks and DiagnosticsHook, in a plain PyTorch loop and as a trainer callback."""
import importlib.util
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mtpdiag import losses, schema
from mtpdiag.hook import CSVSink, DiagnosticsHook, MemorySink, ParquetSink, every, log_spaced
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
        DiagnosticsHook(schedule="often")


def test_plain_loop_writes_tidy_tables_that_pandas_reads(tmp_path):
    """The README loop: measuring every 2nd step leaves the training trajectory bit-identical."""

    def train(hook):
        model = tiny_gpt(dropout=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if hook is not None:
            hook.probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
        torch.manual_seed(1)
        for step in range(1, 5):
            batch = rl_batch(model, seed=step)
            jtrue_batch = {"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]}
            if hook is not None:
                hook.on_step(step, batch, lr=1e-2, eval_batch=jtrue_batch)
            model.train()
            out = model(batch["input_ids"])
            loss = -losses.rl_objective(out, batch) + 0.3 * losses.mtp_policy_loss(out, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model

    hook = DiagnosticsHook(None, every(2), CSVSink(tmp_path), eval_objective=losses.j_true, per_block=True)
    with_hook, without = train(hook), train(None)
    for (name, a), b in zip(with_hook.named_parameters(), without.parameters()):
        assert torch.equal(a, b), name

    steps = pd.read_csv(tmp_path / "diag_steps.csv")
    assert list(zip(steps.step, steps.objective)) == [(2, "j_batch"), (2, "j_true"), (4, "j_batch"), (4, "j_true")]
    assert {"c", "v2", "h_mm", "lambda_star_taylor", "fit_r2", "hvp_mode", "dtype", "note"} <= set(steps.columns)
    assert steps.c_eval.isna().tolist() == [True, False, True, False]
    curves = pd.read_csv(tmp_path / "diag_curves.csv")
    assert set(curves.kind) == {"sgd"} and curves.groupby(["step", "objective"]).size().tolist() == [9, 9, 9, 9]
    assert (curves.loc[curves["lambda"] == 0, "delta_meas"] == 0).all()
    blocks = pd.read_csv(tmp_path / "diag_blocks.csv")
    assert set(blocks.block) == {"wte", "wpe", "blocks.0"}
    per_step = blocks.groupby(["step", "objective"]).v2.sum().to_numpy()
    assert per_step == pytest.approx(steps.v2.to_numpy(), rel=1e-12)


def test_records_round_trip_through_csv_and_a_resumed_run_rewrites_repeated_steps(tmp_path):
    model = tiny_gpt()
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    hook = DiagnosticsHook(probe, 1, CSVSink(tmp_path), line_search=False)
    records = {step: hook.on_step(step, rl_batch(model, seed=step), 0.1)["j_batch"] for step in (1, 2, 3)}
    resumed = DiagnosticsHook(probe, 1, CSVSink(tmp_path), line_search=False)  # as if killed after step 3, resumed at 2
    records[2] = resumed.on_step(2, rl_batch(model, seed=20), 0.1)["j_batch"]
    steps = pd.read_csv(tmp_path / "diag_steps.csv")
    assert steps.step.tolist() == [1, 2]
    for row in steps.itertuples():
        assert row.c == records[row.step].c and row.h_mm == records[row.step].h_mm  # exact: pandas writes 17 digits


def test_file_sinks_use_the_schema_names_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = tiny_gpt()
    sink = CSVSink(tmp_path)
    hook = DiagnosticsHook(Probe(model, losses.rl_objective, losses.mtp_policy_loss), 1, sink, per_block=True, lambdas=[-1, 0, 1])
    for step in (1, 2):
        hook.on_step(step, rl_batch(model, seed=step), 0.1)
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
        hook.on_step(3, rl_batch(model, seed=3), 0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in names} == old


def test_trainer_callback_builds_its_probe_from_the_context():
    model = tiny_gpt()
    batch = rl_batch(model, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    regime = SimpleNamespace(
        forward=lambda model, batch: model(batch["input_ids"]), objective=losses.rl_objective, aux_loss=losses.mtp_ce_loss
    )
    sink = MemorySink()
    hook = DiagnosticsHook(
        schedule=every(5), sink=sink, eval_objective=losses.j_true, optimizer_faithful=True,
        probe_options={"hvp_mode": "rev_rev"}, lambdas=[-1.0, 0.0, 1.0, 2.0],
    )
    ctx = SimpleNamespace(
        step=5, model=model, batch=batch, lr=0.05, optimizer=optimizer, losses=regime,
        j_true_batch={"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]},
    )
    metrics = hook(ctx)
    assert hook.probe.hvp_mode == "rev_rev"
    assert set(metrics) == {f"diag_{o}_{f}" for o in ("j_batch", "j_true") for f in ("c", "cos", "v2", "h_mm", "lambda_star_taylor", "lambda_star_meas_fit")}
    assert metrics["diag_j_batch_v2"] == metrics["diag_j_true_v2"] > 0  # same m, two curve objectives
    curves = sink.frame("curves")
    assert sorted(set(curves.kind)) == ["optimizer", "sgd"] and sorted(set(curves["lambda"])) == [-1.0, 0.0, 1.0, 2.0]
    ctx.step = 6
    assert hook(ctx) is None and len(sink.frame("steps")) == 2


def test_hook_errors_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown measure options \\['lamdbas'\\]"):
        DiagnosticsHook(lamdbas=[0, 1, 2])
    with pytest.raises(ValueError, match="tell the curves apart"):
        DiagnosticsHook(objective_name="j", eval_name="j")
    model = tiny_gpt()
    batch = rl_batch(model, seed=1)
    with pytest.raises(ValueError, match="has no probe"):
        DiagnosticsHook().on_step(1, batch, 0.1)
    with pytest.raises(ValueError, match="optimizer=<the training optimizer>"):
        DiagnosticsHook(Probe(model, losses.rl_objective, losses.mtp_policy_loss), optimizer_faithful=True).on_step(1, batch, 0.1)
    with pytest.raises(ValueError, match="choose one of"):
        MemorySink().frame("step")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        ParquetSink(tmp_path)


def test_top_curvature_schedule_measures_L_of_the_gradients_objective_on_its_steps_only():
    model = tiny_gpt()
    hook = DiagnosticsHook(
        Probe(model, losses.rl_objective, losses.mtp_policy_loss), every(1), top_curvature_schedule={2}.__contains__,
        eval_objective=losses.j_true, line_search=False,
    )
    for step in (1, 2):
        batch = rl_batch(model, seed=step)
        hook.on_step(step, batch, 1e-2, eval_batch={"input_ids": batch["input_ids"], "response_mask": batch["response_mask"]})
    L = hook.sink.frame("steps").set_index(["step", "objective"])["L"]
    assert pd.isna(L[(1, "j_batch")]) and pd.isna(L[(2, "j_true")])
    # L is the top eigenvalue of -H, so it bounds every Rayleigh curvature
    record = hook.probe.measure(rl_batch(model, seed=2), 1e-2, top_curvature=True, line_search=False)
    assert L[(2, "j_batch")] == pytest.approx(record.L, rel=1e-6)
    assert record.L >= record.kappa_m and record.L >= record.kappa_g
