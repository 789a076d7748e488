"""The bench's experiments, each returning plain dicts for results.json.

All traffic stays in the lab's namespaces (198.18.0.0/15). Kernel-wide switches the bench
flips (kernel.bpf_stats_enabled, ftrace events) are put back in `finally` blocks.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from bench import floor
from bench.tools import ToolResult, ToolRun, capture_filter, iputils, mace_ping, scamper
from mace_tools.kernel import programs
from mace_tools.lab.capture import Capture, CapturedEcho, TruthCapture
from mace_tools.lab.load import Load
from mace_tools.lab.paths import PathLab
from mace_tools.lab.topology import Lab
from mace_tools.stats import percentile

# Lab roles: c0 mace-ping; c1..c8 load neighbours; c9 iputils; c10 scamper;
# c11 the independent ping whose RTT shows perturbation; c12..c18 extra mace-ping instances
# (with c0: the 8 concurrent runs of the scaling section); the agent's 16 concurrent
# clients (bench/agent.py) run in every container but the floods c1..c4 and c11, which
# takes c19 and c20 as well.
CONTAINERS = 21
IPUTILS_CONTAINER, SCAMPER_CONTAINER, WITNESS_CONTAINER = 9, 10, 11
EXTRA_MACE = (12, 13, 14, 15, 16, 17, 18)
ID_IPUTILS_CONTAINER, ID_IPUTILS_HOST, ID_SCAMPER = 4242, 4343, 4545
PACKAGE = Path(programs.__file__).resolve().parents[1]  # mace_tools/
REPO = Path(__file__).resolve().parents[1]
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


@contextmanager
def load_setting_to(lab: Lab, neighbours: int, target: str, seconds: float) -> Iterator[None]:
    """Flood neighbours pinging target (an address of either family)."""
    with Load(lab, neighbours, seconds, target=target) if neighbours else nullcontext():
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


def witness_ping(lab: Lab, count: int, interval: float) -> list[float]:
    """RTTs (µs) of an iputils ping from the witness container, which mace never probes."""
    proc = subprocess.run(["ip", "netns", "exec", lab.container_ns(WITNESS_CONTAINER), "ping",
                           "-n", "-c", str(count), "-i", str(interval), lab.target_addr],
                          capture_output=True, text=True, timeout=count * interval + 60)
    return [float(m.group(2)) * 1000
            for m in re.finditer(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", proc.stdout)]


@dataclass(frozen=True)
class Placement:
    """Which CPUs the instances (and their control) and the witness run on; None: any, as
    deployed. Pinned apart, the instances' own CPU (their process, their syscalls, and
    their packets' softirq work, which veth does on the sender's CPU) is kept off the
    witness's CPU: what is left of "mace minus control" is the programs' work on the
    witness's packets and what the CPUs share (caches, locks)."""

    label: str = "any CPU"
    instances: frozenset[int] | None = None
    witness: frozenset[int] | None = None


# The perturbation rows' runs and controls: -l 3 lets a probe woken late on a busy CPU be
# made up (up to 3 intervals of credit, pacing.py): with -l 1 neither kept the asked rate
# under 4 floods (133-176 of 200/s), and each lost a different share.
PACED = ("-l", "3")

ANYWHERE = Placement()
APART = Placement("instances on CPU 1, witness on CPU 0", frozenset({1}), frozenset({0}))


