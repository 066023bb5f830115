"""Figures F1-F8 of a job. Each function reads the job's CSVs, plots, saves
``<out_dir>/<name>.{png,pdf}`` and writes the numbers it plotted to
``<out_dir>/<name>_data.csv`` (so every point traces to CSV rows), and returns
the three paths. Missing inputs raise :class:`~mtpdiag.report.load.JobError`;
a job that legitimately lacks an arm (no occ arm for F3) gets a figure that says so.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .. import regimes
from ..diagnostics import quantities
from ..occ_analysis import correlation_ci
from ..schema import COLLAPSED, ETA_SWEEP, ETA_SWEEP_SERIES, FIGURE_FILES, atomic_write, figure_data_file
from . import acceptance, stats, style
from .data import (OBJECTIVE, STAR_COLUMNS, checkpoints, diag_steps, first_minibatch, flagged_runs, tracking_frame,
                   trained_lrs)
from .load import Job, JobError
from .regret import ORACLE as REGRET_ORACLE, summary as regret_summary
from .stats import loglog_slope, seed_bands

DELTA_UNITS = {"j_batch": "ΔJ_batch (surrogate, advantage units)", "j_true": "ΔJ_true (probability)"}
EXPECTED_ETA_SLOPE = 3  # the Taylor remainder is O(eta^3) (docs/theory.md s.2)


def _finish(fig, out_dir, figure: str, data: pd.DataFrame) -> list[Path]:
    """Save figure ``figure`` (an id of FIGURE_FILES) and the numbers it plotted."""
    out_dir, name = Path(out_dir), FIGURE_FILES[figure]
    paths = style.save(fig, out_dir, name)
    data_path = atomic_write(out_dir / figure_data_file(name), lambda tmp: data.to_csv(tmp, index=False))
    return [*paths, data_path]


def _representatives(job: Job, arms) -> list:
    """``arms`` (labels) if given, else the first measured arm (``Arm.diagnostics``) of each
    regime in job order: a regime trained only without the Probe gets no empty row."""
    if arms:
        return [job.arm(label) for label in arms]
    seen, chosen = set(), []
    for arm in (a for a in job.arms if a.diagnostics):
        regime = job.regime_of(arm)
        if regime not in seen:
            seen.add(regime)
            chosen.append(arm)
    return chosen


def _value(row: pd.Series, column: str) -> float | None:
    """A diagnostics CSV cell as the formulas of :mod:`~mtpdiag.diagnostics.quantities` take it: an empty
    cell (a quantity that was not defined, or not measured) is None."""
    value = row[column]
    return None if pd.isna(value) else float(value)


# ----------------------------------------------------------------------------- F1


def concave_curves(job: Job, out_dir, arms=None, objective: str = OBJECTIVE) -> list[Path]:
    """F1: Delta(lambda) at an early, a middle and a late measured step, one row per
    arm (default: one arm per regime), first seed with measurements: the measured
    points, their quadratic fit, the Taylor parabola, the L-smooth parabola, the
    lambda* markers and the harm threshold 2 lambda*_taylor."""
    needed = "F1 (concave curves)"
    chosen = _representatives(job, arms)
    steps = diag_steps(job, needed, columns=("a", "b", "c", "c_eval", "v2", "L", "harm_threshold", *STAR_COLUMNS,
                                             "lambda_star_smooth", "fit_a2", "fit_a1", "fit_a0", "fit_r2", "note"),
                       arms=chosen, objective=objective)
    curves = job.table("diag_curves", columns=("delta_taylor", "delta_smooth"), needed_for=needed, arms=chosen)
    curves = first_minibatch(curves)
    curves = curves[curves["objective"] == objective]
    if curves.empty:
        raise JobError(f"{needed}: no measured curve of objective {objective!r} in {job.path}")
    n_cols = max(len(checkpoints(group["step"])) for _, group in steps.groupby("arm"))
    colors = style.arm_colors(job.arms)
    used = []
    with style.styled():
        fig, axes = style.new_figure(len(chosen), n_cols)
        for row, arm in enumerate(chosen):
            of_arm = steps[steps["arm"] == arm.label]
            if of_arm.empty:
                for ax in axes[row]:
                    style.note(ax, f"{arm.label}: no diagnostics rows for objective {objective!r}")
                continue
            seed = next(s for s in job.seeds if (of_arm["seed"] == s).any())
            run = of_arm[of_arm["seed"] == seed]
            picks = checkpoints(run["step"])
            for col in range(n_cols):
                ax = axes[row, col]
                if col >= len(picks):
                    style.note(ax, f"{arm.label}: only {len(picks)} measured step(s)")
                    continue
                position, step = picks[col]
                record = run[run["step"] == step].iloc[0]
                points = curves[(curves["arm"] == arm.label) & (curves["seed"] == seed) & (curves["step"] == step)]
                title = f"{arm.label}, seed {seed}: {position} (step {step})"
                ax.set_xlabel(style.LAMBDA_LABEL)
                ax.set_ylabel(DELTA_UNITS.get(objective, f"Δ {objective}"))
                if points.empty:
                    ax.set_title(title)
                    style.note(ax, f"no curve measured at this step: {record['note']}")
                    continue
                used.append(points.assign(**record[["a", "b", "L", "fit_r2", "harm_threshold", "lambda_star_smooth",
                                                    *STAR_COLUMNS]].to_dict()))
                ax.set_title(f"{title}\n{_curve_panel(ax, points, record, colors[arm.label])}", fontsize=7)
        _figure_legend(fig, axes, loc="outside lower center", ncols=4)
        fig.suptitle(f"F1: Δ(λ) = J(θ + η(g + λm)) − J(θ + ηg), objective {objective}")
        if not used:
            raise JobError(f"{needed}: none of the chosen arms {[a.label for a in chosen]} has a measured curve")
        return _finish(fig, out_dir, "F1", pd.concat(used, ignore_index=True))


def _curve_panel(ax, points: pd.DataFrame, record: pd.Series, color) -> str:
    """Draw one curve; returns the panel's numbers (R², L, the lambda*) for its title."""
    lam = np.linspace(points["lambda"].min(), points["lambda"].max(), 200)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.plot(points["lambda"], points["delta_meas"], "o", color=color, label="measured Δ(λ)", zorder=3)
    numbers = []
    if np.isfinite(record["fit_a2"]):
        ax.plot(lam, np.polyval(record[["fit_a2", "fit_a1", "fit_a0"]].astype(float), lam), color=color, linewidth=0.8,
                label="quadratic fit of the measured points")
        numbers.append(f"R² {record['fit_r2']:.3f}")
    shown = [points["delta_meas"].to_numpy()]
    taylor = quantities.taylor_delta(_value(record, "a"), _value(record, "b"), lam)
    if taylor is not None:
        ax.plot(lam, taylor, "--", color="black", label="Taylor a λ − b λ²")
        shown.append(taylor)
    L = _value(record, "L")
    smooth = quantities.smooth_delta(_value(record, "lr"), _value(record, "c"), _value(record, "c_eval"), L,
                                     _value(record, "v2"), lam)
    if smooth is not None:
        ax.plot(lam, smooth, ":", color="tab:orange", label="L-smooth expression")
        numbers.append(f"L {L:.3g}")
    else:
        numbers.append("L not measured")
    for column, line, label in STAR_MARKERS:
        if np.isfinite(record[column]):
            numbers.append(f"{label} {record[column]:.3g}")
            if lam[0] <= record[column] <= lam[-1]:
                ax.axvline(record[column], linestyle=line, color="0.3", linewidth=0.9, label=label)
    # where the measured step is worse than detaching (Delta < 0, between measured points by linear
    # interpolation), whatever the Taylor quadratic's 2 lambda* says
    ordered = points.sort_values("lambda")
    worse = np.interp(lam, ordered["lambda"], ordered["delta_meas"]) < 0
    if worse.any():
        ax.fill_between(lam, 0, 1, where=worse, transform=ax.get_xaxis_transform(), color="tab:red", alpha=0.1,
                        linewidth=0, label="measured Δ < 0: worse than detach")
    if np.isfinite(record["harm_threshold"]):
        numbers.append(f"2λ*_Taylor {record['harm_threshold']:.3g}")
    values = np.concatenate(shown)
    span = values.max() - values.min() or abs(values.max()) or 1.0
    ax.set_ylim(values.min() - 0.15 * span, values.max() + 0.15 * span)  # the L-smooth bound may run far below
    return textwrap.fill(", ".join(numbers), TITLE_WIDTH)


