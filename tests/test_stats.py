"""Statistics as iputils computes them."""

from __future__ import annotations

import math

import pytest

from mace_tools.model import Measurement
from mace_tools.stats import percentile, rtt_stats, summarize


def test_mdev_is_population_std_dev() -> None:
    s = rtt_stats([1.0, 2.0, 3.0, 4.0])
    assert s is not None
    assert (s.min, s.avg, s.max) == (1.0, 2.5, 4.0)
    assert s.mdev == pytest.approx(math.sqrt(1.25))


def test_single_value_and_empty() -> None:
    s = rtt_stats([0.05])
    assert s is not None and s.mdev == 0.0 and s.p99 == 0.05
    assert rtt_stats([]) is None


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0


def m(seq: int, raw_us: int, corrected_us: int | None, dup: bool = False) -> Measurement:
    out = Measurement(seq=seq, src="x", ttl=64, icmp_bytes=64, rtt_raw_ns=raw_us * 1000, dup=dup)
    if corrected_us is not None:
        out.rtt_corrected_ns, out.egress_ns, out.ingress_ns = corrected_us * 1000, 1000, 2000
    return out


def test_summarize_excludes_duplicates_and_counts_coverage() -> None:
    s = summarize([m(1, 100, 10), m(1, 120, None, dup=True), m(2, 200, None), m(3, 300, 30)],
                  transmitted=4, errors=0, elapsed_ms=3000, kernel_events_lost=0)
    assert (s.received, s.duplicates) == (3, 1)
    assert s.rtt_raw_ms == [0.1, 0.2, 0.3]
    assert s.rtt_corrected_ms == [0.01, 0.03]
    assert s.egress_ms == [0.001, 0.001] and s.ingress_ms == [0.002, 0.002]
    assert s.coverage == pytest.approx(2 / 3)
    assert s.loss_percent == 25.0
