"""mace-traceroute without CAP_NET_RAW: UDP and ping sockets reading ICMP errors from their
error queue (probe/tracesockets.py), as Linux traceroute does unprivileged.

A UDP socket's probe must leave as the raw path builds it (same ports, the same full
checksum: --paris identifies probes by it), and what the socket reads must reach the run
as the raw ICMP socket's datagram would: checked against a raw socket reading the same
answer, on loopback in a netns of our own. Lab tests run mace-traceroute inside the
container netns of a routed lab of their own (host bridge and NAT -> r1 -> r2 -> target),
with only CAP_BPF + CAP_PERFMON (or nothing), net.ipv4.ping_group_range opened in that
netns only, and compare its hops with the raw path's.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from accuracy import assert_covered
from unprivileged import with_capabilities

from mace_tools.lab.topology import Lab, add_namespace, cleanup_prefix, ns_exec
from mace_tools.probe import netns
from mace_tools.probe.sockets import NOT_PERMITTED, read_datagram
from mace_tools.probe.trace import UDP, ProbeFactory, parse_answer
from mace_tools.probe.tracesockets import SentHeaders, UdpSocket

NONCE = bytes.fromhex("0badc0ffee15900d")
REPO = Path(__file__).resolve().parents[1]
PREFIX = f"mtu{os.getpid() % 100000}"


def factory(paris: bool, src: str = "127.0.0.1", dst: str = "127.0.0.1",
            sport: int = 40000) -> ProbeFactory:
    return ProbeFactory(UDP, NONCE, src, dst, 60, 33434, sport, 0, paris)


# --- which probe a quoted payload belongs to (no privilege) -------------------------------

def test_headers_are_found_by_the_quoted_tag_else_by_a_port_only_one_probe_used() -> None:
    f = factory(paris=False)
    sent = SentHeaders()
    probes = [f.build(n) for n in (1, 2, 3)]
    for p in probes:
        sent.add(p.message)
    for p in probes:
        payload = p.message[8:]
        assert sent.find(payload, 0) == p.quote_key  # the whole payload quoted
        assert sent.find(payload[:10], 0) == p.quote_key  # just the tag
        port = int.from_bytes(p.quote_key[2:4], "big")
        assert sent.find(b"", port) == p.quote_key  # RFC 792: no payload quoted
    assert sent.find(NONCE + b"\x00\x09", 0) is None  # no such probe
    assert sent.find(b"", 1) is None


def test_paris_probes_share_a_port_so_only_the_tag_tells_them_apart() -> None:
    f = factory(paris=True)
    sent = SentHeaders()
    one, two = f.build(1), f.build(2)
    sent.add(one.message)
    sent.add(two.message)
    assert one.quote_key[:4] == two.quote_key[:4]  # one flow
    assert sent.find(two.message[8:], 0) == two.quote_key
    assert sent.find(b"", 33434) is None  # ambiguous: never a guess


# --- a real UDP socket on loopback, in a netns of our own (root) --------------------------

@pytest.fixture(scope="module")
def loopback_ns() -> Iterator[Path]:
    ns = f"{PREFIX}-lo"
    cleanup_prefix(PREFIX)
    try:
        add_namespace(ns)
        yield Path(Lab.netns_path(ns))
    finally:
        cleanup_prefix(PREFIX)


def wait_readable(fd: int, timeout_s: float = 5.0) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR)
    assert poller.poll(timeout_s * 1000), "nothing came back"


@pytest.mark.lab
@pytest.mark.parametrize("paris", [False, True])
def test_a_udp_socket_probe_is_answered_as_the_raw_path_sees_it(loopback_ns: Path,
                                                                paris: bool) -> None:
    """Port unreachable from 127.0.0.1 (nothing listens in a new netns): the real error, as
    a raw ICMP socket reads it, quotes the header the raw path would have sent (the
    kernel's checksum is computed in full, not left to lo's offload), and the UDP socket
    gives the run the same answer."""
    with netns.entered(loopback_ns):
        udp = UdpSocket(40000)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        raw.setblocking(False)
        f = factory(paris, sport=udp.sport)
        for number in (1, 2):
            probe = f.build(number)
            udp.send(probe.message, "127.0.0.1", 64)
            wait_readable(raw.fileno())
            seen = read_datagram(raw)
            assert seen is not None
            truth = parse_answer(seen[0], f)
            wait_readable(udp.fileno())
            got = udp.recv()
            assert got is not None and udp.recv() is None
            answer = parse_answer(got[0], f)
            assert truth is not None and answer is not None
            assert truth.quote_key == answer.quote_key == probe.quote_key
            assert answer == truth  # source, TTL, type, code, size, reached
            assert answer.reached and answer.icmp_type == 3 and answer.icmp_code == 3
            assert abs(got[1] - seen[1]) < 1_000_000  # the same arrival, kernel-stamped
            if paris:
                assert int.from_bytes(probe.quote_key[6:8], "big") == 0x8000 + number
    finally:
        udp.close()
        raw.close()


@pytest.mark.lab
def test_a_pending_icmp_error_does_not_cost_the_next_probe(loopback_ns: Path) -> None:
    """With IP_RECVERR an ICMP error is also the socket's pending error, which the next
    sendto() reports instead of sending: the socket sends again, and both answers come."""
    with netns.entered(loopback_ns):
        udp = UdpSocket(40200)
    try:
        f = factory(False, sport=udp.sport)
        udp.send(f.build(1).message, "127.0.0.1", 64)
        wait_readable(udp.fileno())  # the error is queued (and pending)
        udp.send(f.build(2).message, "127.0.0.1", 64)
        keys = set()
        deadline = time.monotonic() + 5
        while len(keys) < 2 and time.monotonic() < deadline:
            wait_readable(udp.fileno())
            while (got := udp.recv()) is not None:
                answer = parse_answer(got[0], f)
                assert answer is not None
                keys.add(answer.quote_key)
        assert keys == {f.build(1).quote_key, f.build(2).quote_key}
    finally:
        udp.close()


@pytest.mark.lab
def test_a_taken_source_port_falls_back_to_one_the_kernel_picks(loopback_ns: Path) -> None:
    with netns.entered(loopback_ns):
        first = UdpSocket(40100)
        second = UdpSocket(40100)
    try:
        assert first.sport == 40100 and second.sport not in (0, 40100)
    finally:
        first.close()
        second.close()


# --- mace-traceroute in a routed lab, no CAP_NET_RAW --------------------------------------

@pytest.fixture(scope="module")
def routed() -> Iterator[Lab]:
    with Lab(prefix=f"{PREFIX}r", containers=1, routers=2) as lab:
        lab.warm_up()
        yield lab


def ping_group_range(lab: Lab, value: str) -> None:
    """Set in the container's netns (ours) only: the root namespace is never touched."""
    ns_exec(lab.container_ns(0), "sysctl", "-qw", f"net.ipv4.ping_group_range={value}")


