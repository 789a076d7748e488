"""iputils' schedule (pacing.py), step by step with made-up clocks: no sockets, no sleep."""

from __future__ import annotations

from mace_tools.pacing import MIN_INTERVAL_NS, Pace, Schedule

MS = 1_000_000
S = 1000 * MS


def pace(**plan: object) -> Pace:
    base: dict[str, object] = {"interval_ns": S, "count": None, "deadline_ns": None,
                               "linger_ns": 10 * S}
    return Pace.starting(Schedule(**{**base, **plan}), 0)  # type: ignore[arg-type]


def test_count_alone_stops_sending_and_waits_minus_w_without_replies() -> None:
    p = pace(count=2, linger_ns=3 * S)
    p.sent(0, 1, 0)
    assert p.more(1) and p.next_send == S
    p.sent(S, 2, 0)
    assert not p.more(2) and p.linger_ns == 3 * S  # no reply yet: -W
    assert not p.over(S + 3 * S - 1, 2, 0) and p.over(S + 3 * S, 2, 0)
    assert p.wake(2) == 4 * S


def test_after_a_reply_the_last_probe_waits_two_round_trips_or_an_interval() -> None:
    """iputils' __schedule_exit: max(2 x the largest RTT, interval) once replies came."""
    p = pace(count=2, linger_ns=3 * S, interval_ns=200 * MS)
    p.sent(0, 1, 0)
    p.received = 1
    p.sent(200 * MS, 2, 150 * MS)  # the largest RTT so far: 150 ms
    assert p.linger_ns == 300 * MS
    q = pace(count=2, linger_ns=3 * S, interval_ns=200 * MS)
    q.sent(0, 1, 0)
    q.received = 1
    q.sent(200 * MS, 2, 1 * MS)
    assert q.linger_ns == 200 * MS  # the interval, not 2 ms
    assert q.over(400 * MS, 2, 0) and not q.over(399 * MS, 2, 0)


def test_all_answered_ends_the_run_at_once() -> None:
    p = pace(count=2)
    p.sent(0, 1, 0)
    p.sent(S, 2, 0)
    p.received = 1
    assert not p.over(S + 1, 2, errors=0)
    assert p.over(S + 1, 2, errors=1)  # an ICMP error answers a probe too


def test_count_with_deadline_keeps_sending_until_count_replies() -> None:
    """ping -c 3 -w 5: not three probes, but until three replies (or the deadline)."""
    p = pace(count=3, deadline_ns=9 * S)
    for n in range(1, 6):
        p.sent(n * S, n, 0)
    assert p.more(5)  # five sent, still more
    p.received = 2
    assert not p.over(5 * S, 5, 0)
    p.received = 3
    assert p.over(5 * S, 5, 0)
    assert pace(count=3, deadline_ns=5 * S).over(5 * S, 1, 0)  # the deadline


def test_with_a_deadline_any_error_ends_the_run() -> None:
    p = pace(deadline_ns=5 * S)
    assert not p.over(S, 3, 0) and p.over(S, 3, 1)
    assert not pace().over(S, 3, 1)  # without -w an error ends nothing


def test_preload_goes_at_once_then_on_the_interval() -> None:
    p = pace(preload=3)
    p.sent(0, 1, 0)
    assert p.next_send == 0
    p.sent(1, 2, 0)
    assert p.next_send == 1
    p.sent(2, 3, 0)
    assert S <= p.next_send <= S + 2  # the burst is spent: an interval on


def test_a_late_probe_is_not_made_up_for_with_a_burst() -> None:
    # iputils' token bucket: woken 3.5 intervals late, one probe goes, and the next one a
    # whole interval after it (a fixed timetable would send three at once to catch up)
    p = pace()
    p.sent(0, 1, 0)
    assert p.next_send == S
    late = 4 * S + S // 2
    p.sent(late, 2, 0)
    assert p.next_send == late + S
    p.sent(late + S + 7, 3, 0)  # a little late: the lost 7 ns are not made up either
    assert p.next_send == late + 2 * S + 7


def test_preload_bounds_the_catch_up_to_its_credit() -> None:
    p = pace(preload=3)
    for n in range(3):
        p.sent(n, n + 1, 0)
    assert S <= p.next_send <= S + 2
    stalled = 10 * S  # credit for 10 probes came, at most 3 are kept
    p.sent(stalled, 4, 0)
    assert p.next_send == stalled
    p.sent(stalled, 5, 0)
    assert p.next_send == stalled
    p.sent(stalled, 6, 0)
    assert p.next_send == stalled + S


def test_on_reply_keeps_preload_in_flight_else_100_per_second() -> None:
    p = pace(interval_ns=0, preload=2)
    assert p.on_reply
    p.sent(0, 1, 0)
    assert p.next_send == 0 and p.burst == 0  # (the burst: one more at once)
    p.sent(5, 2, 0)
    assert p.in_flight(2) == 2 and p.next_send == 5 + MIN_INTERVAL_NS
    p.acknowledge(1)
    p.answered(100, 2, ewma8_us=0)
    assert p.next_send == 100  # one in flight now, fewer than -l 2: next at once


def test_adaptive_interval_follows_the_round_trip() -> None:
    """-A: interval = (ewma + 0.5 ms) in whole ms; at least 2 ms for a user."""
    p = pace(adaptive=True)
    p.sent(0, 1, 0)
    p.received = 1
    p.answered(1 * MS, 1, ewma8_us=8 * 3400)  # ewma 3.4 ms
    assert p.interval_ns == 3 * MS and p.next_send == 3 * MS
    p.answered(2 * MS, 1, ewma8_us=8 * 40)  # 0.04 ms: on reply, as a flood
    assert p.interval_ns == 0 and p.on_reply
    user = pace(adaptive=True, user=True)
    user.answered(1 * MS, 1, ewma8_us=8 * 40)
    assert user.interval_ns == 2 * MS


def test_elapsed_is_first_to_last_send() -> None:
    p = pace(count=3)
    for n, at in enumerate((0, S, 2 * S + 3 * MS), start=1):
        p.sent(at, n, 0)
    assert p.elapsed_us() == 2_003_000