TITLE_WIDTH = 60  # characters per line of a panel's numbers
STAR_MARKERS = (("lambda_star_taylor", "--", "λ*_Taylor"), ("lambda_star_meas", "-", "λ*_meas"),
                ("lambda_star_smooth", ":", "λ*_smooth"))


def _figure_legend(fig, axes, **options) -> None:
    """One legend for the whole figure: every distinct label of its panels."""
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), **options)


# ----------------------------------------------------------------------------- F2


DECOMPOSITION = (  # column, axis label, symlog axis, possible values
    ("c", "c = ⟨g, m⟩ (J·L_MTP / θ²)", False, (-np.inf, np.inf)),
    ("cos", "cos(g, m) (dimensionless)", False, (-1.0, 1.0)),
    ("v2", "v² = |m|² (L_MTP² / θ²)", True, (0.0, np.inf)),
    ("neg_h_mm", "−h_mm = −mᵀHm (J·L_MTP² / θ⁴)", True, (-np.inf, np.inf)),
)


def decomposition(job: Job, out_dir, objective: str = OBJECTIVE) -> list[Path]:
    """F2: c, cos, v^2 and -h_mm over training, one line per arm (seed mean, 95% band);
    each arm also has its own marker, so arms of neighbouring colour families stay apart
    where their bands overlap."""
    steps = diag_steps(job, "F2 (decomposition)", columns=("c", "cos", "v2", "h_mm"), objective=objective)
    steps = steps.assign(neg_h_mm=-pd.to_numeric(steps["h_mm"], errors="coerce"))
    colors = style.arm_colors(job.arms)
    measured = [arm for arm in job.arms if (steps["arm"] == arm.label).any()]
    markers = dict(zip((a.label for a in measured), style.cycle_markers(len(measured)), strict=True))
    plotted = []
    with style.styled():
        fig, axes = style.new_figure(2, 2)
        for ax, (column, label, log, bounds) in zip(axes.flat, DECOMPOSITION, strict=True):
            for arm in measured:
                summary = seed_bands(steps[steps["arm"] == arm.label], column)
                if summary.empty:
                    continue
                style.band(ax, summary, "step", arm.label, colors[arm.label], bounds, marker=markers[arm.label],
                           markersize=4)
                plotted.append(summary.assign(quantity=column))
            if log:
                style.symlog_scale(ax, steps[column])
            ax.axhline(0, color="0.5", linewidth=0.8)
            ax.set_xlabel(style.STEP_LABEL)
            ax.set_ylabel(label)
        if not plotted:
            raise JobError(f"F2 (decomposition): c, cos, v2 and h_mm of objective {objective!r} are all empty "
                           f"in {job.path}")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center")
        fig.suptitle(f"F2: per-step decomposition on the shared parameters, objective {objective} "
                     "(mean over seeds, 95% t-band)")
        return _finish(fig, out_dir, "F2", pd.concat(plotted, ignore_index=True))


