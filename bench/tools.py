"""Run each measured tool in the lab and return its RTT per ICMP seq (ms).

Every tool is keyed so truth v2 (captures on the host's outer link) can find its probes:
mace-ping by its payload nonce (--nonce), iputils ping by its ICMP id (-e), scamper by
its ICMP id (-F). NAT keeps ids consistent on the outer link. mace-ping runs in the lab's
host netns and enters the container's with --netns, as on a container host.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from mace_tools.lab.demo import outer_link_transit_us
from mace_tools.lab.topology import Lab

_PING_LINE = re.compile(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms")


@dataclass
class ToolRun:
    """A running tool writing to temp files (a full pipe would stall it while the bench
    is busy elsewhere); `collect()` waits and parses its output."""

    name: str
    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    err: IO[bytes]
    parse: Callable[[str], ToolResult]
    key: tuple[str, object]  # ("nonce", bytes) or ("id", int): how the capture finds it

    def collect(self, timeout_s: float = 600) -> ToolResult:
        self.proc.wait(timeout=timeout_s)
        self.out.seek(0)
        self.err.seek(0)
        result = self.parse(self.out.read().decode())
        result.stderr = self.err.read().decode()
        result.returncode = self.proc.returncode
        self.out.close()
        self.err.close()
        return result


@dataclass
class ToolResult:
    rtt_ms: dict[int, float] = field(default_factory=dict)  # seq -> raw RTT
    corrected_ms: dict[int, float | None] = field(default_factory=dict)  # mace only
    transit_us: dict[int, float | None] = field(default_factory=dict)  # mace: truth residual
    summary: dict = field(default_factory=dict)
    stderr: str = ""
    returncode: int = 0


def _start(name: str, cmd: list[str], parse: Callable[[str], ToolResult],
           key: tuple[str, object]) -> ToolRun:
    # closed by ToolRun.collect(), after the tool has exited
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
    return ToolRun(name, subprocess.Popen(cmd, stdout=out, stderr=err), out, err, parse, key)


def parse_iputils(out: str) -> ToolResult:
    res = ToolResult()
    for m in _PING_LINE.finditer(out):
        res.rtt_ms.setdefault(int(m.group(1)), float(m.group(2)))
    return res


def iputils(lab: Lab, netns: str, ident: int, count: int, interval: float,
            name: str = "iputils") -> ToolRun:
    cmd = ["ip", "netns", "exec", netns, "ping", "-n", "-e", str(ident), "-c", str(count),
           "-i", str(interval), "-W", "1", lab.target_addr]
    return _start(name, cmd, parse_iputils, ("id", ident))


def parse_scamper(out: str) -> ToolResult:
    res = ToolResult()
    for line in out.splitlines():
        rec = json.loads(line) if line.startswith("{") else {}
        if rec.get("type") == "ping":
            for r in rec.get("responses", []):
                # scamper counts seq from 0 by default; we start it at 1 (-d 1)
                res.rtt_ms.setdefault(int(r["seq"]), float(r["rtt"]))
    return res


def scamper(lab: Lab, netns: str, ident: int, count: int, interval: float) -> ToolRun:
    # -O dl: datalink (packet socket) timestamps in the tool's own netns; -d 1: first seq 1
    command = f"ping -c {count} -i {interval} -F {ident} -d 1 -O dl"
    cmd = ["ip", "netns", "exec", netns, "scamper", "-O", "json", "-c", command,
           "-i", lab.target_addr]
    return _start("scamper -O dl", cmd, parse_scamper, ("id", ident))


def parse_mace(out: str) -> ToolResult:
    res = ToolResult()
    for line in out.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "reply" and not rec.get("dup"):
            res.rtt_ms[rec["seq"]] = rec["rtt"]
            res.corrected_ms[rec["seq"]] = rec["rtt_corrected"]
            res.transit_us[rec["seq"]] = outer_link_transit_us(rec)
        elif rec.get("type") == "summary":
            res.summary = rec
    return res


def mace_ping(lab: Lab, container: int, nonce: bytes, count: int, interval: float,
              *extra: str) -> ToolRun:
    cmd = lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                  lab.netns_path(lab.container_ns(container)), "--ndjson", "--nonce",
                  nonce.hex(), "-c", str(count), "-i", str(interval), *extra,
                  lab.target_addr)
    return _start("mace-ping", cmd, parse_mace, ("nonce", nonce))


def capture_filter(runs: list[ToolRun]) -> str:
    terms = []
    for run in runs:
        kind, value = run.key
        if kind == "id":
            terms.append(f"icmp[4:2] = {value}")
        else:
            nonce: bytes = value  # type: ignore[assignment]
            terms.append(f"(icmp[8:4] = 0x{nonce[:4].hex()} and icmp[12:4] = 0x{nonce[4:].hex()})")
    return "icmp and (" + " or ".join(terms) + ")"
