"""The per-reply hot path of probe/: payload layout v2 (nonce + probe number), the
incremental checksum, matching that checks the nonce before the checksum, and the socket
filter that keeps other runs' echo replies out of Python.

The oracles are written here from the specs, not from the code: an RFC 1071 sum over
16-bit words, the payload layout as the module docstring states it, and a classic BPF
interpreter with the opcode values of linux/filter.h. The last test runs the filter in
the kernel, in a network namespace of its own.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mace_tools.probe.icmp as icmp_mod
from mace_tools.probe import netns, sockfilter
from mace_tools.probe.icmp import (
    TAG_LEN,
    EchoTemplate,
    build_echo_request,
    checksum,
    is_our_reply,
    parse_ip_icmp,
    reply_number,
)
from mace_tools.probe.sockets import IcmpSocket, read_datagram

NONCE = bytes.fromhex("0102030405060708")
OTHER = bytes.fromhex("f1f2f3f4f5f6f7f8")
EDGE_NUMBERS = [0, 1, 2, 255, 256, 0x7FFF, 0xFFFE, 0xFFFF, 0x10000, 0x10001, 0x1FFFF,
                0xFFFF0000, 0xFFFEFFFF, 2**32 - 2, 2**32 - 1]
HOTPATH = settings(max_examples=300, deadline=None, derandomize=True, database=None)


# --- oracles --------------------------------------------------------------------------

def ones_sum(data: bytes) -> int:
    """RFC 1071: ones' complement sum of 16-bit words (odd length: zero-padded)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def spec_payload(nonce: bytes, size: int, number: int) -> bytes:
    """Layout v2: nonce, then (size >= 12) the number as a big-endian u32, then byte
    i = i & 0xff counted from the payload start."""
    out = bytearray(i & 0xFF for i in range(size))
    out[:min(size, 8)] = nonce[:min(size, 8)]
    if size >= 12:
        out[8:12] = number.to_bytes(4, "big")
    return bytes(out)


def spec_request(ident: int, number: int, nonce: bytes, size: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, number & 0xFFFF) + \
        spec_payload(nonce, size, number)
    return body[:2] + struct.pack("!H", ~ones_sum(body) & 0xFFFF) + body[4:]


def ipv4(payload: bytes, options: bytes = b"", src: str = "198.18.0.2") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 1, 0, 64, 1, 0,
                       socket.inet_aton(src), socket.inet_aton("198.18.1.10")) + options + payload


def as_reply(request: bytes) -> bytes:
    body = b"\0\0\0\0" + request[4:]
    return body[:2] + struct.pack("!H", ~ones_sum(body) & 0xFFFF) + body[4:]


# --- payload layout v2 and the incremental checksum -------------------------------------

@pytest.mark.parametrize("size", [*range(17), 56, 1400])
def test_template_is_the_spec_for_edge_numbers(size: int) -> None:
    template = EchoTemplate(0xBEEF, NONCE, size)
    for number in EDGE_NUMBERS:
        msg = template.message(number)
        assert msg == spec_request(0xBEEF, number, NONCE, size), (size, number)
        assert msg == build_echo_request(0xBEEF, number, NONCE, size)
        assert ones_sum(msg) == 0xFFFF and checksum(msg) == 0


@HOTPATH
@given(ident=st.integers(0, 0xFFFF), nonce=st.binary(min_size=8, max_size=8),
       size=st.integers(0, 80), number=st.integers(0, 2**32 - 1))
def test_template_checksum_equals_full_checksum(ident: int, nonce: bytes, size: int,
                                                number: int) -> None:
    msg = EchoTemplate(ident, nonce, size).message(number)
    full = build_echo_request(ident, number, nonce, size)
    assert msg[2:4] == full[2:4]
    zeroed = msg[:2] + b"\0\0" + msg[4:]
    assert int.from_bytes(msg[2:4], "big") == checksum(zeroed) == ~ones_sum(zeroed) & 0xFFFF
    assert msg == spec_request(ident, number, nonce, size)


