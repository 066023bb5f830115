"""Data parallelism under torch.distributed (float64): two gloo ranks, each holding
part of a batch, give the Probe record, the calibrators' lambda and the trainer's
metrics of one process holding the whole batch; torchrun runs the CLI trainer;
wrapped modules, a fused attention kernel in an HVP and a user model that does not
fit are clear errors; the trainer trains a Hugging Face model."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from mtpdiag import losses
from mtpdiag.calibrators import OCC, CalibrationInputs, CosineGate, Oracle, WithShadows
from mtpdiag.cli import main as cli_main
from mtpdiag.model import GPT, GPTConfig, GPTOutput, HeadPrediction
from mtpdiag.diagnostics import Probe
from mtpdiag.config import TrainConfig
from mtpdiag.distributed import RowsInMemory, check_shards, minibatch_rows, on_main_then_broadcast, rank_run_dir
from mtpdiag.rundir import RunDir
from mtpdiag.resume import load_run
from mtpdiag.train import train

WORLD = 2
# float64 sums taken in another order differ by rounding (~1e-16 relative); the
# acceptance bound is 1e-6, and ABS is for quantities that are 0 up to rounding
# (e.g. Delta(0), or |delta_RL|^2 on a fresh pi_old)
RTOL, ABS = 1e-6, 1e-12
TIMING = ["time_s", "rollout_time_s", "update_time_s", "step_time_s", "callback_time_s", "diag_time_s"]
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- shared set-up


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=14, block_size=8, d_model=8, n_layer=1, n_head=2, n_mtp=2)).double()


def rl_batch(model: GPT) -> dict:
    """7 rollouts with response lengths 1 to 5 tokens, old log-probs a little off the
    current ones, in 4 prompt groups; rows 0-2 go to rank 0 and rows 3-6 to rank 1, so
    the ranks hold different numbers of rows, tokens and groups (group 1 on both)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 14, (7, 8), generator=gen)
    mask = torch.zeros(7, 7, dtype=torch.float64)
    for row, length in enumerate([5, 1, 4, 2, 3, 5, 2]):
        mask[row, 2 : 2 + length] = 1.0
    with torch.no_grad():
        current = losses.token_logprobs(model(ids).main)
    old = current + 0.1 * torch.randn(current.shape, generator=gen, dtype=torch.float64)
    return {"input_ids": ids, "response_mask": mask, "old_logprobs": old,
            "advantages": torch.randn(7, generator=gen, dtype=torch.float64),
            "group": torch.tensor([0, 0, 1, 1, 2, 2, 3])}  # fmt: skip


def j_true_eval_batch() -> dict:
    gen = torch.Generator().manual_seed(2)
    mask = torch.zeros(5, 7, dtype=torch.float64)
    mask[:, 3:] = 1.0
    return {"input_ids": torch.randint(2, 14, (5, 8), generator=gen), "response_mask": mask}


def rows_of(batch: dict, rank: int | None, split: int) -> dict:
    """The whole batch (rank None), or rank 0's first ``split`` rows / rank 1's rest."""
    if rank is None:
        return batch
    index = slice(0, split) if rank == 0 else slice(split, None)
    return {key: value[index] for key, value in batch.items()}


