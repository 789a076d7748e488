"""Fuzzing the code that decides whether a packet answers one of our probes.

Packets are built valid (IPv4 headers with consistent IHL, total length and header checksum;
ICMP and TCP checksums right) around the real probes of a run, sent through the run's own
send path into a fake socket, and their bodies are then mutated: payload bytes, quoted
header fields, seq, id, lengths, IP options, with the checksum recomputed or not. The run's
decision (mace-ping's receive path, mace-traceroute's parse_answer and probe look-up) is
compared with an oracle written here from the protocols, not from the code:

- an echo reply answers probe `seq` iff its ICMP checksum is valid, its payload starts with
  the run's nonce (a run whose probes are too short for it: the reply has the run's id and
  echoes the whole payload) and `seq` was sent; for traceroute the payload's probe number
  must also be the header's seq;
- an ICMP error answers a probe iff its checksum is valid and it quotes a valid IPv4 header
  of a first fragment, sent to the run's target with the probe's protocol, followed by the
  probe's identifying bytes: for ping an echo request carrying the nonce (when only 8 bytes
  are quoted, the run's id), whose seq was sent; for traceroute the probe's first 8 bytes;
- a TCP answer (traceroute -T) answers probe n iff it comes from the target, its ports are
  the probe's reversed, and it acknowledges probe n's SYN (a SYN-ACK: seq + 1; a RST:
  seq + 1 + payload length). Its checksum is not asked for: a raw socket sees a segment
  from a local netns (veth, checksum offload) with only the pseudo-header's partial sum.

Malformed input (random bytes, inconsistent headers, random kernel event records) must
never raise. Runs are derandomized and keep no example database, so CI sees the same cases.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mace_tools.kernel.events import EVENT, REC_EVENT, REC_PROBE, decode, dispatcher
from mace_tools.model import Hook, KernelEvent, Packet, RunResult
from mace_tools.pinger import Pinger, PingOptions
from mace_tools.probe.icmp import parse_ip_icmp
from mace_tools.probe.icmp_errors import quoted_probe_seq as _quoted_probe_seq
from mace_tools.probe.trace import ICMP, TCP, UDP, ProbeFactory, parse_answer
from mace_tools.tracer import DEFAULT_PORTS, TraceOptions, Tracer

TARGET, SRC, NATTED, ROUTER = "198.18.2.2", "198.18.0.2", "198.18.1.10", "198.18.1.1"
PROTO = {ICMP: 1, TCP: 6, UDP: 17}
ERROR_TYPES = (3, 4, 5, 11, 12)  # ICMP messages that quote the datagram they answer
EXAMPLES_PER_CASE = 30  # each parametrized case forces one mutation: few examples suffice
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- packets, built here independently of the code under test ---------------------------

def ones_sum(data: bytes) -> int:
    """RFC 1071 ones' complement sum of 16-bit words; a message with a valid checksum
    sums to 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    total = sum(data[i] << 8 | data[i + 1] for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def with_checksum(msg: bytes, at: int, pseudo: bytes = b"") -> bytes:
    msg = msg[:at] + b"\0\0" + msg[at + 2:]
    csum = ~ones_sum(pseudo + msg) & 0xFFFF
    return msg[:at] + csum.to_bytes(2, "big") + msg[at + 2:]


def pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def ipv4(src: str, dst: str, proto: int, body: bytes, ttl: int = 64, frag: int = 0,
         options: bytes = b"") -> bytes:
    """A valid IPv4 datagram: IHL, total length and header checksum consistent."""
    options += b"\x01" * (-len(options) % 4)  # NOP padding to a 32-bit boundary
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(body), 0x1234, frag,
                         ttl, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return with_checksum(header + options, 10) + body


def icmp(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    return with_checksum(bytes([icmp_type, code, 0, 0]) + rest + body, 2)


# --- the oracle ------------------------------------------------------------------------

@dataclass(frozen=True)
class Ip:
    src: str
    dst: str
    proto: int
    first_fragment: bool
    l4: bytes  # what follows the header, up to the total length (or the end if cut short)


def read_ip(data: bytes) -> Ip | None:
    """A valid IPv4 header and what follows it (a quote may be cut short)."""
    if len(data) < 20 or data[0] >> 4 != 4 or (data[0] & 0x0F) < 5:
        return None
    ihl = (data[0] & 0x0F) * 4
    total = int.from_bytes(data[2:4], "big")
    if len(data) < ihl or total < ihl:
        return None
    frag_offset = int.from_bytes(data[6:8], "big") & 0x1FFF
    return Ip(socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]), data[9],
              frag_offset == 0, data[ihl:total])


