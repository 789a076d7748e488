"""results.json -> results.md (tables, targets met or missed) and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# (neighbours, load, label) of the accuracy settings issue 10's bias target covers
ACCURACY_V2 = [(0, "idle", "idle"), (2, "flood", "2 floods"), (4, "flood", "4 floods"),
               (8, "flood", "8 floods")]
TOOLS = ["mace-ping corrected", "mace-ping raw", "iputils ping (container)",
         "iputils ping (host netns)", "scamper ping -O dl (container)"]


def _pm(se: float) -> str:
    return f" ± {se:.2f}"


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _within(value: float, se: float, limit: float) -> bool | None:
    """value <= limit at about 95% confidence: True if even value + 2 se is within, False if
    even value - 2 se is beyond, None when this machine cannot tell."""
    if value + 2 * se <= limit:
        return True
    if value - 2 * se > limit:
        return False
    return None


def _all_within(verdicts: list[bool | None]) -> bool | None:
    if False in verdicts:
        return False
    return None if None in verdicts else True


NOT_MEASURED = "not measured"
# the second perturbation measure: the instances' own CPU kept off the witness's
APART = "runs' CPU apart from the witness's"
VERDICT: dict[bool | str | None, str] = {
    True: "yes", False: "**MISSED**", None: "not resolved (within 2 standard errors)",
    NOT_MEASURED: "**not measured** (see its section)"}


def _measured(res: dict, key: str) -> Any:
    """The section's figures, or None where the bench could not measure it."""
    value = res.get(key)
    return None if value is None or (isinstance(value, dict) and "error" in value) else value


def targets(res: dict) -> list[tuple[str, str, bool | str | None]]:
    """(target, measured, verdict); a section that could not measure gives "not measured"."""
    rows: list[tuple[str, str, bool | str | None]] = []
    acc = _measured(res, "accuracy")
    if acc:
        corr = [r["tools"]["mace-ping corrected"] for r in acc]
        worst_mean = max(abs(c.get("mean", 1e9)) for c in corr)
        worst_p99 = max(c.get("abs_p99", 1e9) for c in corr)
        cov = min(r["coverage"] or 0 for r in acc)
        rows += [
            ("corrected - truth v2: \\|mean\\| <= 2 µs, every setting",
             f"{worst_mean:.2f} µs (worst)", worst_mean <= 2),
            ("corrected - truth v2: p99 of \\|error\\| <= 10 µs, every setting",
             f"{worst_p99:.2f} µs (worst)", worst_p99 <= 10),
            ("coverage 100.0%, every setting", f"{cov * 100:.1f}% (lowest)", cov == 1.0)]
    else:
        rows.append(("accuracy targets", "-", NOT_MEASURED))
    flood = _measured(res, "flood")
    if flood:
        runs = flood.get("probes_per_s_runs", [flood["probes_per_s"]])
        rows.append(("flood >= 10,000 probes/s with 100% coverage",
                     f"{flood['probes_per_s']:.0f}/s (median; runs {_runs(runs)}) at "
                     f"{(flood['coverage'] or 0) * 100:.1f}%",
                     min(runs) >= 10000 and flood["coverage"] == 1.0))
    else:
        rows.append(("flood >= 10,000 probes/s", "-", NOT_MEASURED))
    pert = _measured(res, "perturbation")
    if pert:
        worst = max(pert, key=lambda p: p["bpf_delta_mean_us"])
        below_ftrace = all(p["bpf_delta_mean_us"] < p["ftrace_delta_mean_us"] for p in pert)
        rows += [
            ("perturbation <= 1 µs mean, every setting",
             f"{worst['bpf_delta_mean_us']:+.2f}{_pm(worst['bpf_delta_mean_se_us'])} µs "
             f"(worst; ± standard error)", _all_within([_within(
                 p["bpf_delta_mean_us"], p["bpf_delta_mean_se_us"], 1.0) for p in pert])),
            ("perturbation below ftrace's, every setting", "yes" if below_ftrace else "no",
             below_ftrace)]
    else:
        rows.append(("perturbation targets", "-", NOT_MEASURED))
    cost = _measured(res, "cost")
    costs = [v["ns_per_run"] for k, v in (cost or {}).get("programs", {}).items()
             if k != "all" and v["ns_per_run"]]
    rows.append(("<= 150 ns per BPF program run (flood)",
                 f"{max(costs):.1f} ns (worst program)", max(costs) <= 150) if costs else
                ("<= 150 ns per BPF program run (flood)", "-", NOT_MEASURED))
    start = (_measured(res, "startup") or {}).get("mace-ping -c 1")
    if start:
        rows.append(("mace-ping -c 1 to first probe <= 150 ms",
                     f"{_f(start['first_probe_ms_median'], 1)} ms (median)",
                     (start["first_probe_ms_median"] or 1e9) <= 150))
        rss = [start["peak_rss_mb"], *([flood["max_rss_mb"]] if flood else [])]
        rows.append(("peak RSS <= 60 MB", f"{max(rss):.1f} MB", max(rss) <= 60))
    else:
        rows.append(("start-up targets", "-", NOT_MEASURED))
    return rows


def _why(res: dict, key: str) -> str:
    """A section's reason for not measuring, for the measured column."""
    value = res.get(key)
    return value["error"] if isinstance(value, dict) and "error" in value else "-"


def _flood_target(res: dict, key: str, label: str) -> tuple[str, str, bool | str | None]:
    target = f"`-f` rate vs iputils `-f`, same container (c0), {label}: >= 0.5x, 100% " \
             "coverage, 0 lost"
    f = _measured(res, key)
    if not f:
        return target, _why(res, key), NOT_MEASURED
    lost = "unknown" if f["lost_unknown"] else str(f["kernel_events_lost_total"])
    measured = (f"{f['ratio_median']:.2f}x (median of {f['repeats']} pairs: "
                f"{', '.join(f'{r:.2f}' for r in f['ratio_runs'])}); mace "
                f"{f['probes_per_s']:.0f}/s, iputils {_runs(f['iputils_per_s_runs'])}/s; "
                f"coverage {f['coverage_min'] * 100:.1f}% (lowest), {lost} lost")
    return target, measured, (f["ratio_median"] >= 0.5 and f["coverage_min"] == 1.0
                              and not f["lost_unknown"] and f["kernel_events_lost_total"] == 0)