# ----------------------------------------------------------------------------- F3

STAR_LINES = (("lambda_star_taylor", "-", "λ*_Taylor"), ("lambda_star_meas", ":", "λ*_meas"))


def occ_tracking(job: Job, out_dir) -> list[Path]:
    """F3: per occ arm, lambda*_t (Taylor and measured) and each OCC reading's
    lambda_t over training (seed mean, 95% band), and the scatter of lambda_t
    against lambda*_taylor with Spearman rho and its bootstrap CI."""
    arms = job.arms_of(regimes.OCC_REGIME)
    with style.styled():
        if not arms:
            fig, axes = style.new_figure(1, 1)
            style.note(axes[0, 0], f"no occ arm in this job (arms: {[a.label for a in job.arms]}):\nnothing to track")
            empty = pd.DataFrame(columns=["arm", "seed", "step", "proxy", "lambda_t"])
            return _finish(fig, out_dir, "F3", empty)
        frame = tracking_frame(job, "F3 (OCC tracking)")
        proxies = list(pd.unique(frame["proxy"]))
        proxy_colors = {p: f"C{i}" for i, p in enumerate(proxies)}
        fig, axes = style.new_figure(len(arms), 2)
        for row, arm in enumerate(arms):
            of_arm = frame[frame["arm"] == arm.label]
            series, scatter = axes[row]
            series.set_title(f"{arm.label}: λ_t and λ*_t over training")
            scatter.set_title(f"{arm.label}: λ_t against λ*_Taylor (pooled seeds)")
            stars = of_arm.drop_duplicates(["seed", "step"])
            if stars["lambda_star_taylor"].notna().sum() == 0:
                style.note(series, "no step with a measured λ*_Taylor\n(no concave direction or no diagnostics)")
                style.note(scatter, "nothing to compare")
                continue
            for column, line, label in STAR_LINES:
                summary = seed_bands(stars, column, by=("step",))
                if not summary.empty:
                    style.band(series, summary, "step", label, "black", linestyle=line)
            for proxy in proxies:
                rows = of_arm[of_arm["proxy"] == proxy]
                if rows.empty:
                    continue
                color = proxy_colors[proxy]
                style.band(series, seed_bands(rows, "lambda_t", by=("step",)), "step", f"λ_t {proxy}", color)
                paired = rows.dropna(subset=["lambda_star_taylor"])
                scatter.plot(paired["lambda_t"], paired["lambda_star_taylor"], "o", color=color, alpha=0.7,
                             label=f"{proxy}: {_rank_correlation(paired)}")
            style.symlog_scale(series, pd.concat([of_arm["lambda_t"], stars["lambda_star_taylor"]]))
            style.symlog_scale(scatter, of_arm["lambda_t"], axis="x")
            style.symlog_scale(scatter, stars["lambda_star_taylor"])
            series.set_xlabel(style.STEP_LABEL)
            series.set_ylabel("λ (dimensionless, symlog)")
            series.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
            scatter.set_xlabel("λ_t of the OCC reading (dimensionless)")
            scatter.set_ylabel("λ*_Taylor at that step (dimensionless)")
            scatter.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        fig.suptitle("F3: OCC λ_t (mean over the step's mini-batches) against λ*_t "
                     "(the update of the step's first mini-batch)")
        return _finish(fig, out_dir, "F3", frame)


