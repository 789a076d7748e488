"""mace-ping over IPv6 end to end: ICMPv6 echo probes from a container's netns through a
bridge and NAT66 (ip6tables MASQUERADE, as Docker does it), corrected from the kernel's
per-device timestamps and compared with truth v2 on the host's outer link, idle and under
load; plus what a user of `ping -6` sees (header, errors, -4/-6, names)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from accuracy import PROBES, assert_accurate_errors, assert_covered
from netns_etc import remove_netns_etc
from test_ping_parsers import assert_parsed_alike, parsed_by_jc

from mace_tools.lab.agent import AgentProcess, ping_sockets_open, with_capabilities
from mace_tools.lab.capture import Capture, TruthCapture
from mace_tools.lab.demo import PingRun, ProbeRow, compare, measure, parse_ndjson
from mace_tools.lab.load import Load
from mace_tools.lab.topology import BRIDGE_ADDR6, HOST_OUTER_ADDR6, Lab

pytestmark = pytest.mark.lab


def mace_ping(lab: Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """mace-ping from the lab's host netns into container c0's."""
    return subprocess.run(lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                                      lab.container_ns(0), *args),
                          capture_output=True, text=True, timeout=timeout)


def assert_accurate(lab: Lab, run: PingRun, rows: list[ProbeRow]) -> None:
    assert run.returncode == 0, run.stderr
    assert run.summary["af"] == 6 and run.summary["rcvd"] == PROBES
    assert_covered(run.summary["mace"], PROBES)
    assert run.summary["mace"]["kernel_events_lost"] == 0
    assert all(r.capture_ms is not None for r in rows), "capture missed probes"
    rows = [r for r in rows if r.corrected_ms is not None]
    host_ino = os.stat(lab.netns_path(lab.host_ns)).st_ino
    assert {r.outer_dev for r in rows} == {f"{lab.outer_dev}@{host_ino}"}
    errors = [r.error_us for r in rows]
    assert_accurate_errors(errors)
    assert all(r.corrected_ms < r.raw_ms for r in rows)


def test_idle_corrected_matches_capture_over_nat66(lab6: Lab) -> None:
    run, rows = measure(lab6, 0, PROBES, "-i", "0.005", target=lab6.target_addr6)
    assert_accurate(lab6, run, rows)


def test_loaded_corrected_matches_capture_over_nat66(lab6: Lab) -> None:
    with Load(lab6, neighbours=4, duration_s=30, target=lab6.target_addr6):
        run, rows = measure(lab6, 0, PROBES, "-i", "0.005", target=lab6.target_addr6)
    assert_accurate(lab6, run, rows)


def test_path_shows_nat66_at_the_outer_device(lab6: Lab) -> None:
    run, _ = measure(lab6, 0, 3, "-i", "0.01", target=lab6.target_addr6)
    rec = run.records[0]
    stages = [(s["pkt"], s["dev"], s["dir"]) for s in rec["path"]]
    for expected in [("request", "eth0", "tx"), ("request", "br0", "rx"),
                     ("request", "out0", "tx"), ("reply", "out0", "rx"),
                     ("reply", "eth0", "rx")]:
        assert expected in stages
    first = rec["path"][0]
    assert (first["src"], first["dst"]) == (lab6.container_addr6(0), lab6.target_addr6)
    out0 = next(s for s in rec["path"] if s["dev"] == "out0" and s["dir"] == "tx")
    assert out0["src"] == HOST_OUTER_ADDR6  # masqueraded before the outer device


def test_text_output_as_ping_dash_6(lab6: Lab) -> None:
    proc = mace_ping(lab6, "-c", "2", "-i", "0.01", lab6.target_addr6)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    target = lab6.target_addr6
    assert lines[0] == f"PING {target}({target}) 56 data bytes"  # as iputils 20221126
    reply = re.compile(rf"^64 bytes from {re.escape(target)}: icmp_seq=(\d) ttl=63 "
                       r"time=\d+\.\d+ ms corrected=\d+\.\d{3} ms egress=\d+\.\d{3} ms "
                       r"ingress=\d+\.\d{3} ms$")
    assert [reply.match(ln).group(1) for ln in lines[1:3]] == ["1", "2"]
    assert f"--- {target} ping statistics ---" in lines
    assert "kernel data 2/2 replies (100%)" in proc.stdout


def test_hop_limit_exceeded_is_reported_as_iputils_does(lab6: Lab) -> None:
    """-t 1: the container host (its bridge address) answers ICMPv6 time exceeded, which
    quotes the probe; iputils words it "Time exceeded: Hop limit"."""
    proc = mace_ping(lab6, "-c", "2", "-i", "0.2", "-W", "1", "-t", "1", lab6.target_addr6)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("From ")]
    assert errors == [f"From {BRIDGE_ADDR6} icmp_seq={n} Time exceeded: Hop limit"
                      for n in (1, 2)], proc.stdout
    assert re.search(r"2 packets transmitted, 0 received, \+2 errors", proc.stdout)


def test_family_options_and_literals(lab6: Lab) -> None:
    both = mace_ping(lab6, "-4", "-6", "-c", "1", lab6.target_addr6)
    assert (both.returncode, both.stderr) == \
        (2, "mace-ping: only one -4 or -6 option may be specified\n")
    wrong = mace_ping(lab6, "-4", "-c", "1", lab6.target_addr6)
    assert (wrong.returncode, wrong.stderr) == \
        (2, f"mace-ping: {lab6.target_addr6}: Address family for hostname not supported\n")
    wrong = mace_ping(lab6, "-6", "-c", "1", lab6.target_addr)
    assert (wrong.returncode, wrong.stderr) == \
        (2, f"mace-ping: {lab6.target_addr}: Address family for hostname not supported\n")


@pytest.fixture
def dual_name(lab6: Lab) -> str:
    """A name with an A and an AAAA entry in c0's hosts file (/etc/netns, as ip netns
    exec reads it), IPv4 listed first."""
    ns = lab6.container_ns(0)
    etc = Path("/etc/netns") / ns
    created_parent = not etc.parent.exists()
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"{lab6.target_addr} dual.lab.test\n"
                               f"{lab6.target_addr6} dual.lab.test\n")
    yield "dual.lab.test"
    remove_netns_etc(etc, created_parent)


def test_name_with_both_families_resolves_as_getaddrinfo(lab6: Lab, dual_name: str) -> None:
    """IPv6 first when the container has a route for it (RFC 6724), -4 forces IPv4; the
    header names the target as given, with the address taken."""
    for flags, addr in (((), lab6.target_addr6), (("-4",), lab6.target_addr),
                        (("-6",), lab6.target_addr6)):
        proc = mace_ping(lab6, *flags, "-c", "1", "--json", dual_name)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert (doc["dst_name"], doc["dst_addr"]) == (dual_name, addr)
        assert doc["af"] == (6 if ":" in addr else 4)
        assert_covered(doc["mace"], 1)


def test_name_without_an_ipv6_route_takes_ipv4(lab6: Lab, dual_name: str) -> None:
    """RFC 6724 rule 1: a destination the container has no route to comes last."""
    ns = lab6.container_ns(0)
    subprocess.run(["ip", "-n", ns, "-6", "route", "del", "default"], check=True)
    try:
        proc = mace_ping(lab6, "-c", "1", "--json", dual_name)
    finally:
        subprocess.run(["ip", "-n", ns, "-6", "route", "add", "default", "via", BRIDGE_ADDR6],
                       check=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dst_addr"] == lab6.target_addr


# --- without privilege: ping sockets, through mace-agent ----------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def ping_sockets6(lab6: Lab) -> Iterator[None]:
    """c0 lets every group open ping sockets (ICMPv6 ones too), as Docker's containers do."""
    with ping_sockets_open([lab6.container_ns(0)]):
        yield