def test_seq_wraps_and_number_does_not() -> None:
    template = EchoTemplate(1, NONCE, 56)
    lap0, lap1 = template.message(5), template.message(5 + 0x10000)
    assert lap0[6:8] == lap1[6:8] == b"\0\x05"  # the same ICMP seq...
    assert reply_number(lap0[8:]) == 5 and reply_number(lap1[8:]) == 0x10005  # ...told apart


def test_message_accepts_a_seq_as_today() -> None:
    """pinger passes n & 0xffff for now: the number is then the seq itself."""
    template = EchoTemplate(7, NONCE, 56)
    for seq in range(0, 0x10000, 997):
        msg = template.message(seq)
        assert msg == build_echo_request(7, seq, NONCE, 56)
        assert int.from_bytes(msg[6:8], "big") == seq == reply_number(msg[8:])


@HOTPATH
@given(number=st.integers(0, 2**32 - 1), size=st.integers(0, 64), options=st.booleans())
def test_number_round_trips_through_a_reply(number: int, size: int, options: bool) -> None:
    reply = as_reply(EchoTemplate(3, NONCE, size).message(number))
    parsed = parse_ip_icmp(ipv4(reply, b"\x01\x01\x01\x00" if options else b""))
    assert parsed is not None and parsed.seq == number & 0xFFFF
    expected = number if size >= TAG_LEN else None
    assert reply_number(parsed.payload) == parsed.number == expected
    assert is_our_reply(parsed, NONCE, 3, size)


def test_reply_number_of_short_payloads() -> None:
    assert reply_number(b"") is None
    assert reply_number(NONCE + b"\0\0\1") is None  # 11 bytes: nonce and fill, no number
    assert reply_number(NONCE + b"\0\0\1\0") == 256


@HOTPATH
@given(data=st.binary(max_size=300))
def test_checksum_is_rfc1071(data: bytes) -> None:
    assert checksum(data) == ~ones_sum(data) & 0xFFFF


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\0", b"\xff", b"\xff\xff", b"\xff" * 7,
                                  b"\xff\xff\0\0", b"\0\x01" * 0x10001])
def test_checksum_edges(data: bytes) -> None:
    # sums of 0 and of 0xffff (ones' complement -0) are where a modulo shortcut goes wrong
    assert checksum(data) == ~ones_sum(data) & 0xFFFF


# --- matching: the nonce before the checksum ----------------------------------------------

class CountingChecksum:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> int:
        self.calls += 1
        return checksum(data)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> CountingChecksum:
    counter = CountingChecksum()
    monkeypatch.setattr(icmp_mod, "checksum", counter)
    return counter


def test_foreign_reply_costs_no_checksum(counted: CountingChecksum) -> None:
    datagram = ipv4(as_reply(spec_request(9, 1, OTHER, 56)))
    foreign = parse_ip_icmp(datagram)
    assert foreign is not None and counted.calls == 0  # parsing computes none
    assert not is_our_reply(foreign, NONCE, 9, 56)
    assert counted.calls == 0


def test_our_reply_is_checksummed_after_the_nonce(counted: CountingChecksum) -> None:
    good = parse_ip_icmp(ipv4(as_reply(spec_request(9, 1, NONCE, 56))))
    assert good is not None and is_our_reply(good, NONCE, 9, 56) and counted.calls == 1
    bad = bytearray(as_reply(spec_request(9, 1, NONCE, 56)))
    bad[40] ^= 0x55  # in the fill: the nonce still matches, the checksum does not
    parsed = parse_ip_icmp(ipv4(bytes(bad)))
    assert parsed is not None and not is_our_reply(parsed, NONCE, 9, 56)
    assert counted.calls == 2 and not parsed.checksum_ok


def test_parse_keeps_its_own_copy_of_a_buffer() -> None:
    buf = bytearray(ipv4(as_reply(build_echo_request(9, 4, NONCE, 56))))
    parsed = parse_ip_icmp(memoryview(buf))
    buf[:] = bytes(len(buf))  # the next read into a reused buffer
    assert parsed is not None and parsed.seq == 4 and parsed.src == "198.18.0.2"
    assert parsed.payload[:8] == NONCE and parsed.checksum_ok


