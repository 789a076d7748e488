"""Traceroute probes: valid checksums, distinct quote keys, paris constancy, answers."""

from __future__ import annotations

import socket
import struct

import pytest

from mace_tools.probe.icmp import checksum
from mace_tools.probe.trace import ICMP, TCP, UDP, ProbeFactory, annotation, parse_answer

NONCE = bytes.fromhex("a1a2a3a4a5a6a7a8")
SRC, DST = "198.18.1.10", "198.18.0.10"


def factory(method: str, paris: bool = False) -> ProbeFactory:
    return ProbeFactory(method, NONCE, SRC, DST, 60, 33434 if method == UDP else 80,
                        41000, 0x5151, paris)


def pseudo(proto: int, length: int) -> bytes:
    return socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!BBH", 0, proto, length)


@pytest.mark.parametrize("paris", [False, True])
@pytest.mark.parametrize("method", [UDP, TCP, ICMP])
def test_probes_are_valid_and_distinct(method: str, paris: bool) -> None:
    f = factory(method, paris)
    probes = [f.build(n) for n in range(1, 200)]
    for p in probes:
        msg = p.message
        if method == ICMP:
            assert checksum(msg) == 0
            tag_at = 8
        elif method == UDP:
            assert checksum(pseudo(17, len(msg)) + msg) in (0, 0xFFFF)
            tag_at = 8
        else:
            assert checksum(pseudo(6, len(msg)) + msg) == 0
            tag_at = 20
        assert msg[tag_at:tag_at + 8] == NONCE
        assert struct.unpack_from("!H", msg, tag_at + 8)[0] == p.number
        assert len(msg) + 20 == 60 or method == TCP
    assert len({p.quote_key for p in probes}) == len(probes)


def test_paris_holds_the_flow_constant() -> None:
    udp = [factory(UDP, paris=True).build(n).message for n in range(1, 50)]
    assert len({m[:4] for m in udp}) == 1  # ports constant, the checksum varies
    icmp = [factory(ICMP, paris=True).build(n).message for n in range(1, 50)]
    assert len({m[:4] for m in icmp}) == 1  # type, code and checksum constant
    classic = [factory(UDP).build(n).message for n in range(1, 50)]
    assert len({m[:4] for m in classic}) == 49  # destination port varies


def ipv4(proto: int, payload: bytes, src: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 61, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(SRC)) + payload


def icmp_error(icmp_type: int, code: int, quoted: bytes) -> bytes:
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def test_time_exceeded_quoting_a_probe() -> None:
    f = factory(UDP)
    probe = f.build(7)
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(probe.message), 0, 0, 1, 17, 0,
                        socket.inet_aton(SRC), socket.inet_aton(DST)) + probe.message[:8]
    a = parse_answer(ipv4(1, icmp_error(11, 0, inner), "198.18.0.2"), f)
    assert a is not None and a.quote_key == probe.quote_key and not a.reached
    unreach = parse_answer(ipv4(1, icmp_error(3, 3, inner), DST), f)
    assert unreach is not None and unreach.reached and annotation(unreach) == ""
    host_unreach = parse_answer(ipv4(1, icmp_error(3, 1, inner), "198.18.0.2"), f)
    assert host_unreach is not None and annotation(host_unreach) == " !H"


def test_tcp_answers() -> None:
    f = factory(TCP)
    seq = 0x5151 << 16 | 9
    synack = struct.pack("!HHIIBBHHH", 80, 41000, 1234, seq + 1, 5 << 4, 0x12, 0, 0, 0)
    a = parse_answer(ipv4(6, synack, DST), f)
    assert a is not None and a.probe_number == 9 and a.reached
    rst = struct.pack("!HHIIBBHHH", 80, 41000, 0, seq + 1 + f.payload_len, 5 << 4, 0x14, 0, 0,
                      0)
    a = parse_answer(ipv4(6, rst, DST), f)
    assert a is not None and a.probe_number == 9 and a.reached
    wrong_ack = struct.pack("!HHIIBBHHH", 80, 41000, 1234, 77, 5 << 4, 0x14, 0, 0, 0)
    assert parse_answer(ipv4(6, wrong_ack, DST), f) is None
    other_port = struct.pack("!HHIIBBHHH", 80, 41001, 1234, seq + 1, 5 << 4, 0x12, 0, 0, 0)
    assert parse_answer(ipv4(6, other_port, DST), f) is None


def test_garbage_never_raises() -> None:
    import random

    rng = random.Random(7)
    for method in (UDP, TCP, ICMP):
        f = factory(method)
        for _ in range(2000):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(90)))
            parse_answer(data, f)
            parse_answer(b"\x45" + data, f)
