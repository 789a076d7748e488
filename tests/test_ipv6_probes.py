"""ICMPv6 probes without a lab: the echo template, the datagrams our IPv6 sockets hand on
(a fixed IPv6 header built around what the kernel read), ICMPv6 errors and their quotes,
the socket filter, and the BPF programs' reading of IPv6 (extension headers skipped)."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_probe_hotpath import run_cbpf

from mace_tools.kernel.backend import Backend
from mace_tools.model import Hook, KernelEvent, Packet
from mace_tools.probe import netns, sockfilter
from mace_tools.probe.icmp import (
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    EchoTemplate,
    ParsedIcmp6,
    build_echo_request,
    is_our_reply,
    parse_ip_icmp,
)
from mace_tools.probe.icmp_errors import error_text, quoted_probe_seq
from mace_tools.probe.sockets import (
    Icmp6Socket,
    QueuedError,
    error_datagram6,
    ipv6_header,
    reply_datagram,
)

NONCE = bytes.fromhex("a1b2c3d4e5f60718")
OTHER = bytes.fromhex("0102030405060708")
IDENT = 0x2A3B
TARGET, LOCAL, ROUTER = "2001:2::2", "2001:2:0:1::a", "2001:2:0:1::1"


def packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


def as_reply(request: bytes) -> bytes:
    """The ICMPv6 echo reply for request (its checksum is the kernel's business)."""
    return bytes([ICMP6_ECHO_REPLY, 0, 0, 0]) + request[4:]


@pytest.mark.parametrize("size", [56, 12, 8, 0])
def test_template_builds_icmpv6_echo_requests(size: int) -> None:
    template = EchoTemplate(IDENT, NONCE, size, family=6)
    for number in (1, 2, 0xFFFF, 0x10000, 2**32 - 1):
        message = template.message(number)
        assert message == build_echo_request(IDENT, number, NONCE, size,
                                             echo_type=ICMP6_ECHO_REQUEST)
        assert message[0] == ICMP6_ECHO_REQUEST and len(message) == 8 + size


@pytest.mark.parametrize("size", [56, 12, 4])
def test_a_reply_parses_behind_the_header_our_sockets_build(size: int) -> None:
    icmp = as_reply(build_echo_request(IDENT, 7, NONCE, size, echo_type=ICMP6_ECHO_REQUEST))
    datagram = reply_datagram(icmp, packed(TARGET), packed(LOCAL), 61)
    parsed = parse_ip_icmp(datagram)
    assert isinstance(parsed, ParsedIcmp6)
    assert (parsed.family, parsed.src, parsed.dst, parsed.ttl, parsed.icmp_len) == \
        (6, TARGET, LOCAL, 61, 8 + size)
    assert (parsed.icmp_type, parsed.ident, parsed.seq) == (ICMP6_ECHO_REPLY, IDENT, 7)
    assert is_our_reply(parsed, NONCE, IDENT, size)
    assert not is_our_reply(parsed, OTHER, IDENT ^ 1, size)
    assert parsed.number == (7 if size >= 12 else None)


def test_an_icmpv4_echo_reply_type_is_no_icmpv6_reply() -> None:
    """Type 0 is an ICMPv4 echo reply, not an ICMPv6 one: never taken for ours."""
    icmp = bytes([0, 0, 0, 0]) + build_echo_request(IDENT, 1, NONCE, 56)[4:]
    parsed = parse_ip_icmp(reply_datagram(icmp, packed(TARGET), packed(LOCAL), 64))
    assert parsed is not None and not is_our_reply(parsed, NONCE, IDENT, 56)


def test_malformed_ipv6_never_raises() -> None:
    good = reply_datagram(as_reply(build_echo_request(IDENT, 1, NONCE, 56, echo_type=128)),
                          packed(TARGET), packed(LOCAL), 64)
    for cut in range(len(good)):
        parse_ip_icmp(good[:cut])  # None or a shorter message, never an exception
    assert parse_ip_icmp(good[:47]) is None  # no whole ICMPv6 header
    assert parse_ip_icmp(good[:6] + b"\x11" + good[7:]) is None  # UDP, not ICMPv6
    longer = parse_ip_icmp(good + b"trailing")
    assert longer is not None and longer.icmp_len == 64  # the payload length bounds it


def error(icmp_type: int, code: int, info: int, request: bytes,
          target: str = TARGET) -> ParsedIcmp6:
    datagram = error_datagram6(QueuedError(icmp_type, code, info, packed(ROUTER), 63),
                               packed(LOCAL), packed(target), request)
    parsed = parse_ip_icmp(datagram)
    assert isinstance(parsed, ParsedIcmp6)
    return parsed


def test_an_error_quotes_the_probe_and_matches_it() -> None:
    request = build_echo_request(IDENT, 3, NONCE, 56, echo_type=ICMP6_ECHO_REQUEST)
    parsed = error(3, 0, 0, request)
    assert (parsed.src, parsed.ttl, parsed.icmp_type, parsed.code) == (ROUTER, 63, 3, 0)
    assert quoted_probe_seq(parsed.quoted, IDENT, NONCE, TARGET) == 3
    assert quoted_probe_seq(parsed.quoted, IDENT, OTHER, TARGET) is None
    assert quoted_probe_seq(parsed.quoted, IDENT, NONCE, "2001:2::99") is None
    assert quoted_probe_seq(parsed.quoted, IDENT, NONCE, "198.18.0.2") is None
    # an ICMPv4 echo request type in an IPv6 quote is not our probe
    v4type = bytes([8]) + request[1:]
    assert quoted_probe_seq(error(3, 0, 0, v4type).quoted, IDENT, NONCE, TARGET) is None


def test_a_quote_through_a_fragment_header() -> None:
    """A fragmented probe's first fragment is quoted behind its fragment header; a later
    fragment has no ICMPv6 header to match."""
    request = build_echo_request(IDENT, 5, NONCE, 56, echo_type=ICMP6_ECHO_REQUEST)
    quote = error(3, 0, 0, request).quoted
    first = quote[:6] + b"\x2c" + quote[7:40] + bytes([58, 0, 0, 1]) + bytes(4) + quote[40:]
    later = first[:42] + b"\x05\x01" + first[44:]  # offset 160 bytes
    assert quoted_probe_seq(first, IDENT, NONCE, TARGET) == 5
    assert quoted_probe_seq(later, IDENT, NONCE, TARGET) is None


@pytest.mark.parametrize(("icmp_type", "code", "info", "text"), [
    (1, 0, 0, "Destination unreachable: No route"),
    (1, 3, 0, "Destination unreachable: Address unreachable"),
    (1, 4, 0, "Destination unreachable: Port unreachable"),
    (1, 9, 0, "Destination unreachable: Unknown code 9"),
    (2, 0, 1280, "Packet too big: mtu=1280"),
    (3, 0, 0, "Time exceeded: Hop limit"),
    (3, 1, 0, "Time exceeded: Defragmentation failure"),
    (4, 1, 40, "Parameter problem: Unknown header at 40"),
    (4, 7, 8, "Parameter problem: code 7 at 8"),
])
def test_errors_are_worded_as_iputils_ping6(icmp_type: int, code: int, info: int,
                                            text: str) -> None:
    request = build_echo_request(IDENT, 1, NONCE, 56, echo_type=ICMP6_ECHO_REQUEST)
    parsed = error(icmp_type, code, info, request)
    assert parsed.info == info  # the MTU / pointer survives the rebuilt header
    assert error_text(parsed.icmp_type, parsed.code, parsed.info, family=6) == text


def test_filter_verdicts_on_icmpv6_messages() -> None:
    """The filter sees a raw ICMPv6 socket's message from its ICMPv6 header on."""
    program = sockfilter.encode(sockfilter.reply_filter(NONCE, family=6))
    ours = as_reply(EchoTemplate(1, NONCE, 56, family=6).message(9))
    theirs = as_reply(EchoTemplate(1, OTHER, 56, family=6).message(9))
    request = EchoTemplate(1, NONCE, 56, family=6).message(9)
    errors = [bytes([t, 0, 0, 0, 0, 0, 0, 0]) + ipv6_header(64, 0, packed(LOCAL),
                                                             packed(TARGET)) + request
              for t in (1, 2, 3, 4)]
    assert run_cbpf(program, ours) and all(run_cbpf(program, e) for e in errors)
    assert not run_cbpf(program, theirs) and not run_cbpf(program, request)
    assert not run_cbpf(program, bytes([135]) + bytes(23))  # neighbour solicitation
    assert not run_cbpf(program, bytes([0]) + ours[1:])  # an ICMPv4 reply's type
    no_nonce = sockfilter.encode(sockfilter.reply_filter(None, family=6))
    assert run_cbpf(no_nonce, theirs) and not run_cbpf(no_nonce, request)


# --- in the kernel: a network namespace of this test's own, lo only ----------------------

@pytest.fixture
def scratch_netns6() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and raw sockets)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip")
    name = f"mace-v6-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def read_all(sock: Icmp6Socket, until: int, timeout_s: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while len(got) < until and time.monotonic() < deadline:
        poller.poll(50)
        while (item := sock.recv()) is not None:
            got.append(item[0])
    return got