def inside_ping(lab: Lab, *args: str, capabilities: tuple[str, ...]) \
        -> subprocess.CompletedProcess[str]:
    """mace-ping inside c0 with only these capabilities (none: no raw socket, no BPF)."""
    return subprocess.run(["ip", "netns", "exec", lab.container_ns(0),
                           *with_capabilities(*capabilities), sys.executable, "-m",
                           "mace_tools.cli.ping", *args],
                          capture_output=True, text=True, timeout=120, env=_env())


def test_a_ping_socket_with_bpf_is_corrected(lab6: Lab, ping_sockets6: None) -> None:
    """No CAP_NET_RAW: ICMPv6 probes from a ping socket keep their nonce and number."""
    proc = inside_ping(lab6, "-c", "3", "-i", "0.01", "-q", lab6.target_addr6,
                       capabilities=("bpf", "perfmon"))
    assert proc.returncode == 0, proc.stderr
    assert "3 packets transmitted, 3 received" in proc.stdout
    assert "kernel data 3/3 replies (100%)" in proc.stdout


def test_no_capability_and_no_agent_is_raw_with_one_line(lab6: Lab,
                                                         ping_sockets6: None) -> None:
    proc = inside_ping(lab6, "-c", "2", "-i", "0.01", "--agent", "/nonexistent/agent.sock",
                       lab6.target_addr6, capabilities=())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    proc = inside_ping(lab6, "-c", "2", "-i", "0.01", lab6.target_addr6, capabilities=())
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no BPF privilege" in proc.stderr
    assert re.findall(r"icmp_seq=\d ttl=63 time=[\d.]+ ms corrected=none", proc.stdout) \
        and len(re.findall("corrected=none", proc.stdout)) == 2


