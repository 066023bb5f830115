"""`mtpdiag train`: flags map onto TrainConfig, --resume, and clear errors."""
import json
import re

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


def cli_error(capsys, *argv) -> str:
    """The one line `mtpdiag` prints on stderr when it refuses ``argv`` (exit status 2, no
    traceback; only one-line warnings and progress lines before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    *before, error = err.strip().splitlines()
    assert "Traceback" not in err and all(line.startswith(("mtpdiag: warning: ", "sft ")) for line in before), err
    return error


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


def test_resume_continues_from_the_saved_config(tmp_path, cache, capsys):
    out = str(tmp_path / "run")
    run_cli(*TINY, "--regime", "ce", "--lam", "0.2", "--steps", "2", "--out", out, "--sft-cache", cache)
    main(["train", "--out", out, "--resume", "--steps", "4", "--sft-cache", cache, "--no-progress"])
    assert read_metrics(out)["step"].tolist() == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["lam"] == 0.2
    assert re.search(r"cannot resume .* lr: 0.001 -> 0.5",
                     cli_error(capsys, "train", "--out", out, "--resume", "--lr", "0.5", "--sft-cache", cache))


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
def test_inconsistent_flags_are_clear_errors(tmp_path, cache, capsys, args, message):
    error = cli_error(capsys, "train", *TINY, *args, "--out", str(tmp_path / "run"), "--sft-cache", cache)
    assert re.match(f"mtpdiag train: error: {message}", error), error
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_existing_run_directory_needs_resume_or_a_new_out(tmp_path, cache, capsys):
    out = str(tmp_path / "run")
    run_cli(*TINY, "--steps", "1", "--out", out, "--sft-cache", cache)
    assert "is not empty: pass --resume to continue that run, or choose a new --out" in cli_error(
        capsys, "train", *TINY, "--steps", "1", "--out", out, "--sft-cache", cache)


def test_diverging_training_stops_naming_the_step_and_the_loss(tmp_path, cache, capsys):
    # AdamW moves every weight by about lr, so lr=1e30 overflows the logits at once
    main_out = ["train", *TINY, "--lr", "1e30", "--out", str(tmp_path / "run"), "--sft-cache", cache]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(main_out)
    err = capsys.readouterr().err
    assert "mtpdiag: warning: lr=1e+30 is far above what adamw trains with (above 0.1)" in err
    assert re.search(r"step 1, mini-batch 1: \w+ = nan is not finite; stopped before the update", err), err


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


# ----------------------------------------------------------------------------- issue 10: reliability


def test_threads_1_and_2_give_identical_metrics_or_different_sft_cache_entries(tmp_path):
    import pandas as pd

    cache = tmp_path / "cache"
    runs = {}
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}"
        run_cli(*TINY, "--steps", "2", "--threads", str(threads), "--out", str(out), "--sft-cache", str(cache))
        saved = json.loads((out / "config.json").read_text())
        assert saved["config"]["threads"] == threads  # config.json records the count
        runs[threads] = (read_metrics(out).drop(columns=[c for c in read_metrics(out) if c.endswith("_s")]),
                         saved["sft"]["sft_cache_file"])
    (metrics_1, entry_1), (metrics_2, entry_2) = runs[1], runs[2]
    assert entry_1 != entry_2 and len(list((cache / "sft").iterdir())) == 2  # the thread count is in the key
    if metrics_1.equals(metrics_2):  # where the sums happen to agree, the numbers are the same anyway
        pd.testing.assert_frame_equal(metrics_1, metrics_2, check_exact=True)


def test_version_prints_the_version(capsys):
    from mtpdiag import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"mtpdiag {__version__}"


def test_every_flag_help_says_what_it_does_and_the_description_has_no_markup():
    parser = build_parser()
    assert not any(mark in parser.description for mark in ("``", ":class:", ":func:", ":mod:"))
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
                assert len(text.split()) >= 3, f"{name} {action.option_strings[0]}: {action.help!r}"


def test_train_with_lr_minus_1_is_one_line_and_writes_nothing(tmp_path, cache, capsys):
    for lr in ("-1", "nan"):
        error = cli_error(capsys, "train", *TINY, "--lr", lr, "--out", str(tmp_path / "run"), "--sft-cache", cache)
        assert error == f"mtpdiag train: error: lr={float(lr)} must be a finite number > 0"
        assert not (tmp_path / "run").exists()
    error = cli_error(capsys, "train", *TINY, "--n-mtp", "100", "--out", str(tmp_path / "run"), "--sft-cache", cache)
    assert "n_mtp=100" in error and "set --n-mtp 6 or less" in error and not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_one_line_for_train_and_run(tmp_path, cache, capsys):
    file = tmp_path / "file"
    file.write_text("")
    assert cli_error(capsys, "train", *TINY, "--out", str(file), "--sft-cache", cache) == (
        f"mtpdiag train: error: --out {file} is a file, not a directory: choose a directory path")
    assert cli_error(capsys, "run", "--micro", "--preset", "quick", "--out", str(file / "job")) == (
        f"mtpdiag run: error: --out {file / 'job'} lies under {file}, which is a file: choose another path")


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_run_workers_below_1_is_a_usage_error(tmp_path, capsys, workers):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--micro", "--workers", workers, "--out", str(tmp_path / "job")])
    assert exit_info.value.code == 2 and "is not a count of processes: use 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()


def test_resume_on_a_truncated_checkpoint_is_one_line_and_a_finished_run_stays_finished(tmp_path, cache, capsys):
    out = tmp_path / "run"
    run_cli(*TINY, "--steps", "2", "--out", str(out), "--sft-cache", cache)
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    error = cli_error(capsys, "train", "--out", str(out), "--resume", "--steps", "3", "--sft-cache", cache)
    assert error.startswith(f"mtpdiag train: error: {checkpoint} is damaged (") and "delete it" in error
    assert not (out / ".incomplete").exists()