def stepped_adamw(model: GPT) -> torch.optim.AdamW:
    """AdamW with one step of state, the same in every process."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = 0.01 * torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def measure_everything(rank: int | None) -> dict:
    """Probe records and calibrator outputs on this rank's rows (rank None: all rows)."""
    model = tiny_gpt()
    batch = rows_of(rl_batch(model), rank, 3)
    eval_batch = rows_of(j_true_eval_batch(), rank, 2)
    optimizer = stepped_adamw(model)
    # the trained update: AdamW's replay and preconditioner, lambda on the advantages with per-head lambdas of
    # both signs, cross-fitting, the clip fraction, a held-out objective, L and per-block rows
    update = Probe(model, losses.rl_objective, losses.mtp_policy_loss, aux_sign_dependent=True).measure_update(
        batch, optimizer, torch.tensor([0.5, -0.3]), objectives={"j_batch": losses.rl_objective,
        "j_true": (losses.j_true, eval_batch)}, clip_fraction=losses.clip_fraction, top_curvature=True, per_block=True,
    )  # fmt: skip
    records = {**update, "own": Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode="rev_rev").measure(
        batch, 0.05)}  # fmt: skip
    with torch.no_grad():
        logprobs = losses.aligned_logprobs(model(batch["input_ids"]))
    inputs = CalibrationInputs(
        step=1, minibatch=1, logprobs=logprobs, old_logprobs=batch["old_logprobs"],
        response_mask=batch["response_mask"], lr=0.05, model=model, batch=batch,
        forward=lambda m, b: m(b["input_ids"]), objective=losses.rl_objective, aux_loss=losses.mtp_policy_loss,
    )  # fmt: skip
    calibrators = {
        "sum-masked": OCC(aggregate="sum", masked=True),
        "sum-unmasked": OCC(aggregate="sum", masked=False),
        "tokenwise-masked": OCC(aggregate="tokenwise", masked=True),
        "tokenwise-unmasked": OCC(aggregate="tokenwise", masked=False),
        "step-jvp": OCC(proxy="step"),
        "step-fd": OCC(proxy="step", aggregate="tokenwise", finite_difference=1.0),
        "oracle-taylor": Oracle("taylor"),
        "oracle-measured": Oracle("measured"),
        "cosine": CosineGate(),
    }
    calibrations = {name: calibrator(inputs) for name, calibrator in calibrators.items()}
    assert all(p.grad is None for p in model.parameters())
    return {
        "rows": {name: record.as_row() for name, record in records.items()},
        "searched": {name: search_tolerances(record.curve_rows()) for name, record in records.items()},
        "curves": {name: record.curve_rows() for name, record in records.items()},
        "blocks": {name: record.block_rows() for name, record in records.items()},
        "lambdas": {name: c.lambdas.tolist() for name, c in calibrations.items()},
        "info": {name: c.info for name, c in calibrations.items()},
    }


TINY_TRAIN = dict(
    task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2, dtype="float64",
    sft_steps=200, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
    steps=3, prompts_per_step=4, group_size=4, minibatches=2, lr=1e-3, eval_every=3, eval_prompts=12, eval_samples=2,
    regime="occ", diag_every=1, threads=1,
)  # fmt: skip  # threads: one SFT cache entry (the count is in its key) for the single process and the ranks


def shadowed_occ() -> WithShadows:
    """OCC (paper preset) in the update, with the other readings and the Probe-based
    calibrators logged on the same mini-batches."""
    return WithShadows(OCC.paper(), {"reference": OCC.reference(1), "step": OCC(proxy="step"), "cosine": CosineGate()})


def train_tiny(out: Path, cache: Path):
    return train(TrainConfig.from_dict(TINY_TRAIN), out, calibrator=shadowed_occ(), cache_dir=cache, progress=False)


def run_files(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / name) for name in ("metrics.csv", "minibatch.csv", "diag_steps.csv",
                                                        "diag_curves.csv", "diag_blocks.csv")}  # fmt: skip