def test_trailing_bytes_beyond_the_ip_length_are_ignored() -> None:
    datagram = ipv4(as_reply(build_echo_request(9, 4, NONCE, 56))) + b"\xaa" * 6
    parsed = parse_ip_icmp(datagram)
    assert parsed is not None and parsed.icmp_len == 64 and parsed.checksum_ok
    assert parsed.payload.endswith(bytes(range(48, 56)))


# --- reading a datagram -----------------------------------------------------------------

def test_read_datagram_returns_the_datagram_and_its_kernel_time() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        assert read_datagram(b) is None  # nothing waits: None, not an exception
        b.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
        big = os.urandom(60000)
        for data in (b"first", big, b""):
            before = time.clock_gettime_ns(time.CLOCK_REALTIME)
            a.send(data)
            got = read_datagram(b)
            assert got is not None and got[0] == data and isinstance(got[0], bytes)
            assert before <= got[1] <= time.clock_gettime_ns(time.CLOCK_REALTIME)


# --- the socket filter, in an interpreter --------------------------------------------------

def run_cbpf(program: bytes, packet: bytes) -> int:
    """A classic BPF interpreter for the loads, jumps and returns a packet filter uses;
    opcode values from linux/filter.h. A load past the packet's end returns 0 (drop)."""
    insns = [struct.unpack_from("=HBBI", program, at) for at in range(0, len(program), 8)]
    a = x = pc = 0
    sizes = {0x00: 4, 0x08: 2, 0x10: 1}  # BPF_W, BPF_H, BPF_B
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x01:  # ldx #k
            x = k
        elif code == 0xB1:  # ldxb 4*([k]&0xf)
            if k >= len(packet):
                return 0
            x = 4 * (packet[k] & 0x0F)
        elif code in (0x20, 0x28, 0x30, 0x40, 0x48, 0x50):  # ld{,h,b} [k] / [x+k]
            at, size = (k if code & 0xE0 == 0x20 else x + k), sizes[code & 0x18]
            if at + size > len(packet):
                return 0
            a = int.from_bytes(packet[at:at + size], "big")
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x05:  # ja
            pc += k
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not expected in this filter")


def spec_verdict(packet: bytes, nonce: bytes | None, ident: int | None = None) -> bool:
    ihl = 4 * (packet[0] & 0x0F) if packet else 0
    if not packet or len(packet) <= ihl:
        return False
    icmp_type = packet[ihl]
    if icmp_type in (3, 4, 5, 11, 12):
        return True
    if icmp_type != 0:
        return False
    if nonce is not None and ident is not None:  # our id passes (a reply not echoed)
        if len(packet) < ihl + 6:
            return False  # (the id's load fails: the kernel drops it)
        if int.from_bytes(packet[ihl + 4:ihl + 6], "big") == ident:
            return True
    return nonce is None or packet[ihl + 8:ihl + 16] == nonce


def test_filter_program_encoding() -> None:
    """The instructions the kernel gets, as `tcpdump -dd` would print them."""
    got = [tuple(i) for i in sockfilter.reply_filter(NONCE)]
    assert got == [
        (0xB1, 0, 0, 0), (0x50, 0, 0, 0),
        (0x15, 5, 0, 0), (0x15, 8, 0, 3), (0x15, 7, 0, 4), (0x15, 6, 0, 5), (0x15, 5, 0, 11),
        (0x15, 4, 5, 12),
        (0x40, 0, 0, 8), (0x15, 0, 3, 0x01020304), (0x40, 0, 0, 12), (0x15, 0, 1, 0x05060708),
        (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0),
    ]
    assert len(sockfilter.encode(sockfilter.reply_filter(None))) == 8 * 10
    with pytest.raises(ValueError):
        sockfilter.reply_filter(b"short")


