"""One look for every figure: sizes, fonts, colours per arm, seed bands, and
saving as PNG (150 dpi) and PDF.

Figures are built on :class:`matplotlib.figure.Figure` directly (the Agg canvas
renders them), never through pyplot, so making a report changes no global
backend and leaks no open figures.
"""
from __future__ import annotations

import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from .. import regimes
from ..schema import FIGURE_FORMATS, atomic_write

DPI = 150
PANEL = (4.2, 3.1)  # inches per panel
RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "pdf.fonttype": 42,  # editable text in the PDF
}
BAND_ALPHA = 0.2
NO_BAND = "1 seed, no band"
MAX_SYMLOG_TICKS = 9
NOTE_WIDTH = 45  # characters per line of a panel's note

STEP_LABEL = "RL step"
LAMBDA_LABEL = "MTP coefficient λ (dimensionless)"


@contextmanager
def styled():
    with mpl.rc_context(RC):
        yield


def new_figure(rows: int, cols: int, panel=PANEL) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols panels; ``axes`` is always 2-D."""
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """``<out_dir>/<name>.png`` (150 dpi) and ``.pdf``, each written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # the temporary file's name does not end in the format, so savefig is told it
    return [atomic_write(out_dir / f"{name}.{fmt}", lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI))
            for fmt in FIGURE_FORMATS]


def arm_colors(arms) -> dict[str, tuple]:
    """A colour per arm label: the colour family (a matplotlib colormap) its regime
    gives it (:meth:`~mtpdiag.regimes.Regime.colour_family`: the oracle calibrator has
    its own), darker for later arms of the family."""
    by_family: dict[str, list] = {}
    for arm in arms:
        by_family.setdefault(regimes.get(arm.regime).colour_family(arm.calibrator), []).append(arm.label)
    colors = {}
    for fam, labels in by_family.items():
        cmap = mpl.colormaps[fam]
        shades = np.linspace(0.85, 0.5, len(labels)) if len(labels) > 1 else [0.7]
        colors.update({label: cmap(s) for label, s in zip(labels, shades, strict=True)})
    return colors


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def cycle_markers(n: int) -> list[str]:
    """``n`` line markers, repeating ``MARKERS`` past its length."""
    return [MARKERS[i % len(MARKERS)] for i in range(n)]


def band(ax, summary: pd.DataFrame, x: str, label: str, color, bounds=(-np.inf, np.inf), **line) -> None:
    """The seed mean as a line and its 95% t-interval as a band (where 2+ seeds
    have a value), cut to the quantity's possible ``bounds`` (v^2 >= 0, |cos| <= 1);
    a single seed says so in the label instead of faking a band."""
    summary = summary.sort_values(x)
    single = summary["n"].max() < 2
    ax.plot(summary[x], summary["mean"], color=color, label=f"{label} ({NO_BAND})" if single else label, **line)
    if not single:
        ax.fill_between(summary[x], summary["low"].clip(*bounds), summary["high"].clip(*bounds), color=color,
                        alpha=BAND_ALPHA, linewidth=0)


def note(ax, text: str) -> None:
    """A panel that states why it has no data (instead of an empty plot)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, textwrap.fill(text, NOTE_WIDTH), transform=ax.transAxes, ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "0.7"})


def corner_note(ax, text: str) -> None:
    """A short remark in a panel's lower left corner, over the data (e.g. a run drawn off the axis)."""
    # arm labels hold hyphens (occ-paper): wrap between words only
    ax.text(0.02, 0.02, textwrap.fill(text, NOTE_WIDTH, break_on_hyphens=False), transform=ax.transAxes,
            ha="left", va="bottom",
            fontsize=6, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.8})


def symlog_scale(ax, values, axis: str = "y") -> None:
    """A symmetric log axis whose linear part spans the smallest 10% of the non-zero
    magnitudes: signed quantities over decades stay readable. Ticks at 0 and at powers
    of ten a few decades apart (at most ``MAX_SYMLOG_TICKS``), none crowding 0."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x) & (x != 0)]
    if x.size == 0:
        return
    magnitude = np.abs(x)
    linthresh = float(np.percentile(magnitude, 10))
    (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=linthresh)
    low, high = int(np.floor(np.log10(linthresh))) + 1, int(np.ceil(np.log10(magnitude.max())))
    sides = int((x > 0).any()) + int((x < 0).any())
    step = max(1, int(np.ceil(sides * (high - low + 1) / (MAX_SYMLOG_TICKS - 1))))
    powers = 10.0 ** np.arange(high, low - 1, -step)
    ticks = [0.0, *(powers if (x > 0).any() else []), *(-powers if (x < 0).any() else [])]
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_locator(FixedLocator(sorted(ticks)))
