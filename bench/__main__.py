"""`python -m bench`: the paper's figures reproduced on one host, in the namespace lab.

Writes bench/results/results.json (every figure + machine, kernel, commit),
bench/results/results.md (tables, targets met or missed) and PNG plots. `--only` runs
some sections (e.g. `--only agent`) and writes its partial run elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import agent, fleet, ipv6, report
from bench import experiments as ex
from mace_tools.errors import MaceError
from mace_tools.lab.paths import NapiLab
from mace_tools.lab.topology import Lab, LabError

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [("idle", 0, "flood"), ("2 floods", 2, "flood"), ("4 floods", 4, "flood"),
            ("8 floods", 8, "flood"), ("4 UDP bulk", 4, "udp")]


def machine() -> dict:
    def cmd(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True).stdout.strip()

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    mem_kb = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:")), 0)
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": cmd("git", "describe", "--always", "--dirty") or "unknown",
            "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "memory_gb": mem_kb / 2**20, "python": platform.python_version()}


def machine_line(m: dict) -> str:
    return (f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']:.0f} GB, kernel "
            f"{m['kernel']}, Python {m['python']}, commit {m['commit']}")


def section(res: dict, key: str, measure: Callable[[], Any]) -> None:
    """res[key] = measure(), or {"error": why} when it cannot measure: the run goes on and
    the report says so in that section's table."""
    try:
        res[key] = measure()
    except Exception as exc:  # one failing section is reported, never fatal
        res[key] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(f"  {key}: not measured: {res[key]['error']}", flush=True)


@dataclass(frozen=True)
class Step:
    """One section: its results key, the lab it runs in, the line printed before it (if
    any), what it measures, what it prints after, and its --only name (default: key)."""

    key: str
    lab: str
    title: str | None
    measure: Callable[[Lab | NapiLab], Any]
    after: Callable[[dict], None] | None = None
    group: str | None = None

    @property
    def name(self) -> str:
        return self.group or self.key


# the lab of 21 containers; the routed lab (2 routers); a dual-stack lab of 5 containers;
# the NAPI path lab, whose outer link is a wire process (mace_tools/lab/tapwire.py)
STAR, ROUTED, DUAL, WIRE = "star", "routed", "dual", "wire"
# the agent's clients' interval in the perturbation rows (0.01 until 2026-11-24; iputils, the
# control then, sent every 16 ms at -i 0.01 on this 250 Hz kernel)
CLIENT_INTERVAL = 0.008
AGENT_SECTIONS = ("agent_startup", "agent_accuracy", "agent_perturbation", "agent_resources")


def _print_flood(res: dict, key: str) -> None:
    if "error" in res[key]:
        return
    f = res[key]
    where = "across the NAPI lab's wire" if key == "flood_wire" else \
        f"{f['neighbours']} neighbours"
    print(f"  {where}: {f['probes_per_s']:.0f} probes/s (runs "
          f"{', '.join(f'{r:.0f}' for r in f['probes_per_s_runs'])}), iputils -f "
          f"{', '.join(f'{r:.0f}' for r in f['iputils_per_s_runs'])}, ratio "
          f"{f['ratio_median']:.2f}x, coverage {f['coverage_min']}, "
          f"{f['kernel_events_lost_total']} lost", flush=True)


def _print_foreign(res: dict) -> None:
    if "error" not in res["foreign_cost"]:
        print(f"  foreign traffic: {res['foreign_cost']['programs']['all']['ns_per_run']} "
              "ns per run (all programs)", flush=True)


def _print_records(res: dict) -> None:
    if "error" not in res["records"]:
        print(f"  {res['records']['records_per_answered_probe']} records per answered "
              "probe", flush=True)