# fewer points than this give a rank correlation but no interval worth printing (at n = 3
# every resample of a monotone scatter is monotone: the bootstrap says [1.00, 1.00])
MIN_CORRELATION_POINTS = 8


def _rank_correlation(paired: pd.DataFrame) -> str:
    """Spearman rho of lambda_t against lambda*_taylor, with its bootstrap CI from enough points."""
    n = len(paired)
    rho = correlation_ci(paired["lambda_t"].to_numpy(float), paired["lambda_star_taylor"].to_numpy(float),
                         "spearman", stats.N_RESAMPLES, stats.CONFIDENCE, stats.SEED)
    if n < MIN_CORRELATION_POINTS:
        return f"ρ = {rho['spearman']:.2f}, n = {n} (too few points for an interval)"
    return f"ρ = {rho['spearman']:.2f} [{rho['spearman_lo']:.2f}, {rho['spearman_hi']:.2f}], n = {n}"


# ----------------------------------------------------------------------------- F4

def _trained_lr(job: Job, sweep: pd.DataFrame) -> float | None:
    """The learning rate the swept arm trained with (its metrics.csv ``lr``), if one."""
    swept = [job.arm(label) for label in sweep["arm"].unique() if label in {a.label for a in job.arms}]
    try:
        lrs = trained_lrs(job, arms=swept)["trained_lr"].dropna() if swept else pd.Series(dtype=float)
    except JobError:
        return None
    return float(lrs.iloc[0]) if lrs.nunique() == 1 else None