def traceroute_in_container(lab: Lab, *args: str, capabilities: tuple[str, ...]) \
        -> subprocess.CompletedProcess[str]:
    """mace-traceroute run inside the container's netns (as in a container) with only
    these capabilities; --nonce: its own programs, never an agent."""
    env = {k: v for k, v in os.environ.items() if k != "MACE_AGENT"}
    cmd = ["ip", "netns", "exec", lab.container_ns(0), *with_capabilities(*capabilities),
           sys.executable, "-m", "mace_tools.cli.traceroute", "--json", "-w", "1",
           "--nonce", os.urandom(8).hex(), *args, lab.target_addr]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(REPO)})


def traceroute_raw(lab: Lab, *args: str) -> dict:
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.traceroute", "--netns", lab.container_ns(0),
        "--json", "-w", "1", "--nonce", os.urandom(8).hex(), *args, lab.target_addr),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def hops(doc: dict) -> list[list[tuple]]:
    """What a hop's answers are, timing aside: who answered, its TTL, size, error mark."""
    return [[(r.get("from"), r.get("ttl"), r.get("size"), r.get("err"))
             for r in h["result"]] for h in doc["result"]]


@pytest.mark.lab
@pytest.mark.parametrize("flags", [["-U"], ["-U", "--paris"], ["-I"], ["-I", "--paris"]])
def test_no_net_raw_gives_the_raw_paths_hops_every_one_corrected(routed: Lab,
                                                                 flags: list[str]) -> None:
    ping_group_range(routed, "0 2147483647")
    proc = traceroute_in_container(routed, *flags, capabilities=("bpf", "perfmon"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert [h["hop"] for h in doc["result"]] == [1, 2, 3, 4]  # the target's answer ends it
    assert [{r["from"] for r in h["result"]} for h in doc["result"]] == \
        [{a} for a in routed.hop_addrs]
    assert hops(doc) == hops(traceroute_raw(routed, *flags))
    assert doc["mace"]["source"] == "local"
    assert_covered(doc["mace"], doc["mace"]["replies"])
    assert all(r["host_internal"] for r in doc["result"][0]["result"])
    for h in doc["result"][1:]:
        for r in (r for r in h["result"] if not r.get("late_kernel_stamp")):
            assert not r["host_internal"] and r["outer_dev"].startswith("out0@")
            assert 0 < r["rtt_corrected"] < r["rtt"]


@pytest.mark.lab
@pytest.mark.parametrize("flags", [["-U"], ["-I"]])
def test_no_capability_at_all_gives_raw_hops_and_one_line(routed: Lab,
                                                          flags: list[str]) -> None:
    ping_group_range(routed, "0 2147483647")
    proc = traceroute_in_container(routed, *flags, "-q", "1", capabilities=())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mace-traceroute: no mace-agent at ") and "and no BPF privilege" in lines[0]
    doc = json.loads(proc.stdout)
    assert [{r["from"] for r in h["result"]} for h in doc["result"]] == \
        [{a} for a in routed.hop_addrs]
    assert doc["mace"]["source"] == "none"
    assert all(r["rtt"] > 0 and r["rtt_corrected"] is None
               for h in doc["result"] for r in h["result"])


@pytest.mark.lab
@pytest.mark.parametrize(("flags", "needle"), [
    (["-T"], "raw sockets not permitted (TCP SYN probes need one)"),
    (["-I"], NOT_PERMITTED),
])
def test_what_no_socket_allows_is_one_line(routed: Lab, flags: list[str], needle: str) -> None:
    """-T needs CAP_NET_RAW; -I without it needs ping_group_range (closed here)."""
    ping_group_range(routed, "1 0")  # no group: a new netns' default
    proc = traceroute_in_container(routed, *flags, capabilities=("bpf", "perfmon"))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"mace-traceroute: {needle}")
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
