"""mace-traceroute output: traceroute text with corrected times appended, RIPE Atlas
traceroute JSON, NDJSON per hop.

Text keeps Linux traceroute's line shape (` 1  gw.lan (198.18.1.1)  0.412 ms  0.390 ms
0.401 ms`, with -n ` 1  198.18.1.1  ...`; `*` for timeouts, `!H !N !P !X ...` marks,
`<MPLS:...>` for -e, `F=MTU` for --mtu) and appends the corrected times as one token that
no traceroute parser takes for a probe time (no " ms" after each value):
` 1  198.18.1.1  0.412 ms  0.390 ms  0.401 ms  corrected=0.010,0.011,0.012 host-internal`
(`-` where a reply had no kernel data, `late` where its kernel data was refused as late,
`*` for a timeout).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any

from mace_tools import __version__
from mace_tools.model import HopReply, Measurement, TraceResult
from mace_tools.output.atlas import FW, reply_record
from mace_tools.output.writes import write

_ERR = {"!X": "A"}  # RIPE Atlas' letter for "administratively prohibited"
# An address's name (reverse DNS, hosts), None where it has none; None for -n: numeric.
NameOf = Callable[[str], "str | None"]


def header(dst_name: str, dst_addr: str, max_ttl: int, size: int) -> str:
    return f"traceroute to {dst_name} ({dst_addr}), {max_ttl} hops max, {size} byte packets"


def ttl2hops(ttl: int) -> int:
    """Hops back from an answer's TTL, guessing it started at 64, 128 or 255 (--back)."""
    return (65 if ttl <= 64 else 129 if ttl <= 128 else 256) - ttl


def _address(addr: str, name_of: NameOf | None) -> str:
    """` ADDR` with -n, else ` NAME (ADDR)`, the address standing in for a missing name,
    as traceroute prints it."""
    if name_of is None:
        return f" {addr}"
    return f" {name_of(addr) or addr} ({addr})"


def _same_source(a: HopReply, b: HopReply, back: bool) -> bool:
    """traceroute prints the address again when it, the extensions or (--back) the
    answer's TTL differ from the last answered probe's."""
    assert a.measurement is not None and b.measurement is not None
    return a.measurement.src == b.measurement.src and a.ext == b.ext and \
        (not back or a.measurement.ttl == b.measurement.ttl)


def hop_line(ttl: int, replies: list[HopReply], name_of: NameOf | None = None,
             back: bool = False) -> str:
    out, last, corrected = f"{ttl:2d} ", None, []
    for r in replies:
        m = r.measurement
        if m is None:
            out += f" *{r.annotation}"
            corrected.append("*")
            continue
        if last is None or not _same_source(last, r, back):
            out += _source(ttl, r, m, name_of, back)
        last = r
        out += f"  {m.rtt_raw_ns / 1e6:.3f} ms{r.annotation}"
        corrected.append(_corrected(m))
    out += f"  corrected={','.join(corrected)}"
    if any(r.host_internal for r in replies):
        out += " host-internal"
    return out


def _corrected(m: Measurement) -> str:
    """A reply's corrected time in the hop line; `late`: its kernel data was refused (a
    late return stamp, correlate.returned_late), the one count text has no summary for."""
    if m.late_kernel_stamp:
        return "late"
    return "-" if m.rtt_corrected_ns is None else f"{m.rtt_corrected_ns / 1e6:.3f}"


def _source(ttl: int, r: HopReply, m: Measurement, name_of: NameOf | None,
            back: bool) -> str:
    """Who answered, as traceroute prints it: address (and name), <extensions>, and
    with --back '-N' where the way back seems N hops long, not ttl."""
    out = _address(m.src, name_of)
    if r.ext:
        out += f" <{r.ext}>"
    if back and m.ttl and ttl2hops(m.ttl) != ttl:
        out += f" '-{ttl2hops(m.ttl)}'"
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
        mark = r.annotation.strip()
        if mark.startswith("!"):
            rec["err"] = _ERR.get(mark, mark[1:])
        if r.mtu:
            rec["mtu"] = r.mtu
        if r.ext:
            rec["ext"] = r.ext
        results.append(rec)
    return {"hop": ttl, "result": results}


def document(*, dst_name: str, dst_addr: str, method: str, size: int, paris: bool,
             result: TraceResult, hops: list[dict[str, Any]]) -> dict[str, Any]:
    replies = [r for rs in result.hops.values() for r in rs if r.measurement is not None]
    corrected = [r for r in replies if r.measurement and r.measurement.corrected]
    return {
        "fw": FW, "af": 6 if ":" in dst_addr else 4, "type": "traceroute", "proto": method,
        "dst_addr": dst_addr, "dst_name": dst_name, "src_addr": result.source_addr,
        "from": result.source_addr, "paris_id": 1 if paris else 0, "size": size,
        "timestamp": result.start_real_ns // 1_000_000_000,
        "endtime": result.end_real_ns // 1_000_000_000, "msm_id": None, "prb_id": None,
        "result": hops,
        "mace": {"tool": f"mace-traceroute {__version__}", "nonce": result.nonce.hex(),
                 "replies": len(replies), "replies_with_kernel_data": len(corrected),
                 "coverage": len(corrected) / len(replies) if replies else 1.0,
                 "late_kernel_stamps": sum(r.measurement.late_kernel_stamp
                                           for r in replies if r.measurement),
                 "kernel_events_lost": result.kernel_events_lost,
                 "source": result.source},
    }


class TraceOutput:
    """Text, JSON or NDJSON, as the run goes."""

    def __init__(self, mode: str, *, dst_name: str, dst_addr: str, method: str, max_ttl: int,
                 size: int, paris: bool, out: IO[str] | None = None,
                 name_of: NameOf | None = None, back: bool = False) -> None:
        """size: the probes' IP packet length; name_of: hop names for the text (None:
        numeric, -n); back: --back."""
        self.mode, self.dst_name, self.dst_addr = mode, dst_name, dst_addr
        self.method, self.max_ttl, self.size, self.paris = method, max_ttl, size, paris
        self.out = out or sys.stdout
        self.name_of, self.back = name_of, back
        self.hops: list[dict[str, Any]] = []

    def _write(self, line: str) -> None:
        write(self.out, line + "\n")

    def start(self, source_addr: str) -> None:
        if self.mode == "text":
            self._write(header(self.dst_name, self.dst_addr, self.max_ttl, self.size))

    def hop(self, ttl: int, replies: list[HopReply]) -> None:
        if self.mode == "text":
            self._write(hop_line(ttl, replies, self.name_of, self.back))
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
