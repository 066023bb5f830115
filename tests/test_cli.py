"""`mtpdiag train`: flags map onto TrainConfig, --resume, and clear errors."""
import json

import pytest

from mtpdiag.cli import build_parser, config_from_args, main
from mtpdiag.config import DiagnosticsConfig
from mtpdiag.rundir import read_metrics

TINY = (
    "--task-option digits=1 --block-size 8 --d-model 32 --n-layer 1 --n-head 2 --sft-steps 100 --sft-target none "
    "--sft-batch-size 32 --sft-lr 3e-3 --prompts-per-step 4 --group-size 4 --lr 1e-3 --eval-prompts 12 "
    "--eval-samples 2 --eval-every 2 --checkpoint-every 2 --no-progress"
).split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft-cache"))


def run_cli(*args):
    main(["train", *args])


def test_train_writes_a_run_directory_from_the_flags(tmp_path, cache, capsys):
    out = tmp_path / "run"
    run_cli(*TINY, "--regime", "policy", "--lam", "0.5", "--steps", "3", "--seed", "1", "--out", str(out),
            "--sft-cache", cache)  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    config = saved["config"]
    assert config["task_options"] == {"digits": 1}  # parsed as a number, not the string "1"
    assert (config["regime"], config["lam"], config["steps"], config["seed"]) == ("policy", 0.5, 3, 1)
    assert config["sft_target"] is None
    assert saved["sft"]["sft_cache_file"].startswith(cache)
    assert read_metrics(out)["step"].tolist() == [0, 1, 2, 3]
    assert not (out / ".incomplete").exists()
    assert "policy: step 3, J_true" in capsys.readouterr().out


def test_resume_continues_from_the_saved_config(tmp_path, cache):
    out = str(tmp_path / "run")
    run_cli(*TINY, "--regime", "ce", "--lam", "0.2", "--steps", "2", "--out", out, "--sft-cache", cache)
    main(["train", "--out", out, "--resume", "--steps", "4", "--sft-cache", cache, "--no-progress"])
    assert read_metrics(out)["step"].tolist() == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["lam"] == 0.2
    with pytest.raises(SystemExit, match=r"cannot resume .* lr: 0.001 -> 0.5"):
        main(["train", "--out", out, "--resume", "--lr", "0.5", "--sft-cache", cache])


def test_model_and_diagnostics_flags_land_in_their_configs(tmp_path):
    args = build_parser().parse_args([
        "train", "--d-model", "64", "--n-mtp", "2", "--mtp-wiring", "sequential", "--diag-every", "5",
        "--diag-per-block", "false", "--diag-top-curvature", "all", "--diag-objectives", "j_batch",
        "--diag-hvp-mode", "rev_rev", "--lr", "0.01", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.model.d_model, cfg.model.n_mtp, cfg.model.mtp_wiring, cfg.lr) == (64, 2, "sequential", 0.01)
    assert cfg.diagnostics == DiagnosticsConfig(every=5, per_block=False, top_curvature="all", objectives=("j_batch",),
                                                hvp_mode="rev_rev")  # fmt: skip
    assert cfg.model.n_layer == 4 and cfg.diagnostics.every == 5  # the flags not given keep their defaults


@pytest.mark.parametrize(
    "args, message",
    [
        (["--regime", "joint"], "argument --regime: invalid choice: 'joint'"),
        (["--task", "sorting"], "argument --task: invalid choice: 'sorting'"),
        (["--task-option", "digits"], "write a task option as KEY=VALUE"),
        (["--sft-target", "half"], "invalid float value: 'half'"),
        (["--diag-top-curvature", "last"], "argument --diag-top-curvature: invalid choice: 'last'"),
        (["--diag-per-block", "maybe"], "'maybe' is not a boolean: use true or false"),
    ],
)
def test_malformed_flags_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, "--out", str(tmp_path / "run"))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "0.5"], "lam does not apply to regime 'detach'.*drop --lam"),
        (["--block-size", "6"], "block_size=6 is too small for task 'addition'.*--block-size 7"),
        (["--minibatches", "99"], "minibatches=99 exceeds the 16 rollouts.*lower --minibatches"),
        (["--diag-objectives", "j_true"], "diag_objectives=j_true: .*j_batch included"),
    ],
)
def test_inconsistent_flags_are_clear_errors(tmp_path, cache, args, message):
    with pytest.raises(SystemExit, match=f"mtpdiag train: error: {message}"):
        run_cli(*TINY, *args, "--out", str(tmp_path / "run"), "--sft-cache", cache)


def test_existing_run_directory_needs_resume_or_a_new_out(tmp_path, cache):
    out = str(tmp_path / "run")
    run_cli(*TINY, "--steps", "1", "--out", out, "--sft-cache", cache)
    with pytest.raises(SystemExit, match="is not empty: pass --resume to continue that run, or choose a new --out"):
        run_cli(*TINY, "--steps", "1", "--out", out, "--sft-cache", cache)


def test_diverging_training_stops_naming_the_step_and_the_loss(tmp_path, cache):
    # AdamW moves every weight by about lr, so lr=1e30 overflows the logits at once
    with pytest.raises(SystemExit, match=r"step 1, mini-batch 1: \w+ = nan is not finite; stopped before the update"):
        run_cli(*TINY, "--lr", "1e30", "--out", str(tmp_path / "run"), "--sft-cache", cache)


def test_run_quick_micro_writes_every_figure_and_claim(tmp_path, capsys):
    """The CI smoke test of the main job: `mtpdiag run --preset quick --micro`."""
    import pandas as pd
    from PIL import Image

    from mtpdiag.report.figures import FIGURES
    from mtpdiag.schema import FIGURE_FILES as NAMES

    main(["run", "--preset", "quick", "--micro", "--workers", "1", "--out", str(tmp_path / "job"),
          "--sft-cache", str(tmp_path / "cache"), "--no-progress"])
    figures = tmp_path / "job" / "figures"
    assert str(figures) in capsys.readouterr().out
    assert not (tmp_path / "job" / ".incomplete").exists()
    for name in FIGURES:
        png, pdf = figures / f"{NAMES[name]}.png", figures / f"{NAMES[name]}.pdf"
        assert Image.open(png).size[0] > 0 and pdf.read_bytes().startswith(b"%PDF")
    claims = pd.read_csv(figures / "claims.csv")
    assert [c for c in claims["claim"] if "." not in c] == [f"C{i}" for i in range(1, 9)]  # C1.slope...: parts
    assert set(claims["verdict"]) <= {"holds", "does not hold", "equivalent within the paper's effect", "inconclusive",
                                      "reported"}
    assert all(f"| {c} |" in (figures / "claims.md").read_text() for c in claims["claim"])
    table1 = pd.read_csv(figures / "table1.csv")
    arms = [a["label"] for a in json.loads((tmp_path / "job" / "job.json").read_text())["preset"]["arms"]]
    assert table1.loc[table1["table"] == "main", "arm"].tolist() == arms