# ----------------------------------------------------------------------------- two ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank: int, port: int, tmp: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {"measured": measure_everything(rank)}
        # rank 1 gets its own run directory and cache: it must write neither
        own = "" if rank == 0 else "rank1-"
        result = train_tiny(tmp / f"{own}run", tmp / f"{own}cache")
        results["metrics"] = result.metrics
        too_few = TrainConfig.from_dict({**TINY_TRAIN, "prompts_per_step": 1, "group_size": 3})
        with pytest.raises(ValueError, match="cannot give each of the 2 ranks one") as error:
            train(too_few, tmp / f"unused-{rank}", cache_dir=tmp / "cache")
        results["error"] = str(error.value)
        torch.save(results, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One process on the whole batch, then two gloo ranks on its halves."""
    tmp = tmp_path_factory.mktemp("distributed")
    single = {"measured": measure_everything(None), "metrics": train_tiny(tmp / "single", tmp / "cache").metrics}
    mp.spawn(two_rank_worker, args=(free_port(), tmp), nprocs=WORLD)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks, tmp


# The refined line search (scipy's bounded Brent, curves.refined_argmax) stops within
# xatol = 1e-6 of the grid width, on a curve Delta(lambda) whose top is flat to float64
# rounding over a few xatol; two summation orders stop at different points of that
# top, so lambda_star_meas agrees to 1e-5 of the grid width, not to 1e-6 of itself, and
# delta_jonly, read at lambda_star_meas, to that times its slope (twice the steepest
# secant of its grid values, for the curvature within one spacing).
SEARCH_RESOLUTION = 1e-5


def search_tolerances(curve_rows: list[dict]) -> dict[str, float]:
    """The absolute tolerance of each value read at the searched lambda*, from one curve's rows."""
    if not curve_rows:
        return {}
    lam = np.array([row["lambda"] for row in curve_rows])
    jonly = np.array([row["delta_jonly"] for row in curve_rows])
    step = SEARCH_RESOLUTION * (lam[-1] - lam[0])
    return {"lambda_star_meas": step, "delta_jonly": 2 * np.abs(np.diff(jonly) / np.diff(lam)).max() * step + ABS}


def assert_rows_close(got: dict, expected: dict, searched: dict[str, float] | None = None) -> None:
    """Equal rows up to RTOL; ``searched``: the tolerance of the values read at the searched lambda*."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key in TIMING:
            continue
        if searched and key in searched and value is not None:
            assert got[key] == pytest.approx(value, abs=searched[key]), key
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=RTOL, abs=ABS, nan_ok=True), key
        else:
            assert got[key] == value, key


def assert_frames_close(got: pd.DataFrame, expected: pd.DataFrame, curves: pd.DataFrame | None = None,
                        widest_grid: float = 0.0) -> None:
    """Equal tables up to RTOL; ``curves`` (diag_curves) for the tolerances of diag_steps' searched values;
    ``widest_grid`` for the trainer's summary columns of lambda_star_meas (and their step means)."""
    if curves is None:
        searched = [c for c in expected.columns if c.endswith("_lambda_star_meas")]
        keep = [c for c in expected.columns if c not in TIMING and c not in searched]
        pd.testing.assert_frame_equal(got[keep], expected[keep], check_exact=False, rtol=RTOL, atol=ABS)
        for column in searched:
            np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=SEARCH_RESOLUTION * widest_grid)
        return
    keys = ["step", "minibatch", "objective"]
    searched = {key: search_tolerances(rows.to_dict("records")) for key, rows in curves.groupby(keys)}
    assert len(got) == len(expected)
    for (_, got_row), (_, want_row) in zip(got.iterrows(), expected.iterrows()):
        tolerances = searched.get(tuple(want_row[keys]), {})
        assert_rows_close(*({k: None if pd.isna(v) else v for k, v in row.items()} for row in (got_row, want_row)),
                          tolerances)  # fmt: skip


def test_probe_record_on_two_ranks_equals_one_process(two_ranks):
    single, ranks, _ = two_ranks
    expected = single["measured"]
    for name in ("j_batch", "j_true"):
        row = expected["rows"][name]
        assert row["v2"] > 0 and row["L"] is not None and row["lambda_star_meas"] is not None
        assert row["c_crossfit"] is not None and row["a_precond"] is not None and row["delta_trained"] is not None
        assert row["clip_fraction"] is not None and expected["curves"][name] and expected["blocks"][name]
    for rank in ranks:
        for name, row in expected["rows"].items():
            assert_rows_close(rank["measured"]["rows"][name], row, expected["searched"][name])
            for got, want in zip(rank["measured"]["curves"][name], expected["curves"][name], strict=True):
                assert_rows_close(got, want)
            for got, want in zip(rank["measured"]["blocks"][name], expected["blocks"][name], strict=True):
                assert_rows_close(got, want)


def test_calibrators_on_two_ranks_give_the_lambda_of_one_process(two_ranks):
    single, ranks, _ = two_ranks
    expected = single["measured"]
    for name, lambdas in expected["lambdas"].items():  # something to compare: a lambda, or the cosine it gated
        cosines = [v for key, v in expected["info"][name].items() if key.startswith("cos_")]
        assert max(abs(v) for v in [*lambdas, *cosines]) > 1e-3, name
    for rank in ranks:
        for name, lambdas in expected["lambdas"].items():
            assert rank["measured"]["lambdas"][name] == pytest.approx(lambdas, rel=RTOL, abs=ABS), name
            assert_rows_close(rank["measured"]["info"][name], expected["info"][name])


