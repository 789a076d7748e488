"""The traceroute run: probes per hop, answers matched by what they quote, corrected.

Runs over a measuring session (session.py), as the ping run does: kernel events of an
answer are in the ring before the answer reaches a socket, so the session drains them
before each answer is correlated (correlate.py), and on every turn. A hop whose answer
came from inside the container host (the request never left the host's netns, e.g. hop 1,
the bridge) is marked host-internal: its correction is taken at the prober's own device,
as the outer device never saw it.

The plan is traceroute's: one place per probe (nqueries per hop, hop by hop); up to -N
probes not done at once, -z apart; only the first place not done can time out, after
the wait tracewait.py computes (-w MAX,HERE,NEAR); a probe that timed out stays a `*`,
whatever comes later; a hop is handed to the sink once all its places are done, in
order, and never again. --mtu sends a place again, smaller, when the probe was too big
for the path ("F=MTU" on it, as traceroute prints).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mace_tools.correlate import correlate, host_netns
from mace_tools.errors import MaceError
from mace_tools.model import (
    HopReply,
    KernelEvent,
    Measurement,
    Namespaces,
    Packet,
    Probe,
    Reply,
    TraceResult,
)
from mace_tools.probe.icmp import new_nonce
from mace_tools.probe.icmpext import describe_extensions
from mace_tools.probe.sockets import NOT_PERMITTED, NotPermitted
from mace_tools.probe.trace import (
    DEFAULT_RAW_PROTOCOL,
    HEADER_LEN,
    ICMP,
    IP_HEADER_LENS,
    MIN_PAYLOAD,
    PROTO_NUMBERS,
    PROTO_NUMBERS6,
    RAW,
    TCP,
    UDP,
    Answer,
    ProbeFactory,
    annotation,
    final,
    parse_answer,
)
from mace_tools.probe.tracesockets import (
    MessageTooBig,
    PingTraceSocket,
    RawSocket,
    SocketOptions,
    TraceSocket,
    UdpSocket,
)
from mace_tools.session import EventSourceFactory, Session, family_of
from mace_tools.tracewait import WaitSpec, probe_wait_s

NS_PER_S = 1_000_000_000
DEFAULT_PORTS = {UDP: 33434, TCP: 80, ICMP: 0, RAW: 0}
UDP_FIXED_PORT = 53  # -U: traceroute's "udp" method probes the DNS port
POLL_S = 0.02  # the longest wait between turns (kernel events are drained every turn)


@dataclass(slots=True)
class TraceOptions:
    dst_addr: str
    method: str = UDP
    first_ttl: int = 1
    max_ttl: int = 30
    nqueries: int = 3
    wait_s: float = 5.0  # -w MAX
    simultaneous: int = 16
    port: int | None = None
    sendwait_s: float = 0.0
    size: int = 60
    paris: bool = False
    netns_path: Path | None = None
    here: float = 0.0  # -w HERE and NEAR (tracewait.py; 0: not used)
    near: float = 0.0
    fixed_port: bool = False  # -U: every UDP probe to one port (53 unless -p)
    protocol: int = DEFAULT_RAW_PROTOCOL  # the RAW method's (-P)
    first_seq: int = 1  # -I: the first probe's ICMP seq (-p)
    sport: int | None = None  # --sport (UDP and TCP)
    sockets: SocketOptions = field(default_factory=SocketOptions)
    mtu: bool = False  # --mtu: shrink the probes to the path's MTU, say where (F=MTU)
    extensions: bool = False  # -e: ICMP extensions of the answers (RFC 4884)
    icmp_socket: str = ""  # -I: "raw" or "dgram" only (-O), "" raw else dgram

    @property
    def wait(self) -> WaitSpec:
        return WaitSpec(self.wait_s, self.here, self.near)

    @property
    def family(self) -> int:
        """4 or 6: the target's IP version, and so the run's."""
        return family_of(self.dst_addr)


class TraceSink(Protocol):
    def start(self, source_addr: str) -> None: ...
    def hop(self, ttl: int, replies: list[HopReply]) -> None: ...


@dataclass(slots=True)
class _InFlight:
    probe: Probe
    ttl: int
    quote_key: bytes
    index: int = -1  # its place in the plan (-1: none)
    events: list[KernelEvent] = field(default_factory=list)
    outcome: HopReply | None = None


@dataclass(slots=True)
class _Place:
    """One probe's place in the plan: the probe sent for it (the last one: --mtu sends
    again), and its outcome once done."""

    ttl: int
    flight: _InFlight | None = None
    outcome: HopReply | None = None
    note: str = ""  # " F=MTU": --mtu found this probe too big, and sent it again smaller
    mtu: int = 0


@dataclass(slots=True)
class _Progress:
    """Where a trace stands: its places, how far printing got, what may be sent."""

    places: list[_Place]  # nqueries per hop, from -f to -m
    last_ttl: int  # -m, lowered when an answer ends the trace
    printed: int  # the last hop handed to the sink
    start: int = 0  # the first place not done: the only one that can time out
    next_number: int = 1  # the next probe's number (-I: its ICMP seq)
    last_send: int = 0  # CLOCK_MONOTONIC ns


def host_internal(m: Measurement, ns: Namespaces) -> bool:
    """The request entered the host's netns but never left it: the host answered."""
    request = [s for s in m.path if s.packet is Packet.REQUEST]
    host = host_netns(m.path, ns)
    return host != ns.prober and any(s.netns == host for s in request) \
        and not any(s.leaving and s.netns == host for s in request)