def quoted_l4(icmp_msg: bytes, proto: int) -> bytes | None:
    """The quoted datagram's first L4 bytes (>= 8), if the ICMP error quotes a first
    fragment sent to TARGET with protocol proto."""
    if len(icmp_msg) < 8 or icmp_msg[0] not in ERROR_TYPES:
        return None
    quote = read_ip(icmp_msg[8:])
    if quote is None or quote.proto != proto or quote.dst != TARGET \
            or not quote.first_fragment:
        return None
    ihl = (icmp_msg[8] & 0x0F) * 4
    l4 = icmp_msg[8 + ihl:]  # the quote's own total length is the original's: not cut
    return l4 if len(l4) >= 8 else None


@dataclass
class PingRun:
    nonce: bytes
    size: int
    pinger: Pinger
    sent: dict[int, bytes] = field(default_factory=dict)  # seq -> echo request
    numbers: set[int] = field(default_factory=set)  # the probe numbers sent
    transmitted: int = 0  # the run's count of probes sent (its last number)

    @property
    def ident(self) -> int:
        return self.pinger.ident

    def truth(self, datagram: bytes) -> tuple[str, int] | None:
        ip = read_ip(datagram)
        if ip is None or ip.proto != 1 or len(ip.l4) < 8:
            return None
        msg = ip.l4
        if msg[0] == 0:
            return self._reply_truth(msg)
        if ones_sum(msg) != 0xFFFF:
            return None
        echo = quoted_l4(msg, 1)
        if echo is None or echo[0] != 8:
            return None
        ident, seq = struct.unpack_from("!HH", echo, 4)
        data = echo[8:]
        ours = data[:8] == self.nonce if len(data) >= 8 else ident == self.ident
        # (a source quench or redirect is shown, not counted: iputils' notices)
        kind = "notice" if msg[0] in (4, 5) else "error"
        return (kind, seq) if ours and seq in self.sent else None

    def _reply_truth(self, msg: bytes) -> tuple[str, int] | None:
        """An echo reply is ours when it carries the nonce (and, numbered, a number that
        agrees with its seq) as far as its probe's size allows; or, cut shorter than
        that, when it has our id and echoes the start of what that probe sent, the nonce
        at least when the probe carried it (an id and a seq are guessable). A bad
        checksum (reported as corrupted) needs our id as well, as in iputils."""
        ident, seq = struct.unpack_from("!HH", msg, 4)
        payload = msg[8:]
        if seq not in self.sent:
            return None
        start = min(self.size, 12)
        if len(payload) >= start:
            head = min(start, 8)
            ours = payload[:head] == self.nonce[:head] and (self.size >= 8
                                                           or ident == self.ident)
            if self.size >= 12:  # numbered: the payload's number names the probe
                number = int.from_bytes(payload[8:12], "big")
                ours = ours and number in self.numbers and number & 0xFFFF == seq
        else:  # cut: the id, what the probe sent, and still the nonce if it carried one
            ours = ident == self.ident and self.sent[seq][8:].startswith(payload) \
                and len(payload) >= min(self.size, 8)
        if ours and ones_sum(msg) != 0xFFFF:
            ours = ident == self.ident
        return ("reply", seq) if ours else None

    def decide(self, datagram: bytes) -> list[tuple[str, int]]:
        """What the run's receive path makes of datagram: replies and errors it reports."""
        sink = RecordingSink()
        sock = FakeSocket([datagram])
        self.pinger.sink = sink
        result = RunResult(self.nonce, SRC)
        result.transmitted = self.transmitted
        self.pinger._receive(sock, None, result)
        return sink.seen


