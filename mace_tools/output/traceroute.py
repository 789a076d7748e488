"""mace-traceroute output: traceroute text with corrected times appended, RIPE Atlas
traceroute JSON, NDJSON per hop.

Text keeps Linux traceroute's line shape (` 1  198.18.1.1  0.412 ms  0.390 ms  0.401 ms`,
`*` for timeouts, `!H !N !P !X` marks) and appends the corrected times as one token that
no traceroute parser takes for a probe time (no " ms" after each value):
` 1  198.18.1.1  0.412 ms  0.390 ms  0.401 ms  corrected=0.010,0.011,0.012 host-internal`
(`-` where a reply had no kernel data, `*` for a timeout).
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from mace_tools import __version__
from mace_tools.model import HopReply, TraceResult
from mace_tools.output.atlas import FW, reply_record

_ERR = {" !H": "H", " !N": "N", " !P": "P", " !X": "A", " !F": "F", " !S": "S"}


def header(dst_name: str, dst_addr: str, max_ttl: int, size: int) -> str:
    return f"traceroute to {dst_name} ({dst_addr}), {max_ttl} hops max, {size} byte packets"


def hop_line(ttl: int, replies: list[HopReply]) -> str:
    out, last_addr, corrected = f"{ttl:2d} ", None, []
    for r in replies:
        m = r.measurement
        if m is None:
            out += " *"
            corrected.append("*")
            continue
        if m.src != last_addr:
            out += f" {m.src}"
            last_addr = m.src
        out += f"  {m.rtt_raw_ns / 1e6:.3f} ms{r.annotation}"
        corrected.append("-" if m.rtt_corrected_ns is None else f"{m.rtt_corrected_ns / 1e6:.3f}")
    out += f"  corrected={','.join(corrected)}"
    if any(r.host_internal for r in replies):
        out += " host-internal"
    return out


def hop_record(ttl: int, replies: list[HopReply]) -> dict[str, Any]:
    results = []
    for r in replies:
        if r.measurement is None:
            results.append({"x": "*"})
            continue
        rec = reply_record(r.measurement)
        rec = {"from": rec.pop("srcaddr"), "rtt": rec.pop("rtt"),
               "size": r.measurement.icmp_bytes, **rec, "host_internal": r.host_internal}
        if r.annotation.strip():
            rec["err"] = _ERR.get(r.annotation, r.annotation.strip(" !"))
        results.append(rec)
    return {"hop": ttl, "result": results}


def document(*, dst_name: str, dst_addr: str, method: str, size: int, paris: bool,
             result: TraceResult, hops: list[dict[str, Any]]) -> dict[str, Any]:
    replies = [r for rs in result.hops.values() for r in rs if r.measurement is not None]
    corrected = [r for r in replies if r.measurement and r.measurement.corrected]
    return {
        "fw": FW, "af": 4, "type": "traceroute", "proto": method,
        "dst_addr": dst_addr, "dst_name": dst_name, "src_addr": result.source_addr,
        "from": result.source_addr, "paris_id": 1 if paris else 0, "size": size,
        "timestamp": result.start_real_ns // 1_000_000_000,
        "endtime": result.end_real_ns // 1_000_000_000, "msm_id": None, "prb_id": None,
        "result": hops,
        "mace": {"tool": f"mace-traceroute {__version__}", "nonce": result.nonce.hex(),
                 "replies": len(replies), "replies_with_kernel_data": len(corrected),
                 "coverage": len(corrected) / len(replies) if replies else 1.0,
                 "kernel_events_lost": result.kernel_events_lost,
                 "source": result.source},
    }


class TraceOutput:
    """Text, JSON or NDJSON, as the run goes."""

    def __init__(self, mode: str, *, dst_name: str, dst_addr: str, method: str, max_ttl: int,
                 size: int, paris: bool, out: IO[str] | None = None) -> None:
        self.mode, self.dst_name, self.dst_addr = mode, dst_name, dst_addr
        self.method, self.max_ttl, self.size, self.paris = method, max_ttl, size, paris
        self.out = out or sys.stdout
        self.hops: list[dict[str, Any]] = []

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def start(self, source_addr: str) -> None:
        if self.mode == "text":
            self._write(header(self.dst_name, self.dst_addr, self.max_ttl, self.size))

    def hop(self, ttl: int, replies: list[HopReply]) -> None:
        if self.mode == "text":
            self._write(hop_line(ttl, replies))
        elif self.mode == "ndjson":
            self._write(json.dumps({"type": "hop", **hop_record(ttl, replies)}))
        else:
            self.hops.append(hop_record(ttl, replies))

    def finish(self, result: TraceResult) -> None:
        if self.mode == "text":
            return
        doc = document(dst_name=self.dst_name, dst_addr=self.dst_addr, method=self.method,
                       size=self.size, paris=self.paris, result=result, hops=self.hops)
        if self.mode == "ndjson":
            del doc["result"]
            doc["type"] = "summary"
        self._write(json.dumps(doc))