@contextmanager
def on_cpus(cpus: frozenset[int] | None) -> Iterator[None]:
    """What the bench starts meanwhile inherits these CPUs (its own affinity)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def tx_packets(lab: Lab, containers: tuple[int, ...]) -> int:
    """Packets the containers sent so far: their probes (they send nothing else but a
    rare ARP), counted as the host side of each one's veth (vcI) received them, in one
    snapshot of the host netns (one `ip` call, so the window has one start and end)."""
    return sum(sent_by_container(lab, containers).values())


def sent_by_container(lab: Lab, containers: tuple[int, ...]) -> dict[int, int]:
    """tx_packets of each container, from one snapshot."""
    out = subprocess.run(["ip", "-n", lab.host_ns, "-s", "-j", "link", "show"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    rx = {link["ifname"]: link["stats64"]["rx"]["packets"] for link in json.loads(out)}
    return {c: rx[f"vc{c}"] for c in containers}


def witness_during(lab: Lab, containers: tuple[int, ...], block: int, interval: float,
                   place: Placement) -> tuple[list[float], float]:
    """The witness's RTTs (µs) and the probes per second the containers sent meanwhile:
    counted on the wire, so a side that paces slower than asked is seen (iputils 20221126,
    the control until 2026-11-24, sent 30-40% fewer probes than mace-ping at the same -i
    under 4 floods here, measured)."""
    sent, start = tx_packets(lab, containers), time.monotonic()
    with on_cpus(place.witness):
        rtts = witness_ping(lab, block, interval)
    end = time.monotonic()
    return rtts, (tx_packets(lab, containers) - sent) / (end - start)


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


def witness_blocks(lab: Lab, conditions: dict[str, Callable[[], AbstractContextManager[object]]],
                   rounds: int, order: random.Random, neighbours: int, kind: str,
                   block: int, interval: float, settle_s: float = 0.0,
                   after: Callable[[], object] | None = None) -> dict[str, list[list[float]]]:
    """The witness's RTT blocks (µs) under each condition (a context manager held for its
    block), `rounds` times in a shuffled order per round, under `neighbours` load of
    `kind`: paired rounds for paired_delta(). after(): once each condition is left."""
    samples: dict[str, list[list[float]]] = {k: [] for k in conditions}
    seconds = len(conditions) * rounds * (block * interval + settle_s + 3) + 60
    with load_setting(lab, neighbours, kind, seconds):
        for _ in range(rounds):
            for cond in order.sample(list(conditions), k=len(conditions)):
                with conditions[cond]():
                    samples[cond].append(witness_ping(lab, block, interval))
                if after is not None:
                    after()
    return samples


def delta_row(setting: str, rounds: int, block: int, samples: dict[str, list[list[float]]],
              deltas: dict[str, tuple[str, str]]) -> dict:
    """One setting's row from witness_blocks(): the baseline's ("base") mean, and for each
    name in `deltas` (condition, reference) the paired Δ ± its standard error; printed."""
    row: dict = {"setting": setting, "rounds": rounds, "block": block,
                 "baseline_mean_us": merged_blocks(samples["base"])["mean"]}
    for name, (cond, ref) in deltas.items():
        delta, se = paired_delta(samples[cond], samples[ref])
        row[name] = {"delta_mean_us": delta, "se_us": se}
    print(f"  {setting}: " + ", ".join(f"{name} {delta_cell(row, name)} µs"
                                       for name in deltas), flush=True)
    return row


def delta_cell(row: dict, name: str) -> str:
    """A delta_row() figure as the results tables show it."""
    return f"{row[name]['delta_mean_us']:+.2f} ± {row[name]['se_us']:.2f}"


def merged_blocks(samples: list[list[float]]) -> dict[str, float]:
    rtts = sorted(v for block in samples for v in block)
    if not rtts:
        return {"n": 0}
    return {"n": len(rtts), "mean": sum(rtts) / len(rtts), "p99": percentile(rtts, 99)}


# One run joined, no probe sent: the programs attached as while any run is active.
_HOLD_A_RUN = ("import os, sys\n"
               "from mace_tools.kernel.backend import Backend\n"
               "with Backend(os.urandom(8)):\n"
               "    print('ready', flush=True)\n"
               "    sys.stdin.read()\n")


READY_TIMEOUT_S = 60.0  # a child's start-up and load, on a loaded 2-core VM


@contextmanager
def held_by_child(command: list[str], what: str, cwd: Path | None = None) -> Iterator[None]:
    """What `command` sets up and holds: it prints "ready" once it holds it and lets go
    when its stdin closes (or it dies), so a condition never outlives its block, whatever
    happens in this process. Every condition that holds something this way pays the same
    child (its start-up just before the block)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        # (a child stuck before "ready" must not hang the bench)
        if not select.select([proc.stdout], [], [], READY_TIMEOUT_S)[0]:
            proc.kill()
            raise NotMeasured(f"no {what}: not ready within {READY_TIMEOUT_S:.0f} s")
        if proc.stdout.readline().strip() != "ready":
            proc.wait(timeout=30)
            raise NotMeasured(f"no {what}: {last_line(proc.stderr.read())}")
        yield
    finally:
        proc.stdin.close()  # it lets go
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def programs_attached() -> AbstractContextManager[None]:
    """mace's programs attached (one run in the shared set, sending nothing), held by a
    child process as a mace-ping run is."""
    return held_by_child([sys.executable, "-c", _HOLD_A_RUN], "run joined the programs")