@dataclass
class TraceRun:
    method: str
    tracer: Tracer
    sent: dict[int, bytes] = field(default_factory=dict)  # probe number -> L4 message

    @property
    def factory(self) -> ProbeFactory:
        return self.tracer.factory

    def truth(self, datagram: bytes) -> int | None:
        ip = read_ip(datagram)
        if ip is None:
            return None
        if ip.proto == 6:
            return self._tcp_truth(ip)
        if ip.proto != 1 or len(ip.l4) < 8 or ones_sum(ip.l4) != 0xFFFF:
            return None
        msg = ip.l4
        if msg[0] == 0:  # echo reply: -I only, tagged with the nonce and probe number
            seq = int.from_bytes(msg[6:8], "big")
            ours = self.method == ICMP and msg[8:16] == self.tracer.nonce \
                and msg[16:18] == msg[6:8]
            return seq if ours and seq in self.sent else None
        if msg[0] not in (3, 11):
            return None
        l4 = quoted_l4(msg, PROTO[self.method])
        if l4 is None:
            return None
        return next((n for n, probe in self.sent.items() if probe[:8] == l4[:8]), None)

    def _tcp_truth(self, ip: Ip) -> int | None:
        seg = ip.l4
        if self.method != TCP or ip.src != TARGET or len(seg) < 20:
            return None
        sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", seg)
        if (sport, dport) != (self.factory.port, self.factory.sport):
            return None
        for n, probe in self.sent.items():
            syn_seq = int.from_bytes(probe[4:8], "big")
            if flags & 0x04:  # RST: acknowledges the SYN and its payload
                if ack == (syn_seq + 1 + len(probe) - 20) & 0xFFFFFFFF:
                    return n
            elif flags & 0x12 == 0x12 and ack == (syn_seq + 1) & 0xFFFFFFFF:
                return n
        return None

    def decide(self, datagram: bytes) -> int | None:
        """How mace-traceroute's receive path matches datagram to a probe."""
        answer = parse_answer(datagram, self.factory)
        return self.tracer._number(answer) if answer is not None else None


# --- the runs' own send paths, into fakes -----------------------------------------------