def _accuracy_targets(res: dict) -> list[tuple[str, str, bool | str | None]]:
    rows: list[tuple[str, str, bool | str | None]] = []
    acc = {(r["neighbours"], r["load"]): r for r in _measured(res, "accuracy") or []}
    for neighbours, load, label in ACCURACY_V2:
        target = f"corrected - truth v2, {label}: \\|mean\\| <= 0.5 µs, p99 \\|err\\| <= 2 µs"
        d = acc.get((neighbours, load), {}).get("tools", {}).get("mace-ping corrected", {})
        if not d.get("n"):
            rows.append((target, _why(res, "accuracy"), NOT_MEASURED))
            continue
        rows.append((target, f"mean {d['mean']:+.2f} µs, p99 \\|err\\| {d['abs_p99']:.2f} µs "
                     f"(n {d['n']})", abs(d["mean"]) <= 0.5 and d["abs_p99"] <= 2))
    return rows


def _scaling_targets(res: dict) -> list[tuple[str, str, bool | str | None]]:
    rows = _flat_targets(_measured(res, "scaling"), _why(res, "scaling"),
                         "1..8 concurrent runs", "concurrent run(s)", "runs")
    if "scaling_apart" not in res:
        return rows
    return [*rows, *_flat_targets(_measured(res, "scaling_apart"), _why(res, "scaling_apart"),
                                  f"1..8 concurrent runs, {APART}",
                                  f"concurrent run(s), {APART}", "runs")]


def _flat_targets(measured: list[dict] | None, why: str, span: str, unit: str, plural: str
                  ) -> list[tuple[str, str, bool | str | None]]:
    """mace minus control <= 0.5 µs at every N, and flat: the value at the most runs minus
    the value at 1 run <= 0.5 µs, both at ~95% confidence (± 2 standard errors)."""
    rows = [r for r in measured or [] if "error" not in r]
    errors = [r for r in measured or [] if "error" in r]
    if not rows:
        return [(f"neighbour perturbation, {span}: mace minus control <= 0.5 µs, "
                 "flat in N", why, NOT_MEASURED)]
    out: list[tuple[str, str, bool | str | None]] = []
    for r in rows:
        out.append((f"neighbour perturbation, {r['instances']} {unit}: mace minus "
                    "control <= 0.5 µs",
                    f"{r['bpf_share_mean_us']:+.2f}{_pm(r['bpf_share_se_us'])} µs",
                    _within(r["bpf_share_mean_us"], r["bpf_share_se_us"], 0.5)))
    for r in errors:
        out.append((f"neighbour perturbation, {r['instances']} {plural}", r["error"],
                    NOT_MEASURED))
    first, last = rows[0], rows[-1]
    target = (f"neighbour perturbation flat in N, {span}: (mace minus control at "
              f"{last['instances']} {plural}) - (at {first['instances']}) <= 0.5 µs")
    if first is last:
        return [*out, (target, "-", NOT_MEASURED)]
    growth = last["bpf_share_mean_us"] - first["bpf_share_mean_us"]
    se = (first["bpf_share_se_us"] ** 2 + last["bpf_share_se_us"] ** 2) ** 0.5
    return [*out, (target, f"{growth:+.2f}{_pm(se)} µs", _within(growth, se, 0.5))]


def _foreign_target(res: dict) -> tuple[str, str, bool | str | None]:
    target = "ns per program run, foreign traffic (4 iputils floods, 1 run at -i 1): <= 40"
    c = _measured(res, "foreign_cost")
    costs = {k: v["ns_per_run"] for k, v in (c or {}).get("programs", {}).items()
             if k != "all" and v["ns_per_run"] is not None}
    if not costs:
        return target, _why(res, "foreign_cost") if not c else "no program ran", NOT_MEASURED
    worst = max(costs.values())
    each = ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
    floors = [v["ns_per_run"] for k, v in c.get("floor", {}).items()
              if k != "all" and v["ns_per_run"] is not None]
    floor = f"; a program that does nothing, same hooks and traffic: {max(floors):.1f} " \
        "worst" if floors else ""
    return target, f"{worst:.1f} ns (worst program; {each}{floor})", worst <= 40


def _records_target(res: dict) -> tuple[str, str, bool | str | None]:
    target = "records per answered probe crossing to userspace (`-q -c 500 -i 0.01`): 1"
    r = _measured(res, "records")
    if not r or r["records_per_answered_probe"] is None:
        return target, _why(res, "records") if not r else "no reply", NOT_MEASURED
    return target, (f"{r['records_per_answered_probe']:.2f} ({r['kernel_records']} records / "
                    f"{r['received']} replies)"), r["kernel_records"] == r["received"]


def targets_v2(res: dict) -> list[tuple[str, str, bool | str | None]]:
    """The kernel side v2 targets (issue 10), every row measured in this one run."""
    return [_flood_target(res, "flood", "idle"),
            _flood_target(res, "flood_loaded", "4 flood neighbours"),
            *_accuracy_targets(res), *_scaling_targets(res), _foreign_target(res),
            _records_target(res)]


def _agent_startup_target(res: dict) -> tuple[str, str, bool | str | None]:
    target = "`mace-ping -c 1` wall through the agent, client with no capability: <= 80 ms median"
    s = _measured(res, "agent_startup")
    if not s:
        return target, _why(res, "agent_startup"), NOT_MEASURED
    t = s["tools"]
    a = t["agent"]
    measured = (f"{a['wall_ms_median']:.1f} ms median, p90 {a['wall_ms_p90']:.1f} (standalone "
                f"loading the programs: {t['standalone_cold']['wall_ms_median']:.1f}; iputils: "
                f"{t['iputils']['wall_ms_median']:.1f}; {a['runs']} runs each, interleaved; "
                f"client capabilities: {s['client_capabilities']}; {a['corrected']} of "
                f"{a['runs']} corrected)")
    return target, measured, (a["wall_ms_median"] <= 80 and a["failed"] == 0
                              and a["corrected"] == a["runs"])