@pytest.fixture(scope="module")
def agent6(lab6: Lab, ping_sockets6: None) -> Iterator[AgentProcess]:
    running = AgentProcess("-v", prefix=lab6.on_host(), env=_env()).start()
    try:
        yield running
    finally:
        log = running.log_text()
        assert running.stop() == 0, log


def test_no_capability_through_the_agent_is_corrected(lab6: Lab, agent6: AgentProcess) -> None:
    """A client with no capability at all, through mace-agent: corrected against truth v2
    over NAT66; the path hides the host's devices and addresses (IPv6: ::)."""
    with TruthCapture(lab6.outer_link, "icmp6", expect_requests=PROBES) as cap:
        proc = inside_ping(lab6, "--agent", str(agent6.socket), "--ndjson", "-c", str(PROBES),
                           "-i", "0.005", lab6.target_addr6, capabilities=())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    records, summary = parse_ndjson(proc.stdout)
    run = PingRun(records, summary, proc.returncode, proc.stderr)
    assert summary["mace"]["source"] == "agent"
    assert_covered(summary["mace"], PROBES)
    rows = compare(run, cap)
    assert len(rows) == PROBES and all(r.capture_ms is not None for r in rows)
    errors = [r.error_us for r in rows if r.corrected_ms is not None]
    assert_accurate_errors(errors)
    container_ino = os.stat(lab6.netns_path(lab6.container_ns(0))).st_ino
    outside = [s for r in records for s in r["path"] if s["netns"] != container_ino]
    assert outside and all(s["dev"] == "" and s["src"] == "::" for s in outside), outside[:2]


def _link_local(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev, "scope",
                          "link"], capture_output=True, text=True, check=True).stdout
    return out.split()[3].split("/")[0]


def test_link_local_targets_take_their_scope_in_the_container(lab6: Lab) -> None:
    """fe80::...%eth0 names c0's eth0 (by name or index), which the netns mace starts in
    does not have: the scope is looked up where the socket is made, and never sent to DNS."""
    bridge = _link_local(lab6.host_ns, "br0")
    index = subprocess.run(["ip", "-n", lab6.container_ns(0), "-o", "link", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout.split(":")[0]
    for scope in ("eth0", index):
        proc = mace_ping(lab6, "-c", "2", "-i", "0.01", f"{bridge}%{scope}")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0].startswith(f"PING {bridge}%{scope}(")
        assert "2 packets transmitted, 2 received" in proc.stdout
    proc = mace_ping(lab6, "-c", "1", f"{bridge}%nosuch0")
    assert (proc.returncode, proc.stderr) == \
        (2, f"mace-ping: {bridge}%nosuch0: Name or service not known\n")


def inside(lab: Lab, tool: str, *args: str) -> str:
    """iputils ping or mace-ping inside c0 (as root), its text output."""
    cmd = ["ping"] if tool == "iputils" else [sys.executable, "-m", "mace_tools.cli.ping"]
    proc = subprocess.run(["ip", "netns", "exec", lab.container_ns(0), *cmd, *args],
                          capture_output=True, text=True, timeout=60,
                          env={**_env(), "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("args", [["-c", "3", "-i", "0.05"], ["-q", "-c", "3", "-i", "0.05"],
                                  ["-f", "-q", "-c", "100"], ["-n", "-c", "2", "-i", "0.05"]])
def test_parsers_read_mace_ping_dash_6_as_ping_dash_6(lab6: Lab, args: list[str]) -> None:
    """jc's and pingparsing's parsers return the same from mace-ping's IPv6 text as from
    iputils ping's (times aside): its IPv6 header included."""
    iputils = inside(lab6, "iputils", "-6", *args, lab6.target_addr6)
    mace = inside(lab6, "mace", "-6", *args, lab6.target_addr6)
    assert "mace " in mace
    assert_parsed_alike(iputils, mace)
    assert parsed_by_jc(mace)["destination_ip"] == lab6.target_addr6


def test_flow_label_is_on_the_wire_as_ping_dash_f(lab6: Lab) -> None:
    """-F: leased from the kernel's flow label manager and sent in every probe's header
    (a capture at the target keeps only packets with that label); iputils' header."""
    label = random.randrange(1, 0x100000)  # (a lease lingers a few seconds after a run)
    with Capture(lab6.target_ns, "tgt0", f"icmp6 and ip6[0:4] & 0xfffff = {label:#x}",
                 expect_packets=3, inbound=True) as cap:
        proc = mace_ping(lab6, "-F", f"{label:#x}", "-c", "3", "-i", "0.01",
                         lab6.target_addr6)
    assert proc.returncode == 0, proc.stderr
    target = lab6.target_addr6
    assert proc.stdout.splitlines()[0] == f"PING {target}({target}) , flow 0x{label:05x}, " \
                                          "56 data bytes"
    assert len([p for p in cap.packets if p.icmp_type == 128]) == 3
