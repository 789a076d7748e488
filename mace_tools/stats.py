"""Summary statistics as iputils computes them, plus percentiles for JSON and the bench."""

from __future__ import annotations

import math
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


def summarize(measurements: list[Measurement], transmitted: int, errors: int, elapsed_ms: int,
              kernel_events_lost: int) -> RunSummary:
    """Duplicates are counted apart and left out of every RTT list, as iputils does."""
    firsts = [m for m in measurements if not m.dup]
    corrected = [m for m in firsts if m.corrected]
    return RunSummary(
        transmitted=transmitted,
        received=len(firsts),
        duplicates=len(measurements) - len(firsts),
        errors=errors,
        elapsed_ms=elapsed_ms,
        rtt_raw_ms=[m.rtt_raw_ns / NS_PER_MS for m in firsts],
        rtt_corrected_ms=[m.rtt_corrected_ns / NS_PER_MS for m in corrected],
        egress_ms=[m.egress_ns / NS_PER_MS for m in corrected],
        ingress_ms=[m.ingress_ns / NS_PER_MS for m in corrected],
        kernel_events_lost=kernel_events_lost,
    )
