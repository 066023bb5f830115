"""What every claim shares: the verdicts and the rule that gives them
(:data:`VERDICT_RULE`, quoted in every claims report), a claim's result, and
:class:`Claim`, the base each claim C1-C8 is one module on.

The unit of every claim is the seed: all arms, steps and mini-batches of one seed
share its SFT weights and rollout random numbers, so a claim computes its
statistic once per seed (:func:`~mtpdiag.report.stats.per_seed`) and its interval
over the seeds (:func:`~mtpdiag.report.stats.over_seeds`, Student t). One seed
gives no interval, and the part says so (:func:`seed_part`).

A claim declares its id, statement, figure, the name of its statistic and its
thresholds (:class:`Threshold` class attributes, each with its meaning), and
implements :meth:`Claim.test`. Too little data is one ``raise
InsufficientData(why)``; a missing table (a :class:`~mtpdiag.report.load.JobError`)
needs nothing at all: :meth:`Claim.evaluate` turns both into an inconclusive
result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..load import Job, JobError
from ..stats import SeedInterval
from ..table import fmt_ci

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
# an equivalence verdict of its own for a superiority claim (C6): the difference is shown to be
# smaller than the effect the claim's source reports, which contradicts that effect
EQUIVALENT = "equivalent within the paper's effect"
VERDICTS = (HOLDS, FAILS, EQUIVALENT, INCONCLUSIVE)
REPORTED = "reported"  # the verdict column of a part that has no threshold: shown beside its claim, never deciding
UNIT = "seed"  # every claim's unit (module docstring)
ONE_SEED = "one seed: no interval over seeds"
VERDICT_RULE = (
    "The unit is the seed: each statistic is computed once per seed (all arms, steps and\n"
    "mini-batches of a seed are one unit) and its interval is a Student t interval over\n"
    "the seeds (95%; 90% for equivalence); one seed gives no interval. A part with a\n"
    "one-sided threshold holds when its whole 95% interval is on the claimed side, does\n"
    "not hold when the whole interval is on the other side, and is inconclusive when it\n"
    "straddles the threshold. A part claiming equivalence ('is about 0', 'matches') is a\n"
    "TOST at alpha 0.05: it holds when the 90% interval lies inside its margin, does not\n"
    "hold when the 95% interval lies wholly outside it, else is inconclusive. A threshold\n"
    "the data's n cannot reach makes its part inconclusive, and the reason says so. A claim\n"
    "holds when all its deciding parts hold, does not hold when any does not, else is\n"
    "inconclusive; C6 alone has a fourth verdict, 'equivalent within the paper's effect'\n"
    "(its rule is in its reason)."
)


class Threshold:
    """A claim's threshold, declared as a class attribute with its meaning. Read on
    the claim (``self.MIN_STEPS``) it is its value; the claims report lists it as
    ``<claim id>_<attribute>`` with the meaning."""

    def __init__(self, value: float, meaning: str):
        self.value, self.meaning = value, meaning

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None) -> float:
        return self.value


@dataclass
class Estimate:
    """A statistic over the units: its value, 95% interval, how many units gave it, and
    the margin or band it is judged against (text, e.g. ``±0.028``; empty for none)."""

    statistic: str
    estimate: float = np.nan
    ci_low: float = np.nan
    ci_high: float = np.nan
    n_units: int = 0
    margin: str = ""
    unit: str = UNIT

    @classmethod
    def of(cls, statistic: str, interval: SeedInterval, margin: str = "") -> "Estimate":
        return cls(statistic, interval.estimate, interval.low, interval.high, interval.n, margin)


@dataclass
class Part:
    """One tested part of a claim: what was measured and its verdict. A part with a
    ``key`` is a row of its own in claims.csv (``<claim>.<key>``, with its ``estimate``);
    a part that does not ``decide`` is reported beside the claim without entering its verdict."""

    text: str
    verdict: str
    key: str | None = None
    estimate: Estimate | None = None
    decides: bool = True


@dataclass
class ClaimResult:
    claim: str
    statement: str
    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    unit: str
    n_units: int
    margin: str
    verdict: str
    reason: str
    figure: str
    parts: list[Part] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """The claim's rows of claims.csv: its own, then one per part with a key."""
        own = {k: getattr(self, k) for k in CSV_COLUMNS}
        return [own] + [
            {"claim": f"{self.claim}.{p.key}", "statistic": p.estimate.statistic, "estimate": p.estimate.estimate,
             "ci_low": p.estimate.ci_low, "ci_high": p.estimate.ci_high, "unit": p.estimate.unit,
             "n_units": p.estimate.n_units, "margin": p.estimate.margin, "verdict": p.verdict}
            for p in self.parts if p.key is not None
        ]


CSV_COLUMNS = ("claim", "statistic", "estimate", "ci_low", "ci_high", "unit", "n_units", "margin", "verdict")


class InsufficientData(Exception):
    """The job cannot decide the claim (no arm of the regime it is about, too few
    measured steps): the claim is inconclusive for ``reason``, its statistic NaN
    over ``n`` units."""

    def __init__(self, reason: str, n: int = 0):
        super().__init__(reason)
        self.reason, self.n = reason, int(n)