def taylor_residual(job: Job, out_dir) -> list[Path]:
    """F4: |Delta_meas - Delta_taylor| against eta (log-log), one thin line per
    (arm, seed, step, lambda), the fitted common slope with its cluster-bootstrap
    CI, and a slope-3 reference."""
    sweep = job.eta_sweep("F4 (Taylor residual)")
    fit = loglog_slope(sweep, "eta", "residual", ETA_SWEEP_SERIES)
    if fit["n_series"] == 0:
        raise JobError(
            f"F4 (Taylor residual): {job.path / ETA_SWEEP} has no series with positive residuals at 2+ etas "
            f"({len(sweep)} rows, {fit['n_dropped']} with residual <= 0 or not finite)"
        )
    colors = style.arm_colors(job.arms)
    used = sweep[(sweep["eta"] > 0) & (sweep["residual"] > 0)]
    with style.styled():
        fig, axes = style.new_figure(1, 1, panel=(8.5, 4.2))  # wide: the legend sits beside the panel
        ax = axes[0, 0]
        labelled = set()
        for key, series in used.groupby(list(ETA_SWEEP_SERIES), sort=True):
            arm = key[0]
            ax.plot(series["eta"], series["residual"], "-o", markersize=2, linewidth=0.6, alpha=0.5,
                    color=colors.get(arm, "0.5"),
                    label=None if arm in labelled else f"{arm}: one line per (seed, step, λ)")
            labelled.add(arm)
        eta = np.geomspace(used["eta"].min(), used["eta"].max(), 50)
        ci = f"[{fit['low']:.2f}, {fit['high']:.2f}]" if np.isfinite(fit["low"]) else "(no CI: < 3 series)"
        ax.plot(eta, np.exp(fit["intercept"]) * eta ** fit["slope"], color="black", linewidth=2,
                label=f"fit: slope {fit['slope']:.2f} {ci}")
        centre = np.exp(np.log(eta).mean())
        ax.plot(eta, np.exp(fit["intercept"]) * centre ** fit["slope"] * (eta / centre) ** EXPECTED_ETA_SLOPE, "--",
                color="tab:red", label=f"slope {EXPECTED_ETA_SLOPE} (Taylor remainder O(η³))")
        trained = _trained_lr(job, sweep)
        if trained is not None:
            ax.axvline(trained, color="0.3", linestyle=":", label=f"trained η = {trained:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step size η (learning rate)")
        ax.set_ylabel("|Δ_meas − Δ_Taylor| (J units)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        ax.set_title(f"F4: Taylor residual, {fit['n_series']} series, {fit['n_points']} points "
                     f"({fit['n_dropped']} with zero residual left out)")
        return _finish(fig, out_dir, "F4", used.assign(fitted_slope=fit["slope"], slope_low=fit["low"],
                                                               slope_high=fit["high"]))


# ----------------------------------------------------------------------------- F5

PERFORMANCE = (
    ("j_true", "exact J_true = mean π(y*|x) (probability)"),
    ("pass1", "sampled pass@1 (fraction correct)"),
)
PROBABILITY = (0.0, 1.0)