class Tracer:
    def __init__(self, opts: TraceOptions, sink: TraceSink, nonce: bytes | None = None,
                 after_setup: Callable[[], None] | None = None, *,
                 backend_factory: EventSourceFactory | None = None) -> None:
        """after_setup, backend_factory: as Pinger's (the command drops its privileges in
        after_setup)."""
        self.opts = opts
        self._after_setup = after_setup
        self._backend_factory = backend_factory
        self.sink = sink
        self._nonce_asked = nonce  # None: the event source's choice (an agent's), or new
        self.nonce = nonce or new_nonce()  # the run's, once it runs
        self.ident = os.getpid() & 0xFFFF
        self._flight: dict[int, _InFlight] = {}  # probe number -> probe
        self._by_quote: dict[bytes, int] = {}
        places = [_Place(ttl) for ttl in range(opts.first_ttl, opts.max_ttl + 1)
                  for _ in range(opts.nqueries)]
        first_number = opts.first_seq if opts.method == ICMP else 1
        self._progress = _Progress(places, opts.max_ttl, opts.first_ttl - 1,
                                   next_number=first_number & 0xFFFF)

    def run(self) -> TraceResult:
        opts = self.opts
        with Session(opts.netns_path, self._nonce_asked, after_setup=self._after_setup,
                     events_factory=self._backend_factory) as session:
            socks, src = session.open_sockets(lambda: _open_sockets(opts, self.ident),
                                              opts.dst_addr, opts.sockets.device,
                                              opts.sockets.source)
            # a ping socket's requests carry the kernel's id; a UDP socket's port may be
            # another where the run's was taken
            self.ident, sport = socks[0].ident, socks[0].sport
            # the event source may choose the nonce the probes carry (an agent does)
            self.nonce = session.open_events(self._add_event, path=True,
                                             udp=opts.method == UDP, tcp=opts.method == TCP,
                                             errors=True)
            self.factory = ProbeFactory(opts.method, self.nonce, src, opts.dst_addr,
                                        opts.size, _port(opts), sport, self.ident,
                                        opts.paris, fixed_port=opts.fixed_port,
                                        protocol=opts.protocol, family=opts.family)
            result = TraceResult(self.nonce, src, source=session.source)
            session.ready()
            self.sink.start(src)
            self._loop(session, socks, result)
            result.kernel_events_lost = session.lost()
        return result

    def _loop(self, session: Session, socks: list[TraceSocket],
              result: TraceResult) -> None:
        by_fd = {s.fileno(): s for s in socks}
        result.start_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        session.loop(lambda: self._turn(session, socks[0], result),
                     lambda fd: self._receive(by_fd[fd], session, session.ns))
        result.end_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)

    def _end(self) -> int:
        """The places to go through: up to the last hop (lowered by a final answer)."""
        p = self._progress
        return (p.last_ttl - self.opts.first_ttl + 1) * self.opts.nqueries

    def _turn(self, session: Session, send_sock: TraceSocket,
              result: TraceResult) -> float | None:
        """traceroute's do_it() loop: from the first place not done, time it out if its
        wait is over, send what is not sent (up to -N not done, -z apart), hand every
        finished hop to the sink; None once the last hop is printed, else how long to
        wait for what is due next."""
        p, opts = self._progress, self.opts
        now = time.monotonic_ns()
        due: int | None = None  # when the next thing is due (CLOCK_MONOTONIC ns)
        waiting = 0
        i = p.start
        while i < self._end():
            place = p.places[i]
            if i == p.start:
                due = self._expire(i, now)
            if place.outcome is not None:
                if i == p.start:
                    p.start += 1
                i += 1
                continue
            if place.flight is None:
                next_send = p.last_send + int(opts.sendwait_s * NS_PER_S)
                if p.last_send and opts.sendwait_s and next_send > now:
                    due = next_send if due is None else min(due, next_send)
                    break
                self._send_place(send_sock, i, session.lost())
                p.last_send = now = time.monotonic_ns()
                if place.flight is None:
                    continue  # --mtu made it smaller: send it again now
                if place.outcome is not None:
                    continue  # refused as too big (-F): done, as traceroute's "!F-MTU"
            if due is None:
                due = place.flight.probe.sent_mono_ns + self._wait_ns(i)
            waiting += 1
            if waiting >= opts.simultaneous:
                break
            i += 1
        self._emit_hops(result)
        if p.printed >= p.last_ttl:
            return None
        if due is None:
            return POLL_S
        return max(0.0, min(POLL_S, (due - time.monotonic_ns()) / NS_PER_S))

    def _expire(self, index: int, now: int) -> int | None:
        """Time out place index (the one printed next) if its wait is over; else when it
        will be (None: it is done, or not sent)."""
        place = self._progress.places[index]
        if place.outcome is not None or place.flight is None:
            return None
        expires = place.flight.probe.sent_mono_ns + self._wait_ns(index)
        if expires > now:
            return expires
        place.outcome = HopReply(place.ttl, annotation=place.note, mtu=place.mtu)
        return None

    def _wait_ns(self, index: int) -> int:
        places = self._progress.places
        return int(probe_wait_s(self.opts.wait, self._rtt_s, index, len(places),
                                self.opts.nqueries) * NS_PER_S)

    def _rtt_s(self, index: int) -> float | None:
        """ProbeRtt (tracewait.py) of place index."""
        place = self._progress.places[index]
        if place.flight is None:
            return None
        m = place.outcome.measurement if place.outcome is not None else None
        return m.rtt_raw_ns / NS_PER_S if m is not None else 0.0

    def _send_place(self, sock: TraceSocket, index: int, lost: int) -> None:
        """Send a probe for place index (a new number each time: --mtu sends again)."""
        p = self._progress
        place = p.places[index]
        number = p.next_number
        p.next_number = (number + 1) & 0xFFFF
        try:
            place.flight = self._send(sock, number, place.ttl, lost)
        except MessageTooBig as exc:
            self._too_big(index, exc.mtu)
            return
        place.flight.index = index

    def _too_big(self, index: int, mtu: int) -> None:
        """The kernel refused the probe as longer than the device's MTU (DF: -F, --mtu):
        --mtu shrinks the probes and sends this one again (F=MTU); -F ends the trace here,
        as traceroute's "!F-MTU"."""
        place = self._progress.places[index]
        place.flight = None
        if self.opts.mtu and self._shrink(mtu):
            place.note, place.mtu = f" F={mtu}", mtu
            return
        place.outcome = HopReply(place.ttl, annotation=f" !F-{mtu}")
        self._progress.last_ttl = min(self._progress.last_ttl, place.ttl)

    def _shrink(self, mtu: int) -> bool:
        """--mtu: probes from now on fit mtu, if that is smaller and can hold a probe (as
        traceroute: header_len <= mtu < packet length)."""
        header = IP_HEADER_LENS[self.opts.family] + HEADER_LEN[self.opts.method]
        if not header + MIN_PAYLOAD <= mtu < self.factory.packet_len:
            return False
        self.factory.resize(mtu)
        return True

    def _add_event(self, ev: KernelEvent) -> None:
        f = self._flight.get(ev.seq)
        if f is not None:
            f.events.append(ev)

    def _send(self, sock: TraceSocket, number: int, ttl: int, lost: int = 0) -> _InFlight:
        """lost: the backend's lost-events count now (a change by the answer: incomplete).
        MessageTooBig if the kernel refused it (-F); a send that fails otherwise ends the
        run, except where traceroute goes on: EHOSTUNREACH (the answer, if any, says
        more)."""
        tp = self.factory.build(number)
        probe = Probe(number, 0, 0, lost)
        flight = self._flight[number] = _InFlight(probe, ttl, tp.quote_key)
        self._by_quote[tp.quote_key] = number
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.send(tp.message, self.opts.dst_addr, ttl)
        except OSError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise MaceError(f"sendto: {exc.strerror}", exit_code=1) from exc
        return flight

    def _receive(self, sock: TraceSocket, session: Session, ns: Namespaces) -> None:
        """Read every waiting datagram; an answer to a probe still waiting becomes its
        outcome (the first answer: traceroute keeps that one; a probe that timed out, or
        was sent again smaller, takes none)."""
        while (got := sock.recv()) is not None:
            data, recv_real = got
            answer = parse_answer(data, self.factory)
            number = self._number(answer) if answer else None
            if answer is None or number is None:
                continue
            f = self._flight[number]
            place = self._place(f)
            if f.outcome is not None or (place is not None and place.outcome is not None):
                continue  # late: traceroute printed it as it stood, and so do we
            if place is not None and self._path_mtu(answer, place):
                continue
            session.drain()
            f.outcome = self._outcome(f, answer, data, recv_real, session, ns)
            if place is not None:
                place.outcome = f.outcome
            if final(answer):
                self._progress.last_ttl = min(self._progress.last_ttl, f.ttl)

    def _place(self, f: _InFlight) -> _Place | None:
        """The place f was sent for, if it still stands for it (--mtu may have sent
        another)."""
        if f.index < 0:
            return None
        place = self._progress.places[f.index]
        return place if place.flight is f else None

    def _path_mtu(self, answer: Answer, place: _Place) -> bool:
        """--mtu: a router said "fragmentation needed" for a probe that can shrink to the
        MTU it gave: the place is sent again, smaller, with F=MTU on it."""
        if not self.opts.mtu or not answer.too_big:
            return False
        if not self._shrink(answer.mtu):
            return False
        place.flight = None
        place.note, place.mtu = f" F={answer.mtu}", answer.mtu
        return True

    def _outcome(self, f: _InFlight, answer: Answer, data: bytes, recv_real: int,
                 session: Session, ns: Namespaces) -> HopReply:
        complete = session.lost() == f.probe.lost_at_send
        reply = Reply(f.probe.seq, answer.src, answer.ttl, answer.size, recv_real)
        m = correlate(f.probe, reply, f.events, ns, complete)
        internal = host_internal(m, ns)
        if internal:
            # The outer device never saw this probe: its correction is taken at the
            # prober's own device, and the hop is labelled so (README).
            m = correlate(f.probe, reply, f.events, Namespaces(ns.prober, ns.prober),
                          complete)
        place = self._place(f)
        note, mtu = (place.note, place.mtu) if place is not None else ("", 0)
        mark = annotation(answer) or note
        ext = describe_extensions(data) if self.opts.extensions else ""
        return HopReply(f.ttl, m, mark, internal, answer.reached, ext=ext, mtu=mtu)

    def _number(self, answer: Answer) -> int | None:
        if answer.probe_number is not None:
            return answer.probe_number if answer.probe_number in self._flight else None
        return self._by_quote.get(answer.quote_key or b"")

    def _emit_hops(self, result: TraceResult) -> None:
        """Hand every hop whose probes are all done to the sink, in order."""
        p, nq = self._progress, self.opts.nqueries
        while p.printed < p.last_ttl:
            ttl = p.printed + 1
            first = (ttl - self.opts.first_ttl) * nq
            places = p.places[first:first + nq]
            if any(place.outcome is None for place in places):
                break
            replies = [place.outcome for place in places]
            result.hops[ttl] = replies  # type: ignore[assignment]
            self.sink.hop(ttl, replies)  # type: ignore[arg-type]
            p.printed = ttl


