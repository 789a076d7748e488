"""The bench's experiments, each returning plain dicts for results.json.

All traffic stays in the lab's namespaces (198.18.0.0/15). Kernel-wide switches the bench
flips (kernel.bpf_stats_enabled, ftrace events) are put back in `finally` blocks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from bench.tools import ToolResult, ToolRun, capture_filter, iputils, mace_ping, scamper
from mace_tools.kernel.backend import Backend
from mace_tools.lab.capture import Capture, CapturedEcho, TruthCapture
from mace_tools.lab.load import Load
from mace_tools.lab.topology import Lab
from mace_tools.stats import percentile

# Lab roles: c0 mace-ping; c1..c8 load neighbours; c9 iputils; c10 scamper;
# c11 the independent ping whose RTT shows perturbation; c12..c14 extra mace-ping instances.
CONTAINERS = 15
IPUTILS_CONTAINER, SCAMPER_CONTAINER, WITNESS_CONTAINER = 9, 10, 11
EXTRA_MACE = (12, 13, 14)
ID_IPUTILS_CONTAINER, ID_IPUTILS_HOST, ID_SCAMPER = 4242, 4343, 4545
FTRACE_EVENTS = ("net/net_dev_start_xmit", "net/net_dev_xmit", "net/netif_rx",
                 "net/netif_receive_skb")
TRACEFS = Path("/sys/kernel/tracing")


def distribution(values: list[float]) -> dict[str, float | int]:
    """Signed error distribution (µs): mean, p50, p95, p99, max |.|, and p99 of |error|."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    absolute = sorted(abs(v) for v in values)
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(ordered, 50), "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99), "min": ordered[0], "max": ordered[-1],
        "abs_p99": percentile(absolute, 99), "abs_max": absolute[-1],
    }


def errors_us(rtt_ms: dict[int, float | None], truth: dict[int, CapturedEcho]) -> list[float]:
    out = []
    for seq, rtt in rtt_ms.items():
        echo = truth.get(seq)
        if rtt is None or echo is None or echo.rtt_ns is None:
            continue
        out.append(rtt * 1000 - echo.rtt_ns / 1000)
    return out


@contextmanager
def load_setting(lab: Lab, neighbours: int, kind: str, seconds: float) -> Iterator[None]:
    with Load(lab, neighbours, seconds, kind=kind) if neighbours else nullcontext():
        yield


def accuracy(lab: Lab, settings: list[tuple[str, int, str]], probes: int, interval: float,
             scamper_probes: int) -> list[dict]:
    """Every tool at once per load setting, each against the capture on the outer device."""
    rows = []
    seconds = probes * interval + 15
    for name, neighbours, kind in settings:
        nonce = os.urandom(8)
        with load_setting(lab, neighbours, kind, seconds):
            runs: list[ToolRun] = [
                mace_ping(lab, 0, nonce, probes, interval),
                iputils(lab, lab.container_ns(IPUTILS_CONTAINER), ID_IPUTILS_CONTAINER, probes,
                        interval, "iputils (container)"),
                iputils(lab, lab.host_ns, ID_IPUTILS_HOST, probes, interval, "iputils (host)"),
            ]
            if shutil.which("scamper"):
                runs.append(scamper(lab, lab.container_ns(SCAMPER_CONTAINER), ID_SCAMPER,
                                    scamper_probes, 0.1))
            with TruthCapture(lab.outer_link, capture_filter(runs)) as cap:
                results = {run.name: run.collect() for run in runs}
        mace = results["mace-ping"]
        truth_mace = cap.echoes(nonce)
        tools = {
            "mace-ping corrected": errors_us(mace.corrected_ms, truth_mace),
            "mace-ping raw": errors_us(mace.rtt_ms, truth_mace),
            "iputils ping (container)": errors_us(
                results["iputils (container)"].rtt_ms, cap.echoes_by_id(ID_IPUTILS_CONTAINER)),
            "iputils ping (host netns)": errors_us(
                results["iputils (host)"].rtt_ms, cap.echoes_by_id(ID_IPUTILS_HOST)),
        }
        if "scamper -O dl" in results:
            tools["scamper ping -O dl (container)"] = errors_us(
                results["scamper -O dl"].rtt_ms, cap.echoes_by_id(ID_SCAMPER))
        mace_summary = mace.summary.get("mace", {})
        residual, unexplained = truth_residual(mace.corrected_ms, mace.transit_us, truth_mace)
        rows.append({
            "setting": name, "neighbours": neighbours, "load": kind if neighbours else "idle",
            "probes": probes, "replies": len(mace.rtt_ms),
            "coverage": mace_summary.get("coverage"),
            "kernel_events_lost": mace_summary.get("kernel_events_lost"),
            "tools": {tool: distribution(errs) for tool, errs in tools.items()},
            "raw_errors": {tool: errs for tool, errs in tools.items()},
            "mace_truth_us": truths_us(mace.corrected_ms, truth_mace),
            "truth_residual_us": distribution(residual),
            "error_minus_residual_us": distribution(unexplained),
        })
        print(f"  accuracy {name}: coverage {mace_summary.get('coverage')}, corrected "
              f"{_fmt(rows[-1]['tools']['mace-ping corrected'])}", flush=True)
    return rows


