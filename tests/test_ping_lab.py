"""mace-ping end to end in the namespace lab, against truth v2 on the host's outer link.

mace-ping runs in the lab's host netns (as on a container host) and enters the container's
with --netns, so it knows the host's netns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
from accuracy import PROBES, assert_accurate_errors, assert_covered

from mace_tools.lab.demo import PingRun, ProbeRow, measure
from mace_tools.lab.load import Load
from mace_tools.lab.topology import Lab

pytestmark = pytest.mark.lab



def host_outer_dev(lab: Lab) -> str:
    return f"{lab.outer_dev}@{os.stat(lab.netns_path(lab.host_ns)).st_ino}"


def assert_accurate(lab: Lab, run: PingRun, rows: list[ProbeRow], count: int) -> None:
    assert run.returncode == 0, run.stderr
    assert run.summary["rcvd"] == count
    assert_covered(run.summary["mace"], count)
    assert run.summary["mace"]["kernel_events_lost"] == 0
    assert len(rows) == count
    assert all(r.capture_ms is not None for r in rows), "capture missed probes"
    rows = [r for r in rows if r.corrected_ms is not None]
    # every correction was taken at the host's outer device, not somewhere else
    assert {r.outer_dev for r in rows} == {host_outer_dev(lab)}
    errors = [r.error_us for r in rows]
    assert_accurate_errors(errors)
    # and the correction really removed container networking
    assert all(r.corrected_ms < r.raw_ms for r in rows)


def test_idle_corrected_matches_capture(lab: Lab) -> None:
    run, rows = measure(lab, 0, PROBES, "-i", "0.005")
    assert_accurate(lab, run, rows, PROBES)


def test_loaded_corrected_matches_capture(lab: Lab) -> None:
    with Load(lab, neighbours=4, duration_s=30):
        run, rows = measure(lab, 0, PROBES, "-i", "0.005")
    assert_accurate(lab, run, rows, PROBES)


def test_path_crosses_container_host_and_outer_device(lab: Lab) -> None:
    run, _ = measure(lab, 0, 3, "-i", "0.01")
    rec = run.records[0]
    stages = [(s["pkt"], s["dev"], s["dir"]) for s in rec["path"]]
    for expected in [("request", "eth0", "tx"), ("request", "vc0", "rx"),
                     ("request", "br0", "rx"), ("request", "out0", "tx"),
                     ("reply", "out0", "rx"), ("reply", "eth0", "rx")]:
        assert expected in stages
    container_ino = os.stat(lab.netns_path(lab.container_ns(0))).st_ino
    host_ino = os.stat(lab.netns_path(lab.host_ns)).st_ino
    assert rec["outer_dev"] == f"out0@{host_ino}"
    assert rec["path"][0]["netns"] == container_ino
    out0 = next(s for s in rec["path"] if s["dev"] == "out0" and s["dir"] == "tx")
    assert out0["src"] == "198.18.0.1"  # NAT happened before the outer device
    # raw (CLOCK_REALTIME) ends at the socket's receive stamp, which netif_rx in the
    # container takes just *before* mace's tracepoint there stamps the delivery
    # (CLOCK_MONOTONIC): the sum may exceed raw by that gap, well under 2 µs, not more
    clock_gap_ms = 0.002
    for r in run.records:
        assert r["egress"] + r["rtt_corrected"] + r["ingress"] <= r["rtt"] + clock_gap_ms


def test_concurrent_runs_never_mix(lab: Lab) -> None:
    """Two runs from the same container, same target, same seqs, at the same time."""
    results: dict[str, tuple[PingRun, list[ProbeRow]]] = {}

    def one(name: str, container: int) -> None:
        results[name] = measure(lab, container, PROBES, "-i", "0.005")

    threads = [threading.Thread(target=one, args=(n, c)) for n, c in (("a", 0), ("b", 0),
                                                                      ("c", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nonces = {r.summary["mace"]["nonce"] for r, _ in results.values()}
    assert len(nonces) == 3
    for run, rows in results.values():
        assert_accurate(lab, run, rows, PROBES)
        assert run.summary["dup"] == 0  # never took the other run's replies


def test_json_document_is_atlas_shaped(lab: Lab) -> None:
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
        "--json", "-c", "3", "-i", "0.01", lab.target_addr),
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["fw"], doc["af"], doc["proto"], doc["type"]) == (5020, 4, "ICMP", "ping")
    assert (doc["sent"], doc["rcvd"], doc["dup"], doc["size"]) == (3, 3, 0, 56)
    assert doc["dst_addr"] == lab.target_addr and doc["src_addr"] == lab.container_addr(0)
    assert doc["min"] <= doc["avg"] <= doc["max"]
    assert [r["seq"] for r in doc["result"]] == [1, 2, 3]
    for r in doc["result"]:
        assert r["path"]
        assert r.get("late_kernel_stamp") or r["rtt_corrected"] < r["rtt"]
    assert_covered(doc["mace"], 3)


def test_text_output_keeps_iputils_tokens(lab: Lab) -> None:
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
        "-c", "2", "-i", "0.01", lab.target_addr), capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"PING {lab.target_addr} ({lab.target_addr}) 56(84) bytes of data."
    reply = re.compile(rf"^64 bytes from {re.escape(lab.target_addr)}: icmp_seq=(\d) ttl=63 "
                       r"time=\d+\.\d+ ms corrected=\d+\.\d{3} ms egress=\d+\.\d{3} ms "
                       r"ingress=\d+\.\d{3} ms$")
    assert [reply.match(ln).group(1) for ln in lines[1:3]] == ["1", "2"]
    # the mace lines, then iputils' statistics block as iputils prints it (output/text.py)
    assert lines[3].startswith("mace corrected min/avg/max/mdev = ")
    assert lines[4].endswith("kernel data 2/2 replies (100%), 0 events lost, 2 kernel records")
    assert lines[5] == ""
    assert lines[6] == f"--- {lab.target_addr} ping statistics ---"
    assert re.match(r"^2 packets transmitted, 2 received, 0% packet loss, time \d+ms$", lines[7])
    assert lines[8].startswith("rtt min/avg/max/mdev = ") and len(lines) == 9


def test_flood_is_fully_corrected_one_record_per_reply(lab: Lab) -> None:
    """-f at full speed: every reply corrected from its own kernel record, nothing lost,
    exactly one record read per answered probe (the path is not asked for in text)."""
    proc = subprocess.run(lab.on_host(
        sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
        "-f", "-q", "-c", "5000", lab.target_addr), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    counts = re.search(r"5000 packets transmitted, (\d+) received", proc.stdout)
    assert counts and int(counts.group(1)) == 5000, proc.stdout
    assert "kernel data 5000/5000 replies (100%), 0 events lost, 5000 kernel records" \
        in proc.stdout, proc.stdout


def test_no_reply_exits_1_with_atlas_timeouts(lab: Lab) -> None:
    # 198.18.0.3 is on the lab's outer link but nobody has it: requests go unanswered.
    proc = subprocess.run(
        [sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
         "--json", "-c", "2", "-i", "0.1", "-W", "0.3", "198.18.0.3"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert (doc["rcvd"], doc["min"], doc["avg"], doc["max"]) == (0, -1, -1, -1)
    assert doc["result"] == [{"x": "*", "seq": 1}, {"x": "*", "seq": 2}]


def test_pid_namespace(lab: Lab) -> None:
    sleeper = subprocess.Popen(["ip", "netns", "exec", lab.container_ns(0), "sleep", "30"])
    try:
        proc = subprocess.run(lab.on_host(
            sys.executable, "-m", "mace_tools.cli.ping", "--pid", str(sleeper.pid), "-c", "1",
            "-q", lab.target_addr), capture_output=True, text=True, timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 0, proc.stderr
    assert "kernel data 1/1 replies (100%)" in proc.stdout
