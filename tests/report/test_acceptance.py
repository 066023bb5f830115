"""The acceptance section and F8 (mtpdiag/report/acceptance.py, figures.acceptance_tradeoff) on
hand-built jobs of known numbers: final pairs, intervals over seeds, paired differences against
detach and the sentences they give; a job without acceptance columns gets a figure that says so."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from mtpdiag import schema
from mtpdiag.report import acceptance, build_report, figures
from mtpdiag.report.stats import t_interval

from .jobs import DETACH, hand_built_job

KL = {"label": "kl-0.5", "regime": "kl", "lam": 0.5, "calibrator": None}
FROZEN = {"label": "frozen", "regime": "frozen", "lam": None, "calibrator": None}
SEEDS = (0, 1, 2)
START = 0.8  # every arm's acceptance after SFT
# final (accept_tv_1, j_true) per arm, plus a per-seed offset
FINAL = {"detach": (0.7, 0.60), "kl-0.5": (0.9, 0.55), "frozen": (0.8, 0.60)}


def metrics(arm, seed):
    accept, j_true = FINAL[arm]
    noise = 0.01 * (seed - 1)
    row0 = {"step": 0, "j_true": 0.5, "pass1": 0.5, "accept_tv_1": START, "accept_greedy_1": 0.9, "entropy": 1.0,
            "accept_tv_2": START - 0.1}
    step5 = {"step": 5, "reward_mean": 0.5}  # a training step between evaluations: no held-out columns
    final = {"step": 10, "j_true": j_true + noise, "pass1": j_true, "accept_tv_1": accept + noise,
             "accept_greedy_1": 0.8, "entropy": 0.9 + seed, "accept_tv_2": accept - 0.2}
    return [row0, step5, final]


@pytest.fixture
def job(tmp_path):
    return hand_built_job(tmp_path / "job", [DETACH, KL, FROZEN], SEEDS, metrics=metrics)


def test_the_section_has_the_final_pairs_intervals_and_paired_differences_against_detach(job, tmp_path):
    table, runs, missing = acceptance.summary(job)
    assert missing == [] and list(table["arm"]) == ["detach", "kl-0.5", "frozen"]
    assert (runs["step"] == 10).all() and len(runs) == 9
    rows = table.set_index("arm")
    kl = rows.loc["kl-0.5"]
    expected = t_interval([0.89, 0.90, 0.91])
    assert (kl["accept_mean"], kl["accept_low"], kl["accept_high"]) == pytest.approx(expected[:3])
    assert kl["accept_change_mean"] == pytest.approx(0.1) and kl["accept_change_low"] > 0
    # paired per seed: the seed offsets cancel, so the differences have no spread
    assert kl["accept_vs_detach_mean"] == pytest.approx(0.2) and kl["accept_vs_detach_n"] == 3
    assert kl["j_true_vs_detach_mean"] == pytest.approx(-0.05)
    assert kl["j_true_vs_detach_high"] == pytest.approx(-0.05)
    assert rows.loc["frozen", "entropy_mean"] == pytest.approx(1.9)
    assert rows.loc["frozen", "accept_tv_2_mean"] == pytest.approx(0.6)
    assert np.isnan(rows.loc["detach", "accept_vs_detach_mean"])  # no difference of detach with itself
    paths = acceptance.write_acceptance(job, tmp_path / "out")
    assert [p.name for p in paths] == [schema.ACCEPTANCE_CSV, schema.ACCEPTANCE_MD]
    text = paths[1].read_text()
    assert "- **Detach**: acceptance over RL fell (-0.100 [" in text
    assert "- **KL (λ=0.5)**: acceptance over RL rose (0.100 [" in text
    assert "final acceptance against Detach: higher (0.200" in text and "J_true against Detach: lower (-0.050" in text
    assert "- **Frozen**: acceptance over RL no change detectable" in text
    assert "## Final acceptance per head" in text and "accept_tv_2" in text
    pd.testing.assert_frame_equal(pd.read_csv(paths[0], dtype={"step": str}), table, check_dtype=False)


def test_f8_plots_each_arms_mean_with_intervals_and_each_seed(job, tmp_path):
    paths = figures.acceptance_tradeoff(job, tmp_path)
    assert [p.name for p in paths] == ["F8_acceptance_tradeoff.png", "F8_acceptance_tradeoff.pdf",
                                       "F8_acceptance_tradeoff_data.csv"]
    assert imread(paths[0]).shape[0] > 300
    data = pd.read_csv(paths[-1])
    means = data[data["point"] == "arm mean"].set_index("arm")
    table = acceptance.summary(job)[0].set_index("arm")
    for column, source in (("accept_tv_1", "accept_mean"), ("accept_low", "accept_low"), ("j_true", "j_true_mean"),
                           ("j_true_high", "j_true_high")):
        np.testing.assert_allclose(means[column], table.loc[means.index, source])
    seeds = data[data["point"] == "seed"]
    assert len(seeds) == 9
    for row in seeds.itertuples():
        accept, j_true = FINAL[row.arm]
        assert row.accept_tv_1 == pytest.approx(accept + 0.01 * (row.seed - 1))
        assert row.j_true == pytest.approx(j_true + 0.01 * (row.seed - 1))


def test_a_job_without_acceptance_gets_an_f8_that_says_so_and_a_section_that_says_why(tmp_path):
    job = hand_built_job(tmp_path / "old", [DETACH, KL], (0,))  # metrics.csv of j_true and pass1 only
    with pytest.warns(UserWarning, match="not made"):  # the diagnostics figures: this job has no diagnostics
        result = build_report(job.path, tmp_path / "out")
    assert "F8" in result["figures"] and "F8" not in result["skipped"]
    assert pd.read_csv(tmp_path / "out" / "F8_acceptance_tradeoff_data.csv").empty
    assert "No run of this job logs accept_tv_1" in (tmp_path / "out" / schema.ACCEPTANCE_MD).read_text()
    assert schema.ACCEPTANCE_MD in (tmp_path / "out" / schema.CLAIMS_MD).read_text()  # linked from the claims


def test_arms_without_acceptance_are_named_not_drawn(tmp_path):
    def some(arm, seed):
        rows = metrics(arm, seed)
        return rows if arm != "frozen" else [{k: v for k, v in r.items() if not k.startswith("accept")} for r in rows]

    job = hand_built_job(tmp_path / "mixed", [DETACH, KL, FROZEN], (0, 1), metrics=some)
    table, _, missing = acceptance.summary(job)
    assert missing == ["frozen"] and list(table["arm"]) == ["detach", "kl-0.5"]
    data = pd.read_csv(figures.acceptance_tradeoff(job, tmp_path)[-1])
    assert set(data["arm"]) == {"detach", "kl-0.5"}
    assert "Arms without accept_tv_1 in their metrics.csv (left out above): ['frozen']" in acceptance.markdown(
        job, table, missing)


@pytest.mark.parametrize("low, high, word", [
    (0.1, 0.2, acceptance.ROSE), (-0.2, -0.1, acceptance.FELL), (-0.1, 0.1, acceptance.UNCHANGED),
    (np.nan, np.nan, acceptance.NO_INTERVAL)])
def test_a_direction_is_read_off_the_interval(low, high, word):
    assert acceptance.direction(low, high) == word