def truths_us(rtt_ms: dict[int, float | None], truth: dict[int, CapturedEcho]) -> list[float]:
    """The truth (µs) of each reply errors_us() scores, in the same order."""
    return [truth[seq].rtt_ns / 1000 for seq, rtt in rtt_ms.items()  # type: ignore[operator]
            if rtt is not None and seq in truth and truth[seq].rtt_ns is not None]


def truth_residual(corrected_ms: dict[int, float | None], transit_us: dict[int, float | None],
                   truth: dict[int, CapturedEcho]) -> tuple[list[float], list[float]]:
    """Truth v2's residual per reply (the request's transit of the outer link, from mace's
    own events) and what of corrected - truth it does not explain (µs)."""
    residual, unexplained = [], []
    for seq, transit in transit_us.items():
        if transit is None:
            continue
        residual.append(transit)
        error = errors_us({seq: corrected_ms.get(seq)}, truth)
        if error:
            unexplained.append(error[0] - transit)
    return residual, unexplained


def truth_v1_bias(lab: Lab, probes: int, interval: float) -> dict:
    """Truth v1 (one capture on the outer device, both directions) beside truth v2 on the
    same run: how far the tap's early departure stamps pull corrected - truth below zero."""
    nonce = os.urandom(8)
    with TruthCapture(lab.outer_link, Capture.nonce_filter(nonce), probes) as v2, \
            Capture(lab.host_ns, lab.outer_dev, Capture.nonce_filter(nonce), 2 * probes) as v1:
        mace = mace_ping(lab, 0, nonce, probes, interval).collect()
    return {"probes": probes, "interval_s": interval,
            "truth_v1": distribution(errors_us(mace.corrected_ms, v1.echoes(nonce))),
            "truth_v2": distribution(errors_us(mace.corrected_ms, v2.echoes(nonce)))}


def _fmt(d: dict) -> str:
    return f"mean {d['mean']:+.2f} µs, |p99| {d['abs_p99']:.2f} µs" if d.get("n") else "no data"


