"""The ping run: send probes, read replies and kernel events, correlate, report.

One thread, one epoll over the ICMP socket. Kernel events of a reply are committed to the
ring buffer before the reply reaches the socket, so the ring is drained before each reply
is correlated (and on every turn of the loop: its records wake no one, bpf/mace.bpf.c).
When the backend lost events (ring full, a record it could not read) while a probe was in
flight, its reply is shown raw: whatever is missing from its path, nothing stands in.

What the run reports goes to a ``PingSink`` (the output layer); the run itself prints
nothing.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mace_tools.correlate import correlate
from mace_tools.errors import MaceError
from mace_tools.model import KernelEvent, Measurement, Namespaces, Probe, Reply
from mace_tools.probe import netns
from mace_tools.probe.icmp import (
    NONCE_LEN,
    EchoTemplate,
    ParsedIcmp,
    is_our_reply,
    parse_ip_icmp,
)
from mace_tools.probe.sockets import IcmpSocket
from mace_tools.stats import Tally
from mace_tools.status import StatusSignal

if TYPE_CHECKING:  # libbpf is bound only when a run starts
    from mace_tools.kernel.backend import Backend

NS_PER_S = 1_000_000_000
FLOOD_MIN_RATE_S = 0.01  # iputils -f: next probe on reply, or 100 per second at least
MIN_INTERVAL_NS = 10_000_000  # iputils' MIN_INTERVAL_MS: retry when the kernel had no room
MAX_NO_ROOM_BACKOFF_NS = 500_000_000
MAX_POLL_S = 60.0  # the loop re-reads its clock at least this often (epoll's int ms limit)

_UNREACH = {
    0: "Destination Net Unreachable",
    1: "Destination Host Unreachable",
    2: "Destination Protocol Unreachable",
    3: "Destination Port Unreachable",
    4: "Frag needed and DF set",
    5: "Source Route Failed",
    9: "Destination Net Prohibited",
    10: "Destination Host Prohibited",
    13: "Packet filtered",
}
_TIME_EXCEEDED = {0: "Time to live exceeded", 1: "Frag reassembly time exceeded"}


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


@dataclass(slots=True)
class RunResult:
    nonce: bytes
    source_addr: str
    transmitted: int = 0
    errors: int = 0
    elapsed_ms: int = 0
    start_real_ns: int = 0
    kernel_events_lost: int = 0
    kernel: bool = True  # False when probes cannot carry the nonce (size < 8)
    tally: Tally = field(default_factory=Tally)  # replies are counted, not kept


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
    """Probes in flight and the kernel events gathered for them, by 16-bit ICMP seq."""

    def __init__(self) -> None:
        self.sent: dict[int, Probe] = {}
        self.events: dict[int, list[KernelEvent]] = {}
        self.answered: set[int] = set()

    def add(self, probe: Probe) -> bool:
        """Track probe; True if it takes the seq of a probe (65536 probes ago) that got no
        answer, which is then lost for good. So nothing here grows past 65536 entries."""
        lost = probe.seq in self.sent and probe.seq not in self.answered
        self.sent[probe.seq] = probe
        self.events[probe.seq] = []
        self.answered.discard(probe.seq)
        return lost

    def forget(self, seq: int) -> None:
        """A probe that never left (sendto failed): no reply or event will come."""
        self.sent.pop(seq, None)
        self.events.pop(seq, None)
        self.answered.discard(seq)

    def unanswered(self, transmitted: int) -> list[int]:
        """Seqs of the last 65536 probes still sent and unanswered, in sending order."""
        seqs = ((n & 0xFFFF) for n in range(max(1, transmitted - 0xFFFF), transmitted + 1))
        return [seq for seq in seqs if seq in self.sent and seq not in self.answered]

    def add_event(self, ev: KernelEvent) -> None:
        bucket = self.events.get(ev.seq)
        if bucket is not None:  # late events of a finished probe are of no use
            bucket.append(ev)

    def take_events(self, seq: int) -> list[KernelEvent]:
        """A reply's events; the probe's are dropped so a duplicate never reuses them."""
        return self.events.pop(seq, [])


class Pinger:
    def __init__(self, opts: PingOptions, sink: PingSink, nonce: bytes | None = None,
                 backend_factory: Callable[[bytes], Backend] | None = None,
                 after_setup: Callable[[], None] | None = None) -> None:
        """after_setup runs once the socket, the netns and the programs are set up: the
        command drops its privileges there, as iputils does (a long-lived caller, such as
        a service running many pings, keeps its own)."""
        self.opts = opts
        self._after_setup = after_setup
        self.sink = sink
        self.nonce = nonce or new_nonce()
        self.ident = os.getpid() & 0xFFFF
        self._template = EchoTemplate(self.ident, self.nonce, opts.size)
        self._backend_factory = backend_factory
        self._probes = _Probes()
        self._backend: Backend | None = None  # set while a run has its programs
        self._no_room = 0  # consecutive sends refused for lack of buffer (iputils' oom_count)

    def run(self) -> RunResult:
        opts = self.opts
        ns = netns.of_run(opts.netns_path)
        with netns.entered(opts.netns_path):
            sock = IcmpSocket(opts.ttl, opts.device, opts.source)
            try:
                source = source_address(opts.dst_addr, opts.device, opts.source)
            except BaseException:
                sock.close()
                raise
        try:
            result = RunResult(nonce=self.nonce, source_addr=source)
            self.sink.start(source)
            result.kernel = opts.size >= NONCE_LEN
            backend = self._open_backend() if result.kernel else None
            self._backend = backend
            try:
                if self._after_setup is not None:
                    self._after_setup()
                self._loop(sock, backend, ns, result)
            finally:
                if backend is not None:
                    result.kernel_events_lost = backend.lost()
                    backend.close()
        finally:
            sock.close()
        return result

    def _open_backend(self) -> Backend:
        if self._backend_factory is not None:
            return self._backend_factory(self.nonce)
        from mace_tools.kernel.backend import Backend

        backend = Backend(self.nonce)
        backend.open()
        return backend

    def _loop(self, sock: IcmpSocket, backend: Backend | None, ns: Namespaces,
              result: RunResult) -> None:
        opts = self.opts
        probes = self._probes
        poller = select.epoll()
        poller.register(sock.fileno(), select.EPOLLIN)
        status = StatusSignal.install()
        if status.fd is not None:
            poller.register(status.fd, select.EPOLLIN)
        # -i 0, with or without -f, paces as iputils: next probe on reply, 100/s at least
        adaptive = opts.interval_s <= 0
        interval_ns = int((FLOOD_MIN_RATE_S if adaptive else opts.interval_s) * NS_PER_S)
        start = time.monotonic_ns()
        result.start_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        deadline = start + int(opts.deadline_s * NS_PER_S) if opts.deadline_s else None
        next_send = start
        last_send = start
        received = 0
        try:
            while True:
                now = time.monotonic_ns()
                if deadline is not None and now >= deadline:
                    break
                more = opts.count is None or result.transmitted < opts.count
                if not more:
                    # as iputils: a probe answered by an ICMP error is done too
                    outstanding = result.transmitted - received - result.errors
                    if outstanding <= 0 or now >= last_send + int(opts.linger_s * NS_PER_S):
                        break
                if more and now >= next_send:
                    if opts.report_outstanding and result.transmitted:
                        prev = result.transmitted & 0xFFFF
                        if prev not in probes.answered:
                            self.sink.no_answer_yet(prev)
                    retry_ns = self._send(sock, result.transmitted + 1, result)
                    if retry_ns is not None:
                        next_send = now + retry_ns
                    else:
                        result.transmitted += 1
                        last_send = now
                        next_send = now + interval_ns if opts.flood or adaptive \
                            else max(next_send + interval_ns, now)
                    # no `continue`: replies are read between any two probes, else -i 0
                    # (or any interval shorter than a send) would starve the socket
                wake = [next_send if more else last_send + int(opts.linger_s * NS_PER_S)]
                if deadline is not None:
                    wake.append(deadline)
                timeout_s = min(max(0.0, (min(wake) - time.monotonic_ns()) / NS_PER_S),
                                MAX_POLL_S)
                for fd, _ in poller.poll(timeout_s):
                    if fd == status.fd:
                        status.drain()
                if backend is not None:
                    # The programs submit without waking us (bpf/mace.bpf.c): drain every
                    # turn, so unanswered probes' events never pile up in the ring.
                    backend.drain(probes.add_event)
                got = self._receive(sock, backend, ns, result)
                received += got
                if got and adaptive:
                    next_send = time.monotonic_ns()  # next probe as soon as answered
                if status.take():
                    self.sink.status(result.transmitted, result.tally)
        except KeyboardInterrupt:
            pass  # Ctrl-C: stop sending, report what we have (as ping does)
        finally:
            poller.close()
            status.close()
        result.elapsed_ms = (time.monotonic_ns() - start) // 1_000_000
        for seq in probes.unanswered(result.transmitted):
            self.sink.timeout(seq)

    def _send(self, sock: IcmpSocket, n: int, result: RunResult) -> int | None:
        """Send probe n. None: it counts as transmitted, sent or failed for good (as
        iputils' "hard local error": reported, and counted in errors). Else the kernel had
        no room for it: try the same probe again in that many ns, uncounted."""
        seq = n & 0xFFFF
        message = self._template.message(seq)
        probe = Probe(seq, 0, 0)
        if self._probes.add(probe):
            self.sink.timeout(seq)  # the probe 65536 before this one
        # Both clocks just before sendto(): the raw RTT's start (as iputils: wall clock) and
        # the send point egress is measured from (the clock of bpf_ktime_get_ns).
        if self._backend is not None:
            probe.lost_at_send = self._backend.lost()
        probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        probe.sent_mono_ns = time.monotonic_ns()
        try:
            sock.send(message, self.opts.dst_addr)
        except OSError as exc:
            self._probes.forget(seq)
            retry_ns = self._retry_after(exc)
            if retry_ns is None:
                result.errors += 1
                self.sink.send_error(seq, f"sendmsg: {exc.strerror}")
            return retry_ns
        self._no_room = 0
        self.sink.sent(seq)
        return None

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

    def _receive(self, sock: IcmpSocket, backend: Backend | None, ns: Namespaces,
                 result: RunResult) -> int:
        """Read every waiting datagram; return how many new (non-duplicate) replies."""
        new = 0
        probes = self._probes
        while (got := sock.recv()) is not None:
            data, recv_real = got
            parsed = parse_ip_icmp(data)
            if parsed is None:
                continue  # malformed or truncated: not ours, never fatal
            if parsed.icmp_type != 0:
                self._maybe_error(parsed, result)
                continue
            if not is_our_reply(parsed, self.nonce, self.ident, self.opts.size) \
                    or parsed.seq not in probes.sent:
                continue  # another program's echo reply
            probe = probes.sent[parsed.seq]
            complete = True
            if backend is not None:
                backend.drain(probes.add_event)  # events precede socket delivery
                complete = backend.lost() == probe.lost_at_send
            dup = parsed.seq in probes.answered
            reply = Reply(parsed.seq, parsed.src, parsed.ttl, parsed.icmp_len, recv_real,
                          time.monotonic_ns())
            events = [] if dup else probes.take_events(parsed.seq)
            m = correlate(probe, reply, events, ns, complete)
            m.dup = dup
            if not dup:
                probes.answered.add(parsed.seq)
                new += 1
            result.tally.add(m)
            self.sink.reply(m)
        return new

    def _maybe_error(self, parsed: ParsedIcmp, result: RunResult) -> None:
        """An ICMP error quoting one of our probes is reported as iputils does."""
        seq = _quoted_probe_seq(parsed.quoted, self.ident, self.nonce, self.opts.dst_addr)
        if not parsed.checksum_ok or seq is None or seq not in self._probes.sent:
            return
        table = _UNREACH if parsed.icmp_type == 3 else _TIME_EXCEEDED \
            if parsed.icmp_type == 11 else {}
        text = table.get(parsed.code, f"ICMP type {parsed.icmp_type} code {parsed.code}")
        result.errors += 1
        self.sink.icmp_error(seq, parsed.src, text)


def _quoted_probe_seq(quoted: bytes, ident: int, nonce: bytes, dst: str) -> int | None:
    """Seq of our echo request quoted in an ICMP error, or None if it is not ours: the
    quote must be the first fragment of an ICMP datagram to our target (as iputils checks
    the destination: with only 8 bytes quoted, the id alone would take another program's
    probe to another host for ours)."""
    if len(quoted) < 20 or quoted[0] >> 4 != 4 or quoted[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (quoted[0] & 0x0F) * 4
    if ihl < 20 or int.from_bytes(quoted[6:8], "big") & 0x1FFF \
            or socket.inet_ntoa(quoted[16:20]) != dst:
        return None
    icmp = quoted[ihl:]
    if len(icmp) < 8 or icmp[0] != 8:
        return None
    seq = int.from_bytes(icmp[6:8], "big")
    payload = icmp[8:8 + NONCE_LEN]
    if len(payload) == NONCE_LEN:
        return seq if payload == nonce else None
    # RFC 792 quotes only 8 bytes: fall back on the id (not rewritten on our side of NAT).
    return seq if int.from_bytes(icmp[4:6], "big") == ident else None


def new_nonce() -> bytes:
    while True:
        nonce = os.urandom(NONCE_LEN)
        if any(nonce):
            return nonce


def source_address(dst: str, device: str | None, source: str | None) -> str:
    """Source address the kernel picks for dst in the current netns; fails as ping does
    when there is no route."""
    if source is not None:
        return source
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if device is not None:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        udp.connect((dst, 1025))
        return udp.getsockname()[0]
    except OSError as exc:
        raise MaceError(f"connect: {exc.strerror}") from exc
    finally:
        udp.close()
