"""The ping run: iputils' pacing and bookkeeping over a measuring session (session.py).

Probes go out on iputils' schedule (pacing.py: -i, -c, -w, -W, -l, -A; -f and -i 0: the
next probe on a reply, 100 per second at least), and replies are judged as iputils judges
them (echo_check.py: DUP, corrupted, truncated, wrong data). Each carries the run's nonce
and its probe number (the run's count, not wrapped at 65536 as the ICMP seq:
probe/icmp.py), so a late reply from
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from mace_tools.correlate import measured, stages
from mace_tools.echo_check import PLAIN, EchoCheck, PlainReply, Verdict
from mace_tools.errors import MaceError
from mace_tools.model import KernelEvent, Measurement, Probe, ProbeRecord, Reply, RunResult
from mace_tools.pacing import MIN_INTERVAL_NS, NS_PER_S, Pace, Schedule
from mace_tools.probe import sockopts
from mace_tools.probe.addresses import SockAddr, address_text, packed, sockaddr
from mace_tools.probe.icmp import (
    NONCE_LEN,
    TAG_LEN,
    EchoTemplate,
    ParsedIcmp,
    parse_ip_icmp,
)
from mace_tools.probe.icmp_errors import NOTICES, error_text, quoted_probe_seq
from mace_tools.probe.sockets import IcmpSocket, open_icmp_socket
from mace_tools.probe.sockopts import SocketOptions
from mace_tools.session import (
    EventSourceFactory,
    Session,
    family_of,
    new_nonce,
    source_address,
)
from mace_tools.stats import Tally

MAX_NO_ROOM_BACKOFF_NS = 500_000_000
AHEAD_PER_BATCH = 64  # flood: probes sent from one batch of replies before a turn


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
    preload: int = 1  # -l
    adaptive: bool = False  # -A
    pattern: bytes | None = None  # -p
    ident: int | None = None  # -e (None: the pid's low 16 bits, or the ping socket's)
    user_latency: bool = False  # -U: raw RTT ends when the reply is read, not stamped
    strict_source: bool = False  # -B: bind to the source address
    connect: bool = False  # -C
    multicast: bool = False  # -b, or a multicast target: replies come from elsewhere
    socket_options: SocketOptions = field(default_factory=SocketOptions)
    flowlabel: int | None = None  # -F: the IPv6 probes' flow label (leased at start)
    # a service's endless run: probes unanswered this long are forgotten (their late
    # replies ignored), so its memory stays bounded; None: iputils' 65536-probe window
    window_s: float | None = None


class PingSink(Protocol):
    def start(self, source_addr: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def sent(self, seq: int) -> None: ...
    def reply(self, m: Measurement) -> None: ...
    def icmp_error(self, seq: int, src: str, text: str) -> None: ...
    def icmp_notice(self, seq: int, src: str, text: str) -> None: ...
    def no_answer_yet(self, seq: int) -> None: ...
    def send_error(self, seq: int, text: str) -> None: ...
    def timeout(self, seq: int) -> None: ...
    def status(self, transmitted: int, tally: Tally) -> None: ...


class _Probes:
    """Probes in flight and what the kernel sent of them, by key: the probe number when
    the payload carries it (numbered), else the 16-bit ICMP seq. A probe is forgotten
    when the one 65536 after it is sent (iputils' window), so nothing here grows past
    65536 entries however long the run. Per-device events are kept only for a run that
    shows the path (paths): no other run is sent any."""

    def __init__(self, numbered: bool, paths: bool = False) -> None:
        self.numbered = numbered
        self.paths = paths
        self._mask = 0xFFFFFFFF if numbered else 0xFFFF  # a key's bits
        self.sent: dict[int, Probe] = {}
        self.events: dict[int, list[KernelEvent]] = {}
        self.records: dict[int, ProbeRecord] = {}
        self.answered: set[int] = set()
        self.spoiled: set[int] = set()  # a damaged copy took their kernel data: no correction

    def key(self, n: int) -> int:
        """The key of the run's n-th probe (numbers wrap at 2**32, as the payload's)."""
        return n & self._mask

    def add(self, n: int, probe: Probe) -> bool:
        """Track the n-th probe; True if the probe 65536 before it got no answer, which
        is then lost for good (its seq is this one's)."""
        old = (n - 0x10000) & self._mask
        lapped = False
        if old in self.sent:  # (else nothing is held of it: see forget)
            lapped = old not in self.answered
            self.forget(old)
        key = n & self._mask
        self.sent[key] = probe
        if self.paths:
            self.events[key] = []
        return lapped

    def forget(self, key: int) -> None:
        """A probe out of the window, or one that never left (sendto failed)."""
        self.sent.pop(key, None)
        self.answered.discard(key)
        # (each probe sent past the first 65536 forgets one: what is mostly empty is
        # looked at only when it is not)
        if self.events:
            self.events.pop(key, None)
        if self.records:
            self.records.pop(key, None)
        if self.spoiled:
            self.spoiled.discard(key)

    def key_of_seq(self, seq: int, transmitted: int) -> int | None:
        """The key of the probe in the window with this 16-bit seq (an ICMP error's quote
        or a reply cut before its number names no more), None if it was forgotten: the
        latest of the run's numbers with that seq, as the window holds the last 65536."""
        number = transmitted - ((transmitted - seq) & 0xFFFF)
        key = self.key(number)
        return key if number > 0 and key in self.sent else None

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

    def number_of(self, key: int, transmitted: int) -> int:
        """The run's count of the probe with this key (of the last 2**16 or 2**32 sent)."""
        return transmitted - ((transmitted - key) & self._mask)

    def take(self, key: int) -> tuple[Sequence[KernelEvent], ProbeRecord | None]:
        """A reply's events and record; dropped, so a duplicate never reuses them."""
        return self.events.pop(key, ()), self.records.pop(key, None)


def _packed_or_none(address: str) -> bytes | None:
    try:
        return packed(address)
    except OSError:
        return None


class _Sent(NamedTuple):
    """What putting one probe on the wire did; the sink hears of it and the run counts it
    afterwards (_settle): in flood, once the reply that prompted it is reported."""

    seq: int
    at: int  # CLOCK_MONOTONIC just before sendto()
    lapped: bool  # it took the seq of a probe 65536 earlier that got no answer
    error: OSError | None  # sendto() failed


class Pinger:
    def __init__(self, opts: PingOptions, sink: PingSink, nonce: bytes | None = None,
                 backend_factory: EventSourceFactory | None = None,
                 after_setup: Callable[[], None] | None = None,
                 stop_fds: Sequence[int] = (),
                 keep_going: Callable[[], bool] | None = None) -> None:
        """backend_factory: the kernel event source (session.kernel_events when None).
        after_setup runs once the socket, the netns and the programs are set up: the
        command drops its privileges there, as iputils does (a long-lived caller, such as
        a service running many pings, keeps its own). A service's run also ends, as on
        Ctrl-C, when one of stop_fds is readable or keep_going() is false (asked at each
        turn that sends: in flood, at most AHEAD_PER_BATCH probes apart)."""
        self.opts = opts
        self._after_setup = after_setup
        self.sink = sink
        self._nonce_asked = nonce  # None: the event source's choice (an agent's), or new
        self.nonce = nonce or new_nonce()  # the run's, once it runs
        self.ident = os.getpid() & 0xFFFF if opts.ident is None else opts.ident
        self.family = family_of(opts.dst_addr)
        self._dst: SockAddr = (opts.dst_addr, 0)  # its sockaddr, once made in the netns
        self._template = EchoTemplate(self.ident, self.nonce, opts.size, opts.pattern,
                                      self.family)
        self._backend_factory = backend_factory
        self._probes = _Probes(numbered=opts.size >= TAG_LEN, paths=opts.path)
        self._check = EchoCheck(opts.size, opts.pattern)
        # the target as replies' sources read (fe80::1%eth0's come from fe80::1), and
        # packed: None if it is no numeric address (a caller's name: sendto resolves it)
        self._target = _packed_or_none(opts.dst_addr)
        self._target_text = address_text(self._target) if self._target else opts.dst_addr
        self._plain = PlainReply.of_run(self.family, opts.size, self.nonce, self._target,
                                        opts.pattern)  # (again once the nonce is final)
        self._session: Session | None = None  # set while a run is on
        self._pace: Pace | None = None  # set while a run is on
        self._no_room = 0  # consecutive sends refused for lack of buffer (iputils' oom_count)
        self._stop_fds = tuple(stop_fds)
        self._keep_going = keep_going
        self._oldest = 1  # with opts.window_s: the first probe not yet forgotten

    def run(self) -> RunResult:
        opts = self.opts
        with Session(opts.netns_path, self._nonce_asked, after_setup=self._after_setup,
                     events_factory=self._backend_factory) as session:
            (sock,), source = session.open_sockets(self._open_socket, opts.dst_addr,
                                                   opts.device, opts.source,
                                                   broadcast=opts.socket_options.broadcast)
            for line in [*sock.warnings, *session.warnings]:
                self.sink.warning(line)
            if opts.connect:
                sock.connect(self._dst)
            # The kernel correlates probes that carry their number (-s >= 12). The event
            # source may choose the nonce (an agent does): the filter and probes after it.
            if self._probes.numbered:
                self.nonce = session.open_events(self._probes.add_event,
                                                 self._probes.add_record, records=True,
                                                 path=opts.path)
            else:
                self.nonce = session.open_events(None)
            rate = session.probe_rate
            if rate and opts.interval_s * rate < 1:  # (-f, -i 0: as fast as replies come)
                self.sink.warning(f"mace-agent gives kernel data to {rate} probes a second "
                                  "of a run: past that, replies are measured raw")
            self._filter_replies(sock)
            self._template = EchoTemplate(self.ident, self.nonce, opts.size, opts.pattern,
                                          self.family)
            self._plain = PlainReply.of_run(self.family, opts.size, self.nonce,
                                            self._target, opts.pattern)
            result = RunResult(nonce=self.nonce, source_addr=source,
                               kernel=self._probes.numbered, source=session.source,
                               ipg_ewma=opts.flood or opts.adaptive or opts.interval_s <= 0)
            session.ready()
            # -v shows the id a raw socket sends, or a ping socket's when -e chose it
            raw = getattr(sock, "ident", None) is None
            self.sink.start(source, self.ident if raw or opts.ident is not None else None)
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
        opts = self.opts
        source = opts.source
        if opts.strict_source and source is None:  # -B: bound to what the kernel picks
            source = source_address(opts.dst_addr, opts.device, None)
        # ping -e 0: a ping socket cannot take id 0 (iputils then forces a raw socket)
        sock = open_icmp_socket(opts.ttl, opts.device, source, opts.socket_options,
                                ident=opts.ident, raw_only=opts.ident == 0,
                                family=self.family)
        self._dst = sockaddr(opts.dst_addr)  # here: a %scope names this netns' devices
        if opts.flowlabel is not None and self.family == 6:
            try:
                self._dst = sockopts.lease_flowlabel(sock.sock, self._dst, opts.flowlabel)
            except MaceError:
                sock.close()
                raise
        if sock.ident is not None:
            self.ident = sock.ident
        return [sock]

    def _filter_replies(self, sock: IcmpSocket) -> None:
        """A socket filter that drops other runs' echo replies in the kernel (replies to
        probes too short for the nonce pass on their type: probe/sockfilter.py)."""
        # it only saves work: every datagram is still matched after recv()
        with contextlib.suppress(MaceError):
            sock.filter_replies(self.nonce if self.opts.size >= NONCE_LEN else None,
                                self.ident)

    def _schedule_asked(self) -> Schedule:
        opts = self.opts
        return Schedule(
            interval_ns=int(opts.interval_s * NS_PER_S), count=opts.count,
            deadline_ns=int(opts.deadline_s * NS_PER_S) if opts.deadline_s else None,
            linger_ns=int(opts.linger_s * NS_PER_S), preload=opts.preload,
            adaptive=opts.adaptive, user=os.getuid() != 0)

    def _loop(self, session: Session, sock: IcmpSocket, result: RunResult) -> None:
        start = time.monotonic_ns()
        result.start_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        self._pace = pace = Pace.starting(self._schedule_asked(), start)
        session.loop(lambda: self._turn(sock, result),
                     lambda _fd: self._receive(sock, session, result),
                     status=lambda: self.sink.status(result.transmitted, result.tally),
                     stop_fds=self._stop_fds)
        result.elapsed_us = pace.elapsed_us()
        result.elapsed_ms = (result.elapsed_us + 500) // 1000  # iputils rounds it so
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
        # (as iputils: a probe answered by an ICMP error is done too)
        if pace.over(now, result.transmitted, result.errors):
            return None
        if self._keep_going is not None and now >= pace.next_send and not self._keep_going():
            return None
        if self.opts.window_s is not None:
            self._forget_older(now - int(self.opts.window_s * NS_PER_S), result.transmitted)
        # what is due goes at once, as iputils' do-while around pinger(): -l's first
        # probes, and on reply as many as -l allows in flight (at most -l per turn, so
        # replies are read between)
        for _ in range(self.opts.preload):
            if not pace.more(result.transmitted) or now < pace.next_send:
                break
            self._report_outstanding(result)
            self._schedule(self._send(sock, result.transmitted + 1, result), now, result)
            now = time.monotonic_ns()
        return max(0.0, (pace.wake(result.transmitted) - time.monotonic_ns()) / NS_PER_S)

    def _forget_older(self, cutoff_ns: int, transmitted: int) -> None:
        """Forget the probes sent before cutoff_ns (opts.window_s), oldest first."""
        probes = self._probes
        while self._oldest <= transmitted:
            probe = probes.sent.get(probes.key(self._oldest))
            if probe is not None and probe.sent_mono_ns >= cutoff_ns:
                return
            if probe is not None:
                probes.forget(probes.key(self._oldest))
            self._oldest += 1

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
            pace.retry(now, retry_ns)
            return
        result.transmitted += 1
        n = result.transmitted
        # (the longest RTT is read only for the last probe's wait: a read folds the tally)
        pace.sent(now, n, 0 if pace.more(n) else result.tally.raw.max)

    def _send(self, sock: IcmpSocket, n: int, result: RunResult) -> int | None:
        """Send probe n and report it. None: it counts as transmitted, sent or failed for
        good (as iputils' "hard local error": reported, and counted in errors). Else the
        kernel had no room for it: try the same probe again in that many ns, uncounted."""
        return self._settle(self._transmit(sock, n), result)

    def _transmit(self, sock: IcmpSocket, n: int) -> _Sent:
        """Put probe n on the wire and track it; nothing is reported or counted yet."""
        seq, probes, session = n & 0xFFFF, self._probes, self._session
        message = self._template.message(n)
        probe = Probe(seq, 0, 0, session.lost() if session is not None else 0)
        lapped = probes.add(n, probe)
        # Both clocks just before sendto(): the raw RTT's start (as iputils: wall clock) and
        # the send point egress is measured from (the clock of bpf_ktime_get_ns).
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.send(message, self._dst)
        except OSError as exc:
            probes.forget(probes.key(n))
            return _Sent(seq, probe.sent_mono_ns, lapped, exc)
        return _Sent(seq, probe.sent_mono_ns, lapped, None)

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
        pace = self._pace
        plain = self._plain
        sent_ahead = 0  # flood: probes this batch sent ahead of a reply
        while (got := sock.recv()) is not None:
            data, recv_real = got
            if self.opts.user_latency:  # -U: user-to-user, as iputils' gettimeofday()
                recv_real = time.clock_gettime_ns(time.CLOCK_REALTIME)
            # most of a flood's replies are recognised without parsing (PlainReply)
            key = plain.key(data, probes) if plain is not None else None
            if key is not None:
                reply = Reply(key & 0xFFFF, self._target_text, data[plain.ttl_at],
                              plain.icmp_len, recv_real)
                verdict = PLAIN
            else:
                judged = self._judge(data, recv_real, result)
                if judged is None:
                    continue
                key, reply, verdict = judged
            dup = key in probes.answered
            ahead = None
            if not dup and not verdict.corrupted:
                probes.answered.add(key)
                new += 1
                if pace is not None:  # now: a probe sent next may be the last (Pace.sent)
                    pace.received += 1
                self._acknowledge(key, result)
                # The next probe goes ahead of the reply's measurement when fewer than -l
                # are in flight (else at the next turn). On a path answered within
                # sendto() (veth), the reply to that probe is already here, so a batch
                # runs on: at most AHEAD_PER_BATCH probes, then a turn (its checks: a
                # service's stop, -w, the window). A failed send ends it: its retry
                # waits at a turn (EAGAIN, ENOBUFS back off).
                if sent_ahead < AHEAD_PER_BATCH:
                    ahead = self._send_ahead(sock, result)
                    if ahead is not None:
                        sent_ahead = AHEAD_PER_BATCH if ahead.error else sent_ahead + 1
            elif dup:
                self._acknowledge(key, result)  # (iputils acknowledges a DUP too)
            try:
                self._reply(key, reply, verdict, dup, session, result)
            finally:  # (also on Ctrl-C: a probe that left is counted)
                if ahead is not None:
                    # (no -O line to check for: the previous probe is the one just answered)
                    self._schedule(self._settle(ahead, result), ahead.at, result)
        if pace is not None and new:
            pace.answered(time.monotonic_ns(), result.transmitted, result.tally.ewma8_us)
        return new

    def _judge(self, data: bytes, recv_real: int,
               result: RunResult) -> tuple[int, Reply, Verdict] | None:
        """A datagram parsed as an echo reply of this run's: the key of the probe it
        answers, the reply, and the verdict on it; None for anything else (an ICMP error
        about a probe is reported here)."""
        parsed = parse_ip_icmp(data)
        if parsed is None:
            return None  # malformed or truncated: not ours, never fatal
        if parsed.icmp_type != parsed.ECHO_REPLY:
            self._maybe_error(parsed, result)
            return None
        judged = self._check.judge(parsed, self.nonce, self.ident, self._probes,
                                   self._template, result.transmitted)
        if judged is None:
            return None  # another program's reply, an earlier lap's, or forged
        key, verdict = judged
        return key, Reply(parsed.seq, parsed.src, parsed.ttl, parsed.icmp_len, recv_real), \
            verdict

    def _acknowledge(self, key: int, result: RunResult) -> None:
        """An answer (reply or ICMP error) for this probe: iputils' acknowledge(), which
        keeps the most probes found in flight ("pipe") and the highest answered."""
        number = self._probes.number_of(key, result.transmitted)
        if result.transmitted - number + 1 > result.pipesize:
            result.pipesize = result.transmitted - number + 1
        if self._pace is not None:
            self._pace.acknowledge(number)

    def _send_ahead(self, sock: IcmpSocket, result: RunResult) -> _Sent | None:
        """Flood (-i 0, -f's default): a new reply makes the next probe due once fewer
        than -l probes are in flight (iputils' cue). It is sent here, before the reply
        is measured, when -c and -w allow one; else the next turn sends it, as for any
        other reply."""
        pace = self._pace
        if pace is None or not pace.on_reply or not pace.more(result.transmitted) \
                or pace.in_flight(result.transmitted) >= self.opts.preload:
            return None
        if pace.deadline is not None and time.monotonic_ns() >= pace.deadline:
            return None
        return self._transmit(sock, result.transmitted + 1)

    def _reply(self, key: int, reply: Reply, verdict: Verdict, dup: bool,
               session: Session | None, result: RunResult) -> None:
        """Measure a reply to the probe of this key from the probe's kernel record, count
        it and report it."""
        probe = self._probes.sent[key]
        complete = True
        if session is not None:
            session.drain()  # a reply's record precedes its delivery to the socket
            complete = session.lost() == probe.lost_at_send
        fresh = not dup and not verdict.corrupted
        if verdict.corrupted and not dup:
            # The kernel checks no checksum: the record it sent (and the state it freed)
            # came from this damaged copy. The probe stays unanswered, but no reply of it
            # may be corrected from what is left: the real one is shown raw.
            self._probes.take(key)
            self._probes.spoiled.add(key)
        # a reply cut before its number was matched by nothing in the kernel
        cut = reply.icmp_bytes - 8 < TAG_LEN
        kernel = fresh and not cut and key not in self._probes.spoiled
        events, record = self._probes.take(key) if fresh else ((), None)
        if not kernel:
            events, record = (), None
        if record is None and kernel and complete and session is not None:
            # No record: the delivery fired no tracepoint in the prober's netns
            # (macvlan); the kernel's state still holds the outer device's times. (Not
            # asked when records were lost meanwhile, an agent's client over its
            # --probe-rate among them: nothing would be corrected from it.)
            record = session.probe_state(key)
        path = stages(events, probe.sent_mono_ns) if events else None
        m = measured(probe, reply, record, complete, path)
        m.dup = dup and not verdict.corrupted  # (iputils: a damaged reply is no DUP)
        if verdict is not PLAIN:
            m.corrupted, m.truncated, m.wrong_data = verdict
        m.other_source = reply.src != self._target_text and not self.opts.multicast
        result.tally.add(m)
        self.sink.reply(m)

    def _maybe_error(self, parsed: ParsedIcmp, result: RunResult) -> None:
        """An ICMP message quoting one of our probes is reported as iputils does: an
        error ends that probe and counts; a redirect or source quench is only shown."""
        seq = quoted_probe_seq(parsed.quoted, self.ident, self.nonce, self.opts.dst_addr)
        # the probe in the window with that seq (a quote of 8 bytes has no number)
        key = None if seq is None else self._probes.key_of_seq(seq, result.transmitted)
        if key is None or not parsed.checksum_ok:
            return
        text = error_text(parsed.icmp_type, parsed.code, parsed.info, parsed.family)
        if parsed.family == 4 and parsed.icmp_type in NOTICES:
            self.sink.icmp_notice(seq, parsed.src, text)
            return
        result.errors += 1
        self._acknowledge(key, result)
        self.sink.icmp_error(seq, parsed.src, text)