class FakeSocket:
    def __init__(self, incoming: list[bytes] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[bytes] = []

    def send(self, message: bytes, dst: str, ttl: int = 0) -> None:  # IcmpSocket, TraceSocket
        self.sent.append(message)

    def recv(self) -> tuple[bytes, int] | None:
        return (self.incoming.pop(0), 0) if self.incoming else None


class RecordingSink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def reply(self, m: object) -> None:
        self.seen.append(("reply", m.seq))  # type: ignore[attr-defined]

    def icmp_error(self, seq: int, src: str, text: str) -> None:
        self.seen.append(("error", seq))

    def icmp_notice(self, seq: int, src: str, text: str) -> None:
        self.seen.append(("notice", seq))

    def __getattr__(self, name: str) -> object:
        return lambda *args: None  # sent, timeout, ...: not what is checked here


@st.composite
def ping_runs(draw: st.DrawFn) -> PingRun:
    nonce = draw(st.binary(min_size=8, max_size=8).filter(any))
    size = draw(st.sampled_from([0, 1, 5, 7, 8, 9, 16, 56]))
    with patch.object(os, "getpid", return_value=draw(st.integers(1, 2**22))):  # the id
        pinger = Pinger(PingOptions(TARGET, size=size), RecordingSink(), nonce=nonce)
    run = PingRun(nonce, size, pinger)
    sock = FakeSocket()
    first = draw(st.sampled_from([1, 0xFFFF - 1]))  # and the seq wrap-around
    for n in range(first, first + draw(st.integers(1, 4))):
        assert pinger._send(sock, n, RunResult(nonce, SRC)) is None  # type: ignore[arg-type]
        run.sent[n & 0xFFFF] = sock.sent[-1]
        run.numbers.add(n)
        run.transmitted = n
    return run


@st.composite
def trace_runs(draw: st.DrawFn, method: str) -> TraceRun:
    paris = draw(st.booleans())
    size = draw(st.sampled_from([28, 40, 60, 100]))
    nonce = draw(st.binary(min_size=8, max_size=8).filter(any))
    with patch.object(os, "getpid", return_value=draw(st.integers(1, 2**22))):  # the id
        tracer = Tracer(TraceOptions(TARGET, method=method, paris=paris, size=size), None,
                        nonce=nonce)  # type: ignore[arg-type]
    sport = 33000 + (tracer.ident % 20000) if method != ICMP else 0
    tracer.factory = ProbeFactory(method, nonce, SRC, TARGET, size, DEFAULT_PORTS[method],
                                  sport, tracer.ident, paris)
    run = TraceRun(method, tracer)
    sock = FakeSocket()
    for n in range(1, draw(st.integers(1, 4)) + 1):
        tracer._send(sock, n, ttl=n)  # type: ignore[arg-type]
        run.sent[n] = sock.sent[-1]
    return run


# --- answers to those probes (or to others), then mutated --------------------------------

def foreign_echo(draw: st.DrawFn, ident: int) -> bytes:
    """An echo request of another program, or of a probe this run never sent."""
    seq = draw(st.integers(0, 0xFFFF))
    payload = draw(st.binary(max_size=64))
    ident = draw(st.sampled_from([ident, draw(st.integers(0, 0xFFFF))]))
    return icmp(8, 0, struct.pack("!HH", ident, seq), payload)


def quote_of(draw: st.DrawFn, proto: int, l4: bytes) -> bytes:
    """How a router quotes a datagram: its IP header (source maybe NATed, TTL spent, maybe
    with options) and 8 bytes of L4 (RFC 792), or more (RFC 1812)."""
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", bytes(range(1, 9))]))
    datagram = ipv4(draw(st.sampled_from([SRC, NATTED])), TARGET, proto, l4, ttl=1,
                    options=options)
    ihl = (datagram[0] & 0x0F) * 4
    keep = draw(st.sampled_from([8, 12, 20, 64, len(l4)]))
    return datagram[:ihl + keep]


PING_ERRORS = [(11, 0), (3, 1), (3, 3), (3, 13), (12, 0), (4, 0), (5, 1)]
TRACE_ERRORS = [(11, 0), (3, 1), (3, 3), (3, 13)]  # what traceroute answers are made of


def error_to(draw: st.DrawFn, proto: int, l4: bytes,
             kinds: list[tuple[int, int]] = PING_ERRORS) -> bytes:
    icmp_type, code = draw(st.sampled_from(kinds))
    return icmp(icmp_type, code, bytes(4), quote_of(draw, proto, l4))


def echo_reply_to(draw: st.DrawFn, request: bytes, nat: bool = True) -> bytes:
    """The echo reply; NAT may have rewritten its id (then a probe too short for the nonce
    has nothing left to be known by)."""
    ident = draw(st.sampled_from([request[4:6], draw(st.binary(min_size=2, max_size=2))])) \
        if nat else request[4:6]
    return icmp(0, 0, ident + request[6:8], request[8:])


def error_fields(msg: bytes) -> dict[str, tuple[int, int]]:
    """(offset, length) of the fields of an ICMP error's quote: IP header, then L4 (after
    the quote's options, if any)."""
    l4 = 8 + ((msg[8] & 0x0F) * 4 if len(msg) > 8 else 20)
    return {"version_ihl": (8, 1), "frag": (14, 2), "proto": (17, 1), "dst": (24, 4),
            "l4_head": (l4, 8), "l4_data": (l4 + 8, 10)}


ERROR_FIELDS = tuple(error_fields(bytes(9)))
REPLY_FIELDS = {"type": (0, 1), "code": (1, 1), "id": (4, 2), "seq": (6, 2), "nonce": (8, 8),
                "tag": (16, 2)}
TCP_FIELDS = {"ports": (0, 4), "ack": (8, 4), "flags": (13, 1)}
ANYWHERE = ("byte", "cut", "extend")


@st.composite
def mutated(draw: st.DrawFn, msg: bytes, fields: dict[str, tuple[int, int]], first: str,
            checksum_at: int, pseudo_header: bytes = b"") -> bytes:
    """msg with `first` mutated (a named field, a byte anywhere, cut, extended), maybe a
    few more mutations, and its checksum recomputed (mostly: else nothing past it is
    looked at) or not."""
    data = bytearray(msg)
    more = draw(st.sampled_from([0, 0, 1, 2]))
    for how in [first, *(draw(st.sampled_from([*fields, *ANYWHERE])) for _ in range(more))]:
        if how in fields:
            offset, length = fields[how]
            at = offset + draw(st.integers(0, length - 1))
            if at < len(data):
                data[at] = draw(st.integers(0, 255))
        elif how == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[len(data) - draw(st.integers(1, min(len(data), 40))):]
        elif how == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
    out = bytes(data)
    if len(out) >= checksum_at + 2 and draw(st.sampled_from([True, True, True, False])):
        fixed = pseudo_header[:10] + len(out).to_bytes(2, "big") if pseudo_header else b""
        out = with_checksum(out, checksum_at, fixed)
    return out


@st.composite
def ping_answers(draw: st.DrawFn, run: PingRun, kind: str, first: str | None) -> bytes:
    """An echo reply or ICMP error for one of the run's probes (or, now and then, for
    another program's), mutated first in `first` (None: not mutated)."""
    sent = list(run.sent.values())
    request = draw(st.sampled_from([*sent, *sent, foreign_echo(draw, run.ident)])) \
        if first else draw(st.sampled_from(sent))
    if kind == "reply":
        msg, fields, src = echo_reply_to(draw, request, first is not None), REPLY_FIELDS, TARGET
    else:
        msg, src = error_to(draw, 1, request), ROUTER
        fields = error_fields(msg)
    if first is None:
        return ipv4(src, SRC, 1, msg)
    msg = draw(mutated(msg, fields, first, 2))
    options = draw(st.sampled_from([b"", b"\x01" * 4, b"\x07\x07\x04" + bytes(5)]))
    return ipv4(src, SRC, 1, msg, options=options)


def tcp_answer(draw: st.DrawFn, run: TraceRun, probe: bytes) -> bytes:
    syn_seq = int.from_bytes(probe[4:8], "big")
    if draw(st.booleans()):
        flags, ack = 0x14, syn_seq + 1 + len(probe) - 20  # RST-ACK from a closed port
    else:
        flags, ack = 0x12, syn_seq + 1  # SYN-ACK
    seg = struct.pack("!HHIIBBHHH", run.factory.port, run.factory.sport,
                      draw(st.integers(0, 2**32 - 1)), ack & 0xFFFFFFFF, 5 << 4, flags, 512,
                      0, 0)
    return with_checksum(seg, 16, pseudo(TARGET, SRC, 6, len(seg)))


@st.composite
def trace_answers(draw: st.DrawFn, run: TraceRun, kind: str, first: str | None) -> bytes:
    """An ICMP error, echo reply (-I) or TCP answer (-T) for one of the run's probes,
    mutated first in `first` (None: not mutated)."""
    probe = draw(st.sampled_from(list(run.sent.values())))
    if kind == "tcp":
        seg = tcp_answer(draw, run, probe)
        if first is None:
            return ipv4(TARGET, SRC, 6, seg)
        seg = draw(mutated(seg, TCP_FIELDS, first, 16, pseudo(TARGET, SRC, 6, len(seg))))
        return ipv4(draw(st.sampled_from([TARGET, TARGET, ROUTER])), SRC, 6, seg)
    if kind == "echo":
        msg, fields, src = echo_reply_to(draw, probe), REPLY_FIELDS, TARGET
    else:
        msg = error_to(draw, PROTO[run.method], probe, TRACE_ERRORS)
        fields, src = error_fields(msg), draw(st.sampled_from([ROUTER, TARGET]))
    if first is not None:
        msg = draw(mutated(msg, fields, first, 2))
    return ipv4(src, SRC, 1, msg)


# --- the properties ----------------------------------------------------------------------

PING_CASES = [("reply", f) for f in (*REPLY_FIELDS, *ANYWHERE)] + \
    [("error", f) for f in (*ERROR_FIELDS, *ANYWHERE)]
TRACE_CASES = [(m, "error", f) for m in (UDP, ICMP, TCP) for f in (*ERROR_FIELDS, *ANYWHERE)] \
    + [(ICMP, "echo", f) for f in (*REPLY_FIELDS, *ANYWHERE)] \
    + [(TCP, "tcp", f) for f in (*TCP_FIELDS, *ANYWHERE)]


@pytest.mark.parametrize(("kind", "first"), PING_CASES)
@settings(FUZZ, max_examples=EXAMPLES_PER_CASE)
@given(data=st.data())
def test_ping_attributes_only_real_answers(kind: str, first: str, data: st.DataObject) -> None:
    run = data.draw(ping_runs())
    datagram = data.draw(ping_answers(run, kind, first))
    truth = run.truth(datagram)
    assert run.decide(datagram) == ([truth] if truth else [])


@pytest.mark.parametrize("kind", ["reply", "error"])
@FUZZ
@given(data=st.data())
def test_ping_takes_every_genuine_answer(kind: str, data: st.DataObject) -> None:
    """The oracle and the fake run are not vacuous: unmutated answers to sent probes are
    the run's, and the receive path says so."""
    run = data.draw(ping_runs())
    datagram = data.draw(ping_answers(run, kind, None))
    truth = run.truth(datagram)
    assert truth is not None and truth[0] == ("notice" if datagram[20] in (4, 5) else kind)
    assert run.decide(datagram) == [truth]


@pytest.mark.parametrize(("method", "kind", "first"), TRACE_CASES)
@settings(FUZZ, max_examples=EXAMPLES_PER_CASE)
@given(data=st.data())
def test_traceroute_matches_only_real_answers(method: str, kind: str, first: str,
                                              data: st.DataObject) -> None:
    run = data.draw(trace_runs(method))
    datagram = data.draw(trace_answers(run, kind, first))
    assert run.decide(datagram) == run.truth(datagram)


@pytest.mark.parametrize(("method", "kind"), [(UDP, "error"), (ICMP, "error"), (TCP, "error"),
                                              (ICMP, "echo"), (TCP, "tcp")])
@FUZZ
@given(data=st.data())
def test_traceroute_matches_every_genuine_answer(method: str, kind: str,
                                                 data: st.DataObject) -> None:
    run = data.draw(trace_runs(method))
    datagram = data.draw(trace_answers(run, kind, None))
    truth = run.truth(datagram)
    assert truth is not None
    assert run.decide(datagram) == truth


@FUZZ
@given(garbage=st.binary(max_size=120), prefix=st.booleans())
def test_garbage_never_raises(garbage: bytes, prefix: bool) -> None:
    # with a valid IPv4+ICMP header in front, the bytes reach the deep parsing
    datagram = ipv4(ROUTER, SRC, 1, garbage) if prefix else garbage
    parse_ip_icmp(datagram)
    _quoted_probe_seq(garbage, 1, b"\x01" * 8, TARGET)
    pinger = Pinger(PingOptions(TARGET), RecordingSink(), nonce=b"\x01" * 8)
    pinger._receive(FakeSocket([datagram]), None,  # type: ignore[arg-type]
                    RunResult(b"\x01" * 8, SRC))
    for method in (UDP, ICMP, TCP):
        factory = ProbeFactory(method, b"\x01" * 8, SRC, TARGET, 60, 80, 33000, 7, False)
        parse_answer(datagram, factory)
        parse_answer(ipv4(TARGET, SRC, 6, garbage), factory)


# --- kernel event records ------------------------------------------------------------------

NAMES = st.binary(max_size=15).map(lambda b: b.replace(b"\0", b"x"))


@FUZZ
@given(ts=st.integers(0, 2**64 - 1), netns=st.integers(0, 2**32 - 1),
       ifindex=st.integers(0, 2**32 - 1), saddr=st.integers(0, 2**32 - 1),
       daddr=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**32 - 1),
       packet=st.sampled_from(list(Packet)), hook=st.sampled_from(list(Hook)), dev=NAMES,
       tail=st.binary(max_size=16), proto=st.integers(0, 255),
       icmp_type=st.integers(0, 255), offset=st.integers(0, 64))
