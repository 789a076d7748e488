"""Statistics as iputils computes them, from running sums and a bounded quantile sketch."""

from __future__ import annotations

import math
import random
import tracemalloc

import pytest

from mace_tools.model import Measurement, RunSummary
from mace_tools.output.text import mace_fields
from mace_tools.stats import (
    FOLD_EVERY,
    RELATIVE_ERROR,
    QuantileSketch,
    Series,
    Tally,
    percentile,
    rtt_stats,
)


def test_mdev_is_population_std_dev() -> None:
    s = rtt_stats([1.0, 2.0, 3.0, 4.0])
    assert s is not None
    assert (s.min, s.avg, s.max, s.n) == (1.0, 2.5, 4.0, 4)
    assert s.mdev == pytest.approx(math.sqrt(1.25))


def test_single_value_and_empty() -> None:
    s = rtt_stats([0.05])
    assert s is not None and s.mdev == 0.0 and s.p99 == 0.05
    assert rtt_stats([]) is None
    assert Series().stats() is None and Series().mean_ms() is None


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


def summarize(measurements: list[Measurement], transmitted: int, errors: int, elapsed_ms: int,
              kernel_events_lost: int) -> RunSummary:
    """A run's summary from a list (a run itself adds each reply to its Tally as it comes)."""
    tally = Tally()
    for reply in measurements:
        tally.add(reply)
    return tally.summary(transmitted, errors, elapsed_ms, kernel_events_lost)


def test_summarize_excludes_duplicates_and_counts_coverage() -> None:
    s = summarize([m(1, 100, 10), m(1, 120, None, dup=True), m(2, 200, None), m(3, 300, 30)],
                  transmitted=4, errors=0, elapsed_ms=3000, kernel_events_lost=0)
    assert (s.received, s.duplicates) == (3, 1)
    assert s.rtt_raw is not None and s.rtt_corrected is not None
    assert (s.rtt_raw.n, s.rtt_raw.min, s.rtt_raw.max) == (3, 0.1, 0.3)
    assert s.rtt_raw.avg == pytest.approx(0.2)
    assert (s.rtt_corrected.n, s.rtt_corrected.min, s.rtt_corrected.max) == (2, 0.01, 0.03)
    assert s.egress_avg_ms == 0.001 and s.ingress_avg_ms == 0.002
    assert s.corrected_count == 2 and s.coverage == pytest.approx(2 / 3)
    assert s.loss_percent == 25.0


def test_unknown_ingress_keeps_the_correction() -> None:
    # macvlan: no tracepoint sees the delivery into the container; the correction stands
    reply = m(1, 100, 10)
    reply.ingress_ns = None
    s = summarize([reply, m(2, 200, 20)], transmitted=2, errors=0, elapsed_ms=1,
                  kernel_events_lost=0)
    assert s.corrected_count == 2 and s.coverage == 1.0
    assert s.ingress_avg_ms == 0.002  # the one reply that has it
    assert mace_fields(reply).endswith("ingress=none")


def test_summary_of_nothing() -> None:
    s = Tally().summary(transmitted=2, errors=0, elapsed_ms=1, kernel_events_lost=0)
    assert s.rtt_raw is None and s.rtt_corrected is None and s.egress_avg_ms is None
    assert s.coverage == 1.0 and s.corrected_count == 0


