"""The proxy-tracking analysis on synthetic runs whose answers are known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtpdiag.calibrators import OCC, Oracle, WithShadows
from mtpdiag.occ_analysis import best_scale, correlation_ci, minibatch_summary, tracking_summary, tracking_table
from mtpdiag.config import TrainConfig
from mtpdiag.train import train

FAST = {"n_resamples": 400}


def run_frame(lambda_t, lambda_star, lambda_plus=1.0, **extra) -> pd.DataFrame:
    n = len(lambda_t)
    return pd.DataFrame(
        {"step": np.arange(1, n + 1), "lambda_0": lambda_t, "lambda_star_taylor": lambda_star,
         "calib_lambda_plus": lambda_plus, **extra}
    )


def test_a_proxy_proportional_to_lambda_star_tracks_it_perfectly():
    lam = np.linspace(-0.5, 2.0, 12)
    frame = run_frame(lam, 2.5 * lam, lambda_plus=0.5)
    row = tracking_summary(frame, **FAST)
    assert row["n"] == 12
    for method in ("spearman", "pearson"):
        assert row[method] == pytest.approx(1.0)
        assert row[f"{method}_lo"] == pytest.approx(1.0) and row[f"{method}_hi"] == pytest.approx(1.0)
    # lambda_t = 0 at no grid point here, so every row gives a ratio of exactly 2.5
    assert row["n_ratio"] == 12
    assert (row["ratio_median"], row["ratio_iqr"]) == (pytest.approx(2.5), pytest.approx(0.0, abs=1e-12))
    assert row["sign_agreement"] == 1.0
    # lambda* = 2.5 lambda_t with lambda_t made with lambda_plus = 0.5: the best lambda_plus is 1.25
    assert row["best_lambda_plus"] == pytest.approx(1.25) and row["fit_r2"] == pytest.approx(1.0)


def test_a_monotone_nonlinear_proxy_has_rank_correlation_one_but_pearson_below():
    lam = np.linspace(0.1, 3.0, 15)
    row = tracking_summary(run_frame(lam, lam**4), **FAST)
    assert row["spearman"] == pytest.approx(1.0)
    assert row["pearson"] < 0.95


def test_ratio_quartiles_and_sign_agreement_are_counted_by_hand():
    # ratios lambda*/lambda_t = 1, 2, 3, 4, 5 on the first five rows; lambda_t = 0 on the
    # sixth (no ratio, and a disagreeing sign); the seventh has opposite signs
    lam = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    star = [1.0, 2.0, 3.0, 4.0, 5.0, 0.7, -2.0]
    row = tracking_summary(run_frame(lam, star), **FAST)
    assert row["n_ratio"] == 6
    ratios = np.array([1, 2, 3, 4, 5, -2.0])
    assert row["ratio_median"] == pytest.approx(np.median(ratios))
    assert row["ratio_q25"] == pytest.approx(np.percentile(ratios, 25))
    assert row["ratio_iqr"] == pytest.approx(np.percentile(ratios, 75) - np.percentile(ratios, 25))
    assert row["sign_agreement"] == pytest.approx(5 / 7)


def test_rows_without_lambda_star_are_left_out_and_counted():
    lam = np.arange(1.0, 11.0)
    star = np.where(np.arange(10) % 3 == 0, 2 * lam, np.nan)  # the hook ran on every third step
    star[3] = np.inf  # a non-concave step logged as inf must not count either
    row = tracking_summary(run_frame(lam, star), **FAST)
    assert (row["n"], row["n_rows"]) == (3, 10)
    assert row["best_lambda_plus"] == pytest.approx(2.0)


def test_best_scale_is_the_least_squares_fit_through_the_origin():
    rng = np.random.default_rng(3)
    proxy = rng.normal(size=50)
    star = 3.0 * proxy + rng.normal(scale=0.5, size=50)
    scale, r2 = best_scale(proxy, star)
    expected = np.linalg.lstsq(proxy[:, None], star, rcond=None)[0][0]
    assert scale == pytest.approx(expected, rel=1e-12)
    residual = star - expected * proxy
    assert r2 == pytest.approx(1 - residual @ residual / (star @ star), rel=1e-12)
    assert np.isnan(best_scale(np.zeros(4), star[:4])[0])


def test_bootstrap_ci_is_seeded_and_covers_zero_for_an_unrelated_proxy():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=200), rng.normal(size=200)
    first = correlation_ci(x, y, "spearman", seed=1, **FAST)
    assert first == correlation_ci(x, y, "spearman", seed=1, **FAST)
    assert first != correlation_ci(x, y, "spearman", seed=2, **FAST)
    assert first["spearman_lo"] < 0 < first["spearman_hi"]
    assert first["spearman_lo"] < first["spearman"] < first["spearman_hi"]
    assert first["n_degenerate"] == 0


def test_bootstrap_ci_narrows_as_the_run_gets_longer():
    rng = np.random.default_rng(11)
    widths = []
    for n in (20, 500):
        x = rng.normal(size=n)
        ci = correlation_ci(x, x + rng.normal(size=n), "pearson", **FAST)
        widths.append(ci["pearson_hi"] - ci["pearson_lo"])
    assert widths[1] < widths[0] / 2


def test_degenerate_resamples_are_counted_not_propagated():
    # mostly lambda_t = 0 (first mini-batches): many resamples are constant
    x = np.r_[np.zeros(7), 1.0, 2.0, 3.0]
    y = np.r_[np.linspace(-1, 1, 7), 2.0, 3.0, 4.0]
    ci = correlation_ci(x, y, "spearman", **FAST)
    assert ci["n_degenerate"] > 0
    assert np.isfinite([ci["spearman_lo"], ci["spearman_hi"]]).all()
    assert np.isnan(correlation_ci(x[:2], y[:2], "spearman", **FAST)["spearman"])


def test_tracking_table_pairs_every_head_with_every_lambda_star_column():
    lam = np.linspace(0.1, 1.0, 8)
    frame = run_frame(lam, 2 * lam, lambda_1=-lam, lambda_star_meas_search=3 * lam, lambda_star_smooth=np.nan)
    table = tracking_table(frame, **FAST)
    assert sorted(zip(table.lambda_col, table.star_col)) == [
        ("lambda_0", "lambda_star_meas_search"), ("lambda_0", "lambda_star_taylor"),
        ("lambda_1", "lambda_star_meas_search"), ("lambda_1", "lambda_star_taylor"),
    ]
    head1 = table.set_index(["lambda_col", "star_col"]).loc[("lambda_1", "lambda_star_taylor")]
    assert head1["spearman"] == pytest.approx(-1.0) and head1["sign_agreement"] == 0.0


def test_bad_frames_name_the_fix():
    with pytest.raises(ValueError, match="diagnostics hook"):
        tracking_table(pd.DataFrame({"step": [1], "lambda_0": [0.1]}))
    with pytest.raises(KeyError, match="lambda_star_taylor"):
        tracking_summary(pd.DataFrame({"lambda_0": [0.1]}))
    frame = run_frame([0.1, 0.2, 0.3], [0.2, 0.4, 0.6])
    frame.loc[2, "calib_lambda_plus"] = 0.5
    with pytest.raises(ValueError, match="pass lambda_plus="):
        tracking_summary(frame, **FAST)
    assert tracking_summary(frame, lambda_plus=1.0, **FAST)["best_lambda_plus"] == pytest.approx(2.0)
    with pytest.raises(KeyError, match="per-mini-batch table"):
        minibatch_summary(frame)


def test_minibatch_summary_measures_the_first_minibatch_effect():
    steps = np.repeat(np.arange(1, 7), 3)
    minibatch = np.tile([0, 1, 2], 6)
    lam = np.where(minibatch == 0, 0.0, 0.2 * minibatch + 0.01 * steps)
    frame = pd.DataFrame({"step": steps, "minibatch": minibatch, "lambda_0": lam,
                          "calib_r_hat2": np.where(minibatch == 0, 0.0, 1e-3), "loss_total": 1.0})
    table = minibatch_summary(frame).set_index(["minibatch", "column"])
    assert set(table.index.get_level_values("column")) == {"lambda_0", "calib_r_hat2"}
    assert table.loc[(0, "lambda_0"), "frac_zero"] == 1.0
    assert table.loc[(1, "lambda_0"), "frac_zero"] == 0.0
    assert table.loc[(2, "lambda_0"), "n"] == 6
    assert table.loc[(2, "lambda_0"), "median"] == pytest.approx(np.median(0.4 + 0.01 * np.arange(1, 7)))
    assert table.loc[(1, "calib_r_hat2"), "median_abs"] == pytest.approx(1e-3)


def test_first_minibatch_effect_is_measured_in_a_real_occ_run(tmp_path):
    """pi_old is recomputed just before the update, so on mini-batch 0 the ratio
    proxy sees delta_RL = 0 and gives lambda = 0; once mini-batch 0 has moved the
    parameters, mini-batch 1 sees delta_RL != 0. The step proxy and the oracle,
    shadowed on the same mini-batches, are not tied to mini-batch 0."""
    cfg = TrainConfig.from_dict(dict(
        task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2, sft_steps=150, sft_target=None,
        sft_batch_size=32, sft_lr=3e-3, steps=3, prompts_per_step=4, group_size=4, minibatches=2, lr=1e-3,
        eval_every=100, eval_prompts=8, eval_samples=1, regime="occ", dtype="float64",
    ))
    calibrator = WithShadows(OCC.paper(), {"step": OCC(proxy="step"), "oracle": Oracle("taylor")})
    train(cfg, tmp_path / "run", calibrator=calibrator, cache_dir=tmp_path / "cache", progress=False)
    minibatches = pd.read_csv(tmp_path / "run" / "minibatch.csv")
    summary = minibatch_summary(minibatches, columns=["lambda_0", "calib_r_hat2"], zero_tol=1e-12)
    first = summary[summary.minibatch == 0].set_index("column")
    assert first.loc["lambda_0", "frac_zero"] == 1.0 and first.loc["calib_r_hat2", "frac_zero"] == 1.0
    moved = minibatches.pivot(index="step", columns="minibatch", values="grad_norm")[0] > 0
    second = minibatches[minibatches.minibatch == 1].set_index("step")
    assert moved.any(), "no mini-batch 0 had a gradient: the test needs rollouts with mixed rewards"
    assert (second.loc[moved, "calib_r_hat2"] > 0).all()
    assert (minibatches["calib_step_lambda"][minibatches.minibatch == 0] != 0).any()
    assert minibatches["calib_oracle_lambda_star_taylor"].notna().any()
