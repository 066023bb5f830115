"""Figures (mtpdiag/report/figures.py, style.py): the parabolas are the formulas of
mtpdiag.diagnostics.quantities on the CSV row, colours come from the regime
registry, and a job that lacks an arm gets a figure that says so."""
import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest

from mtpdiag import regimes, schema
from mtpdiag.diagnostics import quantities
from mtpdiag.report import figures, style
from mtpdiag.report.load import JobError

from .jobs import CE, DETACH, OCC_PAPER, POLICY, hand_built_job

ORACLE = {"label": "oracle", "regime": "occ", "lam": None, "calibrator": "oracle"}
ROW = {"a": 0.4, "b": 0.1, "lr": 0.1, "c": 2.0, "c_eval": 3.0, "L": 5.0, "v2": 0.5, "fit_a2": -0.1, "fit_a1": 0.4,
       "fit_a0": 0.0, "fit_r2": 0.99, "harm_threshold": 4.0, "lambda_star_taylor": 2.0,
       "lambda_star_meas": 1.9, "lambda_star_smooth": 1.0}


def panel(row):
    fig, axes = style.new_figure(1, 1)
    points = pd.DataFrame({"lambda": np.linspace(-1, 3, 9), "delta_meas": np.zeros(9)})
    text = figures._curve_panel(axes[0, 0], points, pd.Series(row), "C0")
    return {line.get_label(): line for line in axes[0, 0].get_lines()}, text


def test_f1_draws_the_taylor_and_smooth_parabolas_of_the_csv_row():
    lines, text = panel(ROW)
    taylor, smooth = lines["Taylor a λ − b λ²"], lines["L-smooth expression"]
    lam = taylor.get_xdata()
    np.testing.assert_array_equal(taylor.get_ydata(), quantities.taylor_delta(0.4, 0.1, lam))
    # the curve objective's own c_eval enters the L-smooth expression, not the gradient's c
    np.testing.assert_array_equal(smooth.get_ydata(), quantities.smooth_delta(0.1, 2.0, 3.0, 5.0, 0.5, lam))
    assert "L 5" in text and "2λ*_Taylor 4" in text and "R² 0.990" in text


def test_f1_shades_where_the_measured_delta_is_below_zero_not_from_the_taylor_2_lambda_star():
    """The shading used to start at 2 lambda*_Taylor (4 here) while the measured curve was
    already below 0 from lambda = 1: it now follows the measured points."""
    fig, axes = style.new_figure(1, 1)
    lam = np.linspace(-1, 3, 9)
    points = pd.DataFrame({"lambda": lam, "delta_meas": lam * (1 - lam)})  # below 0 left of 0 and right of 1
    figures._curve_panel(axes[0, 0], points, pd.Series(ROW), "C0")
    shaded = [c for c in axes[0, 0].collections if c.get_label() == "measured Δ < 0: worse than detach"]
    assert len(shaded) == 1
    x = np.concatenate([path.vertices[:, 0] for path in shaded[0].get_paths()])
    inside = (x > 0.05) & (x < 0.95)
    assert x.min() == pytest.approx(-1, abs=0.03) and x.max() == pytest.approx(3, abs=0.03) and not inside.any()
    no_harm = pd.DataFrame({"lambda": lam, "delta_meas": np.abs(lam)})
    fig, axes = style.new_figure(1, 1)
    figures._curve_panel(axes[0, 0], no_harm, pd.Series(ROW), "C0")
    assert not [c for c in axes[0, 0].collections if c.get_label().startswith("measured Δ < 0")]


def test_f1_without_l_or_a_draws_neither_parabola():
    lines, text = panel({**ROW, "L": np.nan, "a": np.nan, "c_eval": np.nan})
    assert "L-smooth expression" not in lines and "Taylor a λ − b λ²" not in lines and "L not measured" in text
    lines, _ = panel({**ROW, "c_eval": np.nan})  # no separate curve objective: c_eval is c
    lam = lines["L-smooth expression"].get_xdata()
    np.testing.assert_array_equal(lines["L-smooth expression"].get_ydata(),
                                  quantities.smooth_delta(0.1, 2.0, None, 5.0, 0.5, lam))


@pytest.fixture
def toy_regime():
    class Toy(regimes.Regime):
        name, description, lambda_rule, display, family = "toy", "a test regime", regimes.FIXED, "Toy", "Oranges"

    yield regimes.register(Toy())
    regimes.unregister("toy")


