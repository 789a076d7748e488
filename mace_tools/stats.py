"""Summary statistics as iputils computes them, plus percentiles for JSON and the bench."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

from mace_tools.model import Measurement, RunSummary

NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class RttStats:
    min: float
    avg: float
    max: float
    mdev: float  # population standard deviation, as iputils: sqrt(mean(x^2) - mean(x)^2)
    p50: float
    p95: float
    p99: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def rtt_stats(values: list[float]) -> RttStats | None:
    if not values:
        return None
    n = len(values)
    avg = sum(values) / n
    variance = sum(v * v for v in values) / n - avg * avg
    ordered = sorted(values)
    return RttStats(
        min=ordered[0], avg=avg, max=ordered[-1], mdev=math.sqrt(max(variance, 0.0)),
        p50=percentile(ordered, 50), p95=percentile(ordered, 95), p99=percentile(ordered, 99),
    )


class Tally:
    """Running totals of a run's replies: what the summary needs, without keeping the
    replies themselves (a flood of hours must not grow with every probe's path)."""

    def __init__(self) -> None:
        self.received = 0  # distinct replies
        self.duplicates = 0
        self.first_ttl: int | None = None
        # arrays of C doubles: 8 bytes a reply instead of a float object each
        self.raw_ms = array("d")
        self.corrected_ms = array("d")
        self.egress_ms = array("d")
        self.ingress_ms = array("d")

    def add(self, m: Measurement) -> None:
        """Duplicates are counted apart and left out of every RTT list, as iputils does."""
        if m.dup:
            self.duplicates += 1
            return
        self.received += 1
        if self.first_ttl is None:
            self.first_ttl = m.ttl
        self.raw_ms.append(m.rtt_raw_ns / NS_PER_MS)
        if m.rtt_corrected_ns is not None and m.egress_ns is not None \
                and m.ingress_ns is not None:
            self.corrected_ms.append(m.rtt_corrected_ns / NS_PER_MS)
            self.egress_ms.append(m.egress_ns / NS_PER_MS)
            self.ingress_ms.append(m.ingress_ns / NS_PER_MS)

    def summary(self, transmitted: int, errors: int, elapsed_ms: int,
                kernel_events_lost: int) -> RunSummary:
        return RunSummary(
            transmitted=transmitted, received=self.received, duplicates=self.duplicates,
            errors=errors, elapsed_ms=elapsed_ms, rtt_raw_ms=self.raw_ms.tolist(),
            rtt_corrected_ms=self.corrected_ms.tolist(), egress_ms=self.egress_ms.tolist(),
            ingress_ms=self.ingress_ms.tolist(), kernel_events_lost=kernel_events_lost,
        )


def summarize(measurements: list[Measurement], transmitted: int, errors: int, elapsed_ms: int,
              kernel_events_lost: int) -> RunSummary:
    tally = Tally()
    for m in measurements:
        tally.add(m)
    return tally.summary(transmitted, errors, elapsed_ms, kernel_events_lost)
