"""The traceroute run: probes per hop, answers matched by what they quote, corrected.

Runs over a measuring session (session.py), as the ping run does: kernel events of an
answer are in the ring before the answer reaches a socket, so the session drains them
before each answer is correlated (correlate.py), and on every turn. A hop whose answer
came from inside the container host (the request never left the host's netns, e.g. hop 1,
the bridge) is marked host-internal: its correction is taken at the prober's own device,
as the outer device never saw it.
"""

from __future__ import annotations

import os
import socket
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
from mace_tools.probe.sockets import NOT_PERMITTED, NotPermitted
from mace_tools.probe.trace import (
    ICMP,
    PROTO_NUMBERS,
    TCP,
    UDP,
    Answer,
    ProbeFactory,
    annotation,
    parse_answer,
)
from mace_tools.probe.tracesockets import (
    PingTraceSocket,
    RawSocket,
    TraceSocket,
    UdpSocket,
)
from mace_tools.session import EventSourceFactory, Session, new_nonce

NS_PER_S = 1_000_000_000
DEFAULT_PORTS = {UDP: 33434, TCP: 80, ICMP: 0}
POLL_S = 0.02  # the longest wait for an answer: also the granularity of -w and -z


@dataclass(slots=True)
class TraceOptions:
    dst_addr: str
    method: str = UDP
    first_ttl: int = 1
    max_ttl: int = 30
    nqueries: int = 3
    wait_s: float = 5.0
    simultaneous: int = 16
    port: int | None = None
    sendwait_s: float = 0.0
    size: int = 60
    paris: bool = False
    netns_path: Path | None = None


class TraceSink(Protocol):
    def start(self, source_addr: str) -> None: ...
    def hop(self, ttl: int, replies: list[HopReply]) -> None: ...


@dataclass(slots=True)
class _InFlight:
    probe: Probe
    ttl: int
    quote_key: bytes
    events: list[KernelEvent] = field(default_factory=list)
    outcome: HopReply | None = None