class Claim:
    """One claim of docs/theory.md s.10, tested on a job's CSVs."""

    id: str
    statement: str
    figure: str  # the figures (and table) that show it
    statistic: str  # what its value measures, as the report names it when the data cannot give it
    detail_tables: tuple[str, ...] = ()  # the names of the tables test() fills in ``details``

    @classmethod
    def thresholds(cls) -> list[tuple[str, Threshold]]:
        """``(<id>_<attribute>, threshold)`` in the order the claim declares them."""
        return [(f"{cls.id}_{name}", value) for name, value in vars(cls).items() if isinstance(value, Threshold)]

    @classmethod
    def threshold_name(cls, attribute: str) -> str:
        """How the report names the threshold declared as ``attribute`` (``C3_COS_MARGIN``)."""
        return f"{cls.id}_{attribute}"

    def evaluate(self, job: Job) -> tuple[ClaimResult, dict[str, pd.DataFrame]]:
        """The claim's result on ``job`` and its detail tables (empty where it had no data for them)."""
        details = {name: pd.DataFrame() for name in self.detail_tables}
        try:
            result = self.test(job, details)
        except InsufficientData as short:
            result = self.result([Part(short.reason, INCONCLUSIVE)], Estimate(self.statistic, n_units=short.n))
        except JobError as err:
            result = self.result([Part(f"no data ({err})", INCONCLUSIVE)], Estimate("n/a"))
        return result, details

    def test(self, job: Job, details: dict[str, pd.DataFrame]) -> ClaimResult:
        """The claim's result from its parts (:meth:`result`); may fill ``details``."""
        raise NotImplementedError

    def result(self, parts: list[Part], headline: Estimate | None = None, verdict: str | None = None) -> ClaimResult:
        """The claim's result: ``headline`` is its own row's statistic (default: the first
        part's estimate), ``verdict`` overrides :func:`combine` (C6's equivalence)."""
        if headline is None:
            headline = next((p.estimate for p in parts if p.estimate is not None), Estimate(self.statistic))
        reason = "; ".join(f"{p.text}: {p.verdict}" + ("" if p.decides or p.verdict == REPORTED else " (not deciding)")
                           for p in parts)
        return ClaimResult(self.id, self.statement, headline.statistic, float(headline.estimate),
                           float(headline.ci_low), float(headline.ci_high), headline.unit, int(headline.n_units),
                           headline.margin, combine(parts) if verdict is None else verdict, reason, self.figure,
                           parts)

    def seed_part(self, text: str, interval: SeedInterval, verdict: str, *, key: str | None = None,
                  statistic: str | None = None, margin: str = "", decides: bool = True,
                  threshold: str | None = None) -> Part:
        """A part judged on an interval over seeds: ``verdict`` (from the interval), unless
        fewer than 2 seeds make its ``threshold`` (an attribute name) unreachable: then
        inconclusive, and the text says why."""
        statistic = statistic or text
        if interval.n < 2:
            # with no seed the statistic has no value to print: its name says what was missing
            why = ONE_SEED if interval.n == 1 else "no seed has the data"
            if threshold is not None:
                why += f" (threshold {self.threshold_name(threshold)} unreachable at n = {interval.n})"
            text, verdict = f"{text if interval.n else statistic}: {why}", INCONCLUSIVE
        estimate = Estimate.of(statistic, interval, margin)
        return Part(text, verdict, key, estimate, decides)


def at_least(low: float, high: float, bound: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if low >= bound else FAILS if high < bound else INCONCLUSIVE


def at_most(low: float, high: float, bound: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if high <= bound else FAILS if low > bound else INCONCLUSIVE


def within(low: float, high: float, lo: float, hi: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    return HOLDS if lo <= low and high <= hi else FAILS if high < lo or low > hi else INCONCLUSIVE


def equivalent(interval: SeedInterval, lo: float, hi: float) -> str:
    """TOST at alpha 0.05: holds when the 90% interval lies inside [lo, hi], does not hold
    when the 95% interval lies wholly outside it, else inconclusive."""
    if not np.isfinite([interval.low, interval.high, interval.low90, interval.high90]).all():
        return INCONCLUSIVE
    if lo <= interval.low90 and interval.high90 <= hi:
        return HOLDS
    return FAILS if interval.high < lo or interval.low > hi else INCONCLUSIVE


def combine(parts: list[Part]) -> str:
    verdicts = [p.verdict for p in parts if p.decides]
    return FAILS if FAILS in verdicts else HOLDS if verdicts and all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def ci(value, low, high) -> str:
    """A statistic and its interval as the claims' reasons print them."""
    return fmt_ci(value, low, high, 3)


def seed_ci(interval: SeedInterval) -> str:
    """A per-seed statistic's mean and 95% interval over seeds, with n."""
    return f"{ci(interval.estimate, interval.low, interval.high)} over {interval.n} seeds"