def performance(job: Job, out_dir) -> list[Path]:
    """F5: exact J_true and sampled pass@1 on the held-out prompts against step,
    one line per arm (seed mean, 95% t-band). A run the trainer flagged as collapsed
    is left out of its arm's band and drawn alone, dashed; the axes span the other
    runs, so one collapse does not squash them (the panel says where it went)."""
    metrics = job.table("metrics", needed_for="F5 (performance)")
    flagged = flagged_runs(job)
    fallen = set(zip(flagged.loc[flagged[COLLAPSED], "arm"], flagged.loc[flagged[COLLAPSED], "seed"]))
    is_fallen = pd.Series([(a, s) in fallen for a, s in zip(metrics["arm"], metrics["seed"])], index=metrics.index,
                          dtype=bool)
    colors = style.arm_colors(job.arms)
    plotted = []
    with style.styled():
        fig, axes = style.new_figure(1, 2)
        for ax, (column, label) in zip(axes.flat, PERFORMANCE, strict=True):
            bands = []
            for arm in job.arms:
                of_arm = metrics["arm"] == arm.label
                summary = seed_bands(metrics[of_arm & ~is_fallen], column)
                if summary.empty and not (of_arm & is_fallen).any():
                    raise JobError(f"F5 (performance): arm {arm.label} has no {column} value in its metrics.csv files")
                if not summary.empty:
                    style.band(ax, summary, "step", arm.label, colors[arm.label], PROBABILITY, marker="o", markersize=3)
                    bands.append(summary)
                    plotted.append(summary.assign(quantity=column, collapsed=False))
            notes = []
            for (arm, seed), run in metrics[is_fallen].groupby(["arm", "seed"], sort=False):
                run = run.dropna(subset=[column]).sort_values("step")
                ax.plot(run["step"], run[column], "--x", color=colors[arm], linewidth=1, markersize=4,
                        label=f"{arm} seed {seed} (collapsed)")
                plotted.append(pd.DataFrame({"arm": arm, "seed": seed, "step": run["step"], "mean": run[column],
                                             "n": 1, "quantity": column, "collapsed": True}))
                notes.append(f"{arm} seed {seed} ends at {run[column].iloc[-1]:.3f}")
            if notes and bands:
                _fit_to_bands(ax, pd.concat(bands))
                style.corner_note(ax, "collapsed (dashed, not in the bands): " + "; ".join(notes))
            ax.set_xlabel(style.STEP_LABEL)
            ax.set_ylabel(label)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center")
        fig.suptitle(f"F5: held-out performance ({len(job.seeds)} seed(s); mean, 95% t-band over seeds)")
        return _finish(fig, out_dir, "F5", pd.concat(plotted, ignore_index=True))


def _fit_to_bands(ax, bands: pd.DataFrame) -> None:
    """The y range of the bands (and means), with a margin, within [0, 1]."""
    values = pd.concat([bands["mean"], bands["low"], bands["high"]]).to_numpy(float)
    values = values[np.isfinite(values)]
    low, high = values.min(), values.max()
    margin = 0.1 * (high - low) or 0.05
    ax.set_ylim(max(PROBABILITY[0], low - margin), min(PROBABILITY[1], high + margin))


# ----------------------------------------------------------------------------- F6

BLOCK_QUANTITIES = (
    ("c", "c_block = ⟨g_b, m_b⟩ (J·L_MTP / θ²)", (-np.inf, np.inf)),
    ("v2", "v²_block = |m_b|² (L_MTP² / θ²)", (0.0, np.inf)),
)