def _witness_ping(lab: Lab, count: int, interval: float) -> list[float]:
    """RTTs (µs) of an iputils ping from the witness container, which mace never probes."""
    proc = subprocess.run(["ip", "netns", "exec", lab.container_ns(WITNESS_CONTAINER), "ping",
                           "-n", "-c", str(count), "-i", str(interval), lab.target_addr],
                          capture_output=True, text=True, timeout=count * interval + 60)
    return [float(m.group(2)) * 1000
            for m in re.finditer(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", proc.stdout)]


@contextmanager
def ftrace_enabled() -> Iterator[None]:
    mounted = False
    if not (TRACEFS / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
        mounted = True
    enables = [TRACEFS / "events" / e / "enable" for e in FTRACE_EVENTS]
    try:
        (TRACEFS / "trace").write_text("")
        for path in enables:
            path.write_text("1")
        yield
    finally:
        for path in enables:
            path.write_text("0")
        (TRACEFS / "trace").write_text("")
        if mounted:
            subprocess.run(["umount", str(TRACEFS)], check=False)


def _merge(samples: list[list[float]]) -> dict[str, float]:
    rtts = sorted(v for block in samples for v in block)
    if not rtts:
        return {"n": 0}
    return {"n": len(rtts), "mean": sum(rtts) / len(rtts), "p99": percentile(rtts, 99)}


def _paired_delta(cond: list[list[float]], base: list[list[float]]) -> tuple[float, float]:
    """Mean and standard error of (condition block mean - baseline block mean) over rounds:
    each round's blocks ran back to back, so the pairing cancels slow drift."""
    diffs = [statistics.fmean(c) - statistics.fmean(b)
             for c, b in zip(cond, base, strict=True) if c and b]
    if len(diffs) < 2:
        return (diffs[0] if diffs else float("nan")), float("nan")
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def perturbation(lab: Lab, settings: list[tuple[str, int, str]], count: int,
                 interval: float, rounds: int = 16, seed: int = 1) -> list[dict]:
    """An independent iputils ping's RTT: nothing attached, mace's programs attached, ftrace
    on the same tracepoints. Each round runs one short block of each condition, in an order
    shuffled per round (a fixed order would put any within-round drift on one condition);
    the effect is the mean of the per-round differences, with its standard error, so a
    sub-µs claim comes with how well this machine can resolve it."""
    rows = []
    block = max(50, count // rounds)
    order = random.Random(seed)
    conditions = {"base": nullcontext, "bpf": lambda: Backend(os.urandom(8)),
                  "ftrace": ftrace_enabled}
    for name, neighbours, kind in settings:
        samples: dict[str, list[list[float]]] = {"base": [], "bpf": [], "ftrace": []}
        with load_setting(lab, neighbours, kind, 3 * rounds * (block * interval + 1) + 60):
            for _ in range(rounds):
                for cond in order.sample(list(conditions), k=len(conditions)):
                    with conditions[cond]():
                        samples[cond].append(_witness_ping(lab, block, interval))
        base, bpf, ftrace = (_merge(samples[k]) for k in ("base", "bpf", "ftrace"))
        half_a, half_b = _merge(samples["base"][0::2]), _merge(samples["base"][1::2])
        bpf_delta, bpf_se = _paired_delta(samples["bpf"], samples["base"])
        ftrace_delta, ftrace_se = _paired_delta(samples["ftrace"], samples["base"])
        row = {"setting": name, "rounds": rounds, "block": block, "baseline": base,
               "bpf": bpf, "ftrace": ftrace,
               "noise_mean_us": abs(half_a["mean"] - half_b["mean"]),
               "bpf_delta_mean_us": bpf_delta, "bpf_delta_mean_se_us": bpf_se,
               "bpf_delta_p99_us": bpf["p99"] - base["p99"],
               "ftrace_delta_mean_us": ftrace_delta, "ftrace_delta_mean_se_us": ftrace_se,
               "ftrace_delta_p99_us": ftrace["p99"] - base["p99"]}
        rows.append(row)
        print(f"  perturbation {name}: bpf {bpf_delta:+.2f} ± {bpf_se:.2f} µs, ftrace "
              f"{ftrace_delta:+.2f} ± {ftrace_se:.2f} µs (standard errors over {rounds} "
              f"rounds)", flush=True)
    return rows


@contextmanager
def bpf_stats() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)


def mace_program_stats() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) summed per mace program name over every loaded copy."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    totals: dict[str, tuple[int, int]] = {}
    for prog in json.loads(out):
        name = prog.get("name", "")
        if name.startswith("mace_"):
            t, c = totals.get(name, (0, 0))
            totals[name] = (t + prog.get("run_time_ns", 0), c + prog.get("run_cnt", 0))
    return totals


class NotMeasured(Exception):
    """A bench section could not measure; the message says why (one line for the table)."""


def wait_for_programs(program_sets: int, timeout_s: float = 60.0) -> None:
    """Until `program_sets` copies of mace's programs are loaded (a fixed sleep measured
    nothing on a machine where start-up took longer than the sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                             text=True).stdout
        if sum(p.get("name") == "mace_xmit" for p in json.loads(out or "[]")) >= program_sets:
            return
        time.sleep(0.05)
    raise NotMeasured(f"{program_sets} mace program set(s) not loaded within {timeout_s:.0f} s")


def _delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> dict:
    out = {}
    for name, (t, c) in after.items():
        if name not in before:
            continue
        t0, c0 = before[name]
        runs = c - c0
        out[name] = {"runs": runs, "ns_per_run": (t - t0) / runs if runs else None}
    total_t = sum(v["ns_per_run"] * v["runs"] for v in out.values() if v["runs"])
    total_c = sum(v["runs"] for v in out.values())
    out["all"] = {"runs": total_c, "ns_per_run": total_t / total_c if total_c else None}
    return out


def _run_with_rusage(cmd: list[str], timeout_s: float) -> tuple[str, dict]:
    """Run cmd under GNU time: the child's own peak RSS and CPU (rusage from a fork of
    this Python process would count the parent's pages until exec)."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M %U %S", *cmd],
                              capture_output=True, text=True, timeout=timeout_s)
        wall = time.monotonic() - start
        rss_kb, user, system = report.read().split()[-3:]
    return proc.stdout, {"wall_s": wall, "cpu_s": float(user) + float(system),
                         "max_rss_mb": int(rss_kb) / 1024, "returncode": proc.returncode}


def flood_and_cost(lab: Lab, seconds: int, neighbours: int) -> dict:
    """mace-ping -f for `seconds` under flood neighbours: rate, coverage, CPU, peak RSS."""
    cmd = lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                      lab.netns_path(lab.container_ns(0)), "-f", "-q", "-w", str(seconds),
                      "-W", "1", lab.target_addr)
    with load_setting(lab, neighbours, "flood", seconds + 30):
        out, usage = _run_with_rusage(cmd, seconds + 30)
    sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
    received = int(re.search(r"(\d+) received", out).group(1))
    sending_s = int(re.search(r"time (\d+)ms", out).group(1)) / 1000  # the run, not start-up
    kernel = re.search(r"kernel data (\d+)/(\d+) replies", out)
    lost = re.search(r"(\d+) events lost", out)
    return {"seconds": seconds, "neighbours": neighbours, "sent": sent, "received": received,
            "probes_per_s": sent / sending_s,
            "coverage": int(kernel.group(1)) / int(kernel.group(2)) if kernel else None,
            "kernel_events_lost": int(lost.group(1)) if lost else None, **usage}


