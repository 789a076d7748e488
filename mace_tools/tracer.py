"""The traceroute run: probes per hop, answers matched by what they quote, corrected.

Same shape as the ping run (pinger.py): one thread, one epoll over the receive sockets;
kernel events of an answer are in the ring before the answer reaches a socket, so the ring
is drained before each answer is correlated (correlate.py), and on every turn. A hop
whose answer came from inside the container host (the request never left the host's
netns, e.g. hop 1, the bridge) is marked host-internal: its correction is taken at the
prober's own device, as the outer device never saw it.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mace_tools.correlate import correlate, host_netns
from mace_tools.errors import MaceError
from mace_tools.model import KernelEvent, Measurement, Namespaces, Packet, Probe, Reply
from mace_tools.pinger import new_nonce, source_address
from mace_tools.probe import netns
from mace_tools.probe.sockets import SO_TIMESTAMPNS, read_datagram
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

if TYPE_CHECKING:
    from mace_tools.kernel.backend import Backend

NS_PER_S = 1_000_000_000
DEFAULT_PORTS = {UDP: 33434, TCP: 80, ICMP: 0}


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


@dataclass(slots=True)
class HopReply:
    """One probe's outcome: a measurement with its annotation, or a timeout (None)."""

    ttl: int
    measurement: Measurement | None = None
    annotation: str = ""
    host_internal: bool = False
    reached: bool = False


@dataclass(slots=True)
class TraceResult:
    nonce: bytes
    source_addr: str
    start_real_ns: int = 0
    end_real_ns: int = 0
    hops: dict[int, list[HopReply]] = field(default_factory=dict)
    kernel_events_lost: int = 0


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


def host_internal(m: Measurement, ns: Namespaces) -> bool:
    """The request entered the host's netns but never left it: the host answered."""
    request = [s for s in m.path if s.packet is Packet.REQUEST]
    host = host_netns(m.path, ns)
    return host != ns.prober and any(s.netns == host for s in request) \
        and not any(s.leaving and s.netns == host for s in request)