@pytest.mark.lab
def test_raw_icmpv6_socket_filters_and_reads_replies(scratch_netns6: Path) -> None:
    """Our replies (hop limit and sender from the kernel) and a port unreachable reach the
    filtered socket; another nonce's replies and our own requests do not."""
    with netns.entered(scratch_netns6):
        ours, sender = Icmp6Socket(ttl=7), Icmp6Socket()
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        ours.filter_replies(NONCE)
        for nonce in (OTHER, NONCE):
            for number in (1, 2, 3):
                (ours if nonce == NONCE else sender).send(
                    EchoTemplate(IDENT, nonce, 56, family=6).message(number), ("::1", 0, 0, 0))
        udp.sendto(b"x", ("::1", 9))  # nobody listens: port unreachable comes back
        got = [parse_ip_icmp(d) for d in read_all(ours, 4)]
        time.sleep(0.2)
        got += [parse_ip_icmp(d) for d in read_all(ours, 1, 0.2)]
    finally:
        for sock in (ours, sender):
            sock.close()
        udp.close()
    replies = [p for p in got if p is not None and p.icmp_type == ICMP6_ECHO_REPLY]
    errors = [p for p in got if p is not None and p.icmp_type == 1]
    assert len(got) == 4 and len(replies) == 3 and len(errors) == 1
    assert all(is_our_reply(p, NONCE, IDENT, 56) for p in replies)
    assert [p.number for p in replies] == [1, 2, 3]
    assert {(p.src, p.ttl) for p in replies} == {("::1", 64)}  # the kernel's hop limit
    assert errors[0].code == 4  # port unreachable