def flood_repeated(lab: Lab, seconds: int, neighbours: int, repeats: int) -> dict:
    """flood_and_cost `repeats` times: the median run, with every run's rate as the spread."""
    runs = sorted((flood_and_cost(lab, seconds, neighbours) for _ in range(repeats)),
                  key=lambda r: r["probes_per_s"])
    return {**runs[len(runs) // 2], "repeats": repeats,
            "probes_per_s_runs": [r["probes_per_s"] for r in runs]}


def bpf_cost(lab: Lab, seconds: float, neighbours: int) -> dict:
    """Per-run cost of mace's programs under flood neighbours plus a mace-ping -f probing,
    read from kernel.bpf_stats_enabled counters (bpftool)."""
    with load_setting(lab, neighbours, "flood", seconds + 30), bpf_stats():
        flood = subprocess.Popen(lab.on_host(
            sys.executable, "-m", "mace_tools.cli.ping", "--netns",
            lab.netns_path(lab.container_ns(0)), "-f", "-q", "-w", str(int(seconds) + 5),
            lab.target_addr), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_programs(1)
            before = mace_program_stats()
            time.sleep(seconds)
            after = mace_program_stats()
        finally:
            flood.wait(timeout=30)
    return {"neighbours": neighbours, "seconds": seconds, "programs": _delta(after, before)}


def startup(lab: Lab, runs: int) -> dict:
    """`-c 1` from a container: spawn -> first echo request on the container's eth0
    (tcpdump, CLOCK_REALTIME on both ends), spawn -> exit, and peak RSS."""
    ns = lab.container_ns(0)
    tools = {
        "mace-ping -c 1": [sys.executable, "-m", "mace_tools.cli.ping", "-c", "1", "-q",
                           lab.target_addr],
        "iputils ping -c 1": ["ping", "-c", "1", "-q", lab.target_addr],
    }
    results = {}
    for name, tool in tools.items():
        spawns, usages = [], []
        with Capture(ns, "eth0", "icmp[0] = 8") as cap:
            for _ in range(runs):
                spawns.append(time.clock_gettime_ns(time.CLOCK_REALTIME))
                _, usage = _run_with_rusage(["ip", "netns", "exec", ns, *tool], 30)
                usages.append(usage)
                time.sleep(0.05)
        sends = sorted(p.ts_real_ns for p in cap.packets)
        first = []
        for t0 in spawns:
            after = [t for t in sends if t >= t0]
            if after:
                first.append((after[0] - t0) / 1e6)
        wall = sorted(u["wall_s"] * 1000 for u in usages)
        rss = max(u["max_rss_mb"] for u in usages)
        results[name] = {
            "runs": runs,
            "first_probe_ms_median": percentile(sorted(first), 50) if first else None,
            "first_probe_ms_p95": percentile(sorted(first), 95) if first else None,
            "exit_ms_median": percentile(wall, 50), "exit_ms_p95": percentile(wall, 95),
            "peak_rss_mb": rss,
        }
        print(f"  start-up {name}: first probe {results[name]['first_probe_ms_median']} ms "
              f"(median), exit {results[name]['exit_ms_median']:.1f} ms, rss {rss:.1f} MB",
              flush=True)
    results["bcc"] = bcc_startup()
    return results


_BCC_PROG = r"""
from bcc import BPF
import time
t = time.monotonic()
b = BPF(text='''
TRACEPOINT_PROBE(net, net_dev_start_xmit) { return 0; }
TRACEPOINT_PROBE(net, netif_rx) { return 0; }
TRACEPOINT_PROBE(net, netif_receive_skb) { return 0; }
''')
print("loaded_ms", (time.monotonic() - t) * 1000)
"""


def bcc_startup() -> dict:
    """The same tracepoints through bcc, where bcc can compile here (it needs headers)."""
    python = "/usr/bin/python3"
    check = subprocess.run([python, "-c", "import bcc"], capture_output=True, text=True)
    if check.returncode != 0:
        return {"skipped": "bcc (python3-bpfcc) is not installed"}
    out, usage = _run_with_rusage([python, "-c", _BCC_PROG], 120)
    m = re.search(r"loaded_ms ([\d.]+)", out)
    if not m:
        return {"skipped": "bcc cannot compile on this kernel (no kernel headers)",
                "exit_ms": usage["wall_s"] * 1000}
    return {"load_ms": float(m.group(1)), "exit_ms": usage["wall_s"] * 1000,
            "peak_rss_mb": usage["max_rss_mb"]}


def scaling(lab: Lab, instances: list[int], count: int, interval: float,
            neighbours: int) -> list[dict]:
    """1, 2, 4 concurrent mace-ping runs under flood: per-run BPF cost and the witness RTT.
    The instances run longer than the witness, so their programs' counters are read while
    they are still loaded. The same number of iputils pings at the same rate is the
    control: the instances' own probe traffic also slows the witness down."""
    rows = []
    containers = (0, *EXTRA_MACE)
    with load_setting(lab, neighbours, "flood", (len(instances) + 1) * 2 * count * interval
                      + 60):
        base = _merge([_witness_ping(lab, count, interval)])
        for n in instances:
            with bpf_stats():
                runs = [mace_ping(lab, containers[i], os.urandom(8), 2 * count, interval, "-q")
                        for i in range(n)]
                wait_for_programs(n)
                before = mace_program_stats()
                witness = _merge([_witness_ping(lab, count, interval)])
                after = mace_program_stats()
                results: list[ToolResult] = [r.collect() for r in runs]
            control_runs = [iputils(lab, lab.container_ns(containers[i]), 5000 + i, 2 * count,
                                    interval) for i in range(n)]
            time.sleep(0.5)
            control = _merge([_witness_ping(lab, count, interval)])
            for run in control_runs:
                run.collect()
            coverage = [r.summary.get("mace", {}).get("coverage") for r in results]
            rows.append({"instances": n, "coverage": coverage,
                         "cost": _delta(after, before)["all"], "witness": witness,
                         "witness_delta_mean_us": witness["mean"] - base["mean"],
                         "witness_delta_p99_us": witness["p99"] - base["p99"],
                         "control_delta_mean_us": control["mean"] - base["mean"],
                         "bpf_share_mean_us": witness["mean"] - control["mean"]})
            print(f"  scaling {n}: {rows[-1]['cost']['ns_per_run'] or 0:.1f} ns/run, witness "
                  f"{rows[-1]['witness_delta_mean_us']:+.2f} µs (same-rate iputils "
                  f"{rows[-1]['control_delta_mean_us']:+.2f} µs)", flush=True)
    return rows


TRACE_METHODS = [("UDP", [], "udp"), ("UDP --paris", ["--paris"], "udp"),
                 ("ICMP (-I)", ["-I"], "icmp"), ("TCP SYN (-T)", ["-T"], "tcp")]


def traceroute_accuracy(lab: Lab, traces: int, queries: int) -> list[dict]:
    """Per method and hop: corrected minus truth v2 on the outer link (µs). Hop 1 is the
    host's bridge (host-internal: it never reaches the outer device, no truth there)."""
    rows = []
    for name, flags, method in TRACE_METHODS:
        errors: dict[int, list[float]] = {}
        raw_errors: dict[int, list[float]] = {}
        internal: list[float] = []
        replies = corrected = 0
        for _ in range(traces):
            nonce = os.urandom(8)
            cmd = lab.on_host(sys.executable, "-m", "mace_tools.cli.traceroute", "--netns",
                              lab.netns_path(lab.container_ns(0)), "--json", "--nonce",
                              nonce.hex(), "-q", str(queries), "-w", "1", *flags,
                              lab.target_addr)
            with TruthCapture(lab.outer_link, "icmp or tcp or udp") as cap:
                doc = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                timeout=120).stdout)
            truth = cap.trace(nonce, method, packet_len=60)
            for hop in doc["result"]:
                for r in hop["result"]:
                    if "rtt" not in r:
                        continue
                    replies += 1
                    corrected += r["rtt_corrected"] is not None
                    if r["host_internal"]:
                        internal.append(r["rtt_corrected"] * 1000)
                    elif r["seq"] in truth and r["rtt_corrected"] is not None:
                        errors.setdefault(hop["hop"], []).append(
                            r["rtt_corrected"] * 1000 - truth[r["seq"]])
                        raw_errors.setdefault(hop["hop"], []).append(
                            r["rtt"] * 1000 - truth[r["seq"]])
        rows.append({"method": name, "replies": replies,
                     "coverage": corrected / replies if replies else None,
                     "hops": {str(h): distribution(e) for h, e in sorted(errors.items())},
                     "raw_hops": {str(h): distribution(e) for h, e in sorted(raw_errors.items())},
                     "host_internal_corrected_us": distribution(internal)})
        worst = max((d["abs_p99"] for d in rows[-1]["hops"].values()), default=None)
        print(f"  traceroute {name}: coverage {rows[-1]['coverage']}, worst hop |p99| "
              f"{worst} µs", flush=True)
    return rows