def per_block(job: Job, out_dir, objective: str = OBJECTIVE) -> list[Path]:
    """F6: c and v^2 per parameter block over training, one row per policy arm
    (seed mean, 95% band)."""
    arms = [a for a in job.arms_of(regimes.POLICY) if a.diagnostics]  # an arm trained without the Probe has no rows
    with style.styled():
        if not arms:
            fig, axes = style.new_figure(1, 1)
            style.note(axes[0, 0], f"no policy arm with diagnostics in this job (arms: {[a.label for a in job.arms]})")
            return _finish(fig, out_dir, "F6", pd.DataFrame(columns=["arm", "block", "step"]))
        blocks = first_minibatch(job.table("diag_blocks", needed_for="F6 (per-block c and v²)", arms=arms))
        blocks = blocks[blocks["objective"] == objective]
        if blocks.empty:
            raise JobError(f"F6 (per-block c and v²): no per-block rows of objective {objective!r} "
                           f"for {[a.label for a in arms]}")
        names = list(pd.unique(blocks["block"]))
        palette = {name: style.mpl.colormaps["viridis"](i / max(len(names) - 1, 1)) for i, name in enumerate(names)}
        fig, axes = style.new_figure(len(arms), 2)
        plotted = []
        for row, arm in enumerate(arms):
            of_arm = blocks[blocks["arm"] == arm.label]
            for ax, (column, label, bounds) in zip(axes[row], BLOCK_QUANTITIES, strict=True):
                ax.set_title(f"{arm.label}: {column} per block")
                if of_arm.empty:
                    style.note(ax, f"{arm.label}: no per-block rows")
                    continue
                for name in names:
                    summary = seed_bands(of_arm[of_arm["block"] == name], column, by=("step",))
                    if not summary.empty:
                        style.band(ax, summary, "step", name, palette[name], bounds)
                        plotted.append(summary.assign(arm=arm.label, block=name, quantity=column))
                if column == "v2":
                    style.symlog_scale(ax, of_arm[column])
                ax.axhline(0, color="0.5", linewidth=0.8)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
                ax.set_xlabel(style.STEP_LABEL)
                ax.set_ylabel(label)
        _figure_legend(fig, axes, loc="outside right center")  # outside: the bands stay visible
        fig.suptitle(f"F6: where the MTP gradient meets the RL gradient, per parameter block "
                     f"(policy regime, {objective})")
        return _finish(fig, out_dir, "F6", pd.concat(plotted, ignore_index=True))


# ----------------------------------------------------------------------------- F8

TRADEOFF_COLUMNS = ["point", "arm", "name", "seed", "step", "accept_tv_1", "accept_low", "accept_high", "j_true",
                    "j_true_low", "j_true_high", "n_seeds"]


def _clipped_error(mean: float, low: float, high: float) -> list[list[float]]:
    """matplotlib's asymmetric error of an interval cut to the probabilities [0, 1]."""
    return [[mean - max(low, PROBABILITY[0])], [min(high, PROBABILITY[1]) - mean]]


def acceptance_tradeoff(job: Job, out_dir) -> list[Path]:
    """F8: final exact J_true against the final held-out acceptance of head 1's drafts
    (accept_tv_1), one point per arm at the seed means with 95% t-intervals on both
    axes (drawn within [0, 1]), each seed's run a small dot, dashed lines at Detach's means:
    which regimes keep the draft useful, and at what J_true. A job whose runs log no
    acceptance gets a figure that says so."""
    table, runs, missing = acceptance.summary(job)
    colors = style.arm_colors(job.arms)
    with style.styled():
        fig, axes = style.new_figure(1, 1, panel=(6.0, 4.6))
        ax = axes[0, 0]
        if table.empty:
            style.note(ax, f"no run of this job logs {acceptance.ACCEPT} (arms: {[a.label for a in job.arms]}): "
                           "written before mtpdiag measured acceptance, or never evaluated; nothing to plot")
            return _finish(fig, out_dir, "F8", pd.DataFrame(columns=TRADEOFF_COLUMNS))
        plotted = []
        for row in table.itertuples():
            color = colors[row.arm]
            seeds = runs[runs["arm"] == row.arm]
            ax.plot(seeds[acceptance.ACCEPT], seeds["j_true"], ".", color=color, alpha=0.5, markersize=4)
            single = row.accept_n < 2
            # both axes are probabilities: the drawn interval stops at [0, 1] (the data file keeps the t-interval)
            xerr = None if single else _clipped_error(row.accept_mean, row.accept_low, row.accept_high)
            yerr = None if single else _clipped_error(row.j_true_mean, row.j_true_low, row.j_true_high)
            reference = row.regime == regimes.DETACH.name  # the arm every other one is paired against: drawn on top
            ax.errorbar(row.accept_mean, row.j_true_mean, xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=3,
                        markersize=6, zorder=4 if reference else 3,
                        label=f"{row.name} ({style.NO_BAND})" if single else row.name)
            if reference:
                ax.axvline(row.accept_mean, color=color, linestyle="--", linewidth=0.8)
                ax.axhline(row.j_true_mean, color=color, linestyle="--", linewidth=0.8)
            plotted.append({"point": "arm mean", "arm": row.arm, "name": row.name, "step": row.step,
                            "accept_tv_1": row.accept_mean, "accept_low": row.accept_low,
                            "accept_high": row.accept_high, "j_true": row.j_true_mean, "j_true_low": row.j_true_low,
                            "j_true_high": row.j_true_high, "n_seeds": row.accept_n})
            plotted += [{"point": "seed", "arm": row.arm, "name": row.name, "seed": r.seed, "step": r.step,
                         "accept_tv_1": getattr(r, acceptance.ACCEPT), "j_true": r.j_true}
                        for r in seeds.itertuples()]
        ax.set_xlabel("final acceptance of head 1's drafts, 1 − TV(p_main, q_1) (probability, held out)")
        ax.set_ylabel("final exact J_true (probability)")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right center")
        title = textwrap.fill(f"F8: the acceptance / J_true trade-off per arm ({len(job.seeds)} seed(s); mean, 95% "
                              "t-interval over seeds on both axes; dots: seeds)", 90)
        if missing:
            title += f"\narms without {acceptance.ACCEPT}, not drawn: {missing}"
        ax.set_title(title, fontsize=8)
        return _finish(fig, out_dir, "F8", pd.DataFrame(plotted, columns=TRADEOFF_COLUMNS))