def _agent_accuracy_targets(res: dict) -> list[tuple[str, str, bool | str | None]]:
    limits = "\\|mean\\| <= 1 µs, p99 \\|err\\| <= 5 µs, coverage 100%"
    a = _measured(res, "agent_accuracy")
    if not a:
        return [(f"client with no capability, corrected - truth v2: {limits}",
                 _why(res, "agent_accuracy"), NOT_MEASURED)]
    rows: list[tuple[str, str, bool | str | None]] = []
    for r in a["rows"]:
        target = f"client through the agent, corrected - truth v2, {r['setting']}: {limits}"
        d = r.get("corrected", {})
        if "error" in r or not d.get("n"):
            rows.append((target, r.get("error", "no reply with its truth"), NOT_MEASURED))
            continue
        coverage = r["coverage"] or 0.0
        rows.append((target, f"mean {d['mean']:+.2f} µs, p99 \\|err\\| {d['abs_p99']:.2f} µs, "
                     f"coverage {coverage * 100:.1f}% (n {d['n']}; raw - truth: mean "
                     f"{r['raw']['mean']:+.2f} µs; client capabilities: "
                     f"{a['client_capabilities']})",
                     abs(d["mean"]) <= 1 and d["abs_p99"] <= 5 and coverage == 1.0
                     and r["source"] == "agent"))
    return rows


def _agent_resource_targets(res: dict) -> list[tuple[str, str, bool | str | None]]:
    rss, cpu = "agent RSS <= 60 MB (peak, idle and 16 clients)", "agent CPU idle <= 2% of a core"
    r = _measured(res, "agent_resources")
    if not r:
        why = _why(res, "agent_resources")
        return [(rss, why, NOT_MEASURED), (cpu, why, NOT_MEASURED)]
    idle, busy = r["idle"], r["busy"]
    peak = max(idle["VmHWM"], busy["VmHWM"])
    return [
        (rss, f"{peak:.1f} MB peak (VmHWM); VmRSS {idle['VmRSS']:.1f} MB idle, "
              f"{busy['VmRSS']:.1f} MB with {busy['clients']} clients", peak <= 60),
        (cpu, f"{idle['cpu_percent']:.2f}% over {idle['seconds']:.0f} s idle; "
              f"{busy['cpu_percent']:.2f}% with {busy['clients']} clients at -i "
              f"{r['interval_s']} (no target; the clients themselves: "
              f"{busy['clients_cpu_percent']:.0f}%)", idle["cpu_percent"] <= 2)]


def targets_agent(res: dict) -> list[tuple[str, str, bool | str | None]]:
    """mace-agent's targets (issue 11), every row measured in this one run."""
    pert = _measured(res, "agent_perturbation")
    apart = _measured(res, "agent_perturbation_apart")
    return [_agent_startup_target(res), *_agent_accuracy_targets(res),
            *_flat_targets(pert["rows"] if pert else None, _why(res, "agent_perturbation"),
                           "1..16 clients through the agent", "client(s) through the agent",
                           "clients"),
            *(_flat_targets(apart["rows"] if apart else None,
                            _why(res, "agent_perturbation_apart"),
                            f"1..16 clients through the agent, {APART}",
                            f"client(s) through the agent, {APART}", "clients")
              if "agent_perturbation_apart" in res else []),
            *_agent_resource_targets(res)]


def targets_fleet(res: dict) -> list[tuple[str, str, bool | str | None]]:
    """mace-agent exporting (issue 13): 100 probes at 1/s from 10 lab containers."""
    cpu, rss, scrape = ("agent CPU <= 5% of a core", "agent RSS <= 80 MB",
                        "scrape of /metrics <= 50 ms")
    r = _measured(res, "fleet")
    if not r:
        why = _why(res, "fleet")
        return [(t, why, NOT_MEASURED) for t in (cpu, rss, scrape)]
    w = r["window"]
    return [
        (cpu, f"{w['cpu_percent']:.2f}% over {w['seconds']:.0f} s, {r['probes']} probes "
              f"({r['probes_up']:.0f} up)", w["cpu_percent"] <= 5),
        (rss, f"{w['VmRSS']:.1f} MB at the window's end; peak {w['VmHWM']:.1f} MB",
         max(w["VmRSS"], w["VmHWM"]) <= 80),
        (scrape, f"{r['scrape_ms_median']:.1f} ms median, {r['scrape_ms_max']:.1f} ms max "
                 f"of {r['scrapes']} ({r['scrape_lines']} lines)", r["scrape_ms_max"] <= 50)]


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


AGENT_KEYS = ("agent_startup", "agent_accuracy", "agent_perturbation", "agent_resources")
V2_KEYS = ("flood", "flood_loaded", "accuracy", "scaling", "foreign_cost", "records")
FLOOD_KEYS = ("flood", "flood_loaded", "flood_wire")
EARLIER_KEYS = ("accuracy", "flood", "perturbation", "cost", "startup")


def _table(rows: list[tuple[str, str, bool | str | None]], partial: bool) -> list[str]:
    """A targets table; a partial run leaves out the rows of sections it did not run
    (not measured, with no reason: "-")."""
    if partial:
        rows = [r for r in rows if not (r[2] == NOT_MEASURED and r[1] == "-")]
    return ["| target | measured | met |", "|---|---|---|",
            *(f"| {t} | {v} | {VERDICT[ok]} |" for t, v, ok in rows)]