DSTOPTS = 59  # IPV6_DSTOPTS (linux/in6.h): a destination options header on what we send
_PADN_HEADER = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # next header (kernel's), len 0, PadN(4)


@pytest.mark.lab
@pytest.mark.parametrize("extension", [False, True])
def test_kernel_reads_probes_behind_extension_headers(scratch_netns6: Path,
                                                      extension: bool) -> None:
    """An echo request behind a destination options header is still found (its nonce and
    number are read after the header) and followed through to its reply's record."""
    nonce = os.urandom(8)
    events: list[KernelEvent] = []
    records = []
    with netns.entered(scratch_netns6):
        backend = Backend(nonce, records=True, path=True)
        backend.open()
        sock = Icmp6Socket()
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x86DD))
    try:
        wire.bind(("lo", 0x86DD))
        wire.settimeout(5)
        if extension:
            sock.sock.setsockopt(socket.IPPROTO_IPV6, DSTOPTS, _PADN_HEADER)
        for number in (1, 2, 3):
            sock.send(EchoTemplate(IDENT, nonce, 56, family=6).message(number), ("::1", 0, 0, 0))
        assert len(read_all(sock, 3)) == 3
        backend.drain(events.append, records.append)
        first = wire.recv(2048)  # the first request as it crossed lo
    finally:
        sock.close()
        wire.close()
        backend.close()
    assert first[6] == (60 if extension else 58)  # the header is really there (or not)
    requests = [e for e in events if e.packet is Packet.REQUEST and e.hook is Hook.XMIT]
    assert sorted(e.seq for e in requests) == [1, 2, 3]
    assert {(e.src, e.dst, e.proto, e.icmp_type) for e in requests} == {("::1", "::1", 58, 128)}
    assert sorted(r.number for r in records) == [1, 2, 3]
    assert all(r.departed_ns and r.returned_ns >= r.departed_ns for r in records)