def steps(args: argparse.Namespace) -> list[Step]:
    """Every section, in the order a full run measures them."""
    quick = args.quick
    probes = 200 if quick else args.probes
    witness = 200 if quick else 1000
    seconds, repeats = (3, 1) if quick else (5, 3)
    return [
        Step("accuracy", STAR, "accuracy sweep (truth v2)", lambda lab: ex.accuracy(
            lab, SETTINGS, probes, args.interval,
            scamper_probes=max(20, int(probes * args.interval / 0.1)))),
        Step("truth_v1", STAR, "truth v1 (one-sided capture) beside truth v2, idle",
             lambda lab: ex.truth_v1_bias(lab, probes, args.interval)),
        Step("perturbation", STAR, "perturbation",
             lambda lab: ex.perturbation(lab, SETTINGS, witness, 0.005)),
        Step("flood", STAR, "flood rate, iputils -f beside each run",
             lambda lab: ex.flood_repeated(lab, seconds, 0, repeats),
             after=lambda res: _print_flood(res, "flood")),
        Step("flood_loaded", STAR, None,
             lambda lab: ex.flood_repeated(lab, seconds, 4, repeats),
             after=lambda res: _print_flood(res, "flood_loaded"), group="flood"),
        Step("flood_wire", WIRE, "flood rate across the NAPI lab's wire, iputils -f beside",
             lambda lab: ex.flood_repeated(lab, seconds, 0, repeats),
             after=lambda res: _print_flood(res, "flood_wire"), group="flood"),
        Step("cost", STAR, "BPF cost", lambda lab: ex.bpf_cost(
            lab, seconds=3 if quick else 5, neighbours=4)),
        Step("foreign_cost", STAR, None, lambda lab: ex.foreign_cost(
            lab, seconds=3 if quick else 10, neighbours=4), after=_print_foreign),
        Step("records", STAR, "records per answered probe",
             lambda lab: ex.records_per_probe(lab, 500, 0.01), after=_print_records),
        Step("startup", STAR, "start-up", lambda lab: ex.startup(lab, runs=5 if quick else 20)),
        Step("scaling", STAR, "scaling", lambda lab: ex.scaling(
            lab, [1, 2, 4, 8], witness, 0.005, neighbours=4, rounds=3 if quick else 5)),
        Step("scaling_apart", STAR, f"scaling, {ex.APART.label}", lambda lab: ex.scaling(
            lab, [1, 2, 4, 8], witness, 0.005, neighbours=4, rounds=3 if quick else 5,
            place=ex.APART), group="scaling"),
        Step("agent_startup", STAR, "mace-agent: start-up (-c 1, client with no capability)",
             lambda lab: agent.agent_startup(lab, runs=5 if quick else 20)),
        Step("agent_accuracy", STAR, "mace-agent: accuracy (truth v2)",
             lambda lab: agent.agent_accuracy(lab, 200 if quick else 500, 0.005)),
        Step("agent_perturbation", STAR, "mace-agent: neighbour perturbation, 1/4/16 clients",
             lambda lab: agent.agent_perturbation(
                 lab, [1, 4, 16], witness, 0.005, CLIENT_INTERVAL, neighbours=4,
                 rounds=3 if quick else 5)),
        Step("agent_perturbation_apart", STAR,
             f"mace-agent: neighbour perturbation, {ex.APART.label}",
             lambda lab: agent.agent_perturbation(
                 lab, [1, 4, 16], witness, 0.005, CLIENT_INTERVAL, neighbours=4,
                 rounds=3 if quick else 5, place=ex.APART), group="agent_perturbation"),
        Step("agent_resources", STAR, "mace-agent: RSS and CPU, idle and 16 clients",
             lambda lab: agent.agent_resources(lab, seconds=10 if quick else 30,
                                               clients=16, interval=0.01)),
        Step("fleet", STAR, "mace-agent exporting: 100 probes at 1/s from 10 containers",
             lambda lab: fleet.fleet_resources(lab, seconds=20 if quick else 60,
                                               warmup_s=10 if quick else 15)),
        Step("ipv6", DUAL, "IPv6 beside IPv4 (dual-stack lab, NAT66, truth v2)",
             lambda lab: ipv6.ipv6_accuracy(lab, 200 if quick else 1000, 0.005,
                                            cost_seconds=3 if quick else 10)),
        Step("traceroute", ROUTED, "traceroute accuracy (routed lab, truth v2)",
             lambda lab: ex.traceroute_accuracy(lab, traces=2 if quick else 10,
                                                queries=5 if quick else 10)),
    ]


