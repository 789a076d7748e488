"""mace-ping without CAP_NET_RAW: ICMP datagram ("ping") sockets (probe/sockets.py).

Unit tests check that what a ping socket reads, rebuilt as the IPv4 datagram a raw socket
would have read, goes through the run's one parsing path (parse_ip_icmp, is_our_reply,
quoted_probe_seq). Lab tests run in a routed lab of their own (container -> host bridge
and NAT -> router -> target), with net.ipv4.ping_group_range set in the container's netns
only: the socket in that netns, and mace-ping there with no CAP_NET_RAW.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from unprivileged import with_capabilities

from mace_tools.lab.topology import BRIDGE_ADDR, Lab, ns_exec
from mace_tools.probe import netns
from mace_tools.probe.icmp import (
    ICMP_TIME_EXCEEDED,
    NONCE_LEN,
    TAG_LEN,
    build_echo_request,
    checksum,
    is_our_reply,
    parse_ip_icmp,
)
from mace_tools.probe.icmp_errors import error_text, quoted_probe_seq
from mace_tools.probe.sockets import (
    NOT_PERMITTED,
    PingSocket,
    QueuedError,
    error_datagram,
    reply_datagram,
)

NONCE = bytes.fromhex("a1b2c3d4e5f60718")
IDENT = 0x2A3B
TARGET, LOCAL, ROUTER = "198.18.0.6", "198.18.1.10", "198.18.1.1"
OPEN_RANGE, CLOSED_RANGE = "0 2147483647", "1 0"  # every group; none (a new netns' default)
REPO = Path(__file__).resolve().parents[1]
REPLY_LINE = re.compile(r"(\d+) bytes from ([\d.]+): icmp_seq=(\d+) ttl=(\d+) time=([\d.]+) ms"
                        r" corrected=(none|[\d.]+)")


def packed(address: str) -> bytes:
    return socket.inet_aton(address)


def as_reply(request: bytes) -> bytes:
    """The ICMP echo reply a target sends back for request (what a ping socket reads)."""
    body = b"\x00\x00\x00\x00" + request[4:]
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


# --- the datagrams a ping socket's messages are rebuilt into (no privilege) --------------

@pytest.mark.parametrize("size", [56, TAG_LEN, NONCE_LEN, 4, 0])
def test_a_rebuilt_reply_parses_as_a_raw_socket_datagram(size: int) -> None:
    icmp = as_reply(build_echo_request(IDENT, 7, NONCE, size))
    datagram = reply_datagram(icmp, packed(TARGET), packed(LOCAL), 62)
    assert checksum(datagram[:20]) == 0  # a valid IPv4 header
    parsed = parse_ip_icmp(datagram)
    assert parsed is not None
    assert (parsed.src, parsed.dst, parsed.ttl, parsed.icmp_len) == (TARGET, LOCAL, 62, 8 + size)
    assert (parsed.icmp_type, parsed.ident, parsed.seq) == (0, IDENT, 7)
    assert parsed.checksum_ok and is_our_reply(parsed, NONCE, IDENT, size)
    assert parsed.number == (7 if size >= TAG_LEN else None)
    if size < NONCE_LEN:  # too short for the nonce: matched by the (kernel's) ident only
        assert not is_our_reply(parsed, NONCE, IDENT ^ 1, size)


def time_exceeded(request: bytes) -> bytes:
    return error_datagram(QueuedError(ICMP_TIME_EXCEEDED, 0, 0, packed(ROUTER), 64),
                          packed(LOCAL), packed(TARGET), request)


def test_a_rebuilt_error_quotes_the_probe_as_a_router_does() -> None:
    request = build_echo_request(IDENT, 3, NONCE, 56)
    datagram = time_exceeded(request)
    assert checksum(datagram[:20]) == 0
    parsed = parse_ip_icmp(datagram)
    assert parsed is not None and parsed.checksum_ok
    assert (parsed.src, parsed.ttl, parsed.icmp_type, parsed.code) == (ROUTER, 64, 11, 0)
    assert error_text(parsed.icmp_type, parsed.code) == "Time to live exceeded"
    quote = parsed.quoted
    assert checksum(quote[:20]) == 0 and quote[20:] == request
    assert quoted_probe_seq(quote, IDENT, NONCE, TARGET) == 3
    # not ours: another run's nonce, or a probe to another target
    assert quoted_probe_seq(quote, IDENT, bytes(8), TARGET) is None
    assert quoted_probe_seq(quote, IDENT, NONCE, "198.18.0.99") is None


def test_an_error_quoting_only_the_header_matches_on_the_ident() -> None:
    """RFC 792 quotes 8 bytes of the probe: no nonce, so the socket's ident decides."""
    quote = parse_ip_icmp(time_exceeded(build_echo_request(IDENT, 9, NONCE, 56)[:8]))
    assert quote is not None and quote.checksum_ok
    assert quoted_probe_seq(quote.quoted, IDENT, NONCE, TARGET) == 9
    assert quoted_probe_seq(quote.quoted, IDENT ^ 1, NONCE, TARGET) is None