def test_arm_colours_are_shades_of_the_family_the_registry_gives(toy_regime):
    arms = [schema.Arm(**a) for a in (DETACH, OCC_PAPER, ORACLE, POLICY)] + [schema.Arm.of("toy", 0.5),
                                                                              schema.Arm.of("toy", 2.0)]
    colours = style.arm_colors(arms)
    assert colours["detach"] == mpl.colormaps["Greys"](0.7) and colours["policy-0.5"] == mpl.colormaps["Blues"](0.7)
    assert colours["occ-paper"] == mpl.colormaps["Greens"](0.7)
    assert colours["oracle"] == mpl.colormaps["Purples"](0.7)  # the oracle calibrator is a family of its own
    assert [colours["toy-0.5"], colours["toy-2.0"]] == [mpl.colormaps["Oranges"](0.85), mpl.colormaps["Oranges"](0.5)]


def test_f1_draws_one_row_per_regime_with_the_measured_l(tmp_path):
    lam = np.linspace(-1, 3, 9)
    arms = [POLICY, {**POLICY, "label": "policy-1.0", "lam": 1.0}, CE]
    job = hand_built_job(
        tmp_path / "j", arms, (0,),
        diag=lambda arm, seed: [{"step": s, "L": 10.0, "a": 1.0, "b": 0.5, "lr": 0.1, "c": 10.0, "v2": 1.0,
                                 "fit_r2": 0.9, "fit_a2": -0.5, "fit_a1": 1.0, "fit_a0": 0.0} for s in (2, 4, 6)],
        curves=lambda arm, seed: [{"step": s, "objective": "j_batch", "lambda": x, "delta_meas": x - x**2 / 2,
                                   "delta_taylor": x - x**2 / 2, "delta_smooth": x - x**2} for s in (2, 4, 6) for x in lam])
    paths = figures.concave_curves(job, tmp_path)
    assert [p.name for p in paths] == ["F1_concave_curves.png", "F1_concave_curves.pdf", "F1_concave_curves_data.csv"]
    plotted = pd.read_csv(paths[-1])
    assert set(plotted["arm"]) == {"policy-0.5", "ce-0.5"}  # the first arm of each regime
    assert (plotted["L"] == 10.0).all() and set(plotted["step"]) == {2, 4, 6}
    with pytest.raises(JobError, match=r"F1 \(concave curves\) needs diagnostics of objective 'j_true'"):
        figures.concave_curves(job, tmp_path, objective="j_true")
    unmeasured = {**POLICY, "label": "policy-0.1", "lam": 0.1, "diagnostics": False}
    job = hand_built_job(tmp_path / "k", [DETACH | {"diagnostics": False}, unmeasured, *arms], (0,),
                         diag=lambda arm, seed: [] if arm in ("detach", "policy-0.1") else
                         [{"step": 2, "L": 10.0, "a": 1.0, "b": 0.5, "lr": 0.1, "c": 10.0, "v2": 1.0, "fit_r2": 0.9,
                           "fit_a2": -0.5, "fit_a1": 1.0, "fit_a0": 0.0}],
                         curves=lambda arm, seed: [] if arm in ("detach", "policy-0.1") else
                         [{"step": 2, "objective": "j_batch", "lambda": x, "delta_meas": x, "delta_taylor": x,
                           "delta_smooth": x} for x in lam])
    figures.concave_curves(job, tmp_path)
    assert set(pd.read_csv(tmp_path / "F1_concave_curves_data.csv")["arm"]) == {"policy-0.5", "ce-0.5"}  # no empty rows


def test_a_job_without_occ_or_policy_arms_gets_figures_that_say_so(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, CE], (0,))
    assert figures.occ_tracking(job, tmp_path)[0].name == "F3_occ_tracking.png"
    figures.per_block(job, tmp_path)
    assert (tmp_path / "F6_per_block.png").exists() and (tmp_path / "F6_per_block.pdf").exists()
    assert pd.read_csv(tmp_path / "F3_occ_tracking_data.csv").empty
    assert pd.read_csv(tmp_path / "F6_per_block_data.csv").empty


def test_f5_draws_every_arm_and_needs_each_ones_values(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, CE], (0, 1), final_j_true=lambda arm, seed: 0.6 + 0.1 * seed)
    plotted = pd.read_csv(figures.performance(job, tmp_path)[-1])
    final = plotted[(plotted["step"] == 10) & (plotted["quantity"] == "j_true")]
    assert list(final["arm"]) == ["detach", "ce-0.5"] and final["mean"].to_numpy() == pytest.approx([0.65, 0.65])
    job = hand_built_job(tmp_path / "k", [DETACH, CE], (0,), metrics=lambda arm, seed: [
        {"step": 0, "j_true": np.nan if arm == "ce-0.5" else 0.5, "pass1": 0.5}])
    with pytest.raises(JobError, match="F5 .*arm ce-0.5 has no j_true value in its metrics.csv files"):
        figures.performance(job, tmp_path)