def markdown(res: dict) -> str:
    """The report; a partial run (--only) shows only the targets and sections it ran."""
    def ran(keys: tuple[str, ...]) -> bool:
        return any(k in res for k in keys)

    partial = bool(res.get("only"))

    m = res["machine"]
    out = ["# mace-ping bench results\n",
           f"{m['date']} · commit `{m['commit']}` · kernel {m['kernel']} · {m['cpus']} CPUs "
           f"({m['cpu_model']}), {m.get('memory_gb', 0):.0f} GB · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           "Figures differ a lot between machines (the same commit on another VM of this kind "
           "ran floods 1.5x slower): compare runs on one machine, and read every figure with "
           "its spread.\n",
           "Truth is truth v2 (mace_tools/lab/capture.py): inbound-only tcpdump captures "
           "(nanosecond timestamps, kernel-filtered to each tool's probes) at both ends of the "
           "lab host's outer link; truth = reply in on `out0` - request in at the far end. "
           "Errors are tool RTT minus truth RTT, in µs. The truth is shorter than `out0`'s "
           "departure-to-arrival time by the request's transit of the link (its residual, "
           "measured below), so a correct corrected RTT sits that much above it.\n",
           ]
    if res.get("only"):
        out.append(f"**Partial run**: only {', '.join(res['only'])}.\n")
    if ran(AGENT_KEYS):
        out += ["## Targets: mace-agent (issue 11)\n",
                f"Every row measured side by side in this run, made by `{res['command']}`. "
                "Clients run inside lab containers with the capabilities each row names "
                "(none: an ICMP ping socket, net.ipv4.ping_group_range opened in that lab "
                "container) and reach the agent, in the lab's host netns, through its "
                "socket. A ± figure is a standard error and a verdict needs 2 of them on "
                "its side of the limit; \"flat in N\" is the growth of mace minus control "
                "from 1 to 16 clients.\n", *_table(targets_agent(res), partial), ""]
    if ran(("fleet",)):
        out += ["## Targets: fleet, mace-agent exporting (issue 13)\n",
                f"Measured in this run, made by `{res['command']}`: the agent in the lab's "
                "host netns pings 10 targets from each of 10 lab containers, once a second "
                "each, and serves /metrics; a scrape is timed from the same netns.\n",
                *_table(targets_fleet(res), partial), ""]
    if ran(V2_KEYS):
        out += ["## Targets: kernel side v2 (issue 10)\n",
                f"Every row measured side by side in this run, made by `{res['command']}`. "
                "\"flat in N\" is judged as the growth of mace minus control from the fewest "
                "to the most concurrent runs; a ± figure is a standard error and a verdict "
                "needs 2 of them on its side of the limit.\n",
                *_table(targets_v2(res), partial), ""]
    if ran(EARLIER_KEYS):
        out += ["## Targets of the earlier issues\n", *_table(targets(res), partial)]
    for key, render in SECTIONS:
        value = res.get(key)
        if key == "flood":  # three runs in one table, each may have failed on its own
            if ran(FLOOD_KEYS):
                out += ["", *_flood(res)]
        elif isinstance(value, dict) and "error" in value:
            out += ["", f"## {TITLES[key]}\n", f"**Not measured**: {value['error']}"]
        elif value is not None:
            out += ["", *render(value)]
    if _measured(res, "accuracy"):
        out += ["", "Plots: `fig_accuracy_cdf.png`, `fig_accuracy_load.png`, "
                "`fig_perturbation.png`."]
    return "\n".join([*out, ""])


def _accuracy(acc: list[dict]) -> list[str]:
    out = [f"## {TITLES['accuracy']}\n"]
    for r in acc:
        out += [f"### {r['setting']}: {r['probes']} probes, mace coverage "
                f"{(r['coverage'] or 0) * 100:.1f}%, {r['kernel_events_lost']} events lost\n",
                "| tool | n | mean | p50 | p95 | p99 | max | p99 of abs |",
                "|---|---|---|---|---|---|---|---|"]
        for tool in TOOLS:
            d = r["tools"].get(tool)
            if d and d.get("n"):
                out.append(f"| {tool} | {d['n']} | {d['mean']:+.2f} | {d['p50']:+.2f} | "
                           f"{d['p95']:+.2f} | {d['p99']:+.2f} | {d['max']:+.2f} | "
                           f"{d['abs_p99']:.2f} |")
        out.append("")
    out += ["### The truth's residual\n",
            "The request's transit of the outer link, out0's departure to the far end's "
            "arrival, from mace's own events (µs), and what of corrected - truth it leaves "
            "unexplained.\n",
            "| setting | residual mean | residual p50 | residual p99 | error - residual mean | "
            "error - residual p99 of abs |", "|---|---|---|---|---|---|"]
    for r in acc:
        res_d, left = r.get("truth_residual_us", {}), r.get("error_minus_residual_us", {})
        if res_d.get("n"):
            out.append(f"| {r['setting']} | {res_d['mean']:.2f} | {res_d['p50']:.2f} | "
                       f"{res_d['p99']:.2f} | {_f(left.get('mean'))} | "
                       f"{_f(left.get('abs_p99'))} |")
    return out


def _truth_v1(v: dict) -> list[str]:
    out = [f"## {TITLES['truth_v1']}\n",
           f"One mace-ping run ({v['probes']} probes, {v['interval_s']} s apart, idle) against "
           "both truths at once. Truth v1, one capture on `out0` in both directions, stamps a "
           "departing request in its tap before `net_dev_start_xmit` and then does the tap's "
           "work before the departure: its requests come out early, so corrected - truth v1 "
           "reads low.\n",
           "| truth | n | mean | p50 | p99 | min | p99 of abs |", "|---|---|---|---|---|---|---|"]
    for name, key in (("v1: out0, both directions", "truth_v1"),
                      ("v2: inbound at both ends", "truth_v2")):
        d = v[key]
        if d.get("n"):
            out.append(f"| {name} | {d['n']} | {d['mean']:+.2f} | {d['p50']:+.2f} | "
                       f"{d['p99']:+.2f} | {d['min']:+.2f} | {d['abs_p99']:.2f} |")
    return out


def _flood(res: dict) -> list[str]:
    out = [f"## {TITLES['flood']}\n",
           "Each repeat runs mace-ping -f and iputils ping -f from the same container (c0), "
           "one right after the other under the same neighbours' floods (which goes first "
           "alternates); the ratio is mace / iputils per pair. Rates are over each tool's "
           "own summary `time`. CPU and RSS: the median mace run. On the star lab the "
           "target answers inside the sender's sendto() (veth and bridge all the way: the "
           "whole round trip is CPU work of the sending thread, so nothing overlaps mace's "
           "Python work on a reply); across the NAPI path lab's wire, a Python process "
           "relaying frames between the host's nic0 and the target side "
           "(mace_tools/lab/tapwire.py) on the same two CPUs, the round trip goes on while "
           "the sender works (and the relay takes CPU from both tools).\n",
           "| path | neighbours flooding | mace probes/s (median; every run) | iputils -f "
           "probes/s (every run) | ratio (median; every pair) | coverage (lowest) | events "
           "lost (all runs) | CPU s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for key in FLOOD_KEYS:
        f = res.get(key)
        path = "NAPI lab's wire" if key == "flood_wire" else "star lab (veth)"
        if not f or "error" in f:
            out.append(f"| {path} | not measured: {(f or {}).get('error', 'missing')} "
                       "|||||||| ")
            continue
        runs = f.get("probes_per_s_runs", [f["probes_per_s"]])
        lost = "unknown" if f["lost_unknown"] else f["kernel_events_lost_total"]
        out.append(f"| {path} | {f['neighbours']} | **{f['probes_per_s']:.0f}** "
                   f"({_runs(runs)}) | "
                   f"{_runs(f['iputils_per_s_runs'])} | **{f['ratio_median']:.2f}x** "
                   f"({', '.join(f'{r:.2f}' for r in f['ratio_runs'])}) | "
                   f"{f['coverage_min'] * 100:.2f}% | {lost} | {f['cpu_s']:.1f} | "
                   f"{f['max_rss_mb']:.1f} |")
    stray = [f for f in (res.get(key) for key in FLOOD_KEYS)
             if f and "error" not in f and f.get("stray_sets")]
    if stray:
        out += ["", f"**{max(f['stray_sets'] for f in stray)} mace program set(s) were loaded "
                "before a pair with no run of the bench active** (someone else's runs, or a "
                "leaked set): both tools' packets paid for them."]
    return out


def _perturbation(pert: list[dict]) -> list[str]:
    out = [f"## {TITLES['perturbation']}\n",
           "Each round runs one block of each condition in a shuffled order; Δmean is the "
           "mean over rounds of (block mean - that round's baseline block mean), ± its "
           "standard error. Noise is |odd - even| baseline blocks. iputils prints whole µs, "
           "so Δp99 moves in steps of 1. Empty programs: programs that return at once, on "
           "mace's three tracepoints (bench/bpf/floor.bpf.c), held by a child process as "
           "mace's are: what any program there costs the witness; mace above them: the mean "
           "of per-round (mace block - empty block).\n",
           "| setting | rounds x block | baseline mean | noise | mace BPF Δmean | Δp99 | "
           "empty programs Δmean | mace above empty | ftrace Δmean | Δp99 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pert:
        bpf_se, ftrace_se = p["bpf_delta_mean_se_us"], p["ftrace_delta_mean_se_us"]
        if "floor_delta_mean_us" in p:
            floor = (f"{p['floor_delta_mean_us']:+.2f}{_pm(p['floor_delta_mean_se_us'])} | "
                     f"{p['bpf_above_floor_us']:+.2f}{_pm(p['bpf_above_floor_se_us'])}")
        else:  # (a run from before the floor was measured)
            floor = "- | -"
        out.append(f"| {p['setting']} | {p['rounds']} x {p['block']} | "
                   f"{p['baseline']['mean']:.1f} | {p['noise_mean_us']:.2f} | "
                   f"{p['bpf_delta_mean_us']:+.2f}{_pm(bpf_se)} | "
                   f"{p['bpf_delta_p99_us']:+.2f} | {floor} | "
                   f"{p['ftrace_delta_mean_us']:+.2f}{_pm(ftrace_se)} | "
                   f"{p['ftrace_delta_p99_us']:+.2f} |")
    return out


def _program_table(programs: dict) -> list[str]:
    return ["| program | runs | ns per run |", "|---|---|---|",
            *(f"| {k} | {v['runs']} | {_f(v['ns_per_run'], 1)} |" for k, v in programs.items())]


def _sets_note(c: dict) -> str:
    """How many copies of the programs every packet ran through in a cost window."""
    n = c.get("sets_loaded")
    if n is None or n == 1:
        return "" if n is None else " Program sets loaded in the window: 1 (the shared one)."
    return (f" **Program sets loaded in the window: {n}** (1 expected: another copy was "
            "attached, and every packet paid for it; only the shared set's counters are "
            "shown).")


def _cost(c: dict) -> list[str]:
    return [f"## BPF program cost ({c['neighbours']} flood neighbours + mace-ping -f, "
            f"{c['seconds']:.0f} s, kernel.bpf_stats_enabled)\n",
            f"The shared set's counters.{_sets_note(c)}\n",
            *_program_table(c["programs"])]


def _foreign_cost(c: dict) -> list[str]:
    return [f"## {TITLES['foreign_cost']}\n",
            f"One mace-ping run probing once a second from c0 (so the programs are active: a "
            f"run in the map), {c['neighbours']} iputils floods from neighbour containers "
            f"(echoes without mace's nonce), {c['seconds']:.0f} s window, "
            f"kernel.bpf_stats_enabled; the run got {c['mace_replies']} replies."
            f"{_sets_note(c)}\n",
            *_program_table(c["programs"]),
            *(["\nThen a second window as long, with programs that do nothing attached to "
               "the same three tracepoints (bench/bpf/floor.bpf.c): the floor any program "
               "pays per run here (trampoline, the stats' own clock reads), and mace's "
               "programs beside it in that window.\n",
               "Programs that do nothing:\n", *_program_table(c["floor"]),
               "\nmace's, in the same window:\n", *_program_table(c["beside_floor"])]
              if c.get("floor") else [])]


def _records(r: dict) -> list[str]:
    return [f"## {TITLES['records']}\n",
            "Records and events read from the run's ring (its summary's \"N kernel records\") "
            f"over the replies of one `mace-ping -q -c {r['probes']} -i {r['interval_s']}` "
            "from c0 (no path asked for); `--json` also ships the path, an event per device "
            "crossed: its figure beside it.\n",
            "| replies | kernel records | per answered probe | with --json (path) |",
            "|---|---|---|---|",
            f"| {r['received']} | {r['kernel_records']} | "
            f"{_f(r['records_per_answered_probe'])} | "
            f"{_f(r['json_records_per_answered_probe'])} |"]


def _startup(s: dict) -> list[str]:
    out = [f"## {TITLES['startup']}\n"]
    if s.get("bytecode"):
        out.append("Byte code as installed: `python -m compileall mace_tools` first, "
                   "PYTHONDONTWRITEBYTECODE unset in the children, one untimed run of each "
                   "tool (runs before this note lacked it: ~30 ms pessimistic).\n")
    out += ["| tool | to first probe (median / p95 ms) | to exit (median / p95 ms) | peak RSS |",
            "|---|---|---|---|"]
    for name in ("mace-ping -c 1", "iputils ping -c 1"):
        v = s[name]
        out.append(f"| {name} | {_f(v['first_probe_ms_median'], 1)} / "
                   f"{_f(v['first_probe_ms_p95'], 1)} | {v['exit_ms_median']:.1f} / "
                   f"{v['exit_ms_p95']:.1f} | {v['peak_rss_mb']:.1f} MB |")
    bcc = s["bcc"]
    loaded = f"skipped: {bcc['skipped']}" if "skipped" in bcc else f"{bcc['load_ms']:.1f} (load)"
    out.append(f"| bcc, same tracepoints | {loaded} | {_f(bcc.get('exit_ms'), 1)} | "
               f"{_f(bcc.get('peak_rss_mb'), 1)} |")
    return out


def _scaling_apart(rows: list[dict]) -> list[str]:
    return _scaling(rows, "scaling_apart")


def _rates(r: dict) -> str:
    """The instances' probes/s and the control's, counted on their devices."""
    if "probes_per_s" not in r:
        return "-"
    return f"{r['probes_per_s']:.0f} / {r['control_probes_per_s']:.0f}"


def _scaling(rows: list[dict], key: str = "scaling") -> list[str]:
    placement = rows[0].get("placement", "any CPU") if rows else "any CPU"
    out = [f"## {TITLES[key]}\n",
           f"Placement: {placement} (pinned with sched_setaffinity, inherited by the tools; "
           "veth does a packet's softirq work on its sender's CPU, so a run's packets stay "
           "on its CPU). Probes/s: the runs' and the control's, counted as the host side of "
           "their veths received them during the witness (a row whose two rates differ by "
           "more than 10% is not measured).\n",
           "The witness ping's slowdown comes from the instances' probe traffic, their "
           "processes and their programs (one shared set); the control runs the same "
           "mace-ping commands from the same containers with `--corrections none` (the same "
           "probes, pacing and process, no kernel data), so mace minus control is what the "
           "corrections cost the witness. (Until 2026-11-24 the control was iputils ping at "
           "the same -i, which sent 30-40% fewer probes under load here.) Runs and control "
           "both use `-l 3`, so a probe woken late on a busy CPU is made up within 3 "
           "intervals and both keep near the asked rate. Each round runs one "
           "block of baseline, mace and control in a shuffled order; Δ figures are means of "
           "per-round paired differences ± standard error. Noise: |odd - even| baseline "
           "blocks. ns per program run: the shared set's, in a 1 s window after the first "
           "round's witness, the runs still probing (stats off during the witness); sets "
           "loaded: copies of the programs on the host then (1 while the runs share one).\n",
           "| instances | rounds x block | probes/s runs / control | ns per program run "
           "(sets loaded) | witness Δmean µs | control Δmean µs | mace minus control µs | "
           "noise µs | witness Δp99 µs | coverage (lowest) | events lost |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['instances']} | not measured: {r['error']} ||||||||||")
            continue
        out.append(f"| {r['instances']} | {r['rounds']} x {r['block']} | {_rates(r)} | "
                   f"{_f(r['cost']['ns_per_run'], 1)} ({_f(r.get('sets_loaded'))}) | "
                   f"{r['witness_delta_mean_us']:+.2f}{_pm(r['witness_delta_se_us'])} | "
                   f"{r['control_delta_mean_us']:+.2f}{_pm(r['control_delta_se_us'])} | "
                   f"**{r['bpf_share_mean_us']:+.2f}**{_pm(r['bpf_share_se_us'])} | "
                   f"{_f(r['noise_mean_us'])} | {r['witness_delta_p99_us']:+.2f} | "
                   f"{r['coverage_min'] * 100:.1f}% of {r['runs']} runs | "
                   f"{r['kernel_events_lost']} |")
    return out


def _traceroute(rows: list[dict]) -> list[str]:
    out = [f"## {TITLES['traceroute']}\n",
           "Corrected minus truth v2 on the host's outer link, µs (raw minus truth for "
           "contrast). Hop 1 is the host's bridge: host-internal, never on the outer "
           "device; its corrected time is taken at the container's own eth0.\n",
           "| method | hop | n | corrected mean | corrected p99 of abs | raw mean | coverage |",
           "|---|---|---|---|---|---|---|"]
    for t in rows:
        hi = t["host_internal_corrected_us"]
        out.append(f"| {t['method']} | 1 (host-internal) | {hi.get('n', 0)} | "
                   f"{_f(hi.get('mean'))} (absolute) | - | - | "
                   f"{(t['coverage'] or 0) * 100:.1f}% |")
        for hop, d in t["hops"].items():
            raw = t["raw_hops"][hop]
            out.append(f"| {t['method']} | {hop} | {d['n']} | {d['mean']:+.2f} | "
                       f"{d['abs_p99']:.2f} | {raw['mean']:+.2f} | |")
    return out


def _agent_startup(s: dict) -> list[str]:
    out = [f"## {TITLES['agent_startup']}\n",
           f"{s['runs']} rounds; each runs the cold standalone row with no agent up (it loads "
           "the program set), then starts an agent and runs the other three in a shuffled "
           "order. Wall: spawn to exit of `ip netns exec c0 ...` (and, for the client, "
           "`setpriv`: no capability left). First probe: spawn to the echo request on c0's "
           "eth0. Byte code as installed: `python -m compileall mace_tools` first, "
           "PYTHONDONTWRITEBYTECODE unset in the children, one untimed run of each tool "
           "(this bench's shell sets PYTHONDONTWRITEBYTECODE=1, which made start-up figures "
           "before this section ~30 ms pessimistic). Client capabilities: "
           f"{s['client_capabilities']}.\n"]
    if s.get("foreign_sets"):
        out.append(f"**{s['foreign_sets']} mace program set(s) of someone else's were loaded "
                   "when this section began**: a cold standalone run joins one of its own "
                   "build instead of loading, and every packet paid for them.\n")
    if s.get("cold_rounds_not_cold"):
        out.append(f"**In {s['cold_rounds_not_cold']} round(s) the stopped agent's set was "
                   "still loaded 3 s later**: those cold runs may have joined it.\n")
    out += ["| tool | wall median / p90 ms | to first probe median / p90 ms | peak RSS MB | "
            "corrected | failed |", "|---|---|---|---|---|---|"]
    for key, t in s["tools"].items():
        corrected = f"{t['corrected']}/{t['runs']}" if key != "iputils" else "-"
        out.append(f"| {t['label']} | **{t['wall_ms_median']:.1f}** / {t['wall_ms_p90']:.1f} | "
                   f"{_f(t['first_probe_ms_median'], 1)} / {_f(t['first_probe_ms_p90'], 1)} | "
                   f"{t['peak_rss_mb']:.1f} | {corrected} | {t['failed']} |")
    return out


def _agent_accuracy(a: dict) -> list[str]:
    out = [f"## {TITLES['agent_accuracy']}\n",
           "One client in c0 (capabilities: "
           f"{a['client_capabilities']}), `mace-ping --agent SOCK --ndjson -c N -i I -s 64`; "
           "the agent chose its nonce. Truth v2 kept packets of the probes' size (the "
           "floods carry 56 payload bytes, these 64) and is paired by the nonce of the "
           "run's summary. Raw - truth is what the container had without the agent. "
           "Residual: the truth's (the link transit, from mace's own events).\n",
           "| setting | probes x interval | truth found | coverage | lost | corrected mean | "
           "p50 | p99 | p99 of abs | raw mean | raw p99 of abs | residual mean | error - "
           "residual mean |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        d, raw = r.get("corrected", {}), r.get("raw", {})
        if "error" in r or not d.get("n"):
            out.append(f"| {r['setting']} | not measured: {r.get('error', 'no data')} "
                       "||||||||||||")
            continue
        out.append(f"| {r['setting']} | {r['probes']} x {r['interval_s']} s | "
                   f"{r['truth_matched']} | {(r['coverage'] or 0) * 100:.1f}% | "
                   f"{r['kernel_events_lost']} | **{d['mean']:+.2f}** | {d['p50']:+.2f} | "
                   f"{d['p99']:+.2f} | **{d['abs_p99']:.2f}** | {raw['mean']:+.2f} | "
                   f"{raw['abs_p99']:.2f} | {_f(r['truth_residual_us'].get('mean'))} | "
                   f"{_f(r['error_minus_residual_us'].get('mean'))} |")
    return out


def _ipv6(v: dict) -> list[str]:
    out = [f"## {TITLES['ipv6']}\n",
           "A dual-stack lab (`Lab(ipv6=True)`: NAT66 by ip6tables MASQUERADE out of the host, "
           "as Docker does it with IPv6 on). `mace-ping -c N -i I` from c0 to the target's "
           "IPv4 and IPv6 addresses in turn, under the same load (4 neighbours flooding "
           "the same family). Truth v2 on the outer link for both. Residual: the truth's "
           "(the link transit, from mace's own events).\n",
           "| setting | family | probes x interval | truth found | coverage | lost | "
           "corrected mean | p50 | p99 of abs | raw mean | residual mean | error - residual "
           "mean | same targets as IPv4 (\\|mean\\| <= 0.5, p99 \\|err\\| <= 2 µs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        d, raw = r.get("corrected", {}), r.get("raw", {})
        if not d.get("n"):
            out.append(f"| {r['setting']} | IPv{r['family']} | no data ||||||||||||")
            continue
        met = abs(d["mean"]) <= 0.5 and d["abs_p99"] <= 2
        out.append(f"| {r['setting']} | IPv{r['family']} | {r['probes']} x "
                   f"{r['interval_s']} s | {r['truth_matched']} | "
                   f"{(r['coverage'] or 0) * 100:.1f}% | {r['kernel_events_lost']} | "
                   f"**{d['mean']:+.2f}** | {d['p50']:+.2f} | **{d['abs_p99']:.2f}** | "
                   f"{_f(raw.get('mean'))} | {_f(r['truth_residual_us'].get('mean'))} | "
                   f"{_f(r['error_minus_residual_us'].get('mean'))} | {VERDICT[met]} |")
    cost = v.get("foreign_cost") or {}
    if cost:
        out += ["", "Cost of the programs on foreign traffic of each family: 4 iputils floods "
                "(`ping -f`, no mace nonce) to the target's IPv4 or IPv6 address while one "
                "mace-ping run probes once a second (bpf_stats: ns per program run).\n",
                "| floods | mace_xmit | mace_rx | mace_receive | all |", "|---|---|---|---|---|"]
        for family in sorted(cost, key=str):
            progs = cost[family]["programs"]
            out.append(f"| IPv{family} | " + " | ".join(
                f"{progs[name]['ns_per_run']:.1f}" for name in
                ("mace_xmit", "mace_rx", "mace_receive", "all")) + " |")
    return out


def _agent_perturbation_apart(p: dict) -> list[str]:
    return _agent_perturbation(p, "agent_perturbation_apart")


def _agent_perturbation(p: dict, key: str = "agent_perturbation") -> list[str]:
    out = [f"## {TITLES[key]}\n",
           f"N clients (capabilities: {p['client_capabilities']}), one per lab container, "
           f"each `mace-ping --agent SOCK --ndjson -q -i {p['client_interval_s']}`, under "
           f"{p['neighbours']} flood neighbours; the witness (c11) pings every "
           f"{p['witness_interval_s']} s. Control: the same N clients with `--corrections none` "
           "(no agent, no kernel data). Placement: "
           f"{p.get('placement', 'any CPU')}. Rounds, Δ figures and probes/s as in the "
           "scaling section.\n",
           "| clients | rounds x block | probes/s clients / control | witness Δmean µs | "
           "control Δmean µs | mace minus control µs | noise µs | witness Δp99 µs | "
           "coverage (lowest) | events lost |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        if "error" in r:
            out.append(f"| {r['instances']} | not measured: {r['error']} |||||||||")
            continue
        out.append(f"| {r['instances']} | {r['rounds']} x {r['block']} | {_rates(r)} | "
                   f"{r['witness_delta_mean_us']:+.2f}{_pm(r['witness_delta_se_us'])} | "
                   f"{r['control_delta_mean_us']:+.2f}{_pm(r['control_delta_se_us'])} | "
                   f"**{r['bpf_share_mean_us']:+.2f}**{_pm(r['bpf_share_se_us'])} | "
                   f"{_f(r['noise_mean_us'])} | {r['witness_delta_p99_us']:+.2f} | "
                   f"{r['coverage_min'] * 100:.1f}% of {r['runs']} runs | "
                   f"{r['kernel_events_lost']} |")
    return out


def _agent_resources(r: dict) -> list[str]:
    busy = r["busy"]
    out = [f"## {TITLES['agent_resources']}\n",
           "The agent's own process: CPU from /proc/PID/stat (utime + stime, every thread) "
           "over the window, % of one core; VmRSS at the window's end, VmHWM its peak since "
           f"it started. Idle: up, no client. Busy: {busy['clients']} clients (capabilities: "
           f"{r['client_capabilities']}) at -i {r['interval_s']}, one per lab container, "
           "from once every one is a run (their connections are before the window); "
           f"{r['replies']} replies, coverage {r['coverage_min'] * 100:.1f}% (lowest).\n",
           "| window | seconds | agent CPU % of a core | VmRSS MB | VmHWM MB | clients' CPU % "
           "(all) |", "|---|---|---|---|---|---|"]
    for name, w in (("idle", r["idle"]), (f"{busy['clients']} clients", busy)):
        out.append(f"| {name} | {w['seconds']:.0f} | {w['cpu_percent']:.2f} | "
                   f"{w['VmRSS']:.1f} | {w['VmHWM']:.1f} | {_f(w['clients_cpu_percent'], 0)} |")
    return out


def _fleet(r: dict) -> list[str]:
    w = r["window"]
    coverage = r["corrected"] / r["responses"] if r["responses"] else 0.0
    return [f"## {TITLES['fleet']}\n",
            "The agent's own process (every thread: its probes, its HTTP server, its "
            f"socket) over the window; then {r['scrapes']} scrapes of /metrics from the "
            "lab's host netns. `prometheus_client` renders the same families and label "
            "sets (values synthetic) for scale: the agent renders its own text (mace_tools/agent/"
            "metrics.py).\n",
            "| probes (up) | window s | agent CPU % of a core | VmRSS MB | VmHWM MB | "
            "requests | replies | corrected | scrape ms median / max | lines | "
            "prometheus_client ms |", "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['probes']} ({r['probes_up']:.0f}) | {w['seconds']:.0f} | "
            f"{w['cpu_percent']:.2f} | {w['VmRSS']:.1f} | {w['VmHWM']:.1f} | "
            f"{r['requests']:.0f} | {r['responses']:.0f} | {r['corrected']:.0f} "
            f"({coverage * 100:.1f}%) | {r['scrape_ms_median']:.1f} / "
            f"{r['scrape_ms_max']:.1f} | {r['scrape_lines']} | "
            f"{_f(r['prometheus_client_ms'], 0)} |"]


TITLES = {
    "accuracy": "Accuracy (signed error vs truth v2, µs)",
    "truth_v1": "Truth v1 (the one-sided capture) beside truth v2",
    "flood": "Flood (`mace-ping -f`, one probe in flight as iputils -f)",
    "perturbation": "Perturbation (independent iputils ping in another container, µs)",
    "cost": "BPF program cost",
    "foreign_cost": "BPF program cost on foreign traffic",
    "records": "Records per answered probe crossing to userspace",
    "startup": "Start-up (`-c 1` from a lab container, via `ip netns exec`)",
    "scaling": "Scaling (1..8 concurrent mace-ping runs at 200 probes/s each, 4 flood "
               "neighbours)",
    "traceroute": "mace-traceroute per hop (routed lab: host -> r1 -> r2 -> target)",
    "agent_startup": "mace-agent: start-up (`-c 1` from a lab container)",
    "agent_accuracy": "mace-agent: accuracy of a client with no capability (vs truth v2, µs)",
    "agent_perturbation": "mace-agent: neighbour perturbation, 1..16 clients through the "
                          "agent (µs)",
    "agent_perturbation_apart": "mace-agent: neighbour perturbation, 1..16 clients through "
                                "the agent, clients' CPU apart from the witness's (µs)",
    "scaling_apart": "Scaling, runs' CPU apart from the witness's (1..8 concurrent runs at "
                     "200 probes/s each, 4 flood neighbours)",
    "agent_resources": "mace-agent: the agent's memory and CPU",
    "ipv6": "IPv6 beside IPv4: corrected - truth v2 over NAT66 (µs)",
    "fleet": "mace-agent exporting: 100 probes at 1/s from 10 lab containers",
}
SECTIONS: list[tuple[str, Callable[[Any], list[str]]]] = [
    ("accuracy", _accuracy), ("truth_v1", _truth_v1), ("flood", _flood),
    ("perturbation", _perturbation), ("cost", _cost), ("foreign_cost", _foreign_cost),
    ("records", _records), ("startup", _startup),
    ("scaling", _scaling), ("scaling_apart", _scaling_apart),
    ("agent_startup", _agent_startup), ("agent_accuracy", _agent_accuracy),
    ("agent_perturbation", _agent_perturbation),
    ("agent_perturbation_apart", _agent_perturbation_apart),
    ("agent_resources", _agent_resources), ("fleet", _fleet), ("ipv6", _ipv6),
    ("traceroute", _traceroute)]


def plots(res: dict, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    acc = _measured(res, "accuracy")
    if not acc:
        return written
    pick = next((r for r in acc if r["neighbours"] == 4 and r["load"] == "flood"), acc[-1])
    fig, ax = plt.subplots(figsize=(7, 4))
    for tool in TOOLS:
        errs = sorted(pick["raw_errors"].get(tool, []))
        if errs:
            ax.plot(errs, [(i + 1) / len(errs) for i in range(len(errs))], label=tool)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("RTT error vs truth v2 on the host's outer link (µs)")
    ax.set_ylabel("CDF")
    ax.set_title(f"Accuracy, {pick['setting']} (cf. MACE Fig. 3)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(_save(fig, outdir / "fig_accuracy_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["setting"] for r in acc]
    for tool in TOOLS:
        means = [r["tools"].get(tool, {}).get("mean") for r in acc]
        if any(m is not None for m in means):
            ax.plot(names, means, marker="o", label=tool)
    ax.set_yscale("symlog", linthresh=5)
    ax.set_ylabel("mean error (µs)")
    ax.set_title("Error vs background load (cf. MACE Fig. 4)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(_save(fig, outdir / "fig_accuracy_load.png"))

    pert = _measured(res, "perturbation")
    if not pert:
        return written
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(pert))
    ax.bar([x - 0.2 for x in xs], [p["bpf_delta_mean_us"] for p in pert], 0.4,
           yerr=[2 * p["bpf_delta_mean_se_us"] for p in pert], capsize=4,
           label="mace-ping BPF attached (± 2 standard errors)")
    ax.bar([x + 0.2 for x in xs], [p["ftrace_delta_mean_us"] for p in pert], 0.4,
           yerr=[2 * p["ftrace_delta_mean_se_us"] for p in pert], capsize=4,
           label="ftrace, same tracepoints")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target (1 µs)")
    ax.set_xticks(list(xs), [p["setting"] for p in pert])
    ax.set_ylabel("Δ mean RTT of a neighbour's ping (µs)")
    ax.set_title("Perturbation (cf. MACE Fig. 5)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    written.append(_save(fig, outdir / "fig_perturbation.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