def _random_rtts_ns(n: int, seed: int) -> list[int]:
    """Log-normal around 60 µs with a tail, as RTTs are; a few zeros and negatives too
    (corrected and egress values are differences of kernel stamps)."""
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(math.log(60_000), 0.6)) for _ in range(n)]
    values[::97] = [0] * len(values[::97])
    values[::89] = [-v // 50 for v in values[::89]]
    return values


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_series_matches_exact_statistics(seed: int) -> None:
    """min/avg/max/mdev as from the full list (to float precision); percentiles within the
    sketch's stated relative error of the exact nearest-rank ones."""
    values_ns = _random_rtts_ns(20_000, seed)
    series = Series()
    for v in values_ns:
        series.add(v)
    got = series.stats()
    exact = rtt_stats([v / 1e6 for v in values_ns])
    assert got is not None and exact is not None
    assert got.n == exact.n == len(values_ns)
    assert (got.min, got.max) == (exact.min, exact.max)
    assert got.avg == pytest.approx(exact.avg, rel=1e-12)
    assert got.mdev == pytest.approx(exact.mdev, rel=1e-9)
    for q in ("p50", "p95", "p99"):
        want = getattr(exact, q)
        assert abs(getattr(got, q) - want) <= RELATIVE_ERROR * abs(want) + 1e-12, q


def _expected(values: list[int]) -> tuple[int, int, int, int, int, dict, dict, int]:
    """count, total, total_sq, min, max and a sketch's buckets (positive, negative, zeros)
    of these values, one value at a time, as QuantileSketch._index defines the buckets."""
    sketch = QuantileSketch()
    top = sketch._index(1e13)
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    for v in values:
        if abs(v) >= 1:
            store = positive if v > 0 else negative
            index = min(sketch._index(abs(v)), top)
            store[index] = store.get(index, 0) + 1
    zeros = sum(1 for v in values if abs(v) < 1)
    return (len(values), sum(values), sum(v * v for v in values), min(values), max(values),
            positive, negative, zeros)


def _held(series: Series) -> tuple[int, int, int, int, int, dict, dict, int]:
    sketch = series.sketch
    assert sketch is not None
    return (series.count, series.total, series.total_sq, series.min, series.max,
            dict(sketch._positive), dict(sketch._negative), sketch._zero)


def _reply(seq: int, raw_ns: int, corrected_ns: int | None) -> Measurement:
    reply = Measurement(seq=seq, src="x", ttl=64, icmp_bytes=64, rtt_raw_ns=raw_ns)
    if corrected_ns is not None:
        reply.rtt_corrected_ns, reply.egress_ns, reply.ingress_ns = corrected_ns, 5, 7
    return reply


def test_a_tally_folded_in_batches_holds_what_each_value_adds() -> None:
    """A Tally folds its replies into its series FOLD_EVERY at a time: read at any moment
    (a read folds the rest in), a series holds exactly what adding each value by itself
    gives: sums, min, max and every sketch bucket, zeros and negative values included."""
    values = _random_rtts_ns(3 * FOLD_EVERY + 17, seed=4)
    tally = Tally()
    corrected: list[int] = []
    for seq, v in enumerate(values, start=1):
        keep = seq % 3 != 0
        tally.add(_reply(seq, abs(v), v if keep else None))
        corrected += [v] if keep else []
        if seq in (1, FOLD_EVERY - 1, FOLD_EVERY, FOLD_EVERY + 1, len(values)):
            assert _held(tally.corrected) == _expected(corrected), seq
            raw = tally.raw
            assert (raw.count, raw.total, raw.min, raw.max) == \
                (seq, sum(map(abs, values[:seq])), min(map(abs, values[:seq])),
                 max(map(abs, values[:seq])))
            assert tally.egress.count == tally.ingress.count == len(corrected)


def test_ctrl_c_in_the_middle_of_a_fold_leaves_the_tally_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C raises KeyboardInterrupt wherever the run is; the run then reports what it
    has, which reads (and so folds) the tally again. A fold cut short changed nothing:
    every reply is counted once in every series."""
    tally = Tally()
    original = Series.extend
    cut = []

    def extend_then_interrupt(self: Series, values: list[int]) -> None:
        original(self, values)
        if self.sketch is not None and not cut:  # the corrected series: raw's went before
            cut.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(Series, "extend", extend_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        for seq in range(1, FOLD_EVERY + 1):
            tally.add(_reply(seq, 10_000 + seq, 3_000 + seq))
    assert cut
    assert tally.received == FOLD_EVERY
    assert tally.raw.count == tally.corrected.count == tally.egress.count == FOLD_EVERY
    # (the sketch too: a copy sharing its buckets with the series it came from would hold
    # the cut fold's values twice)
    assert _held(tally.corrected) == _expected([3_000 + seq for seq in range(1, FOLD_EVERY + 1)])
    assert tally.summary(FOLD_EVERY, 0, 1, 0).coverage == 1.0


def test_mdev_exact_where_floats_cancel() -> None:
    """Sums are integers: 10^5 RTTs of 10 s +- 1 ns keep mdev at 1 ns, which the float
    formula mean(x^2) - mean(x)^2 loses entirely."""
    series = Series(quantiles=False)
    for i in range(100_000):
        series.add(10_000_000_000 + (1 if i % 2 else -1))
    got = series.stats()
    assert got is not None and got.mdev == pytest.approx(1e-6, rel=1e-9)
    assert math.isnan(got.p50)  # no sketch kept for this series


def test_sketch_quantiles_and_edges() -> None:
    sketch = QuantileSketch()
    assert sketch.quantile(0.5) is None
    for v in (-5_000, 0, 0, 1_000, 2_000, 3_000, 10**15):
        sketch.add(v)
    assert sketch.quantile(0.0) == pytest.approx(-5_000, rel=RELATIVE_ERROR)
    assert sketch.quantile(2 / 7) == 0.0  # nearest rank 2: a zero
    assert sketch.quantile(5 / 7) == pytest.approx(2_000, rel=RELATIVE_ERROR)
    assert sketch.quantile(1.0) > 1e12  # clamped into the top bucket, still the largest
    # the top bucket bounds the sketch: ~1500 buckets per sign whatever is added
    assert sketch.buckets == 6


def test_series_quantiles_stay_within_min_and_max() -> None:
    series = Series()
    series.add(1_000_001)
    got = series.stats()
    assert got is not None and got.p50 == got.p99 == got.min == got.max == 1.000001


def test_ewma_as_iputils() -> None:
    """rtt8 = 8*first; then rtt8 += t - rtt8/8 (integer µs), as iputils' ping_common.c."""
    tally = Tally()
    expect = 0
    for seq, us in enumerate([100, 200, 50, 50, 1000], start=1):
        tally.add(m(seq, us, None))
        expect = us * 8 if expect == 0 else expect + us - expect // 8
        assert tally.ewma8_us == expect
    tally.add(m(5, 9999, None, dup=True))  # a duplicate moves nothing
    assert tally.ewma8_us == expect and tally.raw.count == 5


def _tally_bytes(tally: Tally, replies: list[Measurement]) -> int:
    """Bytes still allocated after feeding the replies (the replies themselves excluded)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in replies:
            tally.add(r)
        assert tally.raw.count  # a read folds what is pending (at most FOLD_EVERY values)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_tally_memory_does_not_grow_with_replies() -> None:
    """A flood's tally holds sums and a fixed-size sketch: after 2,000 replies have shaped
    the sketch, 50,000 more add (almost) nothing. Keeping values, 8 bytes a reply in each
    of the 4 series, would add 1.6 MB."""
    rtts = _random_rtts_ns(2_000, seed=7)
    replies = [m(i, max(r // 1000, 1), max(r // 2000, 0)) for i, r in enumerate(rtts)]
    tally = Tally()
    _tally_bytes(tally, replies)  # warm-up: buckets and integer sizes settle
    grown = _tally_bytes(tally, replies * 25)
    assert tally.received == 52_000
    assert grown < 16_384, grown
