"""results.json -> results.md (tables, targets met or missed) and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
            ("corrected - truth v2: |mean| <= 2 µs, every setting",
             f"{worst_mean:.2f} µs (worst)", worst_mean <= 2),
            ("corrected - truth v2: p99 of |error| <= 10 µs, every setting",
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


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def markdown(res: dict) -> str:
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
           "## Targets\n", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {t} | {v} | {VERDICT[ok]} |" for t, v, ok in targets(res)]
    for key, render in SECTIONS:
        value = res.get(key)
        if key == "flood":  # two runs in one table, each may have failed on its own
            out += ["", *_flood(res)]
        elif isinstance(value, dict) and "error" in value:
            out += ["", f"## {TITLES[key]}\n", f"**Not measured**: {value['error']}"]
        elif value is not None:
            out += ["", *render(value)]
    out += ["", "Plots: `fig_accuracy_cdf.png`, `fig_accuracy_load.png`, "
            "`fig_perturbation.png`.", ""]
    return "\n".join(out)


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
           "| neighbours flooding | probes | seconds | probes/s (median; every run) | coverage | "
           "events lost | CPU s | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for f in (res.get("flood"), res.get("flood_loaded")):
        if not f or "error" in f:
            out.append(f"| - | not measured: {(f or {}).get('error', 'missing')} ||||||| ")
            continue
        runs = f.get("probes_per_s_runs", [f["probes_per_s"]])
        out.append(f"| {f['neighbours']} | {f['sent']} | {f['wall_s']:.1f} | "
                   f"**{f['probes_per_s']:.0f}** ({_runs(runs)}) | "
                   f"{(f['coverage'] or 0) * 100:.2f}% | {f['kernel_events_lost']} | "
                   f"{f['cpu_s']:.1f} | {f['max_rss_mb']:.1f} |")
    return out


def _perturbation(pert: list[dict]) -> list[str]:
    out = [f"## {TITLES['perturbation']}\n",
           "Each round runs one block of each condition in a shuffled order; Δmean is the "
           "mean over rounds of (block mean - that round's baseline block mean), ± its "
           "standard error. Noise is |odd - even| baseline blocks. iputils prints whole µs, "
           "so Δp99 moves in steps of 1.\n",
           "| setting | rounds x block | baseline mean | noise | mace BPF Δmean | Δp99 | "
           "ftrace Δmean | Δp99 |", "|---|---|---|---|---|---|---|---|"]
    for p in pert:
        bpf_se, ftrace_se = p["bpf_delta_mean_se_us"], p["ftrace_delta_mean_se_us"]
        out.append(f"| {p['setting']} | {p['rounds']} x {p['block']} | "
                   f"{p['baseline']['mean']:.1f} | {p['noise_mean_us']:.2f} | "
                   f"{p['bpf_delta_mean_us']:+.2f}{_pm(bpf_se)} | "
                   f"{p['bpf_delta_p99_us']:+.2f} | "
                   f"{p['ftrace_delta_mean_us']:+.2f}{_pm(ftrace_se)} | "
                   f"{p['ftrace_delta_p99_us']:+.2f} |")
    return out


def _cost(c: dict) -> list[str]:
    out = [f"## BPF program cost ({c['neighbours']} flood neighbours + mace-ping -f, "
           f"{c['seconds']:.0f} s, kernel.bpf_stats_enabled)\n",
           "| program | runs | ns per run |", "|---|---|---|"]
    return out + [f"| {k} | {v['runs']} | {_f(v['ns_per_run'], 1)} |"
                  for k, v in c["programs"].items()]


def _startup(s: dict) -> list[str]:
    out = [f"## {TITLES['startup']}\n",
           "| tool | to first probe (median / p95 ms) | to exit (median / p95 ms) | peak RSS |",
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


def _scaling(rows: list[dict]) -> list[str]:
    out = [f"## {TITLES['scaling']}\n",
           "The witness ping's slowdown comes from the instances' probe traffic and from their "
           "programs; the control runs the same number of iputils pings at the same rate.\n",
           "| instances | ns per program run | witness Δmean µs | control Δmean µs | "
           "mace minus control µs | witness Δp99 µs | coverage |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['instances']} | {_f(r['cost']['ns_per_run'], 1)} | "
                   f"{r['witness_delta_mean_us']:+.2f} | {r['control_delta_mean_us']:+.2f} | "
                   f"{r['bpf_share_mean_us']:+.2f} | {r['witness_delta_p99_us']:+.2f} | "
                   f"{', '.join(_f(x, 3) for x in r['coverage'])} |")
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


TITLES = {
    "accuracy": "Accuracy (signed error vs truth v2, µs)",
    "truth_v1": "Truth v1 (the one-sided capture) beside truth v2",
    "flood": "Flood (`mace-ping -f`, one probe in flight as iputils -f)",
    "perturbation": "Perturbation (independent iputils ping in another container, µs)",
    "cost": "BPF program cost",
    "startup": "Start-up (`-c 1` from a lab container, via `ip netns exec`)",
    "scaling": "Scaling (concurrent mace-ping runs at 200 probes/s, 4 flood neighbours)",
    "traceroute": "mace-traceroute per hop (routed lab: host -> r1 -> r2 -> target)",
}
SECTIONS: list[tuple[str, Callable[[Any], list[str]]]] = [
    ("accuracy", _accuracy), ("truth_v1", _truth_v1), ("flood", _flood),
    ("perturbation", _perturbation), ("cost", _cost), ("startup", _startup),
    ("scaling", _scaling), ("traceroute", _traceroute)]


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