@pytest.mark.parametrize(("icmp_type", "code", "info", "word"), [
    (3, 4, 1400, 1400),  # fragmentation needed: the next-hop MTU in the low half
    (12, 0, 20, 20 << 24),  # parameter problem: the pointer in the first byte
    (3, 1, 0, 0),  # host unreachable: unused
])
def test_a_rebuilt_error_keeps_its_header_word(icmp_type: int, code: int, info: int,
                                               word: int) -> None:
    request = build_echo_request(IDENT, 1, NONCE, 56)
    datagram = error_datagram(QueuedError(icmp_type, code, info, packed(ROUTER), 63),
                              packed(LOCAL), packed(TARGET), request)
    parsed = parse_ip_icmp(datagram)
    assert parsed is not None and parsed.checksum_ok
    assert struct.unpack_from("!I", datagram, 24)[0] == word
    assert quoted_probe_seq(parsed.quoted, IDENT, NONCE, TARGET) == 1


# --- real ping sockets in a lab of our own (root, network namespaces) ---------------------

@pytest.fixture(scope="module")
def routed_lab() -> Iterator[Lab]:
    """Container c0 behind the host's bridge and NAT, one router, then the target
    (198.18.0.6): -t 1 from c0 is answered by the host's bridge (198.18.1.1)."""
    with Lab(prefix=f"mps{os.getpid() % 100000}", containers=1, routers=1) as lab:
        lab.warm_up()
        yield lab


def ping_group_range(lab: Lab, value: str) -> None:
    """Set in the container's netns (ours) only: the root namespace is never touched."""
    ns_exec(lab.container_ns(0), "sysctl", "-qw", f"net.ipv4.ping_group_range={value}")