@dataclass(slots=True)
class _Progress:
    """Where a trace stands: its plan of probes, how far sending and printing got."""

    plan: list[int]  # the TTL of each probe, in sending order (probe n is plan[n - 1])
    last_ttl: int  # -m, lowered when the destination answers
    printed: int  # the last hop handed to the sink
    sent: int = 0  # probes sent so far
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
        self._progress = _Progress(
            [ttl for ttl in range(opts.first_ttl, opts.max_ttl + 1)
             for _ in range(opts.nqueries)], opts.max_ttl, opts.first_ttl - 1)

    def run(self) -> TraceResult:
        opts = self.opts
        with Session(opts.netns_path, self._nonce_asked, after_setup=self._after_setup,
                     events_factory=self._backend_factory) as session:
            socks, src = session.open_sockets(lambda: _open_sockets(opts.method, self.ident),
                                              opts.dst_addr)
            # a ping socket's requests carry the kernel's id; a UDP socket's port may be
            # another where the run's was taken
            self.ident, sport = socks[0].ident, socks[0].sport
            # the event source may choose the nonce the probes carry (an agent does)
            self.nonce = session.open_events(self._add_event, path=True,
                                             udp=opts.method == UDP, tcp=opts.method == TCP,
                                             errors=True)
            port = opts.port if opts.port is not None else DEFAULT_PORTS[opts.method]
            self.factory = ProbeFactory(opts.method, self.nonce, src, opts.dst_addr,
                                        opts.size, port, sport, self.ident, opts.paris)
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

    def _turn(self, session: Session, send_sock: TraceSocket,
              result: TraceResult) -> float | None:
        """Send what the plan allows, time out what waited too long, hand every finished
        hop to the sink; None once the last hop is printed, else how long to wait."""
        p = self._progress
        if p.printed >= p.last_ttl:
            return None
        now = time.monotonic_ns()
        while self._can_send(now):
            p.sent += 1
            self._send(send_sock, p.sent, p.plan[p.sent - 1], session.lost())
            p.last_send = now = time.monotonic_ns()
        wait_ns = int(self.opts.wait_s * NS_PER_S)
        for f in self._flight.values():
            if f.outcome is None and now - f.probe.sent_mono_ns >= wait_ns:
                f.outcome = HopReply(f.ttl)
        self._emit_hops(result)
        return None if p.printed >= p.last_ttl else POLL_S

    def _can_send(self, now: int) -> bool:
        """The next probe of the plan may go: its hop is not past the destination, fewer
        than -N are waiting, and -z has passed since the last."""
        p = self._progress
        outstanding = sum(1 for f in self._flight.values() if f.outcome is None)
        return (p.sent < len(p.plan) and p.plan[p.sent] <= p.last_ttl
                and outstanding < self.opts.simultaneous
                and now - p.last_send >= self.opts.sendwait_s * NS_PER_S)

    def _add_event(self, ev: KernelEvent) -> None:
        f = self._flight.get(ev.seq)
        if f is not None:
            f.events.append(ev)

    def _send(self, sock: TraceSocket, number: int, ttl: int, lost: int = 0) -> None:
        """lost: the backend's lost-events count now (a change by the answer: incomplete)."""
        tp = self.factory.build(number)
        probe = Probe(number, 0, 0, lost)
        self._flight[number] = _InFlight(probe, ttl, tp.quote_key)
        self._by_quote[tp.quote_key] = number
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.send(tp.message, self.opts.dst_addr, ttl)
        except OSError as exc:
            raise MaceError(f"sendto: {exc.strerror}", exit_code=1) from exc

    def _receive(self, sock: TraceSocket, session: Session, ns: Namespaces) -> None:
        """Read every waiting datagram; an answer to a probe becomes its outcome (the
        first answer: traceroute keeps that one)."""
        while (got := sock.recv()) is not None:
            data, recv_real = got
            answer = parse_answer(data, self.factory)
            number = self._number(answer) if answer else None
            if answer is None or number is None:
                continue
            f = self._flight[number]
            if f.outcome is not None and f.outcome.measurement is not None:
                continue  # a second answer to the same probe: traceroute keeps the first
            session.drain()
            complete = session.lost() == f.probe.lost_at_send
            reply = Reply(number, answer.src, answer.ttl, answer.size, recv_real,
                          time.monotonic_ns())
            m = correlate(f.probe, reply, f.events, ns, complete)
            internal = host_internal(m, ns)
            if internal:
                # The outer device never saw this probe: its correction is taken at the
                # prober's own device, and the hop is labelled so (README).
                m = correlate(f.probe, reply, f.events, Namespaces(ns.prober, ns.prober),
                              complete)
            f.outcome = HopReply(f.ttl, m, annotation(answer), internal, answer.reached)
            if answer.reached or answer.icmp_type == 3:
                self._progress.last_ttl = min(self._progress.last_ttl, f.ttl)

    def _number(self, answer: Answer) -> int | None:
        if answer.probe_number is not None:
            return answer.probe_number if answer.probe_number in self._flight else None
        return self._by_quote.get(answer.quote_key or b"")

    def _emit_hops(self, result: TraceResult) -> None:
        """Hand every hop whose probes are all done to the sink, in order."""
        p = self._progress
        while p.printed < p.last_ttl:
            ttl = p.printed + 1
            probes = [f for f in self._flight.values() if f.ttl == ttl]
            if len(probes) < self.opts.nqueries or any(f.outcome is None for f in probes):
                break
            replies = [f.outcome for f in sorted(probes, key=lambda f: f.probe.seq)]
            result.hops[ttl] = replies  # type: ignore[assignment]
            self.sink.hop(ttl, replies)  # type: ignore[arg-type]
            p.printed = ttl


def _open_sockets(method: str, ident: int) -> list[TraceSocket]:
    """[send socket, ICMP receive socket if another], created in the current netns: raw
    where CAP_NET_RAW allows; else, as Linux traceroute unprivileged, a UDP socket (-U)
    or a ping socket (-I) that reads the ICMP errors from its error queue. TCP SYN
    probes need a raw socket."""
    sport = 33000 + (ident % 20000) if method != ICMP else 0
    try:
        send = RawSocket(PROTO_NUMBERS[method], ident, sport)
    except NotPermitted as exc:
        if method == TCP:
            raise MaceError("raw sockets not permitted (TCP SYN probes need one): run as "
                            "root (or with CAP_NET_RAW), or probe with -U or -I",
                            exit_code=1) from exc
        return [UdpSocket(sport, ident)] if method == UDP else [_ping_socket()]
    if method == ICMP:
        return [send]
    try:
        return [send, RawSocket(socket.IPPROTO_ICMP)]
    except BaseException:
        send.close()
        raise


def _ping_socket() -> PingTraceSocket:
    try:
        return PingTraceSocket()
    except NotPermitted as exc:
        raise MaceError(NOT_PERMITTED, exit_code=1) from exc