def _events(scratch: Path, send: Callable[[bytes], None], **switches: bool) -> list[KernelEvent]:
    """The path events of a traceroute-style run (path, plus the given matches) while
    send(nonce) puts probes on lo of the scratch netns."""
    nonce = os.urandom(8)
    events: list[KernelEvent] = []
    with netns.entered(scratch):
        backend = Backend(nonce, path=True, errors=True, **switches)
        backend.open()
    try:
        with netns.entered(scratch):
            send(nonce)
        time.sleep(0.3)  # the answers come back through lo at once; leave them time
        backend.drain(events.append)
    finally:
        backend.close()
    return events


def _answered(events: list[KernelEvent]) -> dict[int, set[tuple[int, int]]]:
    """probe number -> {(proto, icmp_type)} of the answers the kernel matched to it."""
    out: dict[int, set[tuple[int, int]]] = {}
    for e in events:
        if e.packet is Packet.REPLY:
            out.setdefault(e.seq, set()).add((e.proto, e.icmp_type))
    return out


@pytest.mark.lab
def test_kernel_matches_udp_probes_to_the_icmpv6_errors_quoting_them(
        scratch_netns6: Path) -> None:
    """UDP probes (payload: nonce, then the probe number) to a closed port: each port
    unreachable quotes its probe, and the kernel keys it back to that probe."""
    def send(nonce: bytes) -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            for number in (7, 8, 9):
                udp.sendto(nonce + struct.pack("!H", number) + bytes(6), ("::1", 33434))

    events = _events(scratch_netns6, send, udp=True)
    requests = {e.seq for e in events if e.packet is Packet.REQUEST and e.proto == 17}
    assert requests == {7, 8, 9}
    assert _answered(events) == {n: {(58, 1)} for n in (7, 8, 9)}  # ICMPv6 unreachable


@pytest.mark.lab
def test_kernel_matches_tcp_syns_to_their_resets_over_ipv6(scratch_netns6: Path) -> None:
    """TCP SYNs carrying the nonce to a closed port: the RST acks seq + 1 + payload length,
    which the kernel learned from the SYN (addresses and ports swapped)."""
    def send(nonce: bytes) -> None:
        raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
        with raw:
            raw.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)  # the kernel sums it
            for number in (3, 4):
                payload = nonce + struct.pack("!H", number)
                header = struct.pack("!HHIIBBHHH", 40000 + number, 80, 1000 * number, 0,
                                     5 << 4, 0x02, 65535, 0, 0)
                raw.sendto(header + payload, ("::1", 0))

    events = _events(scratch_netns6, send, tcp=True)
    requests = {e.seq for e in events if e.packet is Packet.REQUEST and e.proto == 6}
    assert requests == {3, 4}
    assert _answered(events) == {3: {(6, 0)}, 4: {(6, 0)}}


IPV6_CHECKSUM = 7  # linux/in6.h: the offset of the checksum the kernel computes