def chosen(only: str | None, all_steps: list[Step]) -> list[Step] | str:
    """The steps --only names (comma-separated; "agent": its four sections), in the full
    run's order; or why not."""
    if only is None:
        return all_steps
    names = {s.name for s in all_steps}
    wanted: set[str] = set()
    for name in filter(None, (n.strip() for n in only.split(","))):
        if name == "agent":
            wanted.update(AGENT_SECTIONS)
        elif name in names:
            wanted.add(name)
        else:
            return f"unknown section {name!r} (sections: {', '.join(sorted(names))}, agent)"
    return [s for s in all_steps if s.name in wanted] or "--only names no section"


def run_steps(res: dict, todo: list[Step]) -> None:
    """Each lab is built only if one of its sections is to run, and removed after."""
    labs = {STAR: lambda: Lab(prefix=f"mb{os.getpid() % 100000}", containers=ex.CONTAINERS),
            ROUTED: lambda: Lab(prefix=f"mbr{os.getpid() % 100000}", containers=1,
                                routers=2),
            DUAL: lambda: Lab(prefix=f"mbd{os.getpid() % 100000}", containers=5, ipv6=True),
            WIRE: lambda: NapiLab(prefix=f"mbw{os.getpid() % 100000}", wire_seconds=600)}
    for kind, make in labs.items():
        mine = [s for s in todo if s.lab == kind]
        if not mine:
            continue
        try:
            with make() as lab:
                lab.warm_up()
                for step in mine:
                    if step.title:
                        print(step.title, flush=True)
                    section(res, step.key, lambda step=step, lab=lab: step.measure(lab))
                    if step.after:
                        step.after(res)
        except (LabError, MaceError, OSError, subprocess.CalledProcessError) as exc:
            # a lab that cannot be built (the wire lab needs /dev/net/tun and a relay
            # process) costs its own sections, not the run's other results
            why = f"{kind} lab: {type(exc).__name__}: {exc}".splitlines()[0]
            print(f"  not measured: {why}", flush=True)
            for step in mine:
                res.setdefault(step.key, {"error": why})


def out_dir(args: argparse.Namespace) -> Path | str:
    """Where results go: bench/results for a full run; a partial one (--only) never
    overwrites it, and goes to bench/results/tmp (ignored by git) unless --out says."""
    if args.only is None:
        return args.out or RESULTS
    if args.out is None:
        return RESULTS / "tmp"
    if args.out.resolve() == RESULTS.resolve():
        return f"--only writes a partial run: not into {RESULTS} (give another --out)"
    return args.out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--probes", type=int, default=1500, help="probes per load setting")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--only", metavar="SECTION[,SECTION]",
                        help="run only these sections (\"agent\": the four mace-agent ones); "
                        "results go to --out, default bench/results/tmp")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results directory (default {RESULTS})")
    args = parser.parse_args()
    todo, out = chosen(args.only, steps(args)), out_dir(args)
    for problem in (todo, out):
        if isinstance(problem, str):
            print(f"bench: {problem}", file=sys.stderr)
            return 2
    assert isinstance(todo, list) and isinstance(out, Path)
    if os.geteuid() != 0:
        print("bench: must run as root (BPF, network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    res: dict = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]])}
    if args.only is not None:
        res["only"] = [s.key for s in todo]
    print(f"machine: {machine_line(res['machine'])}", flush=True)
    run_steps(res, todo)
    res["duration_s"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = report.markdown(res)
    (out / "results.md").write_text(table)
    report.plots(res, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
