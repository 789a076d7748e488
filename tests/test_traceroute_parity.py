"""mace-traceroute behaves as Linux traceroute 2.1 (issue 12): its methods and ports, its
waits (-w MAX,HERE,NEAR), -z, hops printed in order and never rewritten, --mtu and -F,
-e, hop names, the header's packet length, its option words. Unit tests here (no
privilege); tests/test_traceroute_options_lab.py runs the same behaviours in a routed lab.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from mace_tools.cli import traceopts as opt
from mace_tools.model import HopReply, Measurement, Namespaces, TraceResult
from mace_tools.output.traceroute import hop_line, ttl2hops
from mace_tools.probe.hopnames import shown_name
from mace_tools.probe.icmp import checksum
from mace_tools.probe.icmpext import describe_extensions, parse_structure
from mace_tools.probe.resolver import (
    build_query,
    lookup_hosts_name,
    parse_ptr_answer,
    ptr_name,
    read_name,
)
from mace_tools.probe.sockets import QueuedError, error_datagram
from mace_tools.probe.trace import (
    ICMP,
    RAW,
    TCP,
    UDP,
    Answer,
    ProbeFactory,
    annotation,
    final,
    packet_len,
)
from mace_tools.probe.tracesockets import MessageTooBig
from mace_tools.tracer import TraceOptions, Tracer
from mace_tools.tracewait import WaitSpec, probe_wait_s

NONCE = bytes.fromhex("a1a2a3a4a5a6a7a8")
SRC, DST, ROUTER = "198.18.1.10", "198.18.0.10", "198.18.0.2"


# --- methods, ports, sizes ---------------------------------------------------------------

def factory(method: str, **kw: object) -> ProbeFactory:
    return ProbeFactory(method, NONCE, SRC, DST, kw.pop("size", 60),  # type: ignore[arg-type]
                        kw.pop("port", 33434), 41000, 0x5151, False, **kw)  # type: ignore[arg-type]


def dport(message: bytes) -> int:
    return int.from_bytes(message[2:4], "big")


def test_default_method_starts_at_the_base_port_and_counts_up() -> None:
    f = factory(UDP)
    assert [dport(f.build(n).message) for n in (1, 2, 3)] == [33434, 33435, 33436]


def test_udp_method_holds_one_port_and_the_checksum_tells_probes_apart() -> None:
    f = factory(UDP, port=53, fixed_port=True)
    probes = [f.build(n) for n in range(1, 300)]
    assert {dport(p.message) for p in probes} == {53}
    assert len({p.quote_key for p in probes}) == len(probes)


def test_raw_probes_carry_no_l4_header_and_quote_their_number() -> None:
    f = factory(RAW, protocol=253)
    probes = [f.build(n) for n in range(1, 50)]
    assert f.protocol == 253 and len(probes[0].message) + 20 == 60
    assert len({p.quote_key for p in probes}) == len(probes)
    assert probes[6].message[:2] == b"\x00\x07" and probes[6].message[2:10] == NONCE


@pytest.mark.parametrize(("method", "asked", "sent"), [
    (UDP, 60, 60), (UDP, 10, 40), (UDP, 28, 40), (ICMP, 1000, 1000), (TCP, 40, 52),
    (RAW, 20, 32), (UDP, 65000, 65000)])
def test_header_says_what_is_sent(method: str, asked: int, sent: int) -> None:
    """Traceroute raises a packet length too small to the least it can send; ours is
    what holds the mace tag (nonce, number, 2 bytes): the header says so."""
    assert packet_len(method, asked) == sent
    f = factory(method, size=asked)
    assert len(f.build(1).message) + 20 == sent == f.packet_len


def test_resize_for_mtu() -> None:
    f = factory(UDP, size=65000)
    f.resize(1400)
    assert len(f.build(1).message) + 20 == 1400


def answer(icmp_type: int, code: int, mtu: int = 0, src: str = ROUTER) -> Answer:
    return Answer(b"", None, src, 60, icmp_type, code, 36, icmp_type == 3 and src == DST, mtu)


@pytest.mark.parametrize(("icmp_type", "code", "mark", "ends"), [
    (11, 0, "", False), (11, 1, " !<11-1>", True), (3, 3, "", True), (3, 0, " !N", True),
    (3, 6, " !N", True), (3, 1, " !H", True), (3, 12, " !H", True), (3, 2, " !P", True),
    (3, 13, " !X", True), (3, 9, " !X", True), (3, 5, " !S", True), (3, 14, " !V", True),
    (3, 15, " !C", True), (3, 4, " !F-1400", True), (3, 3, "", True)])
def test_marks_as_traceroute(icmp_type: int, code: int, mark: str, ends: bool) -> None:
    a = answer(icmp_type, code, mtu=1400)
    assert annotation(a) == mark and final(a) == ends


# --- -w MAX,HERE,NEAR -------------------------------------------------------------------

def waits(spec: WaitSpec, rtts: list[float | None], index: int, per_hop: int = 3) -> float:
    return probe_wait_s(spec, lambda i: rtts[i], index, len(rtts), per_hop)


def test_here_takes_the_first_answer_of_the_same_hop() -> None:
    spec = WaitSpec(5.0, 3.0, 10.0)
    # hop 1: probe 0 waits, 1 answered in 10 ms, 2 in 20 ms; hop 2 answered too
    rtts = [0.0, 0.010, 0.020, 0.001, None, None]
    assert waits(spec, rtts, 0) == pytest.approx((0.010 + 0.001) * 3)


def test_near_takes_the_first_later_answer_up_to_the_first_unsent() -> None:
    spec = WaitSpec(5.0, 3.0, 10.0)
    rtts = [0.0, 0.0, 0.0, 0.0, 0.002, 0.030, None, 0.5]
    assert waits(spec, rtts, 0) == pytest.approx((0.002 + 0.001) * 10)
    assert waits(spec, [0.0, 0.0, 0.0, None, 0.002], 0) == 5.0  # past an unsent one: none


def test_zero_factors_and_the_max_bound() -> None:
    rtts = [0.0, 0.9, 0.0, 0.5]
    assert waits(WaitSpec(5.0, 0.0, 0.0), rtts, 0) == 5.0
    assert waits(WaitSpec(1.0, 3.0, 0.0), rtts, 0) == 1.0  # 2.703 s, capped at MAX
    assert waits(WaitSpec(5.0, 0.0, 10.0), rtts, 2, per_hop=1) == pytest.approx(5.0)
    assert waits(WaitSpec(9.0, 0.0, 10.0), rtts, 2, per_hop=1) == pytest.approx(5.01)


@pytest.mark.parametrize(("text", "spec"), [
    (None, WaitSpec(5.0, 3.0, 10.0)),  # traceroute's defaults
    ("5", WaitSpec(5.0, 0.0, 0.0)),  # MAX alone: HERE and NEAR off, as traceroute
    ("2,1", WaitSpec(2.0, 1.0, 0.0)),
    ("2/1/4", WaitSpec(2.0, 1.0, 4.0)),  # any one character between
    ("0.5,0,20", WaitSpec(0.5, 0.0, 20.0)),
])
def test_wait_specs(text: str | None, spec: WaitSpec) -> None:
    assert opt.wait_option(text) == spec


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("0.5", 0.5), ("10", 0.01),
                                               ("9.9", 9.9), ("250", 0.25)])
def test_sendwait_over_10_is_milliseconds(text: str, seconds: float) -> None:
    assert opt.sendwait_option(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "value"), [("10", 10), ("0x10", 16), ("010", 8), ("0", 0),
                                             ("-1", 0xFFFFFFFF), (" 7", 7), ("1x", None),
                                             ("", None), ("0x", None)])
def test_counts_as_strtoul(text: str, value: int | None) -> None:
    assert opt.strtoul(text) == value


def test_ports_as_traceroute_takes_them() -> None:
    assert opt.port_option(("-p",), "80x") == 80  # strtoul: the rest is ignored
    assert opt.port_option(("-p",), "domain") == 53  # /etc/services
    assert opt.port_option(("-p",), "0x50") == 80
    with pytest.raises(Exception, match="Cannot handle `-p' option with arg `no-such'"):
        opt.port_option(("-p",), "no-such")
    assert opt.protocol_option("udp") == 17 and opt.protocol_option("253") == 253


def test_packetlen_as_strtol() -> None:
    assert opt.packetlen_argument("0x40") == 64 and opt.packetlen_argument("10") == 10
    assert opt.packetlen_argument(None) is None


# --- the run: expiry, late answers, --mtu, -F, ICMP seqs (fake sockets) -----------------

class FakeSession:
    ns = Namespaces(1)

    def lost(self) -> int:
        return 0

    def drain(self) -> None:
        pass


class FakeSocket:
    def __init__(self, refuse_over: int = 0, mtu: int = 0) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []
        self.refuse_over, self.mtu = refuse_over, mtu

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        if self.refuse_over and len(message) + 20 > self.refuse_over:
            raise MessageTooBig(self.mtu)
        self.sent.append(message)

    def recv(self) -> tuple[bytes, int] | None:
        if not self.incoming:
            return None
        return self.incoming.pop(0), time.clock_gettime_ns(time.CLOCK_REALTIME)


class Sink:
    def __init__(self) -> None:
        self.hops: list[tuple[int, list[HopReply]]] = []

    def start(self, source_addr: str) -> None:
        pass

    def hop(self, ttl: int, replies: list[HopReply]) -> None:
        self.hops.append((ttl, list(replies)))


def ipv4(proto: int, payload: bytes, src: str, dst: str = SRC) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 61, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def icmp_error(icmp_type: int, code: int, probe: bytes, proto: int, src: str = ROUTER,
               rest: int = 0) -> bytes:
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(probe), 0, 0, 1, proto, 0,
                         socket.inet_aton(SRC), socket.inet_aton(DST)) + probe[:8]
    body = struct.pack("!BBHI", icmp_type, code, 0, rest) + quoted
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(1, body, src)


def tracer(**kw: object) -> tuple[Tracer, Sink]:
    sink = Sink()
    t = Tracer(TraceOptions(DST, **kw), sink, nonce=NONCE)  # type: ignore[arg-type]
    o = t.opts
    t.factory = ProbeFactory(o.method, NONCE, SRC, DST, o.size, 33434 if o.method == UDP else 80,
                             41000, t.ident, False)
    return t, sink


def turn(t: Tracer, sock: FakeSocket, result: TraceResult) -> float | None:
    return t._turn(FakeSession(), sock, result)  # type: ignore[arg-type]


def test_a_late_answer_never_rewrites_a_printed_hop() -> None:
    t, sink = tracer(max_ttl=3, nqueries=1, wait_s=0.05)
    sock, result = FakeSocket(), TraceResult(NONCE, SRC)
    turn(t, sock, result)
    assert len(sock.sent) == 3
    time.sleep(0.08)
    assert turn(t, sock, result) is None  # all three timed out, printed: the run is over
    assert [ttl for ttl, _ in sink.hops] == [1, 2, 3]
    sock.incoming = [icmp_error(11, 0, sock.sent[0], 17),
                     icmp_error(3, 3, sock.sent[1], 17, src=DST)]
    t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
    assert all(r.measurement is None for _, rs in sink.hops for r in rs)
    assert all(r.measurement is None for rs in result.hops.values() for r in rs)
    assert t._progress.last_ttl == 3  # the late port unreachable ended nothing


def test_answers_in_time_are_kept_and_a_final_one_ends_the_trace() -> None:
    t, sink = tracer(max_ttl=5, nqueries=1, wait_s=5.0)
    sock, result = FakeSocket(), TraceResult(NONCE, SRC)
    turn(t, sock, result)
    sock.incoming = [icmp_error(11, 0, sock.sent[0], 17),
                     icmp_error(3, 3, sock.sent[1], 17, src=DST),
                     icmp_error(3, 3, sock.sent[2], 17, src=DST)]
    t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
    assert turn(t, sock, result) is None
    assert [(ttl, [r.measurement.src for r in rs]) for ttl, rs in sink.hops] == \
        [(1, [ROUTER]), (2, [DST])]  # type: ignore[union-attr]


def test_only_the_next_probe_to_print_times_out_and_near_shortens_its_wait() -> None:
    """Hop 1 stays silent, hop 2 answers at once: with NEAR 10 hop 1 is given up after
    10 x (RTT + 1 ms), not MAX (5 s)."""
    for near, expired in ((10.0, True), (0.0, False)):
        t, sink = tracer(max_ttl=2, nqueries=1, wait_s=5.0, near=near)
        sock, result = FakeSocket(), TraceResult(NONCE, SRC)
        turn(t, sock, result)
        sock.incoming = [icmp_error(3, 3, sock.sent[1], 17, src=DST)]
        t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
        time.sleep(0.1)
        turn(t, sock, result)
        assert (len(sink.hops) == 2) is expired, near
        if expired:
            assert sink.hops[0][1][0].measurement is None
            assert sink.hops[1][1][0].measurement is not None


def test_sendwait_spaces_the_probes() -> None:
    t, _ = tracer(max_ttl=3, nqueries=1, sendwait_s=0.05)
    sock, result = FakeSocket(), TraceResult(NONCE, SRC)
    wait = turn(t, sock, result)
    assert len(sock.sent) == 1 and wait is not None and 0.0 < wait <= 0.05
    time.sleep(0.06)
    turn(t, sock, result)
    assert len(sock.sent) == 2


def test_icmp_seqs_start_at_the_port_option() -> None:
    t, _ = tracer(method=ICMP, max_ttl=2, nqueries=2, first_seq=100)
    sock = FakeSocket()
    turn(t, sock, TraceResult(NONCE, SRC))
    assert [int.from_bytes(m[6:8], "big") for m in sock.sent] == [100, 101, 102, 103]


def test_mtu_discovery_sends_again_smaller_and_says_where() -> None:
    t, sink = tracer(max_ttl=2, nqueries=1, size=65000, mtu=True, simultaneous=1)
    sock, result = FakeSocket(refuse_over=1500, mtu=1500), TraceResult(NONCE, SRC)
    turn(t, sock, result)  # refused locally: shrunk to 1500, sent again at once
    assert [len(m) + 20 for m in sock.sent] == [1500]
    # a router on the way needs 1400: the probe is sent again, F=1400 on it
    sock.incoming = [icmp_error(11, 0, sock.sent[0], 17)]
    t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
    turn(t, sock, result)
    sock.incoming = [icmp_error(3, 4, sock.sent[1], 17, rest=1400)]
    t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
    turn(t, sock, result)
    assert len(sock.sent[2]) + 20 == 1400
    sock.incoming = [icmp_error(3, 3, sock.sent[2], 17, src=DST)]
    t._receive(sock, FakeSession(), FakeSession.ns)  # type: ignore[arg-type]
    assert turn(t, sock, result) is None
    assert [(r.annotation, r.mtu) for _, rs in sink.hops for r in rs] == \
        [(" F=1500", 1500), (" F=1400", 1400)]


def test_dont_fragment_ends_at_a_probe_too_big() -> None:
    t, sink = tracer(max_ttl=5, nqueries=2, size=1600)
    sock, result = FakeSocket(refuse_over=1500, mtu=1500), TraceResult(NONCE, SRC)
    assert turn(t, sock, result) is None
    assert [(ttl, [(r.measurement, r.annotation) for r in rs]) for ttl, rs in sink.hops] == \
        [(1, [(None, " !F-1500"), (None, " !F-1500")])]


# --- -e: ICMP extensions -----------------------------------------------------------------

def extension(objects: list[tuple[int, int, bytes]], good_sum: bool = True) -> bytes:
    body = b"".join(struct.pack("!HBB", 4 + len(d), c, t) + d for c, t, d in objects)
    head = struct.pack("!BBH", 0x20, 0, 0)
    total = checksum(head + body)
    return struct.pack("!BBH", 0x20, 0, total if good_sum else total ^ 1) + body


MPLS = (1, 1, struct.pack("!II", (16001 << 12) | (5 << 9) | (0 << 8) | 1,
                          (42 << 12) | (0 << 9) | (1 << 8) | 255))


def time_exceeded_with(ext: bytes, rfc4884: bool) -> bytes:
    quote = (ipv4(17, bytes(40), SRC, DST) + bytes(128))[:128]
    length = len(quote) // 4 if rfc4884 else 0
    body = struct.pack("!BBHBBH", 11, 0, 0, 0, length, 0) + quote + ext
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(1, body, ROUTER)


@pytest.mark.parametrize("rfc4884", [True, False])
def test_mpls_labels_as_traceroute_prints_them(rfc4884: bool) -> None:
    text = describe_extensions(time_exceeded_with(extension([MPLS]), rfc4884))
    assert text == "MPLS:L=16001,E=5,S=0,T=1/L=42,E=0,S=1,T=255"


def test_other_objects_in_hex_and_joined() -> None:
    ext = extension([(*MPLS[:2], struct.pack("!I", 1 << 12 | 1 << 8 | 7)),
                     (2, 6, bytes.fromhex("0000000300000539"))])
    assert parse_structure(ext) == "MPLS:L=1,E=0,S=1,T=7;2/6:00000003,00000539"


def test_malformed_extensions_are_ignored() -> None:
    assert parse_structure(extension([MPLS], good_sum=False)) == ""
    bad_length = bytearray(extension([MPLS]))
    bad_length[5] = 7  # object length not a multiple of 4
    assert parse_structure(bytes(bad_length)) == ""
    assert describe_extensions(icmp_error(11, 0, bytes(8), 17)) == ""  # no extensions
    for cut in range(len(time_exceeded_with(extension([MPLS]), True))):
        describe_extensions(time_exceeded_with(extension([MPLS]), True)[:cut])


def test_extensions_read_from_an_error_queue_are_found_at_128() -> None:
    """Without CAP_NET_RAW the error queue gives the quoted payload (padding and
    extensions included): the datagram rebuilt from it has them at 128, as traceroute
    finds them there."""
    err = QueuedError(11, 0, 0, socket.inet_aton(ROUTER), 61)
    udp = struct.pack("!HHHH", 41000, 53, 40, 0)
    payload = (bytes(32) + bytes(128))[:128 - 28] + extension([MPLS])
    rebuilt = error_datagram(err, socket.inet_aton(SRC), socket.inet_aton(DST), udp + payload,
                             socket.IPPROTO_UDP)
    assert describe_extensions(rebuilt).startswith("MPLS:L=16001")


# --- hop names and the hop line --------------------------------------------------------------

def hop(src: str, ms: float, mark: str = "", ext: str = "", ttl: int = 61) -> HopReply:
    m = Measurement(1, src, ttl, 36, int(ms * 1e6))
    return HopReply(2, m, mark, ext=ext)


def test_hop_line_as_traceroute() -> None:
    names = {ROUTER: "r1.lab.test"}.get
    line = hop_line(2, [hop(ROUTER, 0.1), HopReply(2), hop(ROUTER, 0.2), hop(DST, 0.3, " !H")],
                    names)
    assert line.startswith(" 2  r1.lab.test (198.18.0.2)  0.100 ms *  0.200 ms "
                           "198.18.0.10 (198.18.0.10)  0.300 ms !H  corrected=")
    numeric = hop_line(2, [hop(ROUTER, 0.1)])
    assert numeric.startswith(" 2  198.18.0.2  0.100 ms  corrected=")


def test_the_corrected_token_says_which_replies_have_no_correction_and_why() -> None:
    corrected = hop(ROUTER, 0.3)
    corrected.measurement.rtt_corrected_ns = 12_000
    late = hop(ROUTER, 0.2)
    late.measurement.late_kernel_stamp = True
    line = hop_line(2, [corrected, hop(ROUTER, 0.1), HopReply(2), late])
    assert line.endswith("  corrected=0.012,-,*,late")


def test_extensions_and_backward_hops_reprint_the_address() -> None:
    line = hop_line(2, [hop(ROUTER, 0.1, ext="MPLS:L=1,E=0,S=1,T=1"),
                        hop(ROUTER, 0.2, ext="MPLS:L=1,E=0,S=1,T=1"),
                        hop(ROUTER, 0.3, ext="MPLS:L=2,E=0,S=1,T=1")])
    assert line.count("198.18.0.2") == 2 and "<MPLS:L=2,E=0,S=1,T=1>" in line
    back = hop_line(2, [hop(ROUTER, 0.1, ttl=62), hop(ROUTER, 0.2, ttl=60)], back=True)
    assert back.startswith(" 2  198.18.0.2 '-3'  0.100 ms 198.18.0.2 '-5'  0.200 ms")
    assert ttl2hops(63) == 2 and ttl2hops(126) == 3 and ttl2hops(250) == 6


def test_a_timed_out_probe_keeps_its_mtu_note() -> None:
    assert hop_line(3, [HopReply(3, annotation=" F=1400"), hop(ROUTER, 0.1)]).startswith(
        " 3  * F=1400 198.18.0.2  0.100 ms")


def test_reverse_lookups() -> None:
    assert ptr_name("198.18.0.10") == "10.0.18.198.in-addr.arpa"
    hosts = "127.0.0.1 localhost\n198.18.0.2 r1.lab.test r1 # router\n198.18.0.2 other\n"
    assert lookup_hosts_name(hosts, "198.18.0.2") == "r1.lab.test"
    assert lookup_hosts_name(hosts, "198.18.0.3") is None
    assert shown_name("r1.lab.test.") == "r1.lab.test"
    assert shown_name("evil\x1b[2J.test") is None and shown_name("a b") is None


def ptr_reply(qid: int, rdata: bytes, flags: int = 0x8180) -> bytes:
    question = build_query(qid, ptr_name(DST), 12)[12:]
    record = struct.pack("!HHHIH", 0xC00C, 12, 1, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", qid, flags, 1, 1, 0, 0) + question + record


def test_ptr_answers_with_compressed_names() -> None:
    plain = ptr_reply(5, b"\x06target\x03lab\x04test\x00")
    assert parse_ptr_answer(plain, 5) == (0, ["target.lab.test"])
    assert parse_ptr_answer(plain, 6) is None
    compressed = ptr_reply(5, b"\x02gw\xc0\x0c")  # gw + the question's name
    assert parse_ptr_answer(compressed, 5) == (0, ["gw." + ptr_name(DST)])
    looped = ptr_reply(5, b"\xc0\x00")  # a name pointing at the header: no labels end it
    assert parse_ptr_answer(looped, 5) in (None, (0, []))
    with pytest.raises(ValueError):
        read_name(b"\xc0\x00", 0)  # a pointer to itself