def test_event_records_decode_as_written(ts: int, netns: int, ifindex: int, saddr: int,
                                         daddr: int, seq: int, packet: Packet, hook: Hook,
                                         dev: bytes, tail: bytes, proto: int, icmp_type: int,
                                         offset: int) -> None:
    """Every field of a record the BPF side writes comes back as written, at any offset
    (bytes after the device name's NUL are ignored)."""
    raw = EVENT.pack(REC_EVENT, packet, hook, proto, icmp_type, 4, seq & 0xFFFF, seq, netns,
                     ifindex, ts, saddr.to_bytes(4, "little"), daddr.to_bytes(4, "little"),
                     (dev + b"\0" + tail)[:16])
    buf = bytes(offset) + raw
    seen: list[KernelEvent] = []
    dispatcher(seen.append)(memoryview(buf), offset)
    event = decode(memoryview(buf), offset)
    assert seen == [event]
    assert (event.ts_mono_ns, event.seq, event.packet, event.hook, event.ifindex,
            event.netns, event.proto, event.icmp_type) == \
        (ts, seq, packet, hook, ifindex, netns, proto, icmp_type)
    assert event.dev == dev.decode(errors="replace")
    assert (event.src, event.dst) == (socket.inet_ntoa(saddr.to_bytes(4, "little")),
                                      socket.inet_ntoa(daddr.to_bytes(4, "little")))


@FUZZ
@given(st.binary(min_size=EVENT.size, max_size=EVENT.size))
def test_any_event_record_decodes_or_is_dropped(raw: bytes) -> None:
    """A record the Python side does not know (another build's packet kind or hook) is
    dropped, never a crash of the run's event loop."""
    seen: list[KernelEvent] = []
    dispatcher(seen.append)(memoryview(raw), 0)
    event = decode(raw)
    known = raw[0] == REC_EVENT and raw[1] < len(Packet) and raw[2] < len(Hook)
    assert seen == ([event] if known else [])
    # (a probe record's kind decodes as one: it is no event, and fills no event list)
    assert (event is not None) == (known or raw[0] == REC_PROBE)