def test_trainer_on_two_ranks_logs_the_rows_of_one_process(two_ranks):
    single, ranks, tmp = two_ranks
    got, expected = run_files(tmp / "run"), run_files(tmp / "single")
    minibatch = expected["minibatch.csv"]
    assert minibatch["lambda_0"].abs().max() > 1e-3 and minibatch["calib_step_lambda"].abs().max() > 1e-3
    curves = expected["diag_curves.csv"]
    widest = curves.groupby(["step", "minibatch", "objective"])["lambda"].agg(lambda grid: grid.max() - grid.min()).max()
    assert set(expected["diag_steps.csv"]["optimizer"]) == {"adamw"} and curves["delta_precond"].notna().any()
    for name, frame in expected.items():
        assert_frames_close(got[name], frame, curves if name == "diag_steps.csv" else None, widest)
    for rank in ranks:  # every rank returns the global rows
        assert_frames_close(rank["metrics"], single["metrics"], widest_grid=widest)


def test_only_rank_0_writes_files(two_ranks):
    _, _, tmp = two_ranks
    assert (tmp / "run" / "checkpoint.pt").exists()
    assert not (tmp / "rank1-run").exists() and not (tmp / "rank1-cache").exists()
    assert json.loads((tmp / "run" / "config.json").read_text())["world_size"] == WORLD


def test_too_few_rollouts_for_every_rank_is_an_error_on_every_rank(two_ranks):
    _, ranks, _ = two_ranks
    for rank in ranks:
        assert "lower --minibatches" in rank["error"]


def test_on_one_process_the_plumbing_is_the_plain_single_process_path(tmp_path):
    rows = minibatch_rows(10, 3)
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # consecutive chunks, as torch.chunk
    check_shards(rollouts_per_step=2, minibatches=2, heldout_prompts=1)  # one rollout per mini-batch is enough
    run = rank_run_dir(tmp_path / "run")
    assert type(run) is RunDir and not isinstance(run, RowsInMemory)
    built = []
    model, summary = on_main_then_broadcast(lambda: (tiny_gpt(), {"trained": True}), lambda: built.append(1))
    assert summary == {"trained": True} and isinstance(model, GPT) and not built  # rank 0 builds nothing else


