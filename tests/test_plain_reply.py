"""echo_check.PlainReply: a flood's common reply recognised without parsing. It may only
take what EchoCheck would judge a clean answer to an unanswered probe from the target;
every other datagram must be left to EchoCheck (None), so each deviation is tried here,
for IPv4 and IPv6, and each plain one is checked against EchoCheck's own verdict."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from mace_tools.echo_check import PLAIN, EchoCheck, PlainReply
from mace_tools.model import Probe
from mace_tools.pinger import _Probes
from mace_tools.probe.icmp import TAG_LEN, EchoTemplate, checksum, parse_ip_icmp
from mace_tools.probe.sockets import ipv4_header, ipv6_header

NONCE = bytes.fromhex("1122334455667788")
IDENT = 0x4D43
TARGETS = {4: "198.18.0.2", 6: "2001:2::2"}
OTHERS = {4: "198.18.0.6", 6: "2001:2::6"}
LOCAL = {4: "198.18.1.10", 6: "2001:2:0:1::10"}


def packed(family: int, address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, address)


def as_reply(request: bytes, family: int) -> bytes:
    """The echo reply to a request as the target sends it (IPv4: checksum redone)."""
    icmp = bytes([0 if family == 4 else 129]) + request[1:2] + b"\0\0" + request[4:]
    if family == 6:
        return icmp  # (the checksum is the kernel's to check; nothing here reads it)
    return icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]


def datagram(icmp: bytes, family: int, src: str | None = None, ttl: int = 61) -> bytes:
    """As our sockets hand a reply on: behind an IP header from src to us."""
    source, local = packed(family, src or TARGETS[family]), packed(family, LOCAL[family])
    if family == 4:
        return ipv4_header(20 + len(icmp), ttl, source, local) + icmp
    return ipv6_header(len(icmp), ttl, source, local) + icmp


class Run:
    """Probes 1..3 of 56 bytes sent; the recogniser and EchoCheck of that run."""

    def __init__(self, family: int, size: int = 56) -> None:
        self.family = family
        self.template = EchoTemplate(IDENT, NONCE, size, family=family)
        self.window = _Probes(numbered=True)
        for n in (1, 2, 3):
            self.window.add(n, Probe(n, 0, 0))
        plain = PlainReply.of_run(family, size, NONCE, packed(family, TARGETS[family]), None)
        assert plain is not None
        self.plain = plain
        self.check = EchoCheck(size)

    def reply(self, n: int, **changes: object) -> bytes:
        return datagram(as_reply(self.template.message(n), self.family), self.family,
                        **changes)  # type: ignore[arg-type]

    def judged(self, data: bytes) -> tuple[int, object] | None:
        parsed = parse_ip_icmp(data)
        assert parsed is not None
        return self.check.judge(parsed, NONCE, IDENT, self.window, self.template, 3)


@pytest.mark.parametrize("family", [4, 6])
def test_a_clean_answer_is_plain_and_agrees_with_echo_check(family: int) -> None:
    run = Run(family)
    data = run.reply(2, ttl=57)
    assert run.plain.key(data, run.window) == 2
    assert run.judged(data) == (2, PLAIN)
    parsed = parse_ip_icmp(data)
    assert parsed is not None
    assert (data[run.plain.ttl_at], run.plain.icmp_len) == (parsed.ttl, parsed.icmp_len) \
        == (57, 64)
    assert parsed.src == TARGETS[family]


def _flip(at: int) -> Callable[[bytes], bytes]:
    return lambda d: d[:at] + bytes([d[at] ^ 0x01]) + d[at + 1:]


# Each turns the plain reply to probe 2 into one PlainReply must leave to EchoCheck.
DEVIATIONS: dict[str, Callable[[bytes], bytes]] = {
    "cut by a byte": lambda d: d[:-1],
    "a byte longer": lambda d: d + b"\0",
    "nonce differs": lambda d: d[:-64 + 8] + bytes([d[-64 + 8] ^ 0xFF]) + d[-64 + 9:],
    "fill differs": lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]),
    "seq disagrees with the number": _flip(-64 + 7),
    "an echo request": lambda d: d[:-64] + bytes([8 if d[0] >> 4 == 4 else 128]) + d[-63:],
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("deviation", sorted(DEVIATIONS))
def test_any_deviation_is_left_to_echo_check(family: int, deviation: str) -> None:
    """(IPv4: the ICMP checksum made right again, so that check is not what rejects it)"""
    run = Run(family)
    changed = DEVIATIONS[deviation](run.reply(2))
    if family == 4:
        icmp = changed[20:22] + b"\0\0" + changed[24:]
        changed = changed[:22] + checksum(icmp).to_bytes(2, "big") + changed[24:]
        assert checksum(changed[20:]) == 0
    assert run.plain.key(changed, run.window) is None


@pytest.mark.parametrize("family", [4, 6])
def test_other_sources_answered_and_unknown_probes_are_not_plain(family: int) -> None:
    run = Run(family)
    assert run.plain.key(run.reply(2, src=OTHERS[family]), run.window) is None
    run.window.answered.add(2)
    assert run.plain.key(run.reply(2), run.window) is None  # a DUP: EchoCheck's
    assert run.plain.key(run.reply(4), run.window) is None  # not sent


def test_ipv4_bad_checksum_options_and_other_protocols_are_not_plain() -> None:
    run = Run(4)
    data = run.reply(1)
    assert run.plain.key(data, run.window) == 1
    bad = data[:22] + bytes([data[22] ^ 0x5A]) + data[23:]
    assert run.plain.key(bad, run.window) is None
    judged = run.judged(bad)
    assert judged is not None and judged[1].corrupted  # type: ignore[attr-defined]
    # an IHL of 6 (one word of options): the same bytes no longer sit where plain reads
    optioned = bytes([0x46]) + data[1:20] + b"\x01\x01\x01\x01" + data[20:]
    optioned = optioned[:2] + (len(optioned)).to_bytes(2, "big") + optioned[4:]
    assert run.plain.key(optioned, run.window) is None
    assert run.plain.key(data[:9] + b"\x11" + data[10:], run.window) is None  # UDP
    # a total length other than what was read (trailing bytes beyond the IP length)
    assert run.plain.key(data[:2] + (len(data) - 1).to_bytes(2, "big") + data[4:],
                         run.window) is None


def test_ipv6_other_next_header_or_payload_length_is_not_plain() -> None:
    run = Run(6)
    data = run.reply(1)
    assert run.plain.key(data, run.window) == 1
    assert run.plain.key(data[:6] + b"\x11" + data[7:], run.window) is None
    assert run.plain.key(data[:4] + (63).to_bytes(2, "big") + data[6:], run.window) is None


def test_probes_too_short_for_their_number_have_no_plain_replies() -> None:
    target = packed(4, TARGETS[4])
    assert PlainReply.of_run(4, TAG_LEN - 1, NONCE, target, None) is None
    assert PlainReply.of_run(4, TAG_LEN, NONCE, target, None) is not None
    assert PlainReply.of_run(4, 56, NONCE, None, None) is None  # no numeric target


def test_a_pattern_fill_is_what_plain_expects() -> None:
    pattern = b"\xab\x0c"
    template = EchoTemplate(IDENT, NONCE, 56, pattern)
    window = _Probes(numbered=True)
    window.add(1, Probe(1, 0, 0))
    plain = PlainReply.of_run(4, 56, NONCE, packed(4, TARGETS[4]), pattern)
    assert plain is not None
    data = datagram(as_reply(template.message(1), 4), 4)
    assert plain.key(data, window) == 1
    unpatterned = PlainReply.of_run(4, 56, NONCE, packed(4, TARGETS[4]), None)
    assert unpatterned is not None and unpatterned.key(data, window) is None
