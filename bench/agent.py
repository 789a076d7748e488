"""The mace-agent rows (issue 11): start-up, accuracy, neighbour perturbation and the
agent's own memory and CPU, each with clients that hold no privilege at all.

The agent runs as a real process in the lab's host netns (where a container host runs
it), on a socket in a temporary directory of its own. Clients are real mace-ping
processes inside lab containers, run with an empty capability set: they probe through
ICMP datagram ("ping") sockets, which net.ipv4.ping_group_range opens to every group in
the lab containers they use (as Docker does; only inside the lab's own netns, and put
back after). Where that does not work the clients get CAP_NET_RAW only, and every
section says which privilege its clients had.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from bench import experiments as ex
from bench.tools import ToolResult, ToolRun, parse_mace
from mace_tools.agent.protocol import DEFAULT_SOCKET
from mace_tools.lab.agent import AgentProcess, with_capabilities
from mace_tools.lab.agent import ping_sockets_open as lab_ping_sockets_open
from mace_tools.lab.capture import Capture, TruthCapture
from mace_tools.lab.demo import parse_ndjson
from mace_tools.lab.topology import Lab, LabError
from mace_tools.stats import percentile

# The 16 containers of concurrent clients: all but the floods (c1..c4) and the witness.
AGENT_CLIENTS = (0, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20)
# Payload bytes of the accuracy section's probes: the floods' iputils pings carry 56, so
# truth v2 can keep only the client's packets (IP length 92) in the kernel, without
# knowing the nonce the agent will choose.
ACCURACY_SIZE = 64
AGENT_START_S = 20.0
SETTLE_S = 0.3  # after the agent listens: its reservations made ahead are ready


class Agent(AgentProcess):
    """mace-agent in the lab's host netns (mace_tools.lab.agent.AgentProcess); a start
    that fails is a figure not measured."""

    def __init__(self, lab: Lab, env: dict[str, str] | None = None) -> None:
        super().__init__(prefix=lab.on_host(), env=env, start_s=AGENT_START_S)

    def start(self) -> Agent:
        try:
            super().start()
        except LabError as exc:
            raise ex.NotMeasured(str(exc)) from None
        return self

    @property
    def pid(self) -> int:
        """The agent's own pid (`ip netns exec` execs it; checked: its CPU and memory are
        read by this pid)."""
        assert self.proc is not None
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        if b"mace_tools.cli.agent" not in cmdline:
            raise ex.NotMeasured(f"pid {self.proc.pid} is not the agent: {cmdline[:80]!r}")
        return self.proc.pid


def ping_sockets_open(lab: Lab, containers: tuple[int, ...]) -> AbstractContextManager[None]:
    """net.ipv4.ping_group_range opened to every group in these lab containers."""
    return lab_ping_sockets_open(lab.container_ns(i) for i in containers)


def client_command(lab: Lab, container: int, agent: Agent, caps: tuple[str, ...],
                   *args: str, raw: bool = False) -> list[str]:
    """mace-ping inside a lab container, through the agent, with only `caps`; raw: the
    same client with no kernel data (--corrections none), not asking the agent."""
    source = ("--corrections", "none") if raw else ("--agent", str(agent.socket))
    return ["ip", "netns", "exec", lab.container_ns(container), *with_capabilities(*caps),
            ex.MACE_PING_SCRIPT, *source, *args, lab.target_addr]


def client_privilege(lab: Lab, agent: Agent, env: dict[str, str] | None = None
                     ) -> tuple[str, ...]:
    """The least privilege a client in c0 gets agent-corrected replies with: none (a ping
    socket), else CAP_NET_RAW only (a raw socket)."""
    why = "no output"
    for caps in ((), ("net_raw",)):
        proc = subprocess.run(client_command(lab, 0, agent, caps, "--ndjson", "-c", "1",
                                             "-W", "2"),
                              capture_output=True, text=True, timeout=60, env=env)
        why = ex.last_line(proc.stderr or proc.stdout)
        if proc.returncode == 0:
            _, summary = parse_ndjson(proc.stdout)
            if summary.get("mace", {}).get("source") == "agent":
                return caps
            why = f"source {summary.get('mace', {}).get('source')}, not the agent"
    raise ex.NotMeasured(f"no client got the agent's corrections, even with CAP_NET_RAW: "
                         f"{why}")


def capabilities_label(caps: tuple[str, ...]) -> str:
    return ", ".join(f"CAP_{c.upper()}" for c in caps) or "none"


def _start_client(cmd: list[str], env: dict[str, str] | None = None) -> ToolRun:
    # closed by ToolRun.collect(), after the client has exited
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    return ToolRun("mace-ping (agent)", proc, out, err, parse_mace, ("agent", None))


# --- 1. start-up ----------------------------------------------------------------------

# results key -> what the row is
STARTUP_TOOLS = {
    "agent": "mace-ping -c 1 through the agent",
    "standalone_cold": "mace-ping -c 1, standalone as root (no agent up: loads the programs)",
    "standalone_warm": "mace-ping -c 1, standalone as root (joins the set the agent holds)",
    "iputils": "iputils ping -c 1 (root)",
}


def _await_sets_gone(foreign: int, timeout_s: float = 3.0) -> bool:
    """Until no more than `foreign` mace program sets are loaded (someone else's, there
    before the section began): the agent just stopped and its set goes with its links.
    False if it stays, and the cold row would not be cold."""
    return ex.await_program_sets(foreign, timeout_s) <= foreign


def agent_startup(lab: Lab, runs: int, seed: int = 3) -> dict:
    """`-c 1` wall time (spawn to exit, `ip netns exec` included) from c0: through the
    agent with no capability, standalone as root with no agent up (it loads the program
    set) and with the agent up (it joins the agent's set), and iputils. Interleaved:
    each round runs the cold standalone row with no agent, then starts an agent and runs
    the other three in a shuffled order. Byte code as installed (ex.installed_env)."""
    if DEFAULT_SOCKET.exists():
        raise ex.NotMeasured(f"{DEFAULT_SOCKET} exists: the standalone rows would go "
                             "through that agent")
    env = ex.installed_env()
    ns = lab.container_ns(0)
    ping = [ex.MACE_PING_SCRIPT, "-c", "1", "-q"]
    as_root = ["ip", "netns", "exec", ns, *ping, lab.target_addr]

    def command(tool: str, agent: Agent | None, caps: tuple[str, ...]) -> list[str]:
        if tool == "iputils":
            return ["ip", "netns", "exec", ns, "ping", "-c", "1", "-q", lab.target_addr]
        if tool == "agent":
            assert agent is not None
            return client_command(lab, 0, agent, caps, "-c", "1", "-q")
        return as_root

    samples: dict[str, list[tuple[int, dict, str]]] = {t: [] for t in STARTUP_TOOLS}

    def timed(tool: str, agent: Agent | None, caps: tuple[str, ...]) -> None:
        spawn = time.clock_gettime_ns(time.CLOCK_REALTIME)
        proc, usage = ex.run_with_rusage(command(tool, agent, caps), 30, env)
        samples[tool].append((spawn, usage, proc.stdout))

    order = random.Random(seed)
    warm = [t for t in STARTUP_TOOLS if t != "standalone_cold"]
    not_cold, foreign = 0, ex.loaded_program_sets()
    with ping_sockets_open(lab, (0,)):
        with Agent(lab, env) as agent:
            caps = client_privilege(lab, agent, env)
            for tool in warm:  # untimed: caches byte code, warms the page cache
                ex.run_with_rusage(command(tool, agent, caps), 30, env)
        with Capture(ns, "eth0", "icmp[0] = 8") as cap:
            for _ in range(runs):
                not_cold += not _await_sets_gone(foreign)
                timed("standalone_cold", None, caps)
                with Agent(lab, env) as agent:
                    time.sleep(SETTLE_S)
                    for tool in order.sample(warm, k=len(warm)):
                        timed(tool, agent, caps)
    sends = sorted(p.ts_real_ns for p in cap.packets)
    rows = {tool: {"label": label, **_startup_row(samples[tool], sends)}
            for tool, label in STARTUP_TOOLS.items()}
    for row in rows.values():
        print(f"  {row['label']}: wall {row['wall_ms_median']:.1f} ms median, p90 "
              f"{row['wall_ms_p90']:.1f}", flush=True)
    return {"runs": runs, "client_capabilities": capabilities_label(caps),
            "foreign_sets": foreign, "cold_rounds_not_cold": not_cold, "tools": rows}


def _startup_row(samples: list[tuple[int, dict, str]], sends: list[int]) -> dict:
    """Median and p90 of wall and spawn-to-first-probe (the first echo request on c0's
    eth0 after the spawn: runs are sequential and each sends one), peak RSS, failures,
    and for mace how many runs printed a corrected reply."""
    walls = sorted(u["wall_s"] * 1000 for _, u, _ in samples)
    first = sorted((next(t for t in sends if t >= spawn) - spawn) / 1e6
                   for spawn, _, _ in samples if any(t >= spawn for t in sends))
    return {"runs": len(samples),
            "wall_ms_median": percentile(walls, 50), "wall_ms_p90": percentile(walls, 90),
            "first_probe_ms_median": percentile(first, 50) if first else None,
            "first_probe_ms_p90": percentile(first, 90) if first else None,
            "peak_rss_mb": max(u["max_rss_mb"] for _, u, _ in samples),
            "failed": sum(u["returncode"] != 0 for _, u, _ in samples),
            "corrected": sum("kernel data 1/1 replies" in out for _, _, out in samples)}


# --- 2. accuracy ------------------------------------------------------------------------

def agent_accuracy(lab: Lab, probes: int, interval: float,
                   settings: tuple[tuple[str, int], ...] = (("idle", 0), ("4 floods", 4))
                   ) -> dict:
    """corrected - truth v2 for a client with no capability in c0, through the agent, idle
    and with flooding neighbours. The agent picks the nonce, so truth v2 captures the
    client's packets by size (ACCURACY_SIZE) and pairs them by the nonce of the run's
    --ndjson summary afterwards."""
    rows = []
    with ping_sockets_open(lab, (0,)), Agent(lab) as agent:
        caps = client_privilege(lab, agent)
        for name, neighbours in settings:
            try:
                rows.append(_accuracy_row(lab, agent, caps, name, neighbours, probes,
                                          interval))
            except ex.NotMeasured as exc:  # this setting is reported as such
                rows.append({"setting": name, "neighbours": neighbours, "error": str(exc)})
                print(f"  agent accuracy {name}: not measured: {exc}", flush=True)
    return {"client_capabilities": capabilities_label(caps), "rows": rows}


def _accuracy_row(lab: Lab, agent: Agent, caps: tuple[str, ...], name: str, neighbours: int,
                  probes: int, interval: float) -> dict:
    cmd = client_command(lab, 0, agent, caps, "--ndjson", "-c", str(probes), "-i",
                         str(interval), "-s", str(ACCURACY_SIZE))
    ip_length = 20 + 8 + ACCURACY_SIZE
    with ex.load_setting(lab, neighbours, "flood", probes * interval + 30), \
            TruthCapture(lab.outer_link, f"icmp and ip[2:2] = {ip_length}", probes) as cap:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=probes * interval + 60)
    result = parse_mace(proc.stdout)
    mace = result.summary.get("mace", {})
    if proc.returncode != 0 or not mace.get("nonce"):
        raise ex.NotMeasured(f"client exit {proc.returncode}: "
                             f"{ex.last_line(proc.stderr or proc.stdout)}")
    truth = cap.echoes(bytes.fromhex(mace["nonce"]))
    if not truth:
        raise ex.NotMeasured(f"truth v2 caught none of the run's {probes} probes")
    errors = ex.errors_us(result.corrected_ms, truth)
    residual, unexplained = ex.truth_residual(result.corrected_ms, result.transit_us, truth)
    row = {"setting": name, "neighbours": neighbours, "probes": probes,
           "interval_s": interval, "replies": len(result.rtt_ms), "truth_matched": len(truth),
           "source": mace.get("source"), "coverage": mace.get("coverage"),
           "kernel_events_lost": mace.get("kernel_events_lost"),
           "corrected": ex.distribution(errors),
           "raw": ex.distribution(ex.errors_us(result.rtt_ms, truth)),
           "truth_residual_us": ex.distribution(residual),
           "error_minus_residual_us": ex.distribution(unexplained)}
    d = row["corrected"]
    figures = f"mean {d['mean']:+.2f} µs, |p99| {d['abs_p99']:.2f} µs" if d["n"] else "no data"
    print(f"  agent accuracy {name}: coverage {row['coverage']}, corrected {figures}, truth "
          f"for {len(truth)}/{probes} probes", flush=True)
    return row


# --- 3. neighbour perturbation ------------------------------------------------------------

def agent_perturbation(lab: Lab, counts: list[int], witness: int, witness_interval: float,
                       client_interval: float, neighbours: int, rounds: int = 5,
                       seed: int = 4, place: ex.Placement = ex.ANYWHERE) -> dict:
    """The witness's RTT (c11) with N clients probing through the agent, each in its own
    container, against the same N clients measuring raw without the agent (the control)
    and neither (the baseline), under flood neighbours: paired rounds in shuffled order, as
    ex.scaling() does for standalone runs. "mace minus control" is what the corrections
    cost the witness (the programs, the clients' reading of their records, the agent).
    `place`: where the clients, the agent, the control and the witness may run."""
    rows: list[dict] = []
    block = max(50, witness // rounds)
    order = random.Random(seed)
    budget = len(counts) * rounds * (3 * block * witness_interval + 60) + 60
    with ExitStack() as stack:
        stack.enter_context(ping_sockets_open(lab, AGENT_CLIENTS))
        with ex.on_cpus(place.instances):  # the agent works for the clients: beside them
            agent = stack.enter_context(Agent(lab))
        caps = client_privilege(lab, agent)
        with ex.load_setting(lab, neighbours, "flood", budget):
            for n in counts:
                rows.append(_perturbation_n(lab, agent, caps, n, rounds, block, order,
                                            witness_interval, client_interval, place))
    return {"client_capabilities": capabilities_label(caps), "neighbours": neighbours,
            "placement": place.label,
            "client_interval_s": client_interval, "witness_interval_s": witness_interval,
            "rows": rows}


def _perturbation_n(lab: Lab, agent: Agent, caps: tuple[str, ...], n: int, rounds: int,
                    block: int, order: random.Random, witness_interval: float,
                    client_interval: float, place: ex.Placement) -> dict:
    containers = AGENT_CLIENTS[:n]
    samples: dict[str, list[list[float]]] = {"base": [], "mace": [], "control": []}
    rates: dict[str, list[float]] = {"mace": [], "control": []}
    results: list[ToolResult] = []
    try:
        for _ in range(rounds):
            for cond in order.sample(list(samples), k=len(samples)):
                if cond == "base":
                    with ex.on_cpus(place.witness):
                        rtts = ex.witness_ping(lab, block, witness_interval)
                else:  # the control: the same clients with no kernel data (no agent)
                    rtts, rate, got = _clients_block(lab, agent, caps, containers, block,
                                                     witness_interval, client_interval, place,
                                                     raw=cond == "control")
                    rates[cond].append(rate)
                    results += got if cond == "mace" else []
                samples[cond].append(rtts)
        row = ex.scaling_row(n, rounds, block, samples, results, None, rates, place)
    except ex.NotMeasured as exc:  # this N is reported as such, the others stand
        print(f"  agent perturbation {n}: not measured: {exc}", flush=True)
        return {"instances": n, "error": str(exc), "placement": place.label}
    print(f"  agent perturbation {n} clients: mace minus control "
          f"{row['bpf_share_mean_us']:+.2f} ± {row['bpf_share_se_us']:.2f} µs (witness "
          f"{row['witness_delta_mean_us']:+.2f}, raw clients "
          f"{row['control_delta_mean_us']:+.2f}), coverage >= {row['coverage_min']}",
          flush=True)
    return row


def _clients_block(lab: Lab, agent: Agent, caps: tuple[str, ...], containers: tuple[int, ...],
                   block: int, witness_interval: float, client_interval: float,
                   place: ex.Placement, raw: bool = False
                   ) -> tuple[list[float], float, list[ToolResult]]:
    """The witness while one client per container probes through the agent (raw: with no
    kernel data, --corrections none), and the clients' probes per second."""
    count = int((90 + block * witness_interval) / client_interval)  # bounded, if we die
    with ex.on_cpus(place.instances):
        runs = _start_clients(lab, agent, caps, containers, count, client_interval, raw)
    try:
        if raw:
            ex.wait_sending(lab, containers, [r.proc for r in runs])
        else:
            ex.wait_for_runs([r.proc for r in runs])
        rtts, rate = ex.witness_during(lab, containers, block, witness_interval, place)
    finally:
        results = [ex.interrupt(r) for r in runs]
    return rtts, rate, results


def _start_clients(lab: Lab, agent: Agent, caps: tuple[str, ...], containers: tuple[int, ...],
                   count: int, interval: float, raw: bool = False) -> list[ToolRun]:
    """One client per container, as the scaling section's runs probe (--ndjson -q),
    stopped by ex.interrupt(); raw: not through the agent, with no kernel data."""
    deadline = str(int(count * interval) + 5)
    args = ("--ndjson", *ex.PACED, "-q", "-c", str(count), "-i", str(interval), "-w",
            deadline)
    runs: list[ToolRun] = []
    try:
        for c in containers:
            runs.append(_start_client(client_command(lab, c, agent, caps, *args, raw=raw)))
    except BaseException:
        for run in runs:
            ex.interrupt(run)
        raise
    return runs


# --- 4. the agent's memory and CPU ----------------------------------------------------------

def _cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of the process (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak since it started), MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def usage_window(agent_pid: int, client_pids: list[int], seconds: float) -> dict:
    """The agent's CPU (% of one core) over `seconds`, its memory at the end, and the
    clients' CPU over the same window (all of them, % of one core)."""
    tick = os.sysconf("SC_CLK_TCK")
    start, agent0 = time.monotonic(), _cpu_ticks(agent_pid)
    clients0 = {pid: _cpu_ticks(pid) for pid in client_pids}
    time.sleep(seconds)
    wall = time.monotonic() - start
    agent1 = _cpu_ticks(agent_pid)
    clients = sum(_cpu_ticks(pid) - t0 for pid, t0 in clients0.items())
    return {"seconds": wall, "clients": len(client_pids),
            "cpu_percent": 100 * (agent1 - agent0) / tick / wall,
            "clients_cpu_percent": 100 * clients / tick / wall if client_pids else None,
            **_memory_mb(agent_pid)}


def agent_resources(lab: Lab, seconds: float, clients: int, interval: float) -> dict:
    """The agent's RSS and CPU over `seconds` idle (up, one client served, none left),
    then over `seconds` with `clients` clients probing every `interval` through it."""
    with ping_sockets_open(lab, AGENT_CLIENTS), Agent(lab) as agent:
        caps = client_privilege(lab, agent)
        time.sleep(1.0)  # the check client's run ended and its maps were taken out
        idle = usage_window(agent.pid, [], seconds)
        count = int((seconds + 90) / interval)
        runs = _start_clients(lab, agent, caps, AGENT_CLIENTS[:clients], count, interval)
        try:
            ex.wait_for_runs([r.proc for r in runs])
            busy = usage_window(agent.pid, [r.proc.pid for r in runs], seconds)
        finally:
            results = [ex.interrupt(r) for r in runs]
    coverage = [r.summary.get("mace", {}).get("coverage") for r in results]
    row = {"client_capabilities": capabilities_label(caps), "interval_s": interval,
           "idle": idle, "busy": busy,
           "coverage_min": min((c if c is not None else 0.0) for c in coverage),
           "replies": sum(len(r.rtt_ms) for r in results)}
    print(f"  agent idle: {idle['cpu_percent']:.2f}% of a core, RSS {idle['VmRSS']:.1f} MB; "
          f"{clients} clients: {busy['cpu_percent']:.2f}%, RSS {busy['VmRSS']:.1f} MB, peak "
          f"{busy['VmHWM']:.1f} MB", flush=True)
    return row
