"""The main job's orchestration: resuming a killed job, refusing a foreign one, the eta sweep."""
import json

import numpy as np
import pandas as pd
import pytest

from mtpdiag import experiment
from mtpdiag.experiment import PRESETS, Arm, micro, run_job, unit_dir

ARMS = (Arm("detach", "detach"), Arm("policy-0.5", "policy", 0.5))


@pytest.fixture(scope="module")
def preset():
    from dataclasses import replace

    return replace(micro(PRESETS["quick"]), arms=ARMS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft-cache")


@pytest.fixture(scope="module")
def resumed_job(preset, cache, tmp_path_factory):
    """A job killed while training its second run, then run again.
    Returns (job directory, regimes trained by the second invocation, metrics.csv
    mtime of the first run before the second invocation)."""
    job = tmp_path_factory.mktemp("resumed") / "job"
    calls = []
    real_train = experiment.train

    def train_then_die(cfg, out, **kwargs):
        calls.append(cfg.regime)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_train(cfg, out, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "train", train_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_job(preset, job, workers=1, cache_dir=cache, progress=False, report=False)
        assert (job / ".incomplete").exists()
        before = (unit_dir(job, ARMS[0], 0) / "metrics.csv").stat().st_mtime_ns
        calls.clear()
        run_job(preset, job, workers=1, cache_dir=cache, progress=False, report=False)
    return job, list(calls), before


def test_a_killed_job_resumes_without_redoing_finished_runs(preset, resumed_job):
    job, retrained, before = resumed_job
    assert retrained == ["policy"]  # detach was not trained again
    assert (unit_dir(job, ARMS[0], 0) / "metrics.csv").stat().st_mtime_ns == before
    assert not (job / ".incomplete").exists()
    rows = pd.read_csv(unit_dir(job, ARMS[1], 0) / "metrics.csv")
    assert rows["step"].tolist() == list(range(preset.base.steps + 1))


def test_another_preset_in_the_same_directory_is_refused(preset, cache, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"preset": {"name": "something-else"}}))
    with pytest.raises(ValueError, match="choose a new --out"):
        run_job(preset, job, workers=1, cache_dir=cache, progress=False, report=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no job.json"):
        run_job(preset, tmp_path / "other", workers=1, cache_dir=cache, progress=False, report=False)


def test_eta_sweep_residual_shrinks_like_eta_cubed(resumed_job):
    job = resumed_job[0]
    sweep = pd.read_csv(job / "eta_sweep.csv")
    assert set(sweep["arm"]) == {"policy-0.5"}
    for (seed, lam), rows in sweep.groupby(["seed", "lambda"]):
        slope = np.polyfit(np.log(rows["eta"]), np.log(rows["residual"]), 1)[0]
        assert 2.7 <= slope <= 3.3, (seed, lam, slope)


def test_the_gpu_preset_on_a_machine_without_a_gpu_names_the_cpu_presets(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--preset default or quick"):
        run_job(PRESETS["full"], tmp_path / "job", workers=1, progress=False)
    assert not (tmp_path / "job").exists()