def floor_attached() -> AbstractContextManager[None]:
    """The empty programs on mace's tracepoints, held by a child as programs_attached()
    holds mace's (the same child's cost in both conditions)."""
    return held_by_child([sys.executable, "-m", "bench.floor", "hold-tracepoints",
                          str(floor.object_file())], "empty programs attached", cwd=REPO)


def paired_delta(cond: list[list[float]], base: list[list[float]]) -> tuple[float, float]:
    """Mean and standard error of (condition block mean - baseline block mean) over rounds:
    each round's blocks ran back to back, so the pairing cancels slow drift."""
    diffs = [statistics.fmean(c) - statistics.fmean(b)
             for c, b in zip(cond, base, strict=True) if c and b]
    if len(diffs) < 2:
        return (diffs[0] if diffs else float("nan")), float("nan")
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def perturbation(lab: Lab, settings: list[tuple[str, int, str]], count: int,
                 interval: float, rounds: int = 16, seed: int = 1) -> list[dict]:
    """An independent iputils ping's RTT: nothing attached, mace's programs attached, empty
    programs on the same tracepoints (the floor any program there costs; held by a child
    as mace's are), ftrace on them. Each round runs one short block of each condition, in
    an order shuffled per round (a fixed order would put any within-round drift on one
    condition); the effect is the mean of the per-round differences, with its standard
    error, so a sub-µs claim comes with how well this machine can resolve it."""
    rows = []
    block = max(50, count // rounds)
    order = random.Random(seed)
    conditions = {"base": nullcontext, "bpf": programs_attached, "floor": floor_attached,
                  "ftrace": ftrace_enabled}
    for name, neighbours, kind in settings:
        samples: dict[str, list[list[float]]] = {k: [] for k in conditions}
        with load_setting(lab, neighbours, kind,
                          len(conditions) * rounds * (block * interval + 1) + 60):
            for _ in range(rounds):
                for cond in order.sample(list(conditions), k=len(conditions)):
                    with conditions[cond]():
                        samples[cond].append(witness_ping(lab, block, interval))
        base, bpf, ftrace = (merged_blocks(samples[k]) for k in ("base", "bpf", "ftrace"))
        half_a, half_b = merged_blocks(samples["base"][0::2]), merged_blocks(samples["base"][1::2])
        bpf_delta, bpf_se = paired_delta(samples["bpf"], samples["base"])
        floor_delta, floor_se = paired_delta(samples["floor"], samples["base"])
        above_delta, above_se = paired_delta(samples["bpf"], samples["floor"])
        ftrace_delta, ftrace_se = paired_delta(samples["ftrace"], samples["base"])
        row = {"setting": name, "rounds": rounds, "block": block, "baseline": base,
               "bpf": bpf, "ftrace": ftrace,
               "noise_mean_us": abs(half_a["mean"] - half_b["mean"]),
               "bpf_delta_mean_us": bpf_delta, "bpf_delta_mean_se_us": bpf_se,
               "bpf_delta_p99_us": bpf["p99"] - base["p99"],
               "floor_delta_mean_us": floor_delta, "floor_delta_mean_se_us": floor_se,
               "bpf_above_floor_us": above_delta, "bpf_above_floor_se_us": above_se,
               "ftrace_delta_mean_us": ftrace_delta, "ftrace_delta_mean_se_us": ftrace_se,
               "ftrace_delta_p99_us": ftrace["p99"] - base["p99"]}
        rows.append(row)
        print(f"  perturbation {name}: bpf {bpf_delta:+.2f} ± {bpf_se:.2f} µs, empty "
              f"programs {floor_delta:+.2f} ± {floor_se:.2f} µs, ftrace "
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


def _bpftool_progs(*args: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "prog", "show", *args], capture_output=True,
                         text=True).stdout
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else [data]


def mace_program_stats() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per mace program name, summed over every loaded copy: one
    while runs share the set (loaded_program_sets() says whether another is loaded)."""
    totals: dict[str, tuple[int, int]] = {}
    for prog in _bpftool_progs():
        name = prog.get("name", "")
        if name in programs.PROGRAMS:
            t, c = totals.get(name, (0, 0))
            totals[name] = (t + prog.get("run_time_ns", 0), c + prog.get("run_cnt", 0))
    return totals


def loaded_program_sets() -> int:
    """Copies of mace's programs loaded on the host: 1 while runs share
    the set; more means another copy is attached too (a private one, or a leaked one),
    and every packet pays for each."""
    return sum(p.get("name") == "mace_xmit" for p in _bpftool_progs())


def await_program_sets(at_most: int = 0, timeout_s: float = 3.0) -> int:
    """Copies of mace's programs still loaded once no more than `at_most` are, or at the
    timeout: a set whose last holder just exited is freed by the kernel a little later."""
    deadline = time.monotonic() + timeout_s
    while (sets := loaded_program_sets()) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return sets


class NotMeasured(Exception):
    """A bench section could not measure; the message says why (one line for the table)."""


def run_owners() -> set[int]:
    """Pids of the live runs of the host's program set(s): one set serves every run, so a
    run is an entry of its runs map, not a loaded program."""
    return set(programs.run_owners())


def wait_for_runs(procs: list[subprocess.Popen], timeout_s: float = 60.0) -> None:
    """Until each of these mace-ping processes is a run of the shared program set (a fixed
    sleep measured nothing on a machine where start-up took longer than the sleep). Keyed
    by pid, so another engineer's run on the same host is never taken for ours."""
    pids = {p.pid for p in procs}  # ip netns exec execs: its pid is mace-ping's
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pids <= run_owners():
            return
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise NotMeasured(f"mace-ping exited before its run was active: {dead[0][-1]}")
        time.sleep(0.05)
    raise NotMeasured(f"{len(pids)} mace-ping run(s) not active in the shared program set "
                      f"within {timeout_s:.0f} s")


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


def run_with_rusage(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None
                    ) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run cmd under GNU time: the child's own peak RSS and CPU (rusage from a fork of
    this Python process would count the parent's pages until exec)."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M %U %S", *cmd],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        wall = time.monotonic() - start
        rss_kb, user, system = report.read().split()[-3:]
    return proc, {"wall_s": wall, "cpu_s": float(user) + float(system),
                  "max_rss_mb": int(rss_kb) / 1024, "returncode": proc.returncode}


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def ping_summary(tool: str, proc: subprocess.CompletedProcess[str]) -> dict:
    """The figures of a ping-style quiet summary (iputils' lines; mace-ping adds its
    kernel-data line). The rate is over the summary's own `time`: the run, not start-up."""
    out = proc.stdout
    sent = re.search(r"(\d+) packets transmitted", out)
    received = re.search(r"(\d+) received", out)
    took = re.search(r"time (\d+)ms", out)
    if not (sent and received and took) or int(took.group(1)) == 0:
        raise NotMeasured(f"{tool} printed no summary (exit {proc.returncode}): "
                          f"{last_line(proc.stderr or out)}")
    kernel = re.search(r"kernel data (\d+)/(\d+) replies", out)
    lost = re.search(r"(\d+) events lost", out)
    return {"sent": int(sent.group(1)), "received": int(received.group(1)),
            "probes_per_s": int(sent.group(1)) / (int(took.group(1)) / 1000),
            "coverage": (int(kernel.group(1)) / int(kernel.group(2))
                         if kernel and int(kernel.group(2)) else None),
            "kernel_events_lost": int(lost.group(1)) if lost else None}


def flood_prober(lab: Lab | PathLab) -> str:
    """The netns floods are run from: the star lab's c0, a path lab's prober."""
    return lab.prober_ns if isinstance(lab, PathLab) else lab.container_ns(0)


def mace_flood(lab: Lab | PathLab, seconds: int) -> dict:
    """mace-ping -f for `seconds` from flood_prober(lab): rate, coverage, lost records, CPU,
    peak RSS."""
    cmd = lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                      lab.netns_path(flood_prober(lab)), "-f", "-q", "-w", str(seconds),
                      "-W", "1", lab.target_addr)
    proc, usage = run_with_rusage(cmd, seconds + 30)
    return {**ping_summary("mace-ping -f", proc), **usage}


