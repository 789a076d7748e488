"""Linux traceroute's options and behaviours, end to end in a routed lab of our own
(container -> host bridge and NAT -> r1 -> r2 -> target), as mace-traceroute runs them
from the lab's host: the ports the methods probe, -w HERE and NEAR, -z, --mtu and -F,
-i -s -t, -P, -O, -e (from a fake router in a netns pair of our own), hop names resolved
inside the probing netns (/etc/netns files and a DNS responder bound there).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_dns import FakeDns
from unprivileged import with_capabilities

from mace_tools.lab.topology import Lab, add_namespace, cleanup_prefix, ns_exec, run
from mace_tools.probe import netns
from mace_tools.probe.icmp import checksum
from mace_tools.probe.sockets import NOT_PERMITTED

pytestmark = pytest.mark.lab

PREFIX = f"mo{os.getpid() % 100000}"
REPO = str(Path(__file__).resolve().parents[1])
R1, R2 = "198.18.0.2", "198.18.0.6"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(prefix=PREFIX, containers=1, routers=2) as built:
        built.warm_up()
        yield built


def traceroute(lab: Lab, *args: str, packetlen: str | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """mace-traceroute from the lab's host into the container's netns to the target;
    -w 1 unless given."""
    wait = [] if any(a.startswith(("-w", "--wait")) for a in args) else ["-w", "1"]
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.traceroute", "--netns", lab.container_ns(0),
        *wait, *args, lab.target_addr, *([packetlen] if packetlen else [])),
        capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def hop_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The hop lines, the corrected token cut off."""
    return [line.split("  corrected=")[0] for line in proc.stdout.splitlines()[1:]]


class Listener:
    """UDP sockets bound in the target's netns: what reached it, with its TOS."""

    def __init__(self, lab: Lab, ports: tuple[int, ...]) -> None:
        with netns.entered(Path(lab.netns_path(lab.target_ns))):
            self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in ports]
        for sock, port in zip(self.socks, ports, strict=True):
            sock.setsockopt(socket.SOL_IP, socket.IP_RECVTOS, 1)
            sock.bind(("0.0.0.0", port))

    def got(self) -> list[tuple[int, int, int, bytes]]:
        """(port, source port, TOS, payload) of every datagram received."""
        out = []
        for sock in self.socks:
            while select.select([sock], [], [], 0)[0]:
                data, anc, _flags, peer = sock.recvmsg(2048, 64)
                tos = next((v[0] for lvl, kind, v in anc if kind == socket.IP_TOS), -1)
                out.append((sock.getsockname()[1], peer[1], tos, data))
        return out

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


# --- methods and ports ------------------------------------------------------------------

def test_methods_probe_the_ports_traceroute_does(lab: Lab) -> None:
    """-U: port 53 (from --sport, with -t's TOS); default: 33434 for the first probe."""
    nonce = os.urandom(8)
    listener = Listener(lab, (53, 33434))
    try:
        traceroute(lab, "-U", "-f", "4", "-m", "4", "-q", "2", "--sport", "40123",
                   "-t", "0x28", "--nonce", nonce.hex(), "-n")
        udp = listener.got()
        assert [(p, sp, tos) for p, sp, tos, _ in udp] == [(53, 40123, 0x28)] * 2
        assert all(data[:8] == nonce for *_, data in udp)
        traceroute(lab, "-f", "4", "-m", "4", "-q", "1", "-n")
        assert [p for p, *_ in listener.got()] == [33434]
    finally:
        listener.close()


def test_icmp_seqs_start_at_the_port(lab: Lab) -> None:
    doc = json.loads(traceroute(lab, "-I", "-p", "1000", "-q", "2", "--json").stdout)
    assert [r["seq"] for h in doc["result"] for r in h["result"]] == list(range(1000, 1008))


def test_raw_protocol_probes_end_at_protocol_unreachable(lab: Lab) -> None:
    proc = traceroute(lab, "-P", "253", "-q", "1", "-n")
    assert hop_lines(proc)[-1].startswith(f" 4  {lab.target_addr} ") and \
        hop_lines(proc)[-1].endswith(" ms !P")
    assert [line.split()[1] for line in hop_lines(proc)] == lab.hop_addrs
    assert "corrected=-" in proc.stdout.splitlines()[-1]  # the programs match no raw probe


