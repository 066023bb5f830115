"""The run directory: rows of completed steps only, rewritten whole after every
step; a checkpoint carries its rows, so a resume neither loses nor repeats one;
its lock refuses a second live writer; damaged files and impossible paths are
one-line errors that name them."""
import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from mtpdiag import rundir
from mtpdiag.rundir import DirectoryLock, RunDir, RunDirError, check_output_dir, read_metrics
from mtpdiag.schema import CHECKPOINT, CONFIG, INCOMPLETE, LOCK, METRICS, MINIBATCH


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


def finished_run(path):
    run = RunDir(path)
    run.open(resume=False)
    run.write_config({"config": {"steps": 1}})
    run.append({"step": 0}, [])
    run.save_checkpoint({"step": 1, "model": {}})
    run.mark_complete()
    return run


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_truncated_or_empty_checkpoint_is_named_and_a_finished_run_stays_finished(tmp_path, damage):
    run = finished_run(tmp_path / "run")
    data = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    before = files(run.path)
    with pytest.raises(RunDirError, match=rf"{CHECKPOINT} is damaged \(.+\): delete it to restart this run"):
        RunDir(run.path).open(resume=True)
    assert files(run.path) == before and RunDir(run.path).is_complete()  # no .incomplete before the load failed


def test_a_damaged_config_json_is_named(tmp_path):
    run = finished_run(tmp_path / "run")
    (run.path / CONFIG).write_text('{"config": ')
    with pytest.raises(RunDirError, match=rf"{run.path / CONFIG} is damaged \(Expecting value"):
        run.read_config()


def test_an_out_that_is_a_file_lies_under_a_file_or_cannot_be_written_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RunDirError, match=r"--out .*file is a file, not a directory: choose a directory path"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(RunDirError, match=r"lies under .*file, which is a file: choose another path"):
        check_output_dir(tmp_path / "file" / "run")
    check_output_dir(tmp_path / "new" / "run")  # a directory to be made under a writable one
    assert not (tmp_path / "new").exists()  # checking writes nothing
    # a read-only place (root writes anywhere, so the permission check is stood in for)
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: path != tmp_path)
    with pytest.raises(RunDirError, match=rf"{tmp_path} is not writable: choose a directory you can write"):
        check_output_dir(tmp_path / "run")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process start times come from Linux's /proc")
def test_a_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / "run" / LOCK
        (tmp_path / "run").mkdir()
        live = {"pid": owner.pid, "started": rundir._process_start(owner.pid), "host": socket.gethostname()}
        lock_file.write_text(json.dumps(live))
        with pytest.raises(RunDirError, match=rf"being written by process {owner.pid} .*kill {owner.pid}"):
            DirectoryLock(tmp_path / "run").acquire()
        # the same pid with another start time is another process: the writer is gone
        lock_file.write_text(json.dumps({**live, "started": live["started"] - 1}))
        DirectoryLock(tmp_path / "run").acquire().release()
    finally:
        owner.kill()
        owner.wait()
    lock_file.write_text(json.dumps(live))  # its owner is dead now
    with DirectoryLock(tmp_path / "run") as lock:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid() == lock.owner()["pid"]
        assert RunDir(tmp_path / "run").open(resume=False) is None  # the lock alone does not make it non-empty
    assert not lock_file.exists()  # released


def test_a_damaged_diag_steps_csv_is_named_on_resume(tmp_path):
    from mtpdiag import schema
    from mtpdiag.hook import CSVSink

    (tmp_path / schema.diag_file("steps")).write_bytes(b'step,c\n1,"0.5\n')  # cut off inside a quoted field
    with pytest.raises(ValueError, match=f"{tmp_path / schema.diag_file('steps')} is damaged .*delete it"):
        CSVSink(tmp_path)