def mace_ping(lab: Lab, *args: str, capabilities: tuple[str, ...]) \
        -> subprocess.CompletedProcess[str]:
    """mace-ping in the container's netns with only these capabilities (none: no
    CAP_NET_RAW, so no raw socket)."""
    cmd = ["ip", "netns", "exec", lab.container_ns(0), *with_capabilities(*capabilities),
           sys.executable, "-m", "mace_tools.cli.ping", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def replies(stdout: str) -> list[tuple[int, str, int, int, float, float | None]]:
    """(bytes, from, icmp_seq, ttl, raw ms, corrected ms or None) of each reply line."""
    out = []
    for line in stdout.splitlines():
        if m := REPLY_LINE.match(line):
            corrected = None if m[6] == "none" else float(m[6])
            out.append((int(m[1]), m[2], int(m[3]), int(m[4]), float(m[5]), corrected))
    return out


@pytest.mark.lab
def test_no_net_raw_measures_through_a_ping_socket_with_corrections(routed_lab: Lab) -> None:
    """CAP_BPF + CAP_PERFMON only: the probes leave a ping socket (no raw socket without
    CAP_NET_RAW) with their nonce and number, so the kernel still corrects every reply."""
    ping_group_range(routed_lab, OPEN_RANGE)
    proc = mace_ping(routed_lab, "-c", "3", "-i", "0.01", "-s", "56", routed_lab.target_addr,
                     capabilities=("bpf", "perfmon"))
    assert proc.returncode == 0, proc.stderr
    got = replies(proc.stdout)
    # TTL as the reply arrived: 64 from the target, minus the router and the host
    assert [r[:4] for r in got] == [(64, routed_lab.target_addr, n, 62) for n in (1, 2, 3)]
    for _, _, _, _, raw, corrected in got:
        assert corrected is not None and 0 < corrected < raw
    assert "3 packets transmitted, 3 received" in proc.stdout
    assert "kernel data 3/3 replies (100%)" in proc.stdout


@pytest.mark.lab
def test_no_capability_at_all_short_probes_match_on_the_kernels_ident(
        routed_lab: Lab) -> None:
    """-s 4 carries no nonce (nor loads any BPF): replies are told apart by the ICMP id,
    which on a ping socket is the kernel's, not the process id."""
    ping_group_range(routed_lab, OPEN_RANGE)
    proc = mace_ping(routed_lab, "-c", "3", "-i", "0.01", "-s", "4", routed_lab.target_addr,
                     capabilities=())
    assert proc.returncode == 0, proc.stderr
    assert [r[:4] for r in replies(proc.stdout)] == \
        [(12, routed_lab.target_addr, n, 62) for n in (1, 2, 3)]
    assert "3 packets transmitted, 3 received" in proc.stdout


@pytest.mark.lab
@pytest.mark.parametrize(("capabilities", "size"), [(("bpf", "perfmon"), "56"), ((), "4")])
def test_icmp_errors_through_a_ping_socket_are_worded_as_iputils(
        routed_lab: Lab, capabilities: tuple[str, ...], size: str) -> None:
    """-t 1: the host's bridge answers time exceeded; the error comes from the socket's
    error queue (with -s 4 the quote has no nonce: matched on the ident)."""
    ping_group_range(routed_lab, OPEN_RANGE)
    proc = mace_ping(routed_lab, "-c", "2", "-i", "0.01", "-t", "1", "-s", size,
                     routed_lab.target_addr, capabilities=capabilities)
    assert proc.returncode == 1, proc.stderr  # no reply, as iputils
    lines = proc.stdout.splitlines()
    for seq in (1, 2):
        assert f"From {BRIDGE_ADDR} icmp_seq={seq} Time to live exceeded" in lines
    assert "2 packets transmitted, 0 received, +2 errors" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.lab
@pytest.mark.parametrize("capabilities", [("bpf", "perfmon"), ()])
def test_no_net_raw_and_no_ping_group_is_one_line(routed_lab: Lab,
                                                  capabilities: tuple[str, ...]) -> None:
    ping_group_range(routed_lab, CLOSED_RANGE)
    proc = mace_ping(routed_lab, "-c", "1", routed_lab.target_addr, capabilities=capabilities)
    assert (proc.returncode, proc.stderr) == (2, f"mace-ping: {NOT_PERMITTED}\n")
    assert proc.stdout == ""


@pytest.fixture
def ping_socket_in_lab(routed_lab: Lab) -> Iterator[tuple[Lab, PingSocket]]:
    """A ping socket with TTL 1 made in the container's netns (this process enters it
    only to create the socket, as a run does)."""
    ping_group_range(routed_lab, OPEN_RANGE)
    with netns.entered(Path(routed_lab.netns_path(routed_lab.container_ns(0)))):
        sock = PingSocket(ttl=1)
    try:
        yield routed_lab, sock
    finally:
        sock.close()


def wait_for(sock: PingSocket, events: int, timeout_s: float = 5.0) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), events)
    assert poller.poll(timeout_s * 1000), "nothing came back"


def read_all(sock: PingSocket, count: int, timeout_s: float = 5.0) -> list[tuple[bytes, int]]:
    got: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        wait_for(sock, select.POLLIN | select.POLLERR, max(0.01, deadline - time.monotonic()))
        while (item := sock.recv()) is not None:
            got.append(item)
    return got


@pytest.mark.lab
def test_a_ping_socket_reports_errors_and_sends_on_after_one(
        ping_socket_in_lab: tuple[Lab, PingSocket]) -> None:
    """The kernel writes its own id into our request and keeps the payload; an ICMP error
    arrives as a raw socket would read it, with its kernel time; and the pending error it
    leaves on the socket does not cost the next probe (a bare sendto() would fail)."""
    lab, sock = ping_socket_in_lab
    target = lab.target_addr
    assert sock.ident == sock.sock.getsockname()[1]
    first = build_echo_request(sock.ident ^ 0x5555, 1, NONCE, 56)  # not the kernel's id
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    sock.sock.sendto(first, (target, 0))
    wait_for(sock, select.POLLERR)  # the error is queued: the socket's error is pending
    sock.send(build_echo_request(sock.ident, 2, NONCE, 56), (target, 0))
    errors = [(parse_ip_icmp(data), at) for data, at in read_all(sock, 2)]
    assert len(errors) == 2
    seqs = []
    for parsed, at in errors:
        assert parsed is not None and parsed.checksum_ok
        assert (parsed.src, parsed.icmp_type, parsed.code) == (BRIDGE_ADDR, 11, 0)
        assert before <= at <= time.clock_gettime_ns(time.CLOCK_REALTIME)
        quote = parsed.quoted
        assert int.from_bytes(quote[24:26], "big") == sock.ident  # the kernel's id
        assert quote[28:28 + NONCE_LEN] == NONCE  # the payload as we wrote it
        seqs.append(quoted_probe_seq(quote, sock.ident, NONCE, target))
    assert sorted(seqs) == [1, 2]
