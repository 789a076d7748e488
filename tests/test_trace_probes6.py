"""IPv6 traceroute probes: checksums over the IPv6 pseudo-header, ICMPv6 echo, the answers
(ICMPv6 errors quoting a probe, echo replies, TCP) and traceroute -6's marks."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from mace_tools.probe.icmp import checksum
from mace_tools.probe.sockets import ipv6_header
from mace_tools.probe.trace import (
    ICMP,
    TCP,
    UDP,
    ProbeFactory,
    annotation,
    final,
    packet_len,
    parse_answer,
)

NONCE = bytes.fromhex("b1b2b3b4b5b6b7b8")
SRC, DST, ROUTER = "2001:2:0:1::a", "2001:2::a", "2001:2::2"


def factory(method: str, paris: bool = False, size: int = 80) -> ProbeFactory:
    return ProbeFactory(method, NONCE, SRC, DST, size, 33434 if method == UDP else 80,
                        41000, 0x5151, paris, family=6)


def pseudo(proto: int, length: int) -> bytes:
    """RFC 8200 8.1, written out independently of the code under test."""
    return (socket.inet_pton(socket.AF_INET6, SRC) + socket.inet_pton(socket.AF_INET6, DST)
            + length.to_bytes(4, "big") + bytes(3) + bytes([proto]))


def packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


def test_packet_length_is_traceroute_6s() -> None:
    assert packet_len(UDP, 80, 6) == 80 and packet_len(ICMP, 80, 6) == 80
    assert packet_len(UDP, 60, 4) == 60
    assert packet_len(UDP, 0, 6) == 40 + 8 + 12  # the least a probe can be: header + tag


@pytest.mark.parametrize("paris", [False, True])
@pytest.mark.parametrize(("method", "proto", "tag_at"), [(UDP, 17, 8), (TCP, 6, 20),
                                                         (ICMP, 58, 8)])
def test_probes_have_v6_checksums_and_distinct_keys(method: str, proto: int, tag_at: int,
                                                    paris: bool) -> None:
    f = factory(method, paris)
    probes = [f.build(n) for n in range(1, 200)]
    for p in probes:
        msg = p.message
        assert checksum(pseudo(proto, len(msg)) + msg) in (0, 0xFFFF)
        assert msg[tag_at:tag_at + 8] == NONCE
        assert struct.unpack_from("!H", msg, tag_at + 8)[0] == p.number
        assert len(msg) + 40 == 80 or method == TCP
    if method == ICMP:
        assert {p.message[0] for p in probes} == {128}  # ICMPv6 echo request
    assert len({p.quote_key for p in probes}) == len(probes)


def test_paris_icmpv6_checksum_is_constant() -> None:
    icmp = [factory(ICMP, paris=True).build(n).message for n in range(1, 50)]
    assert len({m[:4] for m in icmp}) == 1


def error(icmp_type: int, code: int, probe: bytes, src: str, proto: int = 17,
          word: int = 0) -> bytes:
    """An ICMPv6 error from src quoting the whole probe (as Linux does)."""
    quoted = ipv6_header(len(probe), 1, packed(SRC), packed(DST), proto) + probe
    body = struct.pack("!BBHI", icmp_type, code, 0, word) + quoted
    return ipv6_header(len(body), 63, packed(src), packed(SRC)) + body


def test_time_exceeded_and_port_unreachable() -> None:
    f = factory(UDP)
    probe = f.build(7)
    a = parse_answer(error(3, 0, probe.message, ROUTER), f)
    assert a is not None and a.quote_key == probe.quote_key and a.src == ROUTER
    assert a.ttl == 63 and not a.reached and not final(a) and annotation(a) == ""
    end = parse_answer(error(1, 4, probe.message, DST), f)
    assert end is not None and end.reached and final(end) and annotation(end) == ""


@pytest.mark.parametrize(("icmp_type", "code", "mark"), [
    (1, 0, " !N"), (1, 1, " !X"), (1, 2, " !H"), (1, 3, " !H"), (1, 4, ""), (1, 5, " !<5>"),
    (3, 1, " !<3-1>"), (2, 0, " !F-1400"),
])
def test_marks_as_traceroute_6(icmp_type: int, code: int, mark: str) -> None:
    f = factory(UDP)
    a = parse_answer(error(icmp_type, code, f.build(3).message, ROUTER, word=1400), f)
    assert a is not None and annotation(a) == mark and final(a)
    assert a.too_big == (icmp_type == 2) and a.mtu == (1400 if icmp_type == 2 else 0)


def test_a_quote_of_another_destination_or_protocol_is_not_ours() -> None:
    f = factory(UDP)
    probe = f.build(4).message
    quoted = ipv6_header(len(probe), 1, packed(SRC), packed("2001:2::99"), 17) + probe
    body = struct.pack("!BBHI", 3, 0, 0, 0) + quoted
    assert parse_answer(ipv6_header(len(body), 63, packed(ROUTER), packed(SRC)) + body,
                        f) is None
    assert parse_answer(error(3, 0, probe, ROUTER, proto=6), f) is None
    assert parse_answer(error(3, 0, probe, ROUTER), f) is not None  # (the same, ours)


def test_echo_reply_and_tcp_answers() -> None:
    f = factory(ICMP)
    request = f.build(9).message
    reply = bytes([129]) + request[1:]
    a = parse_answer(ipv6_header(len(reply), 64, packed(DST), packed(SRC)) + reply, f)
    assert a is not None and a.probe_number == 9 and a.reached and annotation(a) == ""
    t = factory(TCP)
    seq = 0x5151 << 16 | 5
    rst = struct.pack("!HHIIBBHHH", 80, 41000, 0, seq + 1 + t.payload_len, 5 << 4, 0x14, 0,
                      0, 0)
    a = parse_answer(ipv6_header(len(rst), 64, packed(DST), packed(SRC), 6) + rst, t)
    assert a is not None and a.probe_number == 5 and a.reached
    assert parse_answer(ipv6_header(len(rst), 64, packed(ROUTER), packed(SRC), 6) + rst,
                        t) is None  # not from the target


def test_an_ipv4_datagram_is_not_an_ipv6_answer() -> None:
    f = factory(UDP)
    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 48, 0, 0, 61, 1, 0, bytes(4), bytes(4))
    assert parse_answer(v4 + bytes(28), f) is None


def test_garbage_never_raises() -> None:
    rng = random.Random(6)
    for method in (UDP, TCP, ICMP):
        f = factory(method)
        for _ in range(2000):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(130)))
            parse_answer(data, f)
            parse_answer(b"\x60" + data, f)
            parse_answer(ipv6_header(len(data), 1, packed(ROUTER), packed(SRC)) + data, f)