class Tracer:
    def __init__(self, opts: TraceOptions, sink: TraceSink, nonce: bytes | None = None,
                 after_setup: Callable[[], None] | None = None) -> None:
        """after_setup: as Pinger's (the command drops its privileges there)."""
        self.opts = opts
        self._after_setup = after_setup
        self.sink = sink
        self.nonce = nonce or new_nonce()
        self.ident = os.getpid() & 0xFFFF
        self._flight: dict[int, _InFlight] = {}  # probe number -> probe
        self._by_quote: dict[bytes, int] = {}

    def run(self) -> TraceResult:
        opts = self.opts
        proto = PROTO_NUMBERS[opts.method]
        ns = netns.of_run(opts.netns_path)
        with netns.entered(opts.netns_path):
            socks = _open_sockets(proto)
            try:
                src = source_address(opts.dst_addr, None, None)
            except BaseException:
                for s in socks:
                    s.close()
                raise
        sport = 33000 + (self.ident % 20000) if opts.method != ICMP else 0
        port = opts.port if opts.port is not None else DEFAULT_PORTS[opts.method]
        self.factory = ProbeFactory(opts.method, self.nonce, src, opts.dst_addr, opts.size,
                                    port, sport, self.ident, opts.paris)
        result = TraceResult(self.nonce, src)
        from mace_tools.kernel.backend import Backend

        try:
            with Backend(self.nonce, udp=opts.method == UDP, tcp=opts.method == TCP,
                         errors=True) as backend:
                if self._after_setup is not None:
                    self._after_setup()
                self.sink.start(src)
                self._loop(socks, backend, ns, result)
                result.kernel_events_lost = backend.lost()
        finally:
            for s in socks:
                s.close()
        return result

    def _loop(self, socks: list[socket.socket], backend: Backend, ns: Namespaces,
              result: TraceResult) -> None:
        opts = self.opts
        send_sock = socks[0]
        poller = select.epoll()
        for s in socks:
            poller.register(s.fileno(), select.EPOLLIN)
        plan = [(ttl, q) for ttl in range(opts.first_ttl, opts.max_ttl + 1)
                for q in range(opts.nqueries)]
        next_index = 0
        last_ttl = opts.max_ttl  # lowered when the destination answers
        printed = opts.first_ttl - 1
        wait_ns = int(opts.wait_s * NS_PER_S)
        result.start_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        last_send = 0
        try:
            while printed < last_ttl:
                now = time.monotonic_ns()
                outstanding = sum(1 for f in self._flight.values() if f.outcome is None)
                can_send = (next_index < len(plan) and plan[next_index][0] <= last_ttl
                            and outstanding < opts.simultaneous
                            and now - last_send >= opts.sendwait_s * NS_PER_S)
                if can_send:
                    ttl, _ = plan[next_index]
                    next_index += 1
                    self._send(send_sock, next_index, ttl, backend.lost())
                    last_send = time.monotonic_ns()
                    continue
                for f in self._flight.values():  # timeouts
                    if f.outcome is None and now - f.probe.sent_mono_ns >= wait_ns:
                        f.outcome = HopReply(f.ttl)
                printed, last_ttl = self._emit_hops(printed, last_ttl, result)
                if printed >= last_ttl:
                    break
                for fd, _ in poller.poll(0.02):  # also the granularity of -w and -z
                    sock = next(s for s in socks if s.fileno() == fd)
                    last_ttl = self._receive(sock, backend, ns, last_ttl)
                backend.drain(self._add_event)  # records wake no one (bpf/mace.bpf.c)
        except KeyboardInterrupt:
            pass
        finally:
            poller.close()
        result.end_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)

    def _add_event(self, ev: KernelEvent) -> None:
        f = self._flight.get(ev.seq)
        if f is not None:
            f.events.append(ev)

    def _send(self, sock: socket.socket, number: int, ttl: int, lost: int = 0) -> None:
        """lost: the backend's lost-events count now (a change by the answer: incomplete)."""
        tp = self.factory.build(number)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        probe = Probe(number, 0, 0, lost)
        self._flight[number] = _InFlight(probe, ttl, tp.quote_key)
        self._by_quote[tp.quote_key] = number
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.sendto(tp.message, (self.opts.dst_addr, 0))
        except OSError as exc:
            raise MaceError(f"sendto: {exc.strerror}", exit_code=1) from exc

    def _receive(self, sock: socket.socket, backend: Backend, ns: Namespaces,
                 last_ttl: int) -> int:
        while (got := read_datagram(sock)) is not None:
            data, recv_real = got
            answer = parse_answer(data, self.factory)
            number = self._number(answer) if answer else None
            if answer is None or number is None:
                continue
            f = self._flight[number]
            if f.outcome is not None and f.outcome.measurement is not None:
                continue  # a second answer to the same probe: traceroute keeps the first
            backend.drain(self._add_event)
            complete = backend.lost() == f.probe.lost_at_send
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
                last_ttl = min(last_ttl, f.ttl)
        return last_ttl

    def _number(self, answer: Answer) -> int | None:
        if answer.probe_number is not None:
            return answer.probe_number if answer.probe_number in self._flight else None
        return self._by_quote.get(answer.quote_key or b"")

    def _emit_hops(self, printed: int, last_ttl: int, result: TraceResult) -> tuple[int, int]:
        """Hand every hop whose probes are all done to the sink, in order."""
        while printed < last_ttl:
            ttl = printed + 1
            probes = [f for f in self._flight.values() if f.ttl == ttl]
            if len(probes) < self.opts.nqueries or any(f.outcome is None for f in probes):
                break
            replies = [f.outcome for f in sorted(probes, key=lambda f: f.probe.seq)]
            result.hops[ttl] = replies  # type: ignore[assignment]
            self.sink.hop(ttl, replies)  # type: ignore[arg-type]
            printed = ttl
        return printed, last_ttl


def _open_sockets(proto: int) -> list[socket.socket]:
    """[send socket, ICMP receive socket]: raw, created in the current netns."""
    socks: list[socket.socket] = []
    try:
        send = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        socks.append(send)
        icmp = send if proto == socket.IPPROTO_ICMP else \
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        if icmp is not send:
            socks.append(icmp)
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setblocking(False)
    except PermissionError as exc:
        for s in socks:
            s.close()
        raise MaceError("raw sockets not permitted: run as root (or with CAP_NET_RAW)",
                        exit_code=1) from exc
    return socks
