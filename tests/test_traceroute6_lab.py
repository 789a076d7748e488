"""mace-traceroute -6 end to end on a routed dual-stack lab: container -> host (NAT66) ->
r1 -> r2 -> target, every method, against truth v2 over IPv6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from accuracy import assert_accurate_errors, assert_covered, late_beyond_first_hop
from fake_dns import FakeDns
from netns_etc import remove_netns_etc
from unprivileged import WITHOUT_CAPABILITIES

from mace_tools.lab.capture import TruthCapture
from mace_tools.lab.topology import Lab, ns_exec

pytestmark = pytest.mark.lab

TRACES_PER_METHOD = 7  # x 3 outer hops x 10 queries: 210 replies per method (as IPv4's)
PACKET_LEN6 = 80  # traceroute -6's default


@pytest.fixture(scope="module")
def routed6() -> Iterator[Lab]:
    """The dual-stack routed lab; c0 resolves with its own resolver (127.0.0.11, inside
    c0: no test asks a real DNS server), which knows the routers' and target's names."""
    with Lab(prefix=f"m6r{os.getpid() % 100000}", containers=1, routers=2,
             ipv6=True) as lab:
        lab.warm_up()
        ns = lab.container_ns(0)
        etc = Path("/etc/netns") / ns
        created_parent = not etc.parent.exists()
        etc.mkdir(parents=True, exist_ok=True)
        try:
            (etc / "resolv.conf").write_text(
                "nameserver 127.0.0.11\noptions timeout:1 attempts:1\n")
            names = {a: f"hop{i}.lab.test" for i, a in enumerate(lab.hop_addrs6[1:], 2)}
            with FakeDns(lab.netns_path(ns), "127.0.0.11",
                         {"dual.lab.test": [lab.target_addr, lab.target_addr6],
                          "v4only.lab.test": lab.target_addr}, ptr=names):
                yield lab
        finally:
            remove_netns_etc(etc, created_parent)


def run(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.traceroute", "--netns", lab.container_ns(0),
        "-w", "1", *args), capture_output=True, text=True, timeout=120)


def trace(lab: Lab, nonce: bytes, *args: str) -> dict:
    proc = run(lab, "--json", "--nonce", nonce.hex(), *args, lab.target_addr6)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("method", "flags"), [("udp", []), ("udp", ["-U"]),
                                               ("icmp", ["-I"]), ("tcp", ["-T"])])
def test_hops_and_corrected_times_over_ipv6(routed6: Lab, method: str,
                                            flags: list[str]) -> None:
    nonces = [os.urandom(8) for _ in range(TRACES_PER_METHOD)]
    host_ino = os.stat(routed6.netns_path(routed6.host_ns)).st_ino
    with TruthCapture(routed6.outer_link, "icmp6 or tcp or udp") as cap:
        docs = [trace(routed6, nonce, "-q", "10", *flags) for nonce in nonces]
    errors = []
    for nonce, doc in zip(nonces, docs, strict=True):
        assert doc["af"] == 6 and doc["size"] == PACKET_LEN6
        assert doc["proto"] == method.upper()
        assert_covered(doc["mace"], doc["mace"]["replies"])
        assert doc["dst_addr"] == routed6.target_addr6
        hops = doc["result"]
        assert [h["hop"] for h in hops] == [1, 2, 3, 4]
        froms = [{r.get("from") for r in h["result"]} for h in hops]
        assert froms == [{a} for a in routed6.hop_addrs6], froms
        # hop 1 is the host's bridge: host-internal; the others crossed the outer device
        assert all(r["host_internal"] for r in hops[0]["result"])
        assert all(not r["host_internal"] and r["outer_dev"] == f"out0@{host_ino}"
                   for h in hops[1:] for r in h["result"] if not r.get("late_kernel_stamp"))
        truth_us = cap.trace(nonce, method, packet_len=PACKET_LEN6)
        for h in hops[1:]:
            for r in (r for r in h["result"] if not r.get("late_kernel_stamp")):
                assert r["seq"] in truth_us, f"capture missed probe {r['seq']}"
                errors.append(r["rtt_corrected"] * 1000 - truth_us[r["seq"]])
                assert r["rtt_corrected"] < r["rtt"]
    assert len(errors) + late_beyond_first_hop(docs) == TRACES_PER_METHOD * 3 * 10
    assert_accurate_errors(errors)


def test_hop_names_and_numeric(routed6: Lab) -> None:
    """Hop names from the probing netns' resolver (ip6.arpa PTR), unless -n; a name target
    takes the family -4/-6 asks for."""
    proc = run(routed6, "-q", "1", "-6", "dual.lab.test")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"traceroute to dual.lab.test ({routed6.target_addr6}), 30 hops max, "
                        f"{PACKET_LEN6} byte packets")
    hop1, *routers = routed6.hop_addrs6
    assert lines[1].startswith(f" 1  {hop1} ({hop1})  ")  # no PTR: the address stands in
    for n, addr in enumerate(routers, 2):
        assert lines[n].startswith(f" {n}  hop{n}.lab.test ({addr})  "), lines[n]
    proc = run(routed6, "-q", "1", "-n", routed6.target_addr6)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[1] for ln in proc.stdout.splitlines()[1:]] == routed6.hop_addrs6
    proc = run(routed6, "-q", "1", "-n", "-4", "dual.lab.test")
    assert proc.returncode == 0, proc.stderr
    assert f"({routed6.target_addr}), 30 hops max, 60 byte packets" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["-4", "TARGET6"], "TARGET6: Address family for hostname not supported"),
    (["-6", "v4only.lab.test"], "v4only.lab.test: Address family for hostname not supported"),
    (["-4", "-6", "TARGET6"], "only one -4 or -6 option may be specified"),
])
def test_family_errors_as_mace_ping_words_them(routed6: Lab, args: list[str],
                                                message: str) -> None:
    target6 = routed6.target_addr6
    proc = run(routed6, *(target6 if a == "TARGET6" else a for a in args))
    assert proc.returncode == 2
    assert proc.stderr == f"mace-traceroute: {message.replace('TARGET6', target6)}\n"


@pytest.mark.parametrize("flag", ["-U", "-I"])
def test_unprivileged_ipv6(routed6: Lab, flag: str) -> None:
    """No capability at all, inside the container: a UDP socket (-U) or an ICMPv6 ping
    socket (-I) with IPV6_RECVERR finds every hop (raw times only: no BPF privilege)."""
    ns = routed6.container_ns(0)
    ns_exec(ns, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *WITHOUT_CAPABILITIES, sys.executable, "-m",
         "mace_tools.cli.traceroute", "-6", "-n", "-w", "1", "-q", "2", "--json", flag,
         routed6.target_addr6],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["af"] == 6
    assert [{r.get("from") for r in h["result"]} for h in doc["result"]] == \
        [{a} for a in routed6.hop_addrs6]


def test_path_mtu_over_ipv6(routed6: Lab) -> None:
    """--mtu by ICMPv6 packet too big (F=MTU where the path narrows, as traceroute -6), and
    -F: a probe over the first device's MTU is refused locally (!F-MTU)."""
    narrow = [(routed6.router_ns(1), "out0"), (routed6.router_ns(2), "in0")]
    try:
        for ns, dev in narrow:
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "mtu", "1400"], check=True)
        proc = run(routed6, "-n", "-q", "1", "--mtu", routed6.target_addr6)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert " F=1500 " in lines[1] and " F=1400 " in lines[3], proc.stdout
        assert "F=" not in lines[2] + lines[4]
    finally:
        for ns, dev in narrow:
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "mtu", "1500"], check=True)
    proc = run(routed6, "-n", "-q", "1", "-F", routed6.target_addr6, "2000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == [" 1  * !F-1500  corrected=*"]