def _port(opts: TraceOptions) -> int:
    """The destination port (-p), or the method's default: 33434 and up (default
    method), 53 (-U), 80 (-T); unused by ICMP and RAW."""
    if opts.port is not None:
        return opts.port
    return UDP_FIXED_PORT if opts.fixed_port else DEFAULT_PORTS[opts.method]


def _open_sockets(opts: TraceOptions, ident: int) -> list[TraceSocket]:
    """[send socket, ICMP receive socket if another], created in the current netns: raw
    where CAP_NET_RAW allows; else, as Linux traceroute unprivileged, a UDP socket (UDP)
    or a ping socket (-I) that reads the ICMP errors from its error queue. TCP SYN and
    RAW probes need a raw socket. -I -O raw / -O dgram: that kind only. Of the target's
    family (IPv6: the ICMPv6 sockets)."""
    method, tune, family = opts.method, opts.sockets, opts.family
    sport = opts.sport if opts.sport is not None else 33000 + (ident % 20000)
    if method in (ICMP, RAW):
        sport = 0
    if method == ICMP and opts.icmp_socket == "dgram":
        return [_ping_socket(tune, family)]
    numbers = PROTO_NUMBERS6 if family == 6 else PROTO_NUMBERS
    try:
        send = RawSocket(numbers.get(method, opts.protocol), ident, sport, tune, family)
    except NotPermitted as exc:
        if method in (TCP, RAW) or opts.icmp_socket == "raw":
            what = {TCP: "TCP SYN probes need one", RAW: "-P probes need one"}.get(
                method, "-O raw asks for one")
            raise MaceError(f"raw sockets not permitted ({what}): run as root (or with "
                            "CAP_NET_RAW), or probe with -U or -I", exit_code=1) from exc
        if method == UDP:
            return [UdpSocket(sport, ident, tune, fixed=opts.sport is not None,
                              family=family)]
        return [_ping_socket(tune, family)]
    if method == ICMP:
        return [send]
    try:
        return [send, RawSocket(numbers[ICMP], family=family)]
    except BaseException:
        send.close()
        raise


def _ping_socket(tune: SocketOptions, family: int) -> PingTraceSocket:
    try:
        return PingTraceSocket(tune, family)
    except NotPermitted as exc:
        raise MaceError(NOT_PERMITTED, exit_code=1) from exc
