"""What every claim shares: the verdicts and the interval rule that gives them
(:data:`VERDICT_RULE`, quoted in every claims report), a claim's result, and
:class:`Claim`, the base each claim C1-C6 is one module on.

A claim declares its id, statement, figure, the name of its statistic and its
thresholds (:class:`Threshold` class attributes, each with its meaning), and
implements :meth:`Claim.test`. Too little data is one ``raise
InsufficientData(why)``; a missing table (a :class:`~mtpdiag.report.load.JobError`)
needs nothing at all: :meth:`Claim.evaluate` turns both into an inconclusive
result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..load import Job, JobError
from ..table import fmt_ci

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE)
VERDICT_RULE = (
    "The rule for every part of a claim: the part holds when its whole interval is on\n"
    "the claimed side of its threshold, does not hold when the whole interval is on\n"
    "the other side, and is inconclusive when the interval straddles the threshold or\n"
    "there is too little data (fewer rows than the part's minimum). A claim holds when\n"
    "all its parts hold, does not hold when any part does not, else is inconclusive."
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
class ClaimResult:
    claim: str
    statement: str
    statistic: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    reason: str
    figure: str


@dataclass
class Part:
    """One tested part of a claim: what was measured and its verdict."""

    text: str
    verdict: str


class InsufficientData(Exception):
    """The job cannot decide the claim (no arm of the regime it is about, too few
    measured steps): the claim is inconclusive for ``reason``, its statistic NaN
    over ``n`` rows."""

    def __init__(self, reason: str, n: int = 0):
        super().__init__(reason)
        self.reason, self.n = reason, int(n)


class Claim:
    """One claim of docs/theory.md s.6, tested on a job's CSVs."""

    id: str
    statement: str
    figure: str  # the figures (and table) that show it
    statistic: str  # what its value measures, as the report names it when the data cannot give it
    detail_tables: tuple[str, ...] = ()  # the names of the tables test() fills in ``details``

    @classmethod
    def thresholds(cls) -> list[tuple[str, Threshold]]:
        """``(<id>_<attribute>, threshold)`` in the order the claim declares them."""
        return [(f"{cls.id}_{name}", value) for name, value in vars(cls).items() if isinstance(value, Threshold)]

    def evaluate(self, job: Job) -> tuple[ClaimResult, dict[str, pd.DataFrame]]:
        """The claim's result on ``job`` and its detail tables (empty where it had no data for them)."""
        details = {name: pd.DataFrame() for name in self.detail_tables}
        try:
            result = self.test(job, details)
        except InsufficientData as short:
            result = self.result([Part(short.reason, INCONCLUSIVE)], n=short.n)
        except JobError as err:
            result = self.result([Part(f"no data ({err})", INCONCLUSIVE)], statistic="n/a")
        return result, details

    def test(self, job: Job, details: dict[str, pd.DataFrame]) -> ClaimResult:
        """The claim's result from its parts (:meth:`result`); may fill ``details``."""
        raise NotImplementedError

    def result(self, parts: list[Part], value=np.nan, low=np.nan, high=np.nan, n=0,
               statistic: str | None = None) -> ClaimResult:
        reason = "; ".join(f"{p.text}: {p.verdict}" for p in parts)
        return ClaimResult(self.id, self.statement, self.statistic if statistic is None else statistic, float(value),
                           float(low), float(high), int(n), combine(parts), reason, self.figure)


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


def combine(parts: list[Part]) -> str:
    verdicts = [p.verdict for p in parts]
    return FAILS if FAILS in verdicts else HOLDS if verdicts and all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def ci(value, low, high) -> str:
    """A statistic and its interval as the claims' reasons print them."""
    return fmt_ci(value, low, high, 3)
