"""How sure a table is: the interval of a cell's mean, and the verdict on a projected optimizer
against its base.

A cell is a sample of runs, one value per seed. Its 95 % interval is Student's t interval of the
mean (n - 1 degrees of freedom); a single run has none. A projected / base pair is compared on the
seeds both ran (a shared seed means the same initialisation and data order, so the per-seed
difference cancels what the seeds share): the paired t interval of the mean difference when at
least two seeds are shared, the runs of other seeds left out; otherwise Welch's unpaired t
interval over all runs of both cells, with Welch-Satterthwaite degrees of freedom. The verdict
reads the interval against 0 in the direction where the metric is better.

These are the textbook intervals and assume roughly normal per-seed values; with 2 or 3 seeds they
are wide (t quantiles 12.7 and 4.3), and a zero spread (deterministic runs, exact ties) gives a
zero-width interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping

from scipy.stats import t as student_t

CONFIDENCE = 0.95

GAIN = "gain reproduced"
NO_DIFFERENCE = "no clear difference"
REVERSED = "reversed"
VERDICTS = (GAIN, NO_DIFFERENCE, REVERSED)


@dataclass(frozen=True)
class Interval:
    """A two-sided CONFIDENCE interval and the t distribution's degrees of freedom behind it."""

    low: float
    high: float
    df: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided critical value of Student's t: P(|T| <= q) = confidence."""
    return float(student_t.ppf(0.5 + confidence / 2, df))


def _around(center: float, std_error: float, df: float) -> Interval:
    half = t_quantile(df) * std_error if std_error > 0 else 0.0
    return Interval(center - half, center + half, df)


def mean_interval(values: list[float]) -> Interval | None:
    """Student's t interval of the mean of `values`; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    return _around(statistics.fmean(values), statistics.stdev(values) / math.sqrt(n), n - 1)


@dataclass(frozen=True)
class Comparison:
    """A projected cell minus its base cell. `test` says how: "paired" (over `pairs` shared
    seeds), "welch" (unpaired, all runs), or "" when no interval can be had (`reason` says why).
    `left_out` counts the runs of seeds the other cell lacks, when paired."""

    estimate: float | None
    interval: Interval | None
    test: str
    n_projected: int
    n_base: int
    pairs: int = 0
    left_out: int = 0
    verdict: str | None = None     # one of VERDICTS; None when untested
    reason: str = ""               # why untested

    @property
    def tested(self) -> bool:
        return self.verdict is not None


def verdict(interval: Interval, direction: str) -> str:
    """GAIN when the whole interval lies on the better side of 0 (strictly), REVERSED when it
    lies on the worse side, NO_DIFFERENCE when it holds 0."""
    better_above = direction == "max"
    if interval.low > 0:
        return GAIN if better_above else REVERSED
    if interval.high < 0:
        return REVERSED if better_above else GAIN
    return NO_DIFFERENCE


def compare(projected: Mapping[Any, float], base: Mapping[Any, float], direction: str) -> Comparison:
    """The projected cell's values minus the base cell's (each: seed -> value): paired over
    shared seeds when there are at least two, else Welch over all runs; see the module doc."""
    n_p, n_b = len(projected), len(base)
    if n_p == 0 or n_b == 0:
        missing = "no runs" if n_p == 0 else "no base runs"
        return Comparison(None, None, "", n_p, n_b, reason=missing)
    shared = [seed for seed in projected if seed in base]
    if len(shared) >= 2:
        diffs = [projected[s] - base[s] for s in shared]
        interval = mean_interval(diffs)
        return Comparison(statistics.fmean(diffs), interval, "paired", n_p, n_b, pairs=len(shared),
                          left_out=n_p + n_b - 2 * len(shared), verdict=verdict(interval, direction))
    p, b = list(projected.values()), list(base.values())
    estimate = statistics.fmean(p) - statistics.fmean(b)
    if n_p < 2 or n_b < 2:
        return Comparison(estimate, None, "", n_p, n_b, reason="n = 1")
    var_p, var_b = statistics.variance(p) / n_p, statistics.variance(b) / n_b
    total = var_p + var_b
    # Welch-Satterthwaite; with no spread on either side the interval is a point and df moot.
    df = total**2 / (var_p**2 / (n_p - 1) + var_b**2 / (n_b - 1)) if total > 0 else n_p + n_b - 2
    interval = _around(estimate, math.sqrt(total), df)
    return Comparison(estimate, interval, "welch", n_p, n_b, verdict=verdict(interval, direction))