@st.composite
def icmp_packets(draw: st.DrawFn) -> bytes:
    options = bytes(4 * draw(st.integers(0, 10)))
    icmp_type = draw(st.sampled_from([0, 0, 0, 3, 4, 5, 8, 11, 12, 13, 14, 255]))
    nonce = draw(st.sampled_from([NONCE, OTHER, NONCE[:7] + b"\0", b""]))
    body = bytes([icmp_type, 0]) + bytes(6) + nonce + draw(st.binary(max_size=24))
    packet = ipv4(body, options)
    return packet[:draw(st.integers(0, len(packet)))] if draw(st.booleans()) else packet


@HOTPATH
@given(packet=icmp_packets(), with_nonce=st.booleans(),
       ident=st.sampled_from([None, 0, 0x1234]))
def test_filter_verdict_is_the_spec(packet: bytes, with_nonce: bool, ident: int | None) -> None:
    nonce = NONCE if with_nonce else None
    program = sockfilter.encode(sockfilter.reply_filter(nonce, ident))
    assert (run_cbpf(program, packet) != 0) == spec_verdict(packet, nonce, ident)


def test_filter_passes_a_reply_with_our_id_that_did_not_echo_the_payload() -> None:
    program = sockfilter.encode(sockfilter.reply_filter(NONCE, 0x1234))
    cut = as_reply(EchoTemplate(0x1234, NONCE, 56).message(3))[:8]  # header only
    assert run_cbpf(program, ipv4(cut))
    other = as_reply(EchoTemplate(0x4321, NONCE, 56).message(3))[:8]
    assert not run_cbpf(program, ipv4(other))


def test_filter_verdicts_on_real_probes() -> None:
    program = sockfilter.encode(sockfilter.reply_filter(NONCE))
    rr = bytes([7, 11, 4]) + bytes(9)  # record route, as an echoed reply may carry
    for options in (b"", rr):
        ours = ipv4(as_reply(EchoTemplate(1, NONCE, 56).message(70000)), options)
        theirs = ipv4(as_reply(EchoTemplate(1, OTHER, 56).message(3)), options)
        request = ipv4(EchoTemplate(1, NONCE, 56).message(3), options)
        error = ipv4(bytes([11, 0, 0, 0, 0, 0, 0, 0]) + request)
        assert run_cbpf(program, ours) and run_cbpf(program, error)
        assert not run_cbpf(program, theirs) and not run_cbpf(program, request)
        assert not run_cbpf(program, ipv4(as_reply(EchoTemplate(1, NONCE, 4).message(3))))


# --- the socket filter, in the kernel -------------------------------------------------------

