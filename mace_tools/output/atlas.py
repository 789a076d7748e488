"""RIPE Atlas ping result shape (what ripe.atlas.sagan reads), with mace fields beside.

Sagan ignores keys it does not know, so the standard fields keep their meaning and the
mace ones are added per reply and in a "mace" object. Schema: README "JSON output".
"""

from __future__ import annotations

from typing import Any

from mace_tools import __version__
from mace_tools.model import Measurement, RunSummary, Stage
from mace_tools.stats import rtt_stats

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


def _round(v: float) -> float:
    return round(v, 3)


def mace_summary(s: RunSummary, nonce: bytes) -> dict[str, Any]:
    corrected = rtt_stats(s.rtt_corrected_ms)
    n_ok = len(s.rtt_corrected_ms)
    return {
        "tool": f"mace-ping {__version__}",
        "nonce": nonce.hex(),
        "min": _round(corrected.min) if corrected else -1,
        "avg": _round(corrected.avg) if corrected else -1,
        "max": _round(corrected.max) if corrected else -1,
        "mdev": _round(corrected.mdev) if corrected else -1,
        "egress_avg": _round(sum(s.egress_ms) / n_ok) if n_ok else None,
        "ingress_avg": _round(sum(s.ingress_ms) / n_ok) if n_ok else None,
        "replies_with_kernel_data": n_ok,
        "coverage": round(s.coverage, 6),
        "kernel_events_lost": s.kernel_events_lost,
    }


def document(*, dst_name: str, dst_addr: str, src_addr: str, size: int, start_real_ns: int,
             summary: RunSummary, nonce: bytes, results: list[dict[str, Any]],
             first_ttl: int | None) -> dict[str, Any]:
    raw = rtt_stats(summary.rtt_raw_ms)
    return {
        "fw": FW, "af": 4, "type": "ping", "proto": "ICMP",
        "dst_addr": dst_addr, "dst_name": dst_name, "src_addr": src_addr, "from": src_addr,
        "size": size, "ttl": first_ttl if first_ttl is not None else -1,
        "sent": summary.transmitted, "rcvd": summary.received, "dup": summary.duplicates,
        "min": _round(raw.min) if raw else -1,
        "avg": _round(raw.avg) if raw else -1,
        "max": _round(raw.max) if raw else -1,
        "timestamp": start_real_ns // 1_000_000_000, "lts": -1, "step": None,
        "msm_id": None, "prb_id": None,
        "result": results,
        "mace": mace_summary(summary, nonce),
    }
