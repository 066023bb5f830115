"""The main job's orchestration: its arms, resuming a killed job, refusing a foreign one, the eta sweep."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from mtpdiag import experiment
from mtpdiag.calibrators import WithShadows
from mtpdiag.experiment import ACCEPTANCE_ARMS, DEFAULT_ARMS, PRESETS, Preset, arm_config, eta_sweep_arm, micro, run_job
from mtpdiag.schema import Arm, run_dir

ARMS = (Arm.of("detach"), Arm.of("policy", 0.5))


def test_the_default_arms_keep_their_labels_and_configs():
    assert [a.label for a in DEFAULT_ARMS] == ["detach", "ce-0.5", "policy-0.1", "policy-0.5", "policy-1.0",
                                               "occ-paper", "occ-reference", "oracle", "amortised-taylor", "detach@adamw",
                                               "occ-paper@adamw"]  # fmt: skip
    assert DEFAULT_ARMS[3] == Arm("policy-0.5", "policy", 0.5)
    assert DEFAULT_ARMS[7] == Arm("oracle", "occ", None, "oracle")
    assert [a.label for a in DEFAULT_ARMS if a.diagnostics] == ["ce-0.5", "policy-0.5", "occ-paper", "oracle",
                                                                "occ-paper@adamw"]
    base = PRESETS["default"].base
    cfg = arm_config(base, DEFAULT_ARMS[7], seed=2)
    assert (cfg.regime, cfg.lam, cfg.calibrator, cfg.seed, cfg.optimizer) == ("occ", None, "oracle", 2, "sgd")
    assert cfg.with_values(regime="detach", calibrator=None, seed=0) == base
    adamw = arm_config(base, DEFAULT_ARMS[10], seed=0)
    assert (adamw.optimizer, adamw.lr, adamw.calibrator) == ("adamw", experiment.ADAMW_LR, "occ-paper")
    preset = PRESETS["quick"]
    assert Preset.from_dict(preset.to_dict()) == preset  # job.json round-trips, arms included


def test_the_regret_experiment_rides_on_the_sgd_detach_arm_only():
    default = PRESETS["default"]
    assert default.regret_every > 0 and default.base.minibatches >= 4
    assert [a.label for a in default.arms if default.runs_regret(a)] == ["detach"]
    assert not any(replace(default, regret_every=0).runs_regret(a) for a in default.arms)


def test_the_acceptance_arms_train_without_the_probe_and_the_eta_sweep_skips_them():
    assert [a.label for a in ACCEPTANCE_ARMS] == ["kl-0.5", "tv-0.5", "frozen"]
    base = PRESETS["default"].base
    assert base.diagnostics.every > 0
    for arm in ACCEPTANCE_ARMS:
        assert not arm.diagnostics and arm_config(base, arm, seed=1).diagnostics.every == 0
        assert arm in PRESETS["default"].arms and arm in PRESETS["quick"].arms
    assert arm_config(base, DEFAULT_ARMS[3], seed=1).diagnostics.every == base.diagnostics.every
    only_detached = replace(PRESETS["quick"], arms=(Arm.of("detach"), Arm.of("policy", 0.5, optimizer="adamw")))
    with pytest.raises(ValueError, match="the eta sweep needs an SGD arm"):
        eta_sweep_arm(only_detached)


def test_occ_arms_shadow_the_other_readings_under_shadow_labels():
    paper = experiment._arm_calibrator(Arm.of("occ", calibrator="occ-paper"), 1)
    oracle = experiment._arm_calibrator(Arm.of("occ", calibrator="oracle"), 1)
    assert isinstance(paper, WithShadows) and paper.primary.name == "occ-paper"
    assert {k: c.name for k, c in paper.shadows.items()} == {"shadow_reference": "occ-reference"}
    assert list(oracle.shadows) == ["shadow_paper", "shadow_reference", "shadow_step"]
    assert experiment._arm_calibrator(Arm.of("policy", 0.5), 1) is None


def test_the_eta_sweep_probes_a_joint_policy_arm_else_the_first_joint_one():
    quick = PRESETS["quick"]
    assert eta_sweep_arm(quick).label == "policy-0.1"  # the first SGD policy arm
    adamw_only = replace(quick, arms=(Arm.of("policy", 0.5, optimizer="adamw"), Arm.of("ce", 0.5)))
    assert eta_sweep_arm(adamw_only).label == "ce-0.5"
    assert eta_sweep_arm(replace(quick, arms=(Arm.of("detach"), Arm.of("ce", 0.5)))).label == "ce-0.5"
    with pytest.raises(ValueError, match="not only detached ones"):
        eta_sweep_arm(replace(quick, arms=(Arm.of("detach"),)))


@pytest.fixture(scope="module")
def preset():
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
        before = (run_dir(job, ARMS[0].label, 0) / "metrics.csv").stat().st_mtime_ns
        calls.clear()
        run_job(preset, job, workers=1, cache_dir=cache, progress=False, report=False)
    return job, list(calls), before


def test_a_killed_job_resumes_without_redoing_finished_runs(preset, resumed_job):
    job, retrained, before = resumed_job
    assert retrained == ["policy"]  # detach was not trained again
    assert (run_dir(job, ARMS[0].label, 0) / "metrics.csv").stat().st_mtime_ns == before
    assert not (job / ".incomplete").exists()
    rows = pd.read_csv(run_dir(job, ARMS[1].label, 0) / "metrics.csv")
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


def test_eta_sweep_residual_shrinks_like_eta_cubed_and_reaches_past_the_trained_eta(preset, resumed_job):
    job = resumed_job[0]
    sweep = pd.read_csv(job / "eta_sweep.csv")
    assert set(sweep["arm"]) == {"policy-0.5"}
    lr = preset.base.lr
    assert sweep["eta"].max() == pytest.approx(experiment.ETA_SWEEP_ABOVE_LR * lr)
    assert (sweep["eta"] >= lr / 10).groupby(sweep["seed"]).sum().min() > 0
    small = sweep[sweep["eta"] < lr / 10]  # the clean small-eta range, where the eta^3 law must show
    for (seed, lam), rows in small.groupby(["seed", "lambda"]):
        assert rows["eta"].nunique() >= 3
        slope = np.polyfit(np.log(rows["eta"]), np.log(rows["residual"]), 1)[0]
        assert 2.7 <= slope <= 3.3, (seed, lam, slope)


def test_eta_sweep_occs_lambda_grows_like_eta_and_lambda_star_like_its_inverse(resumed_job):
    """OCC's ratio proxy reads the log-prob change of one step (first order in eta) over a
    static head gap, so lambda_t ~ eta; lambda*_taylor = (c + eta h_gm) / (-eta h_mm) ~ 1/eta
    (theory s.5). Both laws are the small-eta limit (eta h_gm and the eta^2 terms of the
    log-prob change bend them at the top of the sweep), so both are fitted on its lower half."""
    sweep = pd.read_csv(resumed_job[0] / "eta_sweep.csv")
    states = sweep.drop_duplicates(["seed", "eta"])
    for seed, rows in states.groupby("seed"):
        small = rows[rows["eta"] <= rows["eta"].quantile(0.5)]
        occ = np.polyfit(np.log(small["eta"]), np.log(small["lambda_occ_paper"].abs()), 1)[0]
        star = np.polyfit(np.log(small["eta"]), np.log(small["lambda_star_taylor"].abs()), 1)[0]
        assert 0.8 <= occ <= 1.2, (seed, occ)
        assert -1.05 <= star <= -0.95, (seed, star)


def test_the_gpu_preset_on_a_machine_without_a_gpu_names_the_cpu_presets(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--preset default or quick"):
        run_job(PRESETS["full"], tmp_path / "job", workers=1, progress=False)
    assert not (tmp_path / "job").exists()


# ----------------------------------------------------------------------------- issue 10: reliability


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` as {pid: start time} (zombies are dead)."""
    from pathlib import Path

    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children[int(stat.parent.name)] = fields[19]
    return children