@pytest.fixture
def scratch_netns() -> Iterator[tuple[Path, str]]:
    """A network namespace of this test's own, lo up with a 198.18 address; removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and raw sockets)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip")
    name, addr = f"mace-hp-{os.getpid()}", f"198.18.{os.getpid() % 250 + 1}.{7}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{addr}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
        yield Path("/run/netns") / name, addr
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def raw_icmp(options: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    if options:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, options)
    return sock


def read_all(sock: IcmpSocket | socket.socket, until: int, deadline: float) -> list[bytes]:
    """Datagrams read until `until` have come or the deadline passed (then what came)."""
    recv = sock.recv if isinstance(sock, IcmpSocket) else lambda: read_datagram(sock)
    got: list[bytes] = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while len(got) < until and time.monotonic() < deadline:
        poller.poll(50)
        while (item := recv()) is not None:
            got.append(item[0])
    return got


@pytest.mark.lab
def test_kernel_filter_keeps_foreign_echo_replies_out(scratch_netns: tuple[Path, str]) -> None:
    """Our replies (with IP options or not) and an ICMP error reach the filtered socket; a
    second sender's replies with another nonce do not, though an unfiltered socket beside it
    gets every one (so the silence is the filter's doing). A filter without a nonce passes
    every echo reply; the filter itself drops echo requests (which ICMP_FILTER would too)."""
    path, addr = scratch_netns
    rr = bytes([7, 11, 4]) + bytes(9)  # record route: the reply echoes it (IHL 8)
    count = 12
    with netns.entered(path):
        ours, control, typed = IcmpSocket(), IcmpSocket(), IcmpSocket()
        plain = raw_icmp()  # no ICMP_FILTER: only the BPF filter decides
        senders = {NONCE: [raw_icmp(), raw_icmp(rr)], OTHER: [raw_icmp(), raw_icmp(rr)]}
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ours.filter_replies(NONCE)
        typed.filter_replies(None)
        sockfilter.attach(plain, sockfilter.reply_filter(NONCE))
        for nonce, (bare, optioned) in senders.items():
            template = EchoTemplate(0x4D48, nonce, 56)
            for number in range(0x10000 - count // 2, 0x10000 + count // 2):  # across a wrap
                (optioned if number % 2 else bare).sendto(template.message(number), (addr, 0))
        udp.sendto(b"x", (addr, 9))  # discard port, closed: port unreachable comes back
        deadline = time.monotonic() + 10
        everything = read_all(control, 2 * count + 1, deadline)
        assert len(everything) == 2 * count + 1, "the control socket missed datagrams"
        # a last probe of ours, sent after every foreign reply was delivered: once it is
        # read, nothing foreign can still be on its way to the filtered sockets
        senders[NONCE][0].sendto(EchoTemplate(0x4D48, NONCE, 56).message(1), (addr, 0))
        got = read_all(ours, count + 2, deadline)
        from_plain = read_all(plain, count + 2, deadline)
        from_typed = read_all(typed, 2 * count + 2, deadline)
    finally:
        for sock in (ours, control, typed):
            sock.close()
        for sock in (plain, udp, *senders[NONCE], *senders[OTHER]):
            sock.close()
    parsed = [parse_ip_icmp(d) for d in got]
    assert all(p is not None for p in parsed)
    replies = [p for p in parsed if p is not None and p.icmp_type == 0]
    errors = [p for p in parsed if p is not None and p.icmp_type == 3]
    assert len(replies) == count + 1 and len(errors) == 1 and len(parsed) == count + 2
    assert all(is_our_reply(p, NONCE, 0, 56) for p in replies)
    assert sorted(p.number or 0 for p in replies) == \
        [1, *range(0x10000 - count // 2, 0x10000 + count // 2)]
    assert {p.icmp_len for p in replies} == {64}
    ihls = {d[0] & 0x0F for d, p in zip(got, parsed, strict=True) if p and p.icmp_type == 0}
    assert ihls == {5, 8}  # with record route echoed, the filter found the ICMP header too
    assert sorted(from_plain) == sorted(got)  # no echo request, no foreign reply either
    assert len(from_typed) == 2 * count + 2  # no nonce: every reply and the error


def test_the_run_judges_a_foreign_reply_without_a_checksum(counted: CountingChecksum) -> None:
    """The receive path's own check (echo_check.EchoCheck.judge, not is_our_reply): a
    foreign echo reply is turned away on its nonce, before any checksum; ours is
    checksummed once."""
    from mace_tools.echo_check import EchoCheck
    from mace_tools.model import Probe
    from mace_tools.pinger import _Probes

    window = _Probes(numbered=True)
    window.add(1, Probe(1, 0, 0))
    template = EchoTemplate(9, NONCE, 56)
    check = EchoCheck(56)
    foreign = parse_ip_icmp(ipv4(as_reply(spec_request(9, 1, OTHER, 56))))
    ours = parse_ip_icmp(ipv4(as_reply(template.message(1))))
    assert foreign is not None and ours is not None
    counted.calls = 0  # (building the probes summed them)
    assert check.judge(foreign, NONCE, 9, window, template, 1) is None
    assert counted.calls == 0
    judged = check.judge(ours, NONCE, 9, window, template, 1)
    assert judged is not None and judged[0] == 1 and not judged[1].corrupted
    assert counted.calls == 1