def iputils_flood(lab: Lab | PathLab, seconds: int) -> dict:
    """iputils `ping -f` for `seconds` from the same container: the rate to match."""
    cmd = ["ip", "netns", "exec", flood_prober(lab), "ping", "-f", "-q", "-w",
           str(seconds), lab.target_addr]
    proc, usage = run_with_rusage(cmd, seconds + 30)
    return {**ping_summary("iputils ping -f", proc), **usage}


def flood_pair(lab: Lab | PathLab, seconds: int, neighbours: int, mace_first: bool) -> dict:
    """mace-ping -f and iputils ping -f from flood_prober(lab), one right after the other
    under the same neighbours' floods; which goes first alternates over repeats (no order
    bias)."""
    floods = [("mace", mace_flood), ("iputils", iputils_flood)]
    stray = await_program_sets()  # none of our runs is active: 0 unless someone else's
    if neighbours and not isinstance(lab, Lab):
        raise NotMeasured("flood neighbours need the star lab's containers")
    with load_setting(lab, neighbours, "flood", 2 * seconds + 60) if isinstance(lab, Lab) \
            else nullcontext():
        got = {name: run(lab, seconds) for name, run in (floods if mace_first
                                                          else floods[::-1])}
    mace, ref = got["mace"], got["iputils"]
    return {**mace, "seconds": seconds, "neighbours": neighbours, "mace_first": mace_first,
            "iputils": ref, "ratio": mace["probes_per_s"] / ref["probes_per_s"],
            "stray_sets": stray}