def _alive(pid: int, started: str) -> bool:
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    fields = text[text.rindex(")") + 2:].split()
    return fields[0] != "Z" and fields[19] == started  # the same process, not a reused pid


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent_after_kill_9_and_a_restart_takes_over(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mtpdiag.rundir import DirectoryLock

    job = tmp_path / "job"
    parent = subprocess.Popen(
        [sys.executable, "-m", "mtpdiag", "run", "--preset", "quick", "--micro", "--workers", "2", "--out", str(job),
         "--sft-cache", str(tmp_path / "cache"), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            if any("spawn_main" in open(f"/proc/{pid}/cmdline").read() for pid in workers if os.path.exists(
                    f"/proc/{pid}/cmdline")):
                break
            time.sleep(0.2)
        assert parent.poll() is None and workers, "the job started no worker process"
        time.sleep(1.0)  # let the pool start all its workers
        workers = _children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        time.sleep(10)
        survivors = [pid for pid, started in workers.items() if _alive(pid, started)]
        assert survivors == [], f"workers {survivors} outlived their job"
        # the dead job's lock is taken over by a restart (a live one would be refused)
        DirectoryLock(job, "job directory").acquire().release()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, started in workers.items():
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def test_a_failing_worker_raises_its_own_error_not_one_of_the_shut_down_pool():
    import operator

    with pytest.raises(ZeroDivisionError):
        experiment._Workers(1, lambda update: None).run({"unit": (operator.truediv, 1, 0)}, lambda key: None)