def test_method_options(lab: Lab) -> None:
    raw = traceroute(lab, "-I", "-O", "raw", "-q", "1", "-n")
    assert [line.split()[1] for line in hop_lines(raw)] == lab.hop_addrs
    ns_exec(lab.container_ns(0), "sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
    dgram = traceroute(lab, "-I", "-O", "dgram", "-q", "1", check=False)
    assert (dgram.returncode, dgram.stderr) == (1, f"mace-traceroute: {NOT_PERMITTED}\n")


def test_header_says_what_is_sent(lab: Lab) -> None:
    """Too short a length is raised to the least probe (mace's tag fits), and said so."""
    for args, packetlen, size in ((["-m", "1"], "10", 40), (["-T", "-m", "1"], "40", 52),
                                  (["-m", "1"], "0x80", 128)):
        proc = traceroute(lab, "-q", "1", "-n", *args, packetlen=packetlen)
        assert proc.stdout.splitlines()[0].endswith(f", 1 hops max, {size} byte packets")


# --- waits --------------------------------------------------------------------------------

def timed(lab: Lab, *args: str) -> tuple[float, list[str]]:
    start = time.monotonic()
    proc = traceroute(lab, "-n", *args)
    return time.monotonic() - start, hop_lines(proc)


def test_near_gives_up_a_silent_hop_by_the_next_hops_rtt(lab: Lab) -> None:
    """r2 never says "time exceeded": with MAX alone each of its probes waits MAX; with
    NEAR the target's answers (hop 4) cut the wait to 10 x their RTT."""
    ns_exec(lab.router_ns(2), "iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type",
            "time-exceeded", "-j", "DROP")
    try:
        slow, lines = timed(lab, "-w", "1.5")
        assert lines[2] == " 3  * * *" and slow >= 1.5
        fast, lines = timed(lab, "-w", "1.5,3,10")
        assert lines[2] == " 3  * * *" and lines[3].startswith(f" 4  {lab.target_addr}")
        # both runs pay start-up (and a loaded machine's delays): compare the waits
        assert fast < slow - 1.0, (fast, slow)
    finally:
        ns_exec(lab.router_ns(2), "iptables", "-F", "OUTPUT")


def test_here_gives_up_by_the_rtt_of_the_same_hop(lab: Lab) -> None:
    """r1 answers the first of three probes only: with HERE the other two wait 3 x its
    RTT, not MAX."""
    r1 = lab.router_ns(1)
    took: dict[bool, float] = {}
    for wait, quick in (("1.5", False), ("1.5,3,0", True)):
        ns_exec(r1, "iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "time-exceeded",
                "-m", "statistic", "--mode", "nth", "--every", "3", "--packet", "0",
                "-j", "ACCEPT")
        ns_exec(r1, "iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "time-exceeded",
                "-j", "DROP")
        try:
            took[quick], lines = timed(lab, "-f", "2", "-m", "2", "-w", wait)
        finally:
            ns_exec(r1, "iptables", "-F", "OUTPUT")
        assert lines[0].startswith(f" 2  {R1}  ") and lines[0].endswith(" ms * *")
    # both runs pay start-up (and a loaded machine's delays): compare the waits
    assert took[False] >= 1.5 and took[True] < took[False] - 1.0, took


def test_sendwait_over_10_is_milliseconds(lab: Lab) -> None:
    took, lines = timed(lab, "-q", "1", "-z", "300")
    assert len(lines) == 4 and 0.9 <= took < 10


# --- path MTU ------------------------------------------------------------------------------

@pytest.fixture
def narrow_link(lab: Lab) -> Iterator[None]:
    """The r1 -> r2 link at MTU 1400 (r1 answers "fragmentation needed" for more)."""
    run("ip", "-n", lab.router_ns(1), "link", "set", "out0", "mtu", "1400")
    run("ip", "-n", lab.router_ns(2), "link", "set", "in0", "mtu", "1400")
    try:
        yield
    finally:
        run("ip", "-n", lab.router_ns(1), "link", "set", "out0", "mtu", "1500")
        run("ip", "-n", lab.router_ns(2), "link", "set", "in0", "mtu", "1500")


def test_mtu_discovery_prints_where_the_mtu_changes(lab: Lab, narrow_link: None) -> None:
    """As Linux traceroute here: F=1500 at hop 1 (the container's own device), F=1400 at
    hop 3 (r1's frag-needed, printed on the first probe that fits past it)."""
    proc = traceroute(lab, "--mtu", "-n")
    assert proc.stdout.splitlines()[0].endswith("65000 byte packets")
    lines = hop_lines(proc)
    assert [line.split()[1] for line in lines] == lab.hop_addrs
    assert [line.count("F=") for line in lines] == [1, 0, 1, 0]
    assert " ms F=1500 " in lines[0] and " ms F=1400 " in lines[2]


def test_dont_fragment_stops_at_a_link_too_narrow(lab: Lab, narrow_link: None) -> None:
    lines = hop_lines(traceroute(lab, "-F", "-n", packetlen="1450"))
    assert len(lines) == 3 and lines[2].startswith(f" 3  {R1}  ")
    assert lines[2].count("!F-1400") == 3
    too_big = traceroute(lab, "-F", "-n", packetlen="1600")
    assert hop_lines(too_big) == [" 1  * !F-1500 * !F-1500 * !F-1500"]


@pytest.mark.parametrize("method", ["-U", "-I"])
def test_mtu_discovery_without_net_raw(lab: Lab, narrow_link: None, method: str) -> None:
    """A UDP or ping socket: the local MTU from its error queue's local error, the path's
    from the frag-needed the error queue holds."""
    ns = lab.container_ns(0)
    ns_exec(ns, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *with_capabilities("bpf", "perfmon"), sys.executable,
         "-m", "mace_tools.cli.traceroute", "--mtu", "-n", "-w", "1", method, lab.target_addr],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    lines = hop_lines(proc)
    assert [line.split()[1] for line in lines] == lab.hop_addrs
    assert " ms F=1500 " in lines[0] and " ms F=1400 " in lines[2]


# --- interface and source ---------------------------------------------------------------------

def test_interface_and_source(lab: Lab) -> None:
    via = traceroute(lab, "-i", "eth0", "-q", "1", "-n")
    assert [line.split()[1] for line in hop_lines(via)] == lab.hop_addrs
    bad = traceroute(lab, "-i", "nosuch0", "-q", "1", check=False)
    assert (bad.returncode, bad.stderr) == (
        1, "mace-traceroute: setsockopt SO_BINDTODEVICE: No such device\n")
    own = lab.container_addr(0)
    doc = json.loads(traceroute(lab, "-s", own, "-q", "1", "--json").stdout)
    assert doc["src_addr"] == own and len(doc["result"]) == 4
    foreign = traceroute(lab, "-s", "198.18.9.9", "-q", "1", check=False)
    assert (foreign.returncode, foreign.stderr) == (
        1, "mace-traceroute: bind: Cannot assign requested address\n")


# --- hop names, resolved inside the probing netns ---------------------------------------------

@pytest.fixture
def names(lab: Lab) -> Iterator[FakeDns]:
    """/etc/netns/C0/{hosts,resolv.conf}, as `ip netns exec` shows them: hosts names r1,
    a responder on 127.0.0.11 inside C0 (only reachable from there) has r2's PTR."""
    ns = lab.container_ns(0)
    etc = Path("/etc/netns") / ns
    etc.mkdir(parents=True, exist_ok=True)
    try:
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{R1} r1.lab.test r1\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions timeout:1 attempts:1\n")
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        with FakeDns(lab.netns_path(ns), "127.0.0.11", {}, ptr={R2: "r2.lab.test"}) as dns:
            yield dns
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc.parent.rmdir()  # only if no one else's namespace has files there


def test_hop_names_from_the_probing_netns(lab: Lab, names: FakeDns) -> None:
    lines = hop_lines(traceroute(lab, "-q", "1"))
    assert [" ".join(line.split()[1:3]) for line in lines] == [
        "198.18.1.1 (198.18.1.1)", f"r1.lab.test ({R1})", f"r2.lab.test ({R2})",
        f"{lab.target_addr} ({lab.target_addr})"]
    assert "6.0.18.198.in-addr.arpa" in names.queries  # asked inside C0
    assert "2.0.18.198.in-addr.arpa" not in names.queries  # the hosts file had it
    names.queries.clear()
    numeric = hop_lines(traceroute(lab, "-q", "1", "-n"))
    assert [line.split()[1] for line in numeric] == lab.hop_addrs and names.queries == []


# --- -e: ICMP extensions from a fake router ----------------------------------------------------

MPLS_ENTRY = (16001 << 12) | (5 << 9) | (1 << 8) | 1


def mpls_time_exceeded(datagram: bytes) -> bytes:
    """Time exceeded for datagram with an RFC 4884 quote (128 bytes) and an MPLS object."""
    quote = (datagram + bytes(128))[:128]
    obj = struct.pack("!HBBI", 8, 1, 1, MPLS_ENTRY)
    ext = struct.pack("!BBH", 0x20, 0, 0) + obj
    ext = ext[:2] + struct.pack("!H", checksum(ext)) + ext[4:]
    body = struct.pack("!BBHBBH", 11, 0, 0, 0, len(quote) // 4, 0) + quote + ext
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


@pytest.fixture
def fake_router() -> Iterator[str]:
    """{p}-a (198.18.3.1) -- {p}-b (198.18.3.2): b answers every probe to 198.18.4.0/24 with
    a time exceeded carrying an MPLS label stack (no Linux router sends one). Yields a."""
    prefix = f"{PREFIX}x"
    a, b = f"{prefix}-a", f"{prefix}-b"
    cleanup_prefix(prefix)
    stop = threading.Event()
    try:
        add_namespace(a)
        add_namespace(b)
        run("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "b0",
            "netns", b)
        run("ip", "-n", a, "addr", "add", "198.18.3.1/30", "dev", "a0")
        run("ip", "-n", b, "addr", "add", "198.18.3.2/30", "dev", "b0")
        run("ip", "-n", a, "link", "set", "a0", "up")
        run("ip", "-n", b, "link", "set", "b0", "up")
        run("ip", "-n", a, "route", "add", "198.18.4.0/24", "via", "198.18.3.2")
        # b drops the probes before routing (no ICMP of its own); its packet socket sees them
        ns_exec(b, "iptables", "-t", "raw", "-A", "PREROUTING", "-d", "198.18.4.0/24", "-j",
                "DROP")
        with netns.entered(Path(Lab.netns_path(b))):
            sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
            answer = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sniff.bind(("b0", 0x0800))

        def serve() -> None:
            while not stop.is_set():
                if not select.select([sniff], [], [], 0.1)[0]:
                    continue
                ip = sniff.recv(65535)
                if ip[16:19] == bytes([198, 18, 4]) and ip[9] in (1, 6, 17):
                    answer.sendto(mpls_time_exceeded(ip), ("198.18.3.1", 0))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield a
        stop.set()
        thread.join(timeout=5)
        sniff.close()
        answer.close()
    finally:
        stop.set()
        cleanup_prefix(prefix)


@pytest.mark.parametrize("method", ["-U", "-I", "-T"])
def test_extensions_shown_as_traceroute_does(fake_router: str, method: str) -> None:
    line = run_in(fake_router, method, "-e", "-n", "-m", "1", "-q", "2").splitlines()[1]
    assert line.startswith(" 1  198.18.3.2 <MPLS:L=16001,E=5,S=1,T=1>  "), line
    assert line.count("198.18.3.2") == 1  # same address and extensions: printed once
    assert "<" not in run_in(fake_router, method, "-n", "-m", "1", "-q", "1")


def run_in(ns: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.traceroute", "--netns", ns,
                           "-w", "1", *args, "198.18.4.1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_extensions_read_from_a_udp_sockets_error_queue(fake_router: str) -> None:
    """No capability at all: the extensions come from the UDP socket's error queue."""
    proc = subprocess.run(
        ["ip", "netns", "exec", fake_router, *with_capabilities(), sys.executable, "-m",
         "mace_tools.cli.traceroute", "-U", "-e", "-n", "-m", "1", "-q", "1", "-w", "1",
         "198.18.4.1"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith(
        " 1  198.18.3.2 <MPLS:L=16001,E=5,S=1,T=1>  ")
