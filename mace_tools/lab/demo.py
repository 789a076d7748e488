"""The lab demo, as functions the CLI, the tests and the bench share.

`run_mace_ping` runs the real `mace-ping` command (a subprocess, as a user would) from a
lab container with --ndjson, while truth v2 (inbound captures at both ends of the host's
outer link, lab/capture.py) records the truth; `compare` pairs each reply with it by the
run's nonce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from mace_tools.lab.capture import Capture, CapturedEcho, TruthCapture
from mace_tools.lab.topology import Lab, LabError


@dataclass(frozen=True, slots=True)
class ProbeRow:
    seq: int
    raw_ms: float
    corrected_ms: float | None
    capture_ms: float | None  # the truth's RTT
    outer_dev: str | None = None  # the device mace took the correction at
    transit_us: float | None = None  # the truth's residual (outer_link_transit_us)

    @property
    def error_us(self) -> float | None:
        """corrected minus truth, in µs (None when either is missing)."""
        if self.corrected_ms is None or self.capture_ms is None:
            return None
        return (self.corrected_ms - self.capture_ms) * 1000


@dataclass
class PingRun:
    records: list[dict]
    summary: dict
    returncode: int
    stderr: str

    @property
    def nonce(self) -> bytes:
        return bytes.fromhex(self.summary["mace"]["nonce"])


def parse_ndjson(text: str) -> tuple[list[dict], dict]:
    """Per-probe records and the summary record of `mace-ping --ndjson` output."""
    records, summary = [], None
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "summary":
            summary = rec
        else:
            records.append(rec)
    if summary is None:
        raise LabError("mace-ping printed no summary record")
    return records, summary


def mace_ping_command(lab: Lab, container: int, *args: str,
                      target: str | None = None) -> list[str]:
    """mace-ping from the lab's host netns into a container's, to target (default: the
    lab's IPv4 target)."""
    return lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                       lab.netns_path(lab.container_ns(container)), "--ndjson", *args,
                       target or lab.target_addr)


def run_mace_ping(lab: Lab, container: int, *args: str, timeout_s: float = 300,
                  target: str | None = None) -> PingRun:
    proc = subprocess.run(mace_ping_command(lab, container, *args, target=target),
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode == 2:
        raise LabError(f"mace-ping failed: {proc.stderr.strip()}")
    records, summary = parse_ndjson(proc.stdout)
    return PingRun(records, summary, proc.returncode, proc.stderr)


def outer_link_transit_us(record: dict) -> float | None:
    """The request's transit of the outer link as mace's own events show it (µs): from its
    last departure from the outer device to its next arrival, at the far end. Truth v2 is
    shorter than the outer device's departure-to-arrival time by exactly this: its residual.
    None without the outer device or the far end's arrival in the record's path."""
    dev, _, netns = (record.get("outer_dev") or "").rpartition("@")
    path = record.get("path") or []
    left = [s["t"] for s in path if s["pkt"] == "request" and s["dir"] == "tx"
            and s["dev"] == dev and str(s["netns"]) == netns]
    if not left:
        return None
    arrived = next((s["t"] for s in path if s["pkt"] == "request" and s["dir"] == "rx"
                    and s["t"] >= left[-1] and str(s["netns"]) != netns), None)
    return None if arrived is None else arrived - left[-1]


def probe_rows(run: PingRun, truth: dict[int, CapturedEcho]) -> list[ProbeRow]:
    """Each distinct reply with its truth by seq (capture_ms None when the truth missed it)
    and the truth's residual."""
    rows = []
    for rec in run.records:
        if rec.get("type") != "reply" or rec.get("dup"):
            continue
        echo = truth.get(rec["seq"])
        rtt = echo.rtt_ns if echo else None
        rows.append(ProbeRow(rec["seq"], rec["rtt"], rec["rtt_corrected"],
                             None if rtt is None else rtt / 1e6, rec.get("outer_dev"),
                             outer_link_transit_us(rec)))
    return rows


def compare(run: PingRun, capture: TruthCapture) -> list[ProbeRow]:
    """The run's replies paired with the truth of its probes (by the run's nonce)."""
    return probe_rows(run, capture.echoes(run.nonce))


def measure(lab: Lab, container: int, count: int, *args: str, nonce: bytes | None = None,
            target: str | None = None) -> tuple[PingRun, list[ProbeRow]]:
    """mace-ping -c count from a container to target (default: the lab's IPv4 target)
    against truth v2 on the lab's outer link (captures filtered in the kernel by the
    run's nonce)."""
    nonce = nonce or os.urandom(8)
    with TruthCapture(lab.outer_link, Capture.nonce_filter(nonce),
                      expect_requests=count) as cap:
        run = run_mace_ping(lab, container, "-c", str(count), "--nonce", nonce.hex(), *args,
                            target=target)
    return run, compare(run, cap)
