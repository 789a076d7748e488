"""RIPE Atlas ping result shape (what ripe.atlas.sagan reads), with mace fields beside.

Sagan ignores keys it does not know, so the standard fields keep their meaning and the
mace ones are added per reply and in a "mace" object. Schema: README "JSON output".
"""

from __future__ import annotations

from typing import Any

from mace_tools import __version__
from mace_tools.model import Measurement, RttStats, RunSummary, Stage

FW = 5020  # result format of Atlas firmware >= 5000, which sagan parses
NS_PER_MS = 1_000_000


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / NS_PER_MS, 6)


def stage_record(s: Stage) -> dict[str, Any]:
    return {
        "pkt": s.packet.name.lower(), "dev": s.dev, "ifindex": s.ifindex, "netns": s.netns,
        "dir": "tx" if s.leaving else "rx", "t": round(s.t_ns / 1000, 3),
        "src": s.src, "dst": s.dst,
    }


def reply_record(m: Measurement) -> dict[str, Any]:
    rec: dict[str, Any] = {"rtt": _ms(m.rtt_raw_ns)}
    if m.dup:
        rec["dup"] = 1
    if m.late_kernel_stamp:  # kernel data refused (correlate.returned_late): raw only
        rec["late_kernel_stamp"] = 1
    rec.update({
        "seq": m.seq, "ttl": m.ttl, "srcaddr": m.src,
        "rtt_corrected": _ms(m.rtt_corrected_ns),
        "egress": _ms(m.egress_ns), "ingress": _ms(m.ingress_ns),
        "outer_dev": m.outer_dev,
        "path": [stage_record(s) for s in m.path],
    })
    return rec


def timeout_record(seq: int) -> dict[str, Any]:
    return {"x": "*", "seq": seq}


def send_error_record(seq: int, text: str) -> dict[str, Any]:
    """A probe the kernel refused to send (sendto failed): Atlas' per-packet error shape."""
    return {"error": text, "seq": seq}


def _round(v: float) -> float:
    return round(v, 3)


def _stat(stats: RttStats | None, name: str) -> float:
    """One statistic rounded to µs, or Atlas' -1 when the series is empty."""
    return -1 if stats is None else _round(getattr(stats, name))


def mace_summary(s: RunSummary, nonce: bytes, source: str = "local") -> dict[str, Any]:
    corrected = s.rtt_corrected
    return {
        "tool": f"mace-ping {__version__}",
        "nonce": nonce.hex(),
        # where the kernel data came from: "agent" (the host's mace-agent), "local" (the
        # programs this run joined or loaded) or "none" (no source: every reply raw)
        "source": source,
        "min": _stat(corrected, "min"),
        "avg": _stat(corrected, "avg"),
        "max": _stat(corrected, "max"),
        "mdev": _stat(corrected, "mdev"),
        # nearest-rank percentiles from the run's sketch: within 1% (stats.RELATIVE_ERROR)
        "p50": _stat(corrected, "p50"),
        "p95": _stat(corrected, "p95"),
        "p99": _stat(corrected, "p99"),
        "egress_avg": None if s.egress_avg_ms is None else _round(s.egress_avg_ms),
        "ingress_avg": None if s.ingress_avg_ms is None else _round(s.ingress_avg_ms),
        "replies_with_kernel_data": s.corrected_count,
        "coverage": round(s.coverage, 6),
        # replies whose return was stamped after their receive stamp: shown raw
        "late_kernel_stamps": s.late_kernel_stamps,
        "kernel_events_lost": s.kernel_events_lost,
        "kernel_records": s.kernel_records,  # read from the kernel: 1 per answer, + path
    }


def document(*, dst_name: str, dst_addr: str, src_addr: str, size: int, start_real_ns: int,
             summary: RunSummary, nonce: bytes, results: list[dict[str, Any]],
             first_ttl: int | None, source: str = "local") -> dict[str, Any]:
    raw = summary.rtt_raw
    return {
        "fw": FW, "af": 6 if ":" in dst_addr else 4, "type": "ping", "proto": "ICMP",
        "dst_addr": dst_addr, "dst_name": dst_name, "src_addr": src_addr, "from": src_addr,
        "size": size, "ttl": first_ttl if first_ttl is not None else -1,
        "sent": summary.transmitted, "rcvd": summary.received, "dup": summary.duplicates,
        "min": _stat(raw, "min"),
        "avg": _stat(raw, "avg"),
        "max": _stat(raw, "max"),
        "timestamp": start_real_ns // 1_000_000_000, "lts": -1, "step": None,
        "msm_id": None, "prb_id": None,
        "result": results,
        "mace": mace_summary(summary, nonce, source),
    }
