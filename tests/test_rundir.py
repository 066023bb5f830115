"""The run directory: rows of completed steps only, rewritten whole after every
step; a checkpoint carries its rows, so a resume neither loses nor repeats one."""
import json

import pandas as pd
import pytest
import torch

from mtpdiag.rundir import RunDir, RunDirError, read_metrics
from mtpdiag.schema import CHECKPOINT, CONFIG, INCOMPLETE, METRICS, MINIBATCH


def files(path):
    return sorted(p.name for p in path.iterdir())


def test_rows_are_written_after_every_step_and_a_later_column_leaves_earlier_rows_empty(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.open(resume=False) is None
    assert files(run.path) == [INCOMPLETE] and not run.is_complete()
    run.write_config({"config": {"steps": 2}})
    run.append({"step": 0, "j_true": 0.5}, [])
    assert files(run.path) == [INCOMPLETE, CONFIG, METRICS]  # no minibatch.csv without a mini-batch row
    run.append({"step": 1, "j_true": 0.6, "lambda_0": 0.1}, [{"step": 1, "minibatch": 0}, {"step": 1, "minibatch": 1}])
    metrics = read_metrics(run.path)
    assert metrics["step"].tolist() == [0, 1] and metrics["lambda_0"].isna().tolist() == [True, False]
    assert pd.read_csv(run.path / MINIBATCH)["minibatch"].tolist() == [0, 1]
    assert run.read_config() == {"config": {"steps": 2}}
    assert json.loads((run.path / CONFIG).read_text()) == {"config": {"steps": 2}}
    run.mark_complete()
    assert run.is_complete() and INCOMPLETE not in files(run.path)
    assert not any(name.endswith(".tmp") for name in files(run.path))  # every write went through a rename


def test_resume_rewrites_the_rows_of_the_checkpoint_and_drops_the_steps_after_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open(resume=False)
    run.append({"step": 0}, [])
    run.append({"step": 1}, [{"step": 1, "minibatch": 0}])
    run.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}})
    run.append({"step": 2}, [{"step": 2, "minibatch": 0}])  # then killed before the next checkpoint
    assert read_metrics(run.path)["step"].tolist() == [0, 1, 2]

    resumed = RunDir(run.path)
    checkpoint = resumed.open(resume=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(2))
    assert read_metrics(run.path)["step"].tolist() == [0, 1]
    assert pd.read_csv(run.path / MINIBATCH)["step"].tolist() == [1]
    assert (run.path / INCOMPLETE).exists() and CHECKPOINT in files(run.path)


def test_a_non_empty_directory_needs_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty: pass --resume to continue that run, or choose a new --out"):
        RunDir(tmp_path / "run").open(resume=False)
    assert RunDir(tmp_path / "run").open(resume=True) is None  # nothing to resume from: a fresh start
    assert RunDir(tmp_path / "missing").read_config() is None
