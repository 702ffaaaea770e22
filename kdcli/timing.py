"""Statistics of timings: the median with a 95% interval that assumes no distribution, and the
ratio of two timings, paired round by round when they were timed together (`kd bench`'s
round-robin) and bounded by their intervals otherwise. `kd bench` writes them, `kd compare` reads them."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

CONFIDENCE = 0.95


def median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """The median of ``values`` and a 95% confidence interval for it: the k-th smallest and the k-th
    largest value, k the largest rank with P(Binomial(n, 1/2) < k) at most 2.5% (order statistics:
    nothing is assumed about the shape of the noise). Under 6 values no rank is that safe, and the
    interval is the whole range."""
    ordered = sorted(values)
    n, tail, k = len(ordered), 0.0, 0
    while k < n:
        tail += math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) <= k)
        if tail > (1 - CONFIDENCE) / 2:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """What a result file says of a list of timings: the median ``p50``, its 95% interval ``ci95`` and the
    interquartile range ``iqr``."""
    median, low, high = median_interval(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (median,) * 3
    return {"p50": median, "ci95": [low, high], "iqr": [q1, q3]}


def tight(values: Sequence[float], precision: float) -> bool:
    """Whether the 95% interval of the median of ``values`` is within ``precision`` of it on both sides."""
    median, low, high = median_interval(values)
    return max(median - low, high - median) <= precision * median


@dataclass(frozen=True)
class Timing:
    """A median time with its 95% interval (None where the result file has none) and, when timed
    round-robin, the time of each round and the session that timed it."""

    median: float
    low: float | None = None
    high: float | None = None
    by_round: tuple[float, ...] | None = None
    session: str | None = None

    def paired_with(self, other: Timing) -> bool:
        return (self.session is not None and self.session == other.session and self.by_round is not None
                and other.by_round is not None and len(self.by_round) == len(other.by_round))

    def overlaps(self, other: Timing) -> bool:
        """Whether the two intervals share a value (False when either has none)."""
        if None in (self.low, self.high, other.low, other.high):
            return False
        return self.low <= other.high and other.low <= self.high  # type: ignore[operator]


def ratio(slow: Timing, fast: Timing) -> tuple[float, float | None, float | None]:
    """How many times ``fast`` is faster than ``slow``, with a 95% interval: the median of the rounds'
    ratios and its interval when the two were timed together (a burst of load hits both sides of a
    round alike), else the ratio of the medians within the ratio of the intervals' far ends (None
    where an interval is missing)."""
    if slow.paired_with(fast):
        return median_interval([s / f for s, f in zip(slow.by_round, fast.by_round)])  # type: ignore[arg-type]
    value = slow.median / fast.median
    if None in (slow.low, slow.high, fast.low, fast.high):
        return value, None, None
    return value, slow.low / fast.high, slow.high / fast.low  # type: ignore[operator]


def pooled(timings: list[Timing]) -> Timing:
    """Timings of models that are one architecture, as one: round by round the mean when they were
    timed together, else the mean of the medians within the widest interval."""
    first = timings[0]
    if all(first.paired_with(t) for t in timings[1:]):
        rounds = tuple(statistics.fmean(values) for values in zip(*(t.by_round for t in timings)))  # type: ignore[misc]
        median, low, high = median_interval(rounds)
        return Timing(median, low, high, rounds, first.session)
    lows, highs = [t.low for t in timings], [t.high for t in timings]
    return Timing(statistics.fmean(t.median for t in timings), None if None in lows else min(lows),  # type: ignore
                  None if None in highs else max(highs))  # type: ignore[type-var]
