"""The ping run: iputils' pacing and bookkeeping over a measuring session (session.py).

Probes go out on iputils' schedule (-i, -c, -w, -W; -f and -i 0: the next probe on a
reply, 100 per second at least). Each carries the run's nonce and its probe number (the
run's count, not wrapped at 65536 as the ICMP seq: probe/icmp.py), so a late reply from
an earlier lap of the seq is never taken for a new probe. The kernel correlates each
probe and sends one record per answer (bpf/mace.bpf.c), plus one event per device
crossed when the output shows the path (--json, --ndjson); ICMP errors quoting a probe
are reported as iputils words them (probe/icmp_errors.py). A reply's record is in the
ring buffer before the reply reaches the socket, so the session drains the ring before
each reply is measured (correlate.measured). When records were lost while a probe was in
flight, its reply is shown raw: whatever is missing, nothing stands in.

Flood (-f, -i 0): a reply to the latest probe has the next probe sent before the reply is
correlated and reported, so that work overlaps the next round trip. The sink still hears
things in iputils' order: the reply, then the next probe (its dot).

What the run reports goes to a ``PingSink`` (the output layer); the run itself prints
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from mace_tools.correlate import measured, stages
from mace_tools.errors import MaceError
from mace_tools.model import KernelEvent, Measurement, Probe, ProbeRecord, Reply, RunResult
from mace_tools.probe.addresses import SockAddr, sockaddr
from mace_tools.probe.icmp import (
    NONCE_LEN,
    TAG_LEN,
    EchoTemplate,
    ParsedIcmp,
    is_our_reply,
    parse_ip_icmp,
)
from mace_tools.probe.icmp_errors import error_text, quoted_probe_seq
from mace_tools.probe.sockets import IcmpSocket, open_icmp_socket
from mace_tools.session import EventSourceFactory, Session, family_of, new_nonce
from mace_tools.stats import Tally

NS_PER_S = 1_000_000_000
FLOOD_MIN_RATE_S = 0.01  # iputils -f: next probe on reply, or 100 per second at least
MIN_INTERVAL_NS = 10_000_000  # iputils' MIN_INTERVAL_MS: retry when the kernel had no room
MAX_NO_ROOM_BACKOFF_NS = 500_000_000


@dataclass(slots=True)
class PingOptions:
    dst_addr: str
    count: int | None = None  # -c
    interval_s: float = 1.0  # -i
    size: int = 56  # -s
    ttl: int | None = None  # -t
    linger_s: float = 10.0  # -W: how long to wait for replies after the last probe
    deadline_s: float | None = None  # -w
    flood: bool = False  # -f
    device: str | None = None  # -I NAME
    source: str | None = None  # -I ADDR
    netns_path: Path | None = None  # --netns / --pid
    report_outstanding: bool = False  # -O
    path: bool = False  # an event per device crossed, for outputs that show the path


class PingSink(Protocol):
    def start(self, source_addr: str) -> None: ...
    def sent(self, seq: int) -> None: ...
    def reply(self, m: Measurement) -> None: ...
    def icmp_error(self, seq: int, src: str, text: str) -> None: ...
    def no_answer_yet(self, seq: int) -> None: ...
    def send_error(self, seq: int, text: str) -> None: ...
    def timeout(self, seq: int) -> None: ...
    def status(self, transmitted: int, tally: Tally) -> None: ...


class _Probes:
    """Probes in flight and what the kernel sent of them, by key: the probe number when
    the payload carries it (numbered), else the 16-bit ICMP seq. A probe is forgotten
    when the one 65536 after it is sent (iputils' window), so nothing here grows past
    65536 entries however long the run."""

    def __init__(self, numbered: bool) -> None:
        self.numbered = numbered
        self.sent: dict[int, Probe] = {}
        self.events: dict[int, list[KernelEvent]] = {}
        self.records: dict[int, ProbeRecord] = {}
        self.answered: set[int] = set()
        self.by_seq: dict[int, int] = {}  # seq -> key of the probe in the window with it

    def key(self, n: int) -> int:
        """The key of the run's n-th probe (numbers wrap at 2**32, as the payload's)."""
        return n & 0xFFFFFFFF if self.numbered else n & 0xFFFF

    def add(self, n: int, probe: Probe) -> bool:
        """Track the n-th probe; True if the probe 65536 before it got no answer, which
        is then lost for good (its seq is this one's)."""
        old = self.key(n - 0x10000)
        lapped = old in self.sent and old not in self.answered
        self.forget(old)
        key = self.key(n)
        self.sent[key] = probe
        self.events[key] = []
        self.by_seq[key & 0xFFFF] = key
        return lapped

    def forget(self, key: int) -> None:
        """A probe out of the window, or one that never left (sendto failed)."""
        self.sent.pop(key, None)
        self.events.pop(key, None)
        self.records.pop(key, None)
        self.answered.discard(key)
        if self.by_seq.get(key & 0xFFFF) == key:
            del self.by_seq[key & 0xFFFF]

    def unanswered(self, transmitted: int) -> list[int]:
        """Seqs of the last 65536 probes still sent and unanswered, in sending order."""
        return [n & 0xFFFF for n in range(max(1, transmitted - 0xFFFF), transmitted + 1)
                if self.key(n) in self.sent and self.key(n) not in self.answered]

    def add_event(self, ev: KernelEvent) -> None:
        bucket = self.events.get(ev.seq)  # the kernel's probe number: our key
        if bucket is not None:  # late events of a finished probe are of no use
            bucket.append(ev)

    def add_record(self, record: ProbeRecord) -> None:
        """The kernel's record of an answered probe; a later one (the reply reached a
        second device of the prober's netns) replaces it, as its delivery is later."""
        if record.number in self.sent:
            self.records[record.number] = record

    def take(self, key: int) -> tuple[list[KernelEvent], ProbeRecord | None]:
        """A reply's events and record; dropped, so a duplicate never reuses them."""
        return self.events.pop(key, []), self.records.pop(key, None)


class _Sent(NamedTuple):
    """What putting one probe on the wire did; the sink hears of it and the run counts it
    afterwards (_settle): in flood, once the reply that prompted it is reported."""

    seq: int
    key: int  # the probe's key in _Probes (its number when numbered)
    at: int  # CLOCK_MONOTONIC just before sendto()
    lapped: bool  # it took the seq of a probe 65536 earlier that got no answer
    error: OSError | None  # sendto() failed


@dataclass(slots=True)
class _Pace:
    """iputils' schedule of one run (CLOCK_MONOTONIC ns)."""

    interval_ns: int
    adaptive: bool  # -i 0 (-f's default): next probe on reply, 100 per second at least
    linger_ns: int  # -W: how long replies are waited for after the last probe
    deadline: int | None  # -w
    next_send: int
    last_send: int
    received: int = 0  # distinct replies so far

    @classmethod
    def starting(cls, opts: PingOptions, now: int) -> _Pace:
        adaptive = opts.interval_s <= 0
        interval_s = FLOOD_MIN_RATE_S if adaptive else opts.interval_s
        deadline = now + int(opts.deadline_s * NS_PER_S) if opts.deadline_s else None
        return cls(int(interval_s * NS_PER_S), adaptive, int(opts.linger_s * NS_PER_S),
                   deadline, now, now)


class Pinger:
    def __init__(self, opts: PingOptions, sink: PingSink, nonce: bytes | None = None,
                 backend_factory: EventSourceFactory | None = None,
                 after_setup: Callable[[], None] | None = None) -> None:
        """backend_factory: the kernel event source (session.kernel_events when None).
        after_setup runs once the socket, the netns and the programs are set up: the
        command drops its privileges there, as iputils does (a long-lived caller, such as
        a service running many pings, keeps its own)."""
        self.opts = opts
        self._after_setup = after_setup
        self.sink = sink
        self._nonce_asked = nonce  # None: the event source's choice (an agent's), or new
        self.nonce = nonce or new_nonce()  # the run's, once it runs
        self.ident = os.getpid() & 0xFFFF
        self.family = family_of(opts.dst_addr)
        self._dst: SockAddr = (opts.dst_addr, 0)  # its sockaddr, once made in the netns
        self._template = EchoTemplate(self.ident, self.nonce, opts.size, self.family)
        self._backend_factory = backend_factory
        self._probes = _Probes(numbered=opts.size >= TAG_LEN)
        self._session: Session | None = None  # set while a run is on
        self._pace: _Pace | None = None  # set while a run is on
        self._no_room = 0  # consecutive sends refused for lack of buffer (iputils' oom_count)

    def run(self) -> RunResult:
        opts = self.opts
        with Session(opts.netns_path, self._nonce_asked, after_setup=self._after_setup,
                     events_factory=self._backend_factory) as session:
            (sock,), source = session.open_sockets(self._open_socket, opts.dst_addr,
                                                   opts.device, opts.source)
            # The kernel correlates probes that carry their number (-s >= 12). The event
            # source may choose the nonce (an agent does): the filter and probes after it.
            if self._probes.numbered:
                self.nonce = session.open_events(self._probes.add_event,
                                                 self._probes.add_record, records=True,
                                                 path=opts.path)
            else:
                self.nonce = session.open_events(None)
            self._filter_replies(sock)
            self._template = EchoTemplate(self.ident, self.nonce, opts.size, self.family)
            result = RunResult(nonce=self.nonce, source_addr=source,
                               kernel=self._probes.numbered, source=session.source)
            session.ready()
            self.sink.start(source)
            self._session = session
            try:
                self._loop(session, sock, result)
                result.kernel_events_lost = session.lost()
                result.kernel_records = session.records_read
            finally:
                self._session = self._pace = None
        return result

    def _open_socket(self) -> list[IcmpSocket]:
        """The run's ICMP socket: raw, or without CAP_NET_RAW a ping socket (probe/
        sockets.py). A ping socket's requests carry the kernel's ICMP id, not ours, and
        replies and quoted errors of probes too short for the nonce match on the id: so
        the run's ident is set here, once the socket is open (the template is built
        after this, and the kernel writes the id of a ping socket's requests anyway)."""
        sock = open_icmp_socket(self.opts.ttl, self.opts.device, self.opts.source,
                                self.family)
        self._dst = sockaddr(self.opts.dst_addr)  # here: a %scope names this netns' devices
        if sock.ident is not None:
            self.ident = sock.ident
        return [sock]

    def _filter_replies(self, sock: IcmpSocket) -> None:
        """A socket filter that drops other runs' echo replies in the kernel (replies to
        probes too short for the nonce pass on their type: probe/sockfilter.py)."""
        # it only saves work: every datagram is still matched after recv()
        with contextlib.suppress(MaceError):
            sock.filter_replies(self.nonce if self.opts.size >= NONCE_LEN else None)

    def _loop(self, session: Session, sock: IcmpSocket, result: RunResult) -> None:
        start = time.monotonic_ns()
        result.start_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        self._pace = _Pace.starting(self.opts, start)
        session.loop(lambda: self._turn(sock, result),
                     lambda _fd: self._receive(sock, session, result),
                     status=lambda: self.sink.status(result.transmitted, result.tally))
        result.elapsed_ms = (time.monotonic_ns() - start) // 1_000_000
        for seq in self._probes.unanswered(result.transmitted):
            self.sink.timeout(seq)

    def _turn(self, sock: IcmpSocket, result: RunResult) -> float | None:
        """iputils' loop but the reading: end the run when it is over (None), send the
        probe that is due; seconds until the next thing is due. Replies are read after
        every turn, so between any two probes (else -i 0, or any interval shorter than a
        send, would starve the socket)."""
        pace = self._pace
        assert pace is not None
        now = time.monotonic_ns()
        if pace.deadline is not None and now >= pace.deadline:
            return None
        more = self._more(result)
        if not more:
            # as iputils: a probe answered by an ICMP error is done too
            outstanding = result.transmitted - pace.received - result.errors
            if outstanding <= 0 or now >= pace.last_send + pace.linger_ns:
                return None
        if more and now >= pace.next_send:
            self._report_outstanding(result)
            self._schedule(self._send(sock, result.transmitted + 1, result), now, result)
        wake = pace.next_send if more else pace.last_send + pace.linger_ns
        if pace.deadline is not None:
            wake = min(wake, pace.deadline)
        return max(0.0, (wake - time.monotonic_ns()) / NS_PER_S)

    def _more(self, result: RunResult) -> bool:
        """Probes left to send (-c)."""
        return self.opts.count is None or result.transmitted < self.opts.count

    def _report_outstanding(self, result: RunResult) -> None:
        """-O: the previous probe is still unanswered as the next one goes."""
        if self.opts.report_outstanding and result.transmitted \
                and self._probes.key(result.transmitted) not in self._probes.answered:
            self.sink.no_answer_yet(result.transmitted & 0xFFFF)

    def _schedule(self, retry_ns: int | None, now: int, result: RunResult) -> None:
        """Count a probe sent at `now` (retry_ns None, as _settle says) and set when the
        next is due; or have the same probe tried again in retry_ns."""
        pace = self._pace
        assert pace is not None
        if retry_ns is not None:
            pace.next_send = now + retry_ns
            return
        result.transmitted += 1
        pace.last_send = now
        pace.next_send = now + pace.interval_ns if self.opts.flood or pace.adaptive \
            else max(pace.next_send + pace.interval_ns, now)

    def _send(self, sock: IcmpSocket, n: int, result: RunResult) -> int | None:
        """Send probe n and report it. None: it counts as transmitted, sent or failed for
        good (as iputils' "hard local error": reported, and counted in errors). Else the
        kernel had no room for it: try the same probe again in that many ns, uncounted."""
        return self._settle(self._transmit(sock, n), result)

    def _transmit(self, sock: IcmpSocket, n: int) -> _Sent:
        """Put probe n on the wire and track it; nothing is reported or counted yet."""
        seq = n & 0xFFFF
        message = self._template.message(n)
        probe = Probe(seq, 0, 0)
        lapped = self._probes.add(n, probe)
        if self._session is not None:
            probe.lost_at_send = self._session.lost()
        # Both clocks just before sendto(): the raw RTT's start (as iputils: wall clock) and
        # the send point egress is measured from (the clock of bpf_ktime_get_ns).
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.send(message, self._dst)
        except OSError as exc:
            self._probes.forget(self._probes.key(n))
            return _Sent(seq, self._probes.key(n), probe.sent_mono_ns, lapped, exc)
        return _Sent(seq, self._probes.key(n), probe.sent_mono_ns, lapped, None)

    def _settle(self, sent: _Sent, result: RunResult) -> int | None:
        """Report a transmitted probe to the sink; what _send returns."""
        if sent.lapped:
            self.sink.timeout(sent.seq)  # the probe 65536 before this one
        if sent.error is None:
            self._no_room = 0
            self.sink.sent(sent.seq)
            return None
        retry_ns = self._retry_after(sent.error)
        if retry_ns is None:
            result.errors += 1
            self.sink.send_error(sent.seq, f"sendmsg: {sent.error.strerror}")
        return retry_ns

    def _retry_after(self, exc: OSError) -> int | None:
        """As iputils: a full socket buffer (EAGAIN) is retried in 10 ms; a full device
        queue or no memory (ENOBUFS, ENOMEM) backs off min(interval/2, 500 ms) until the
        retries would outlast -W, then fails as any other error (None: a failure)."""
        if exc.errno == errno.EAGAIN:
            return MIN_INTERVAL_NS
        if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
            backoff = min(max(int(self.opts.interval_s * NS_PER_S) // 2, MIN_INTERVAL_NS),
                          MAX_NO_ROOM_BACKOFF_NS)
            self._no_room += 1
            if self._no_room * backoff < self.opts.linger_s * NS_PER_S:
                return backoff
        return None

    def _receive(self, sock: IcmpSocket, session: Session | None, result: RunResult) -> int:
        """Read every waiting datagram; return how many new (non-duplicate) replies.
        session None: no kernel data (nothing is drained)."""
        new = 0
        probes = self._probes
        ahead_key: int | None = None  # flood: the probe this batch sent ahead of a reply
        due = False  # flood: a reply of this batch made the next probe due at once
        while (got := sock.recv()) is not None:
            data, recv_real = got
            parsed = parse_ip_icmp(data)
            if parsed is None:
                continue  # malformed or truncated: not ours, never fatal
            if parsed.icmp_type != parsed.ECHO_REPLY:
                self._maybe_error(parsed, result)
                continue
            if not is_our_reply(parsed, self.nonce, self.ident, self.opts.size):
                continue  # another program's echo reply
            key = self._reply_key(parsed)
            if key is None or key not in probes.sent:
                continue  # not a probe in the window: an earlier lap's, or forged
            dup = key in probes.answered
            ahead = None
            if not dup:
                probes.answered.add(key)
                new += 1
                # One probe per batch of replies, as ever; sent ahead of the reply when it
                # can be, else at the next turn. A reply to that very probe (a path that
                # answers within sendto(), as loopback does) makes the next one due.
                if ahead_key is None:
                    ahead = self._send_ahead(sock, key, result)
                    ahead_key = None if ahead is None else ahead.key
                    due = ahead is None
                elif key == ahead_key:
                    due = True
            try:
                self._reply(parsed, key, recv_real, dup, session, result)
            finally:  # (also on Ctrl-C: a probe that left is counted)
                if ahead is not None:
                    # (no -O line to check for: the previous probe is the one just answered)
                    self._schedule(self._settle(ahead, result), ahead.at, result)
        pace = self._pace
        if pace is not None:
            pace.received += new
            if due and pace.adaptive:
                pace.next_send = time.monotonic_ns()  # next probe as soon as answered
        return new

    def _reply_key(self, parsed: ParsedIcmp) -> int | None:
        """The key of the probe a reply answers: the number its payload carries (which
        must agree with its seq), or its seq for probes too short to carry one."""
        if not self._probes.numbered:
            return parsed.seq
        number = parsed.number
        if number is None or number & 0xFFFF != parsed.seq:
            return None
        return number

    def _send_ahead(self, sock: IcmpSocket, key: int, result: RunResult) -> _Sent | None:
        """Flood (-i 0, -f's default): a new reply makes the next probe due. It is sent
        here, before the reply is measured, when the reply answers the latest probe
        (none is left in flight: iputils' cue) and -c and -w allow one; else the next
        turn sends it, as for any other reply."""
        pace = self._pace
        if pace is None or not pace.adaptive or key != self._probes.key(result.transmitted) \
                or not self._more(result):
            return None
        if pace.deadline is not None and time.monotonic_ns() >= pace.deadline:
            return None
        return self._transmit(sock, result.transmitted + 1)

    def _reply(self, parsed: ParsedIcmp, key: int, recv_real: int, dup: bool,
               session: Session | None, result: RunResult) -> None:
        """Measure a reply from its probe's kernel record, count it and report it."""
        probe = self._probes.sent[key]
        complete = True
        if session is not None:
            session.drain()  # a reply's record precedes its delivery to the socket
            complete = session.lost() == probe.lost_at_send
        reply = Reply(parsed.seq, parsed.src, parsed.ttl, parsed.icmp_len, recv_real,
                      time.monotonic_ns())
        events, record = ([], None) if dup else self._probes.take(key)
        if record is None and not dup and session is not None:
            # No record: the delivery fired no tracepoint in the prober's netns
            # (macvlan); the kernel's state still holds the outer device's times.
            record = session.probe_state(key)
        path = stages(events, probe.sent_mono_ns) if events else None
        m = measured(probe, reply, record, complete, path)
        m.dup = dup
        result.tally.add(m)
        self.sink.reply(m)

    def _maybe_error(self, parsed: ParsedIcmp, result: RunResult) -> None:
        """An ICMP error quoting one of our probes is reported as iputils does."""
        seq = quoted_probe_seq(parsed.quoted, self.ident, self.nonce, self.opts.dst_addr)
        # the probe in the window with that seq (a quote of 8 bytes has no number)
        if seq is None or seq not in self._probes.by_seq or not parsed.checksum_ok:
            return
        result.errors += 1
        self.sink.icmp_error(seq, parsed.src, error_text(parsed.icmp_type, parsed.code,
                                                         parsed.family, parsed.info))
