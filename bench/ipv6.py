"""IPv6 beside IPv4 in one dual-stack lab (Lab(ipv6=True): NAT66 as Docker does it):
corrected - truth v2 for mace-ping over each family, idle and with flooding neighbours of
the same family, so the two are compared on the same machine, lab and minute."""

from __future__ import annotations

from bench import experiments as ex
from mace_tools.lab.demo import ProbeRow, measure
from mace_tools.lab.topology import Lab

SETTINGS = (("idle", 0), ("4 floods", 4))


def ipv6_accuracy(lab: Lab, probes: int, interval: float, cost_seconds: float) -> dict:
    """One row per (setting, family): mace-ping -c probes -i interval from c0; and the
    programs' cost per run on foreign traffic of each family (4 iputils floods)."""
    rows = []
    for name, neighbours in SETTINGS:
        for family in (4, 6):
            target = lab.target_addr6 if family == 6 else lab.target_addr
            with ex.load_setting_to(lab, neighbours, target, probes * interval + 30):
                run, probe_rows = measure(lab, 0, probes, "-i", str(interval), target=target)
            rows.append(_row(name, neighbours, family, probes, interval, run.summary,
                             probe_rows))
            d = rows[-1]["corrected"]
            print(f"  IPv{family} {name}: corrected - truth {ex._fmt(d)}", flush=True)
    cost = {}
    for family, target in ((4, lab.target_addr), (6, lab.target_addr6)):
        cost[family] = ex.foreign_cost(lab, cost_seconds, 4, flood_target=target)
        print(f"  foreign IPv{family} floods: {cost[family]['programs']['all']['ns_per_run']:.1f}"
              " ns per program run", flush=True)
    return {"rows": rows, "foreign_cost": cost}


def _row(name: str, neighbours: int, family: int, probes: int, interval: float,
         summary: dict, probe_rows: list[ProbeRow]) -> dict:
    mace = summary.get("mace", {})
    paired = [r for r in probe_rows if r.error_us is not None]
    return {
        "setting": name, "neighbours": neighbours, "family": family, "probes": probes,
        "interval_s": interval, "replies": len(probe_rows), "truth_matched": len(paired),
        "coverage": mace.get("coverage"), "kernel_events_lost": mace.get("kernel_events_lost"),
        "corrected": ex.distribution([r.error_us for r in paired]),  # type: ignore[misc]
        "raw": ex.distribution([r.raw_ms * 1000 - r.capture_ms * 1000 for r in paired
                                if r.capture_ms is not None]),
        "truth_residual_us": ex.distribution([r.transit_us for r in paired
                                              if r.transit_us is not None]),
        "error_minus_residual_us": ex.distribution([
            r.error_us - r.transit_us for r in paired  # type: ignore[operator]
            if r.transit_us is not None]),
    }
