"""When a ping run sends, waits and stops: iputils' schedule (ping_common.c: pinger,
__schedule_exit, update_interval and main_loop's exit checks), kept apart from the
sending and the bookkeeping in pinger.py.

- -i N: a probe every N seconds; the first -l PRELOAD of them at once. A late probe is
  never made up for beyond -l: iputils' token bucket holds at most PRELOAD intervals of
  credit, so a run woken late (a busy CPU) sends at most PRELOAD probes at once and then
  keeps the interval, where a fixed timetable would burst to catch up. (iputils counts
  the credit in whole ms, and for -i of 10 ms or more waits on SO_RCVTIMEO, which the
  kernel rounds up to jiffies: -i 0.01 sends every 16 ms on a 250 Hz kernel, measured.
  Neither artefact is copied: the credit here is in ns, the wait an epoll timeout.)
- -i 0 (-f's default, or -A once the round trip is under half a millisecond): the next
  probe as soon as fewer than PRELOAD are in flight, else 10 ms after the last one (100
  per second at least).
- -A: the interval follows the round trip (iputils' 1/8-weighted moving average, rounded
  to whole ms; at least 2 ms for a user other than root).
- -c N alone: after the N-th probe, replies are awaited for -W if none came yet, else for
  twice the longest round trip (at least one interval, and at least 10 ms where iputils
  has no floor); the run ends early when every probe is answered.
- -w: probes go on until -c replies (or errors) arrived, or the deadline; any error then
  ends the run at once, as iputils' main loop does.
All times are CLOCK_MONOTONIC ns.
"""

from __future__ import annotations

from dataclasses import dataclass

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
MIN_INTERVAL_NS = 10 * NS_PER_MS  # iputils' MIN_INTERVAL_MS: -i 0 without replies
MIN_USER_INTERVAL_MS = 2  # iputils: -A and -i for a user other than root


@dataclass(frozen=True, slots=True)
class Schedule:
    """What the command line asked for."""

    interval_ns: int  # -i (0: on reply, as -f)
    count: int | None  # -c
    deadline_ns: int | None  # -w, from the start
    linger_ns: int  # -W
    preload: int = 1  # -l
    adaptive: bool = False  # -A
    user: bool = False  # not root: -A keeps 2 ms between probes at least


@dataclass(slots=True)
class Pace:
    """One run's schedule as it goes. The run reports what it did (sent, answered,
    received) and asks what is due."""

    plan: Schedule
    start: int
    interval_ns: int
    next_send: int
    last_send: int
    deadline: int | None
    linger_ns: int  # how long replies are awaited after the last probe (set when sent)
    burst: int  # -f and -A: probes of -l still to go at once (-i N: the credit below)
    credit_ns: int  # -i N: the token bucket's credit (iputils' tokens), as of credit_at
    credit_at: int
    received: int = 0  # distinct replies so far
    acked: int = 0  # highest probe number answered (or refused by an ICMP error)

    @classmethod
    def starting(cls, plan: Schedule, now: int) -> Pace:
        deadline = now + plan.deadline_ns if plan.deadline_ns else None
        return cls(plan, now, plan.interval_ns, now, now, deadline, plan.linger_ns,
                   plan.preload - 1, plan.interval_ns * plan.preload, now)

    @property
    def on_reply(self) -> bool:
        """-i 0: the next probe goes when one is answered (iputils' "flood")."""
        return self.interval_ns <= 0

    def more(self, transmitted: int) -> bool:
        """Probes left to send: until -c are sent, or with -w until the deadline."""
        count = self.plan.count
        return count is None or transmitted < count or self.deadline is not None

    def in_flight(self, transmitted: int) -> int:
        # (comparisons, not max(): these run for every probe of a flood)
        return transmitted - self.acked if transmitted > self.acked else 0

    def acknowledge(self, number: int) -> None:
        """Probe `number` was answered (or an error came back for it)."""
        if number > self.acked:
            self.acked = number

    def over(self, now: int, transmitted: int, errors: int) -> bool:
        """iputils' exit checks: with -w the deadline, any error, or -c answers (or
        errors) in; else every probe answered, or the last probe's wait over."""
        count = self.plan.count
        if self.deadline is not None:
            # (iputils checks -c answers without -w too; there it can only end the run
            # before the last probe when a probe got both an error and a reply, which a
            # forged error could cause: without -w the run waits for its probes instead)
            return now >= self.deadline or bool(errors) or \
                (count is not None and self.received + errors >= count)
        if self.more(transmitted):
            return False
        outstanding = transmitted - self.received - errors
        return outstanding <= 0 or now >= self.last_send + self.linger_ns

    def sent(self, now: int, transmitted: int, max_rtt_ns: int) -> None:
        """A probe was counted as sent at `now` (transmitted: the count with it); when the
        next one is due. After the last of -c, how long its answers are awaited."""
        self.last_send = now
        on_reply = self.interval_ns <= 0  # (once: this runs for every probe of a flood)
        if not on_reply and not self.plan.adaptive:
            self.next_send = now + self._spend_credit(now)  # -l's burst included
        elif self.burst > 0:
            self.burst -= 1
            self.next_send = now
        elif on_reply:
            self.next_send = now if transmitted - self.acked < self.plan.preload \
                else now + MIN_INTERVAL_NS
        else:  # -A
            self.next_send = now + self.interval_ns
        if not self.more(transmitted):
            # (10 ms at least: a flood's answers are read later than iputils reads them,
            # and a reply in time must not be called lost for Python's sake)
            wait = max(2 * max_rtt_ns, self.interval_ns, MIN_INTERVAL_NS) if self.received \
                else 0
            # (0: iputils' timer would never go off; -W bounds the wait instead)
            self.linger_ns = wait or self.plan.linger_ns

    def _spend_credit(self, now: int) -> int:
        """-i N: a probe went at `now`; how long until the bucket holds the next one's
        credit. The credit grows with time up to -l intervals, and each probe spends one
        interval (iputils' pinger(): the -l burst, then one probe per interval, and a late
        one made up for only while the credit lasts)."""
        bucket = self.interval_ns * self.plan.preload
        self.credit_ns = min(self.credit_ns + now - self.credit_at, bucket) - self.interval_ns
        self.credit_at = now
        return max(0, self.interval_ns - self.credit_ns)

    def retry(self, now: int, retry_ns: int) -> None:
        """The kernel had no room for the probe: the same probe again in retry_ns."""
        self.next_send = now + retry_ns

    def answered(self, now: int, transmitted: int, ewma8_us: int) -> None:
        """After a batch of replies: -A takes the interval from the round trip, and on
        reply the next probe is due once fewer than -l are in flight."""
        if self.plan.adaptive and ewma8_us:
            interval_ms = (ewma8_us // 8 + 500) // 1000
            if self.plan.user:
                interval_ms = max(interval_ms, MIN_USER_INTERVAL_MS)
            self.interval_ns = interval_ms * NS_PER_MS
            if not self.on_reply:
                self.next_send = self.last_send + self.interval_ns
        if self.on_reply and self.in_flight(transmitted) < self.plan.preload:
            self.next_send = min(self.next_send, now)

    def wake(self, transmitted: int) -> int:
        """When the next thing is due: a probe, the end of the wait, or the deadline."""
        wake = self.next_send if self.more(transmitted) else self.last_send + self.linger_ns
        return wake if self.deadline is None else min(wake, self.deadline)

    def elapsed_us(self) -> int:
        """First send to last send: iputils' "time" and the base of its ipg."""
        return (self.last_send - self.start) // 1000
