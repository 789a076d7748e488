"""mace-traceroute end to end on a routed lab: host -> r1 -> r2 -> target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from accuracy import PROBES, assert_accurate_errors, assert_covered, late_beyond_first_hop
from unprivileged import WITHOUT_CAPABILITIES

from mace_tools.lab.capture import TruthCapture
from mace_tools.lab.demo import measure
from mace_tools.lab.topology import Lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def routed() -> Iterator[Lab]:
    with Lab(prefix=f"mr{os.getpid() % 100000}", containers=1, routers=2) as lab:
        lab.warm_up()
        yield lab


def trace(lab: Lab, *args: str, nonce: bytes | None = None) -> dict:
    nonce = nonce or os.urandom(8)
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.traceroute", "--netns", lab.container_ns(0),
        "--json", "--nonce", nonce.hex(), "-w", "1", *args, lab.target_addr),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# A share of replies within the tail bound is only a claim with enough replies: one trace of
# 3 outer hops x 5 queries has 15, where a single interrupt on the link fails the test.
# 7 traces x 3 hops x 10 queries give 210 replies per method, one truth capture around all.
TRACES_PER_METHOD = 7


@pytest.mark.parametrize(("method", "flags"), [("udp", []), ("udp", ["--paris"]),
                                               ("icmp", ["-I"]), ("tcp", ["-T"])])
def test_hops_and_corrected_times(routed: Lab, method: str, flags: list[str]) -> None:
    nonces = [os.urandom(8) for _ in range(TRACES_PER_METHOD)]
    host_ino = os.stat(routed.netns_path(routed.host_ns)).st_ino
    with TruthCapture(routed.outer_link, "icmp or tcp or udp") as cap:
        docs = [trace(routed, "-q", "10", *flags, nonce=nonce) for nonce in nonces]
    errors = []
    for nonce, doc in zip(nonces, docs, strict=True):
        hops = doc["result"]
        assert [h["hop"] for h in hops] == [1, 2, 3, 4]
        froms = [{r.get("from") for r in h["result"]} for h in hops]
        assert froms == [{a} for a in routed.hop_addrs], froms
        assert doc["proto"] == method.upper()
        assert_covered(doc["mace"], doc["mace"]["replies"])
        # hop 1 is the host's bridge: host-internal; the others crossed the outer device
        assert all(r["host_internal"] for r in hops[0]["result"])
        assert all(not r["host_internal"] and r["outer_dev"] == f"out0@{host_ino}"
                   for h in hops[1:] for r in h["result"] if not r.get("late_kernel_stamp"))
        truth_us = cap.trace(nonce, method, packet_len=60)
        for h in hops[1:]:
            for r in (r for r in h["result"] if not r.get("late_kernel_stamp")):
                number = r["seq"]
                assert number in truth_us, f"capture missed probe {number}"
                errors.append(r["rtt_corrected"] * 1000 - truth_us[number])
                assert r["rtt_corrected"] < r["rtt"]
    assert len(errors) + late_beyond_first_hop(docs) == TRACES_PER_METHOD * 3 * 10
    assert_accurate_errors(errors)


def test_traceroute_and_ping_at_once_never_mix(routed: Lab) -> None:
    """ICMP traceroute and mace-ping from one container: same protocol, same seqs."""
    results: dict[str, object] = {}

    def ping() -> None:
        results["ping"] = measure(routed, 0, PROBES, "-i", "0.005")

    t = threading.Thread(target=ping)
    t.start()
    docs = [trace(routed, "-I", "-q", "3") for _ in range(3)]
    t.join()
    run, rows = results["ping"]  # type: ignore[misc]
    assert run.summary["dup"] == 0
    assert_covered(run.summary["mace"], PROBES)
    assert len(rows) == PROBES
    assert all(r.capture_ms is not None for r in rows), "capture missed probes"
    errors = [r.error_us for r in rows if r.error_us is not None]
    assert_accurate_errors(errors)
    for doc in docs:
        froms = [{r.get("from") for r in h["result"]} for h in doc["result"]]
        assert froms == [{a} for a in routed.hop_addrs]
        assert_covered(doc["mace"], doc["mace"]["replies"])


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--bogus", "198.18.0.10"], 2, "Bad option `--bogus' (argc 1)"),
    (["-f", "5", "-m", "3", "198.18.0.10"], 2, "first hop out of range"),
    (["-I", "-M", "nosuch", "198.18.0.10"], 2, "Unknown traceroute module nosuch"),
    (["-q", "0", "198.18.0.10"], 2, "no more than 10 probes per hop"),
    (["--netns", "mace-none", "198.18.0.10"], 2, "network namespace 'mace-none' not found"),
])
def test_bad_input(args: list[str], code: int, needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.traceroute", *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mace-traceroute: ") and needle in lines[0]


def test_names_resolve_in_the_probing_netns(lab_dns: tuple[str, object], lab: Lab) -> None:
    """--netns NAME resolves with /etc/netns/NAME files, asking from inside NAME."""
    ns, _ = lab_dns
    for tool in ("traceroute", "ping"):
        proc = subprocess.run([sys.executable, "-m", f"mace_tools.cli.{tool}", "--netns", ns,
                               "-n", "-w", "1", "-q" if tool == "traceroute" else "-c", "1",
                               "target.lab.test"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"target.lab.test ({lab.target_addr})" in proc.stdout.splitlines()[0]
        proc = subprocess.run([sys.executable, "-m", f"mace_tools.cli.{tool}", "--netns", ns,
                               "nosuchhost.invalid"], capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stderr) == (
            2, f"mace-{tool}: nosuchhost.invalid: Name or service not known\n")


def test_runtime_error_exits_1() -> None:
    """TCP SYN probes need a raw socket (UDP and ICMP do without: test_traceroute_
    unprivileged.py)."""
    proc = subprocess.run(
        [*WITHOUT_CAPABILITIES, sys.executable, "-m", "mace_tools.cli.traceroute",
         "-T", "-w", "1", "127.0.0.1"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1, proc.stderr
    assert "run as root" in proc.stderr and "Traceback" not in proc.stderr
