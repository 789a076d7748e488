"""ICMP probe codec: exact bytes, round trips, and garbage that must never raise."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from mace_tools.probe.icmp import (
    NONCE_LEN,
    EchoTemplate,
    build_echo_request,
    checksum,
    is_our_reply,
    parse_ip_icmp,
)

NONCE = bytes.fromhex("0102030405060708")


def ipv4(payload: bytes, src: str = "198.18.0.2", dst: str = "198.18.1.10", ttl: int = 63,
         ihl: int = 5) -> bytes:
    options = bytes(4 * (ihl - 5))
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 1, 0, ttl, 1, 0,
                         socket.inet_aton(src), socket.inet_aton(dst)) + options
    return header + payload


def as_reply(request: bytes) -> bytes:
    body = b"\x00\x00\x00\x00" + request[4:]
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def test_checksum_known_vector() -> None:
    # RFC 1071 example words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x01") == ~0x0100 & 0xFFFF


def test_request_layout() -> None:
    msg = build_echo_request(0x1234, 7, NONCE, 56)
    assert len(msg) == 64
    assert msg[0] == 8 and msg[1] == 0 and struct.unpack("!HH", msg[4:8]) == (0x1234, 7)
    assert msg[8:16] == NONCE  # the kernel side reads the nonce right after the header
    assert msg[16:20] == b"\0\0\0\x07"  # then the probe number (a seq < 65536 is its own)
    assert msg[20:] == bytes(range(12, 56))
    assert checksum(msg) == 0


def test_request_layout_past_the_seq_wrap() -> None:
    msg = build_echo_request(0x1234, 0x12345, NONCE, 56)
    assert struct.unpack("!HH", msg[4:8]) == (0x1234, 0x2345)  # seq: the number's low 16 bits
    assert msg[16:20] == bytes.fromhex("00012345") and msg[20:] == bytes(range(12, 56))
    assert checksum(msg) == 0


@pytest.mark.parametrize("size", [0, 5, 8, 56, 1400])
def test_template_matches_full_build_for_every_seq(size: int) -> None:
    template = EchoTemplate(0xBEEF, NONCE, size)
    for seq in (0, 1, 2, 255, 256, 0x7FFF, 0xFFFE, 0xFFFF, *range(1000, 66000, 977)):
        seq &= 0xFFFF
        msg = template.message(seq)
        assert msg == build_echo_request(0xBEEF, seq, NONCE, size)
        assert checksum(msg) == 0


def test_small_sizes_truncate_the_nonce() -> None:
    assert build_echo_request(1, 1, NONCE, 0)[8:] == b""
    assert build_echo_request(1, 1, NONCE, 5)[8:] == NONCE[:5]


def test_round_trip_reply_is_ours() -> None:
    p = parse_ip_icmp(ipv4(as_reply(build_echo_request(99, 3, NONCE, 56))))
    assert p is not None
    assert (p.src, p.dst, p.ttl, p.icmp_type, p.ident, p.seq) == \
        ("198.18.0.2", "198.18.1.10", 63, 0, 99, 3)
    assert p.icmp_len == 64 and p.checksum_ok
    assert is_our_reply(p, NONCE, ident=1)  # the id does not matter (NAT may rewrite it)
    assert not is_our_reply(p, os.urandom(NONCE_LEN), ident=99)


def test_ip_options_are_skipped() -> None:
    p = parse_ip_icmp(ipv4(as_reply(build_echo_request(1, 2, NONCE, 56)), ihl=7))
    assert p is not None and p.seq == 2 and p.payload[:8] == NONCE


def test_short_payload_falls_back_on_id() -> None:
    p = parse_ip_icmp(ipv4(as_reply(build_echo_request(77, 1, NONCE, 4))))
    assert p is not None
    assert is_our_reply(p, NONCE, ident=77, size=4)
    assert not is_our_reply(p, NONCE, ident=78, size=4)
    assert not is_our_reply(p, NONCE, ident=77)  # cut short: not a reply to a 56-byte probe


def test_bad_checksum_is_not_a_reply() -> None:
    msg = bytearray(as_reply(build_echo_request(1, 1, NONCE, 56)))
    msg[20] ^= 0xFF
    p = parse_ip_icmp(ipv4(bytes(msg)))
    assert p is not None and not p.checksum_ok and not is_our_reply(p, NONCE, 1)


def test_error_exposes_quoted_datagram() -> None:
    quoted = ipv4(build_echo_request(5, 9, NONCE, 56), src="198.18.1.10", dst="198.18.0.9")
    err = b"\x0b\x00\x00\x00\x00\x00\x00\x00" + quoted
    err = err[:2] + struct.pack("!H", checksum(err)) + err[4:]
    p = parse_ip_icmp(ipv4(err, src="198.18.0.1"))
    assert p is not None and p.icmp_type == 11 and p.quoted == quoted


def test_malformed_never_raises() -> None:
    rng = random.Random(1234)
    valid = ipv4(as_reply(build_echo_request(1, 1, NONCE, 56)))
    cases = [b"", b"\x45", valid[:19], valid[:27], b"\x60" + valid[1:], b"\x44" + valid[1:],
             valid[:9] + b"\x06" + valid[10:]]
    cases += [valid[:n] for n in range(len(valid))]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(80))) for _ in range(3000)]
    for case in cases:
        p = parse_ip_icmp(case)
        if p is not None:
            is_our_reply(p, NONCE, 1)
    assert parse_ip_icmp(valid[:27]) is None  # ICMP shorter than its header
    assert parse_ip_icmp(b"\x60" + valid[1:]) is None  # not IPv4
    assert parse_ip_icmp(valid[:9] + b"\x06" + valid[10:]) is None  # not ICMP