def flood_repeated(lab: Lab | PathLab, seconds: int, neighbours: int, repeats: int) -> dict:
    """flood_pair `repeats` times: the median mace run's figures, every run's rate, iputils'
    rate beside each, and each pair's ratio (mace / iputils) with their median. On the
    star lab the target answers inside sendto() (veth all the way); on the NAPI path lab
    a wire process carries the packets with timing of its own, as a real link would."""
    pairs = [flood_pair(lab, seconds, neighbours, mace_first=i % 2 == 0)
             for i in range(repeats)]
    by_rate = sorted(pairs, key=lambda r: r["probes_per_s"])
    return {**by_rate[len(by_rate) // 2], "repeats": repeats,
            "probes_per_s_runs": [r["probes_per_s"] for r in by_rate],
            "iputils_per_s_runs": sorted(r["iputils"]["probes_per_s"] for r in pairs),
            "ratio_runs": [r["ratio"] for r in pairs],
            "ratio_median": statistics.median(r["ratio"] for r in pairs),
            "coverage_min": min((r["coverage"] if r["coverage"] is not None else 0.0)
                                for r in pairs),
            "kernel_events_lost_total": sum(r["kernel_events_lost"] or 0 for r in pairs),
            "lost_unknown": any(r["kernel_events_lost"] is None for r in pairs),
            "stray_sets": max(r["stray_sets"] for r in pairs)}


def bpf_cost(lab: Lab, seconds: float, neighbours: int) -> dict:
    """Per-run cost of mace's programs under flood neighbours plus a mace-ping -f probing,
    read from kernel.bpf_stats_enabled counters (bpftool)."""
    with load_setting(lab, neighbours, "flood", seconds + 30), bpf_stats():
        flood = subprocess.Popen(lab.on_host(
            sys.executable, "-m", "mace_tools.cli.ping", "--netns",
            lab.netns_path(lab.container_ns(0)), "-f", "-q", "-w", str(int(seconds) + 5),
            lab.target_addr), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_runs([flood])
            before = mace_program_stats()
            time.sleep(seconds)
            after = mace_program_stats()
            sets = loaded_program_sets()
        finally:
            flood.wait(timeout=30)
    return {"neighbours": neighbours, "seconds": seconds, "sets_loaded": sets,
            "programs": _delta(after, before)}


def interrupt(run: ToolRun, timeout_s: float = 30) -> ToolResult:
    """Stop a tool as Ctrl-C does (it prints its summary) and collect it; killed if it
    does not stop."""
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
    try:
        return run.collect(timeout_s)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        return run.collect(timeout_s)


def foreign_cost(lab: Lab, seconds: float, neighbours: int, flood_target: str | None = None
                 ) -> dict:
    """ns per program run on foreign traffic: one mace-ping run probing once a second, so
    the programs are active (a run in the map: switches.runs > 0), while `neighbours`
    iputils floods (echoes without mace's nonce) to flood_target (default: the lab's IPv4
    target) cross every hook; stats over that window."""
    deadline = int(seconds) + 90
    run = mace_ping(lab, 0, os.urandom(8), deadline, 1.0, "-q", "-w", str(deadline))
    try:
        wait_for_runs([run.proc])
        flood = load_setting_to(lab, neighbours, flood_target, seconds + 30) if flood_target \
            else load_setting(lab, neighbours, "flood", seconds + 30)
        with flood, bpf_stats():
            time.sleep(0.5)  # every flood at full rate
            before = mace_program_stats()
            time.sleep(seconds)
            after = mace_program_stats()
            sets = loaded_program_sets()
            # then as long again beside programs that do nothing: what any program pays
            # per run here (not attached during the first window: it measures mace alone)
            with floor.attached() as floor_fds:
                floor_before, beside_before = floor.stats(floor_fds), mace_program_stats()
                time.sleep(seconds)
                floor_after, beside_after = floor.stats(floor_fds), mace_program_stats()
    finally:
        result = interrupt(run)
    if not result.rtt_ms:
        raise NotMeasured(f"the slow mace-ping run got no reply: {last_line(result.stderr)}")
    return {"neighbours": neighbours, "seconds": seconds, "mace_replies": len(result.rtt_ms),
            "sets_loaded": sets, "programs": _delta(after, before),
            "floor": _delta(floor_after, floor_before),
            "beside_floor": _delta(beside_after, beside_before)}


def records_per_probe(lab: Lab, count: int, interval: float) -> dict:
    """Records crossing to userspace per answered probe, for a plain `mace-ping -q` from
    c0 (text output: no path asked for): its summary's "N kernel records" (records and
    events read from the ring) over the replies received. The JSON outputs ship the
    path (an event per device) as well: their figure is shown beside it."""
    def run(*mode: str) -> tuple[str, str]:
        cmd = lab.on_host(sys.executable, "-m", "mace_tools.cli.ping", "--netns",
                          lab.netns_path(lab.container_ns(0)), *mode, "-c", str(count),
                          "-i", str(interval), lab.target_addr)
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=count * interval + 60)
        return proc.stdout, proc.stderr

    out, err = run("-q")
    received = re.search(r"(\d+) received", out)
    records = re.search(r"(\d+) kernel records", out)
    if not received or not records:
        raise NotMeasured(f"mace-ping -q printed no kernel records: {last_line(out + err)}")
    json_out, _ = run("--json")
    try:
        mace = json.loads(json_out).get("mace", {})
    except json.JSONDecodeError:
        mace = {}
    got = int(received.group(1))
    with_path = mace.get("kernel_records")
    return {"probes": count, "interval_s": interval, "received": got,
            "kernel_records": int(records.group(1)),
            "records_per_answered_probe": int(records.group(1)) / got if got else None,
            "json_records_per_answered_probe": with_path / got if with_path and got
            else None}


def installed_env() -> dict[str, str]:
    """The environment a start-up is timed in, as a real install starts: mace_tools
    byte-compiled (pip compiles at install; a checkout has only what earlier runs left),
    and no PYTHONDONTWRITEBYTECODE, so the first, untimed run caches whatever else it
    imports (with it set, every start compiled those again: ~30 ms). No MACE_AGENT either:
    which agent a run uses is the row's to say, not the caller's shell's."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(PACKAGE)], check=True,
                   capture_output=True)
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONDONTWRITEBYTECODE", "MACE_AGENT")}


# The console script as pip installs it (mace_tools.cli.launch): what a user starts, and
# the only way in that loads the programs while the command still imports (kernel.early).
MACE_PING_SCRIPT = str(Path(sys.executable).with_name("mace-ping"))


def startup(lab: Lab, runs: int) -> dict:
    """`-c 1` from a container: spawn -> first echo request on the container's eth0
    (tcpdump, CLOCK_REALTIME on both ends), spawn -> exit, and peak RSS; byte code
    compiled as installed (installed_env), after one untimed run of each tool."""
    ns = lab.container_ns(0)
    env = installed_env()
    tools = {
        "mace-ping -c 1": [MACE_PING_SCRIPT, "-c", "1", "-q", lab.target_addr],
        "iputils ping -c 1": ["ping", "-c", "1", "-q", lab.target_addr],
    }
    results = {}
    for name, tool in tools.items():
        spawns, usages = [], []
        run_with_rusage(["ip", "netns", "exec", ns, *tool], 30, env)  # caches, warms
        with Capture(ns, "eth0", "icmp[0] = 8") as cap:
            for _ in range(runs):
                spawns.append(time.clock_gettime_ns(time.CLOCK_REALTIME))
                _, usage = run_with_rusage(["ip", "netns", "exec", ns, *tool], 30, env)
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
    results["bytecode"] = "compiled, one untimed run first"  # earlier results lack this
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
    proc, usage = run_with_rusage([python, "-c", _BCC_PROG], 120)
    m = re.search(r"loaded_ms ([\d.]+)", proc.stdout)
    if not m:
        return {"skipped": "bcc cannot compile on this kernel (no kernel headers)",
                "exit_ms": usage["wall_s"] * 1000}
    return {"load_ms": float(m.group(1)), "exit_ms": usage["wall_s"] * 1000,
            "peak_rss_mb": usage["max_rss_mb"]}


def bounded_count(interval: float, block: int) -> int:
    """Probes for a run stopped by `interrupt` after one witness block: enough for the
    wait for the runs plus the block, and bounded, should the bench itself die."""
    return int((90 + block * interval) / interval)


def _mace_block(lab: Lab, n: int, block: int, interval: float, cost_window_s: float,
                place: Placement
                ) -> tuple[list[float], float, list[ToolResult], dict | None]:
    """The witness while `n` mace-ping runs (one shared program set) probe at `interval`,
    and their probes per second; then, if cost_window_s, their programs' cost over that
    window (stats on only then: bpf_stats' own clock reads would slow the witness)."""
    containers = (0, *EXTRA_MACE)[:n]
    runs: list[ToolRun] = []
    cost = None
    try:
        _start_paced_runs(lab, containers, block, interval, place, runs)
        wait_for_runs([r.proc for r in runs])
        rtts, rate = witness_during(lab, containers, block, interval, place)
        if cost_window_s:
            with bpf_stats():
                before = mace_program_stats()
                time.sleep(cost_window_s)
                cost = _delta(mace_program_stats(), before)
                cost["sets_loaded"] = loaded_program_sets()
    finally:
        results = [interrupt(r) for r in runs]
    return rtts, rate, results, cost


def _start_paced_runs(lab: Lab, containers: tuple[int, ...], block: int, interval: float,
                      place: Placement, runs: list[ToolRun], *extra: str) -> None:
    """One perturbation-row mace-ping run per container (-l 3, -q, bounded), on the
    instances' CPUs; each is appended to `runs` as it starts, so the caller stops the
    started ones should a later start fail."""
    count = bounded_count(interval, block)
    with on_cpus(place.instances):
        for c in containers:
            runs.append(mace_ping(lab, c, os.urandom(8), count, interval, *PACED, *extra,
                                  "-q", "-w", str(int(count * interval) + 5)))


def control_block(lab: Lab, containers: tuple[int, ...], block: int, interval: float,
                  place: Placement, witness_interval: float | None = None
                  ) -> tuple[list[float], float]:
    """The witness while the same mace-ping runs probe from these containers with no
    kernel data (--corrections none: no programs, nothing read): the runs' own probe traffic
    and process, without the corrections; and their probes per second. (iputils was the
    control before: at the same -i it sends 30-40% fewer probes here, measured.)"""
    runs: list[ToolRun] = []
    try:
        _start_paced_runs(lab, containers, block, interval, place, runs, "--corrections", "none")
        wait_sending(lab, containers, [r.proc for r in runs])
        return witness_during(lab, containers, block, witness_interval or interval, place)
    finally:
        for run in runs:
            interrupt(run)


def wait_sending(lab: Lab, containers: tuple[int, ...], procs: list[subprocess.Popen],
                 timeout_s: float = 60.0) -> None:
    """Until every container has sent 2 probes since: runs with no kernel data are no runs
    of the program set to wait for (wait_for_runs)."""
    first = sent_by_container(lab, containers)
    waiting = set(containers)
    deadline = time.monotonic() + timeout_s
    while waiting:
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise NotMeasured(f"a control run exited before it sent: {dead[0][-1]}")
        if time.monotonic() > deadline:
            raise NotMeasured(f"{len(waiting)} control run(s) not sending within "
                              f"{timeout_s:.0f} s")
        time.sleep(0.05)
        now = sent_by_container(lab, containers)
        waiting = {c for c in waiting if now[c] < first[c] + 2}


def scaling(lab: Lab, instances: list[int], count: int, interval: float, neighbours: int,
            rounds: int = 5, seed: int = 2, place: Placement = ANYWHERE) -> list[dict]:
    """1..8 concurrent mace-ping runs under flood neighbours: the witness's RTT with the runs
    probing, with the same runs measuring raw (the control, control_block: the runs' own
    probe traffic and process slow the witness too), and with neither (the baseline). As in
    perturbation(), each round runs one block of each condition in a shuffled order and
    every figure is a mean of per-round paired differences with its standard error; "mace
    minus control" is what the corrections cost the witness (the programs, and the runs'
    reading of their records). The programs' cost is read in a window after the first round's
    witness, with the runs still probing. `place`: where the runs, the control and the
    witness may run (APART: the runs' CPU kept off the witness's)."""
    rows = []
    block = max(50, count // rounds)
    order = random.Random(seed)
    budget = len(instances) * rounds * (3 * block * interval + 60) + 60
    with load_setting(lab, neighbours, "flood", budget):
        for n in instances:
            samples: dict[str, list[list[float]]] = {"base": [], "mace": [], "control": []}
            rates: dict[str, list[float]] = {"mace": [], "control": []}
            results: list[ToolResult] = []
            cost: dict | None = None
            try:
                for _ in range(rounds):
                    for cond in order.sample(list(samples), k=len(samples)):
                        if cond == "base":
                            with on_cpus(place.witness):
                                rtts = witness_ping(lab, block, interval)
                        elif cond == "control":
                            rtts, rate = control_block(lab, (0, *EXTRA_MACE)[:n], block,
                                                       interval, place)
                            rates[cond].append(rate)
                        else:
                            rtts, rate, got, window = _mace_block(
                                lab, n, block, interval, 0.0 if cost else 1.0, place)
                            rates[cond].append(rate)
                            results += got
                            cost = cost or window
                        samples[cond].append(rtts)
                rows.append(scaling_row(n, rounds, block, samples, results, cost, rates,
                                        place))
            except NotMeasured as exc:  # this N is reported as such, the others stand
                rows.append({"instances": n, "error": str(exc), "placement": place.label})
                print(f"  scaling {n}: not measured: {exc}", flush=True)
                continue
            r = rows[-1]
            print(f"  scaling {n}: {r['cost']['ns_per_run'] or 0:.1f} ns/run, mace minus "
                  f"control {r['bpf_share_mean_us']:+.2f} ± {r['bpf_share_se_us']:.2f} µs "
                  f"(witness {r['witness_delta_mean_us']:+.2f}, raw runs "
                  f"{r['control_delta_mean_us']:+.2f}), coverage >= {r['coverage_min']}",
                  flush=True)
    return rows


def scaling_row(n: int, rounds: int, block: int, samples: dict[str, list[list[float]]],
                results: list[ToolResult], cost: dict | None, rates: dict[str, list[float]],
                place: Placement) -> dict:
    """One N's figures. The control stands for the instances' probe traffic only if it sent
    as many probes: a rate more than 10% apart makes the row not measured (an earlier bench
    compared clients at 100/s with a control that sent 62.5/s)."""
    base, mace, control = (merged_blocks(samples[k]) for k in ("base", "mace", "control"))
    if not (base["n"] and mace["n"] and control["n"]):
        raise NotMeasured(f"{n} runs: the witness got no replies")
    mace_rate, control_rate = (statistics.fmean(rates[k]) for k in ("mace", "control"))
    if mace_rate <= 0 or control_rate <= 0:
        raise NotMeasured(f"{n} runs: the runs sent {mace_rate:.0f} probes/s, the control "
                          f"{control_rate:.0f}/s")
    if not 0.9 <= control_rate / mace_rate <= 1.1:
        raise NotMeasured(f"{n} runs: the control sent {control_rate:.0f} probes/s, the "
                          f"runs {mace_rate:.0f}/s: not the same traffic")
    witness_d, witness_se = paired_delta(samples["mace"], samples["base"])
    control_d, control_se = paired_delta(samples["control"], samples["base"])
    share_d, share_se = paired_delta(samples["mace"], samples["control"])
    half_a, half_b = merged_blocks(samples["base"][0::2]), merged_blocks(samples["base"][1::2])
    coverage = [r.summary.get("mace", {}).get("coverage") for r in results]
    return {"instances": n, "rounds": rounds, "block": block, "runs": len(results),
            "placement": place.label, "probes_per_s": mace_rate,
            "control_probes_per_s": control_rate,
            "coverage_min": min((c if c is not None else 0.0) for c in coverage),
            "kernel_events_lost": sum(r.summary.get("mace", {}).get("kernel_events_lost")
                                      or 0 for r in results),
            "cost": (cost or {}).get("all", {"runs": 0, "ns_per_run": None}),
            "sets_loaded": (cost or {}).get("sets_loaded"),
            "baseline": base, "witness": mace, "control": control,
            "noise_mean_us": abs(half_a["mean"] - half_b["mean"]) if half_b["n"] else None,
            "witness_delta_mean_us": witness_d, "witness_delta_se_us": witness_se,
            "witness_delta_p99_us": mace["p99"] - base["p99"],
            "control_delta_mean_us": control_d, "control_delta_se_us": control_se,
            "bpf_share_mean_us": share_d, "bpf_share_se_us": share_se}


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
