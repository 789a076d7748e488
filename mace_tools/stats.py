"""Summary statistics as iputils computes them, plus percentiles for JSON and the bench.

A run keeps no per-reply values: each RTT series is running sums (count, sum, sum of
squares, min, max; exact integers in ns) and, where percentiles are wanted, a fixed-size
log-bucketed quantile sketch. So a flood of hours costs the same memory as a ping of ten.
A Tally takes a flood's replies tens of thousands a second: it appends each one's times
to short lists and folds them into its series a batch at a time (builtins over the batch,
no Python call per value), and every read of a series folds what is pending first. A fold
builds new series and swaps them in: Ctrl-C, a KeyboardInterrupt raised wherever the run
was, then finds the tally as before the fold or after it, never half folded.
``rtt_stats``/``percentile`` stay for the short, already-kept lists of the lab and bench.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from operator import mul, truediv

from mace_tools.model import Measurement, RttStats, RunSummary

__all__ = ["FOLD_EVERY", "RELATIVE_ERROR", "QuantileSketch", "RttStats", "Series", "Tally",
           "percentile", "rtt_stats"]

NS_PER_MS = 1_000_000
NS_PER_US = 1_000
# Quantiles from the sketch are within this relative error of a value of the run's
# (DDSketch's guarantee: Masson, Rim, Lee, "DDSketch", VLDB 2019).
RELATIVE_ERROR = 0.01
# Magnitudes (ns) the sketch tells apart; anything larger shares the top bucket, anything
# under 1 ns is zero. 1e13 ns (about 2.8 h) is far beyond any RTT, and bounds the
# sketch at ~1500 buckets per sign (typically a few dozen are used: a few KB).
_MAX_MAGNITUDE_NS = 1e13
# Replies a Tally holds before folding them into its series: bounds what is pending.
FOLD_EVERY = 256


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def rtt_stats(values: list[float]) -> RttStats | None:
    """Exact statistics of a list (lab demo, bench); a run uses Series instead."""
    if not values:
        return None
    n = len(values)
    avg = sum(values) / n
    variance = sum(v * v for v in values) / n - avg * avg
    ordered = sorted(values)
    return RttStats(
        min=ordered[0], avg=avg, max=ordered[-1], mdev=math.sqrt(max(variance, 0.0)),
        p50=percentile(ordered, 50), p95=percentile(ordered, 95), p99=percentile(ordered, 99),
        n=n,
    )


class QuantileSketch:
    """Nearest-rank quantiles within RELATIVE_ERROR, in memory bounded by the value range.

    Bucket i of a sign holds magnitudes in (gamma^(i-1), gamma^i], gamma = (1+a)/(1-a);
    its representative 2*gamma^i/(gamma+1) is within a (relative) of every value in it.
    """

    __slots__ = ("_gamma", "_log_gamma", "_max_index", "_negative", "_positive", "_zero",
                 "count")

    def __init__(self, relative_error: float = RELATIVE_ERROR) -> None:
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self._gamma)
        self._max_index = self._index(_MAX_MAGNITUDE_NS)
        self._positive: Counter[int] = Counter()
        self._negative: Counter[int] = Counter()  # corrected/egress/ingress may dip below 0
        self._zero = 0
        self.count = 0

    def _index(self, magnitude: float) -> int:
        return math.ceil(math.log(magnitude) / self._log_gamma)

    def _value(self, index: int) -> float:
        return 2 * self._gamma ** index / (self._gamma + 1)

    def add(self, value: float) -> None:
        self.add_many((value,))

    def copy(self) -> QuantileSketch:
        new = QuantileSketch.__new__(QuantileSketch)
        new._gamma, new._log_gamma, new._max_index = \
            self._gamma, self._log_gamma, self._max_index
        new._positive, new._negative = Counter(self._positive), Counter(self._negative)
        new._zero, new.count = self._zero, self.count
        return new

    def add_many(self, values: Sequence[float]) -> None:
        """Add every value: each bucket index is _index's, computed by builtins over the
        whole batch (the per-value cost of a flood's replies)."""
        self.count += len(values)
        if values and min(values) >= 1:  # (RTTs nearly always: one pass, not three)
            positive, negative = values, []
        else:
            positive = [v for v in values if v >= 1]
            negative = [-v for v in values if v <= -1]
        self._zero += len(values) - len(positive) - len(negative)
        for magnitudes, store in ((positive, self._positive), (negative, self._negative)):
            if magnitudes:
                logs = map(truediv, map(math.log, magnitudes), repeat(self._log_gamma))
                indexes = list(map(math.ceil, logs))
                if max(indexes) > self._max_index:  # past the range (rare): clamped
                    indexes = [min(i, self._max_index) for i in indexes]
                store.update(indexes)

    @property
    def buckets(self) -> int:
        """Buckets in use (what the sketch's memory grows with: never the count)."""
        return len(self._positive) + len(self._negative) + (1 if self._zero else 0)

    def quantile(self, q: float) -> float | None:
        """Nearest-rank q-quantile (q in 0..1) within the relative error; None if empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self._negative, reverse=True):  # most negative first
            seen += self._negative[index]
            if seen >= rank:
                return -self._value(index)
        seen += self._zero
        if seen >= rank:
            return 0.0
        for index in sorted(self._positive):
            seen += self._positive[index]
            if seen >= rank:
                return self._value(index)
        return self._value(max(self._positive))  # unreachable: counts add up to count


class Series:
    """One RTT series of a run (ns in, ms out): running sums, and a sketch if quantiles
    are wanted. Sums are Python integers, so avg and mdev are exact however long the run."""

    __slots__ = ("count", "max", "min", "sketch", "total", "total_sq")

    def __init__(self, quantiles: bool = True) -> None:
        self.count = 0
        self.total = 0
        self.total_sq = 0
        self.min = 0
        self.max = 0
        self.sketch = QuantileSketch() if quantiles else None

    def add(self, ns: int) -> None:
        self.extend((ns,))

    def extended(self, values: Sequence[int]) -> Series:
        """A copy of this series with values added (extend); this one is left as it is."""
        new = Series.__new__(Series)
        new.count, new.total, new.total_sq, new.min, new.max = \
            self.count, self.total, self.total_sq, self.min, self.max
        new.sketch = None if self.sketch is None else self.sketch.copy()
        new.extend(values)
        return new

    def extend(self, values: Sequence[int]) -> None:
        """Add a batch of values (ns)."""
        if not values:
            return
        low, high = min(values), max(values)
        if self.count == 0 or low < self.min:
            self.min = low
        if self.count == 0 or high > self.max:
            self.max = high
        self.count += len(values)
        self.total += sum(values)
        self.total_sq += sum(map(mul, values, values))
        if self.sketch is not None:
            self.sketch.add_many(values)

    def mean_ms(self) -> float | None:
        return self.total / self.count / NS_PER_MS if self.count else None

    def _quantile_ms(self, q: float) -> float:
        """Sketch quantile clamped to the exact min and max (the sketch may overshoot)."""
        if self.sketch is None:
            return math.nan
        value = self.sketch.quantile(q)
        assert value is not None  # only called with count > 0
        return min(max(value, self.min), self.max) / NS_PER_MS

    def stats(self) -> RttStats | None:
        """min/avg/max/mdev exact (mdev: population std dev, as iputils); percentiles
        within RELATIVE_ERROR (nan when the series keeps no sketch)."""
        n = self.count
        if n == 0:
            return None
        # n^2 * variance, exactly: no cancellation however close the values are
        spread = n * self.total_sq - self.total * self.total
        return RttStats(
            min=self.min / NS_PER_MS, avg=self.total / n / NS_PER_MS, max=self.max / NS_PER_MS,
            mdev=math.sqrt(max(spread, 0)) / n / NS_PER_MS,
            p50=self._quantile_ms(0.50), p95=self._quantile_ms(0.95),
            p99=self._quantile_ms(0.99), n=n,
        )


class Tally:
    """Running totals of a run's replies: what the summary and the SIGQUIT status line
    need, in memory that does not grow with the number of replies. The RTT series are
    read through properties, which fold the pending batch in first (module docstring)."""

    __slots__ = ("_pending", "_series", "corrupted", "duplicates", "ewma8_us", "first_ttl",
                 "late_kernel_stamps", "received")

    def __init__(self) -> None:
        self.received = 0  # distinct replies
        self.duplicates = 0
        self.corrupted = 0  # bad checksum: neither received nor timed, as iputils
        self.late_kernel_stamps = 0  # kernel data refused (correlate.returned_late)
        self.first_ttl: int | None = None
        # raw, corrected, egress and ingress RTTs. Quantiles are reported of corrected ones
        # only (the JSON's mace.p50/p95/p99): a sketch is most of what a value costs here,
        # so the others keep none (their p50/p95/p99 are nan); egress and ingress only
        # have their averages reported.
        self._series: tuple[Series, ...] = (Series(quantiles=False), Series(),
                                             Series(quantiles=False), Series(quantiles=False))
        # values not yet folded into the series above, in the same order
        self._pending: tuple[list[int], ...] = ([], [], [], [])
        # iputils' "ewma": 8 times an exponentially weighted average of the RTT in whole
        # µs (each reply moves it 1/8 of the way), kept in integers as iputils keeps it.
        self.ewma8_us = 0

    def add(self, m: Measurement) -> None:
        """Duplicates and corrupted replies are counted apart and left out of every RTT
        series."""
        if m.corrupted:
            self.corrupted += 1
            return
        if m.dup:
            self.duplicates += 1
            return
        self.received += 1
        if self.first_ttl is None:
            self.first_ttl = m.ttl
        raw, corrected, egress, ingress = self._pending
        raw.append(m.rtt_raw_ns)
        rtt_us = m.rtt_raw_ns // NS_PER_US
        self.ewma8_us = rtt_us * 8 if self.ewma8_us == 0 else \
            self.ewma8_us + rtt_us - self.ewma8_us // 8
        self.late_kernel_stamps += m.late_kernel_stamp
        if m.rtt_corrected_ns is not None and m.egress_ns is not None:
            corrected.append(m.rtt_corrected_ns)
            egress.append(m.egress_ns)
            if m.ingress_ns is not None:  # none where the delivery fires no tracepoint
                ingress.append(m.ingress_ns)
        if len(raw) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Fold the pending values into new series, then swap both in (module docstring:
        no call between the two stores, where a KeyboardInterrupt could be raised)."""
        pending = self._pending
        if not pending[0]:  # every reply has a raw RTT: nothing pending anywhere
            return
        folded = tuple([series.extended(values) if values else series
                        for series, values in zip(self._series, pending, strict=True)])
        emptied: tuple[list[int], ...] = ([], [], [], [])
        self._series, self._pending = folded, emptied

    @property
    def raw(self) -> Series:
        """Raw RTTs of the distinct, undamaged replies."""
        self._fold()
        return self._series[0]

    @property
    def corrected(self) -> Series:
        """Corrected RTTs, of the replies that have one."""
        self._fold()
        return self._series[1]

    @property
    def egress(self) -> Series:
        self._fold()
        return self._series[2]

    @property
    def ingress(self) -> Series:
        self._fold()
        return self._series[3]

    def summary(self, transmitted: int, errors: int, elapsed_ms: int,
                kernel_events_lost: int, kernel_records: int = 0, pipe: int = 0,
                ipg_us: int | None = None) -> RunSummary:
        """ipg_us: iputils' inter-packet gap, when the summary shows ipg/ewma."""
        return RunSummary(
            corrupted=self.corrupted, pipe=pipe,
            ipg_ewma_us=None if ipg_us is None or not self.received
            else (ipg_us, self.ewma8_us),
            transmitted=transmitted, received=self.received, duplicates=self.duplicates,
            errors=errors, elapsed_ms=elapsed_ms, rtt_raw=self.raw.stats(),
            rtt_corrected=self.corrected.stats(), egress_avg_ms=self.egress.mean_ms(),
            ingress_avg_ms=self.ingress.mean_ms(), kernel_events_lost=kernel_events_lost,
            kernel_records=kernel_records, late_kernel_stamps=self.late_kernel_stamps,
        )