def test_symlog_ticks_stay_few_and_include_zero():
    fig, axes = style.new_figure(1, 1)
    style.symlog_scale(axes[0, 0], np.concatenate([np.geomspace(1e-6, 1e6, 50), -np.geomspace(1e-6, 1e6, 50), [0]]))
    ticks = axes[0, 0].yaxis.get_major_locator().tick_values(0, 1)
    assert 0.0 in ticks and len(ticks) <= style.MAX_SYMLOG_TICKS and axes[0, 0].get_yscale() == "symlog"


def test_f5_draws_a_collapsed_run_apart_and_keeps_the_axis_to_the_others(tmp_path):
    from .jobs import collapsed_job

    with mpl.rc_context(), pytest.MonkeyPatch.context() as patch:
        axes_seen = []
        new_figure = style.new_figure

        def keep_axes(*args, **kwargs):
            fig, axes = new_figure(*args, **kwargs)
            axes_seen.append(axes)
            return fig, axes

        patch.setattr(style, "new_figure", keep_axes)
        plotted = pd.read_csv(figures.performance(collapsed_job(tmp_path / "j"), tmp_path)[-1])
    fallen = plotted[plotted["collapsed"]]
    assert set(zip(fallen["arm"], fallen["seed"])) == {("occ-paper", 0)}
    # the collapsed seed is not in its arm's band: the band's mean at step 10 is over seeds 1-3
    band = plotted[~plotted["collapsed"] & (plotted["arm"] == "occ-paper") & (plotted["step"] == 10)
                   & (plotted["quantity"] == "j_true")]
    assert band["mean"].iloc[0] == pytest.approx(np.mean([0.5 + 0.01 * s + 0.05 + 0.001 * s for s in (1, 2, 3)]))
    j_true_axis = axes_seen[0][0, 0]
    low, high = j_true_axis.get_ylim()
    assert low > 0.3 and high < 0.7  # the axis spans the healthy runs, not the collapse to 0.001
    labels = [line.get_label() for line in j_true_axis.get_lines()]
    assert "occ-paper seed 0 (collapsed)" in labels
    assert any("occ-paper seed 0 ends at 0.001" in " ".join(t.get_text().split()) for t in j_true_axis.texts)


def test_f3_prints_no_rank_interval_from_too_few_points():
    """At n = 3 the bootstrap interval of a monotone scatter is [1.00, 1.00]: F3 printed it as if it meant something."""
    few = pd.DataFrame({"lambda_t": [1.0, 2.0, 3.0], "lambda_star_taylor": [0.1, 0.2, 0.3]})
    assert figures._rank_correlation(few) == "ρ = 1.00, n = 3 (too few points for an interval)"
    rng = np.random.default_rng(0)
    x = rng.normal(size=figures.MIN_CORRELATION_POINTS * 2)
    enough = pd.DataFrame({"lambda_t": x, "lambda_star_taylor": x + rng.normal(size=x.size)})
    label = figures._rank_correlation(enough)
    assert label.startswith("ρ = ") and "[" in label and label.endswith(f"n = {x.size}")


def test_f4_marks_the_trained_eta_of_the_swept_arm_measured_or_not(tmp_path):
    """The trained eta was read from diag_steps of every measured arm: an AdamW arm's lr made it
    ambiguous, and an unmeasured swept arm had none. It is now the swept arm's own lr."""
    sweep = pd.DataFrame({"arm": [POLICY["label"]]})
    diag = lambda arm, seed: [{"step": 2, "lr": 0.005}]  # noqa: E731
    job = hand_built_job(tmp_path / "j", [POLICY, CE], (0, 1), diag=diag)
    assert figures._trained_lr(job, sweep) == 0.005  # an older metrics.csv without lr: diag_steps' lr
    logged = lambda arm, seed: [{"step": 0, "j_true": 0.5, "pass1": 0.5, "lr": 0.005 if arm == POLICY["label"] else 1e-4},  # noqa: E731
                                {"step": 10, "j_true": 0.5, "pass1": 0.5, "lr": 0.005 if arm == POLICY["label"] else 1e-4}]
    unmeasured = hand_built_job(tmp_path / "k", [POLICY, CE], (0,), metrics=logged)
    assert figures._trained_lr(unmeasured, sweep) == 0.005  # from the trainer's lr column, no diagnostics at all
    assert figures._trained_lr(hand_built_job(tmp_path / "l", [POLICY], (0,)), sweep) is None  # nothing logged


def test_f6_draws_no_empty_row_for_a_policy_arm_trained_without_the_probe(tmp_path):
    unmeasured = {**POLICY, "label": "policy-0.1", "lam": 0.1, "diagnostics": False}
    job = hand_built_job(tmp_path / "j", [unmeasured], (0,))
    figures.per_block(job, tmp_path)  # the only policy arm is unmeasured: the figure says so instead of a blank row
    assert pd.read_csv(tmp_path / "F6_per_block_data.csv").empty