def test_torchrun_cli_trainer_logs_the_rows_of_one_process(tmp_path):
    flags = ["--task-option", "digits=1", "--block-size", "8", "--d-model", "16", "--n-layer", "1", "--n-head", "2",
             "--dtype", "float64", "--sft-steps", "60", "--sft-target", "none", "--sft-batch-size", "32",
             "--sft-lr", "3e-3", "--steps", "3", "--prompts-per-step", "3", "--group-size", "4", "--minibatches", "2",
             "--lr", "1e-3", "--eval-every", "3", "--eval-prompts", "8", "--eval-samples", "1", "--regime", "occ",
             "--calibrator", "occ-reference", "--no-progress"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                "--no-python", shutil.which("mtpdiag")]  # fmt: skip
    # separate SFT caches: rank 0's SFT under torchrun is checked against the single process's
    done = subprocess.run(
        [*launcher, "train", *flags, "--out", str(tmp_path / "torchrun"), "--sft-cache", str(tmp_path / "cache-a")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cli_main(["train", *flags, "--out", str(tmp_path / "single"), "--sft-cache", str(tmp_path / "cache-b")])
    for name in ("metrics.csv", "minibatch.csv"):
        expected = pd.read_csv(tmp_path / "single" / name)
        assert_frames_close(pd.read_csv(tmp_path / "torchrun" / name), expected)
    assert pd.read_csv(tmp_path / "single" / "minibatch.csv")["lambda_0"].abs().max() > 1e-4


# ----------------------------------------------------------------------------- errors that name the fix


@pytest.fixture
def single_process_group(tmp_path):
    """A real one-process gloo group, as DDP and FSDP need."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # a one-process group shards nothing
def test_wrapped_modules_are_rejected_by_the_probe_and_the_trainer(single_process_group, tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(tiny_gpt())
    with pytest.raises(TypeError, match="pass `model.module`"):
        Probe(ddp, losses.rl_objective, losses.mtp_policy_loss)
    with pytest.raises(TypeError, match="pass `model.module`"):
        train(TrainConfig.from_dict(TINY_TRAIN), tmp_path / "run", model=ddp)
    fsdp = FullyShardedDataParallel(tiny_gpt(), device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match="full_state_dict=True"):
        Probe(fsdp, losses.rl_objective, losses.mtp_policy_loss)


class FlashAttentionGPT(nn.Module):
    """One attention layer that calls the fused CPU flash-attention kernel itself, as
    custom models and kernel libraries do, so the probe's math-backend switch cannot
    reach it; its backward has no derivative."""

    def __init__(self, vocab: int = 14, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d, dtype=torch.float64)
        self.qkv = nn.Linear(d, 3 * d, dtype=torch.float64)
        self.mtp_heads = nn.ModuleList([nn.Linear(d, d, dtype=torch.float64)])

    def forward(self, idx: torch.Tensor) -> GPTOutput:
        x = self.embed(idx)
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, dim=-1))
        h = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0].squeeze(1)
        logits = F.linear(h, self.embed.weight)
        positions = torch.arange(idx.size(1))
        mtp = F.linear(self.mtp_heads[0](h), self.embed.weight)
        return GPTOutput(
            main=HeadPrediction(logits[:, :-1], idx[:, 1:], positions[1:]),
            mtp=[HeadPrediction(mtp[:, :-2], idx[:, 2:], positions[2:])],
        )


def test_fused_attention_kernel_in_an_hvp_names_the_fix():
    model = FlashAttentionGPT()
    batch = rl_batch(tiny_gpt())
    probe = Probe(model, losses.rl_objective, losses.mtp_policy_loss)
    assert probe.measure(batch, 0.05, hvp=False, line_search=False).v2 > 0  # gradients alone are fine
    for mode in ("fwd_rev", "rev_rev"):
        with pytest.raises(RuntimeError, match="attention='math'.*attn_implementation='eager'"):
            Probe(model, losses.rl_objective, losses.mtp_policy_loss, hvp_mode=mode).measure(batch, 0.05)


# ----------------------------------------------------------------------------- a user model in the trainer

def load_example():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("hf_tiny_gpt2", REPO / "examples" / "hf_tiny_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_example_trains_a_tiny_gpt2_with_diagnostics(tmp_path):
    example = load_example()
    result = example.main(["--out", str(tmp_path / "run"), "--steps", "2", "--sft-steps", "100", "--no-progress"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_class"] == "MTPCausalLM" and config["sft"]["sft_cache_file"] is None
    assert list(result.metrics["step"]) == [0, 1, 2]
    diag = pd.read_csv(tmp_path / "run" / "diag_steps.csv")
    assert diag[["step", "minibatch"]].drop_duplicates().values.tolist() == [[s, mb] for s in (1, 2) for mb in (0, 1)]
    assert set(diag["objective"]) == {"j_batch", "j_true"} and diag["v2"].gt(0).any()  # per mini-batch: some have m = 0
    with pytest.raises(ValueError, match="not mtpdiag's GPT"):
        load_run(tmp_path / "run")


def test_a_user_model_that_does_not_fit_the_config_names_the_fix(tmp_path):
    example = load_example()
    cfg = TrainConfig.from_dict(TINY_TRAIN)
    with pytest.raises(ValueError, match="model.to\\(device='cpu', dtype=torch.float64\\)"):
        train(cfg, tmp_path / "a", model=example.tiny_gpt2(vocab_size=14, n_mtp=1))
    with pytest.raises(ValueError, match="n_mtp=1 MTP heads over task 'addition'"):
        train(cfg, tmp_path / "b", model=example.tiny_gpt2(vocab_size=14, n_mtp=2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 MTP heads over 20 tokens"):
        train(cfg, tmp_path / "c", model=example.tiny_gpt2(vocab_size=20, n_mtp=2, dtype=torch.float64))