def regret(job: Job, out_dir) -> list[Path]:
    """F7: each calibrator's regret (in detach-step gains) at each eta scale, mean over
    seeds of the per-seed median with its 95% t-interval; the label gives the cost."""
    frame = regret_summary(job)
    scales = sorted(frame["eta_scale"].unique())
    with style.styled():
        fig, axes = style.new_figure(1, len(scales), panel=(4.6, 0.28 * frame["calibrator"].nunique() + 1.4))
        for ax, scale in zip(axes[0], scales, strict=True):
            group = frame[frame["eta_scale"] == scale].reset_index(drop=True)
            y = np.arange(len(group))[::-1]
            for yi, row in zip(y, group.itertuples(), strict=True):
                color = "tab:green" if row.proposed else ("black" if row.calibrator == REGRET_ORACLE else "tab:blue")
                finite = np.isfinite([row.ci_low, row.ci_high]).all()
                # a regret is >= 0 by construction: the drawn interval stops at 0 (the data file keeps the t-interval)
                low = max(row.ci_low, 0.0)
                xerr = [[row.regret_median - low], [row.ci_high - row.regret_median]] if finite else None
                ax.errorbar(row.regret_median, yi, xerr=xerr, fmt="o", color=color, capsize=2, markersize=4)
            ax.set_yticks(y, [f"{c} ({cost:.2g}×)" for c, cost in zip(group["calibrator"], group["cost_over_detach"],
                                                                       strict=True)], fontsize=7)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xscale("symlog", linthresh=0.1)
            shown = group[["regret_median", "ci_low", "ci_high"]].to_numpy(dtype=float)
            shown = shown[np.isfinite(shown)]
            if shown.size:  # symlog's autoscale cuts the largest points at the edge
                ax.set_xlim(min(shown.min() * 1.5, -0.02), max(shown.max() * 1.5, 0.2))
            ax.set_xlabel("regret (detach-step gains of ΔJ_true)")
            ax.set_title(f"η = {scale:g} × lr", fontsize=9)
        fig.suptitle(textwrap.fill(
            f"F7: regret of each calibrator's λ against λ*_meas on the detach trajectories ({len(job.seeds)} seed(s); "
            "mean of per-seed medians, 95% t-interval over seeds drawn from 0; label: cost over a detach step)", 110),
            fontsize=8)
        return _finish(fig, out_dir, "F7", frame)


FIGURES = {
    "F1": concave_curves,
    "F2": decomposition,
    "F3": occ_tracking,
    "F4": taylor_residual,
    "F5": performance,
    "F6": per_block,
    "F7": regret,
    "F8": acceptance_tradeoff,
}
