"""`python -m bench`: the paper's figures reproduced on one host, in the namespace lab.

Writes bench/results/results.json (every figure + machine, kernel, commit),
bench/results/results.md (tables, targets met or missed) and PNG plots.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import experiments as ex
from bench import report
from mace_tools.lab.topology import Lab

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
            "commit": cmd("git", "rev-parse", "--short", "HEAD") or "unknown",
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


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--probes", type=int, default=1500, help="probes per load setting")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root (BPF, network namespaces)", file=sys.stderr)
        return 2
    probes = 200 if args.quick else args.probes
    witness = 200 if args.quick else 1000
    started = time.monotonic()
    res: dict = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]])}
    print(f"machine: {machine_line(res['machine'])}", flush=True)
    with Lab(prefix=f"mb{os.getpid() % 100000}", containers=ex.CONTAINERS) as lab:
        lab.warm_up()
        print("accuracy sweep (truth v2)", flush=True)
        section(res, "accuracy", lambda: ex.accuracy(
            lab, SETTINGS, probes, args.interval,
            scamper_probes=max(20, int(probes * args.interval / 0.1))))
        print("truth v1 (one-sided capture) beside truth v2, idle", flush=True)
        section(res, "truth_v1", lambda: ex.truth_v1_bias(lab, probes, args.interval))
        print("perturbation", flush=True)
        section(res, "perturbation", lambda: ex.perturbation(lab, SETTINGS, witness, 0.005))
        print("flood rate, iputils -f beside each run", flush=True)
        seconds, repeats = (3, 1) if args.quick else (5, 3)
        section(res, "flood", lambda: ex.flood_repeated(lab, seconds, 0, repeats))
        section(res, "flood_loaded", lambda: ex.flood_repeated(lab, seconds, 4, repeats))
        for key in ("flood", "flood_loaded"):
            if "error" not in res[key]:
                f = res[key]
                print(f"  {f['neighbours']} neighbours: {f['probes_per_s']:.0f} probes/s (runs "
                      f"{', '.join(f'{r:.0f}' for r in f['probes_per_s_runs'])}), iputils -f "
                      f"{', '.join(f'{r:.0f}' for r in f['iputils_per_s_runs'])}, ratio "
                      f"{f['ratio_median']:.2f}x, coverage {f['coverage_min']}, "
                      f"{f['kernel_events_lost_total']} lost", flush=True)
        print("BPF cost", flush=True)
        section(res, "cost", lambda: ex.bpf_cost(lab, seconds=3 if args.quick else 5,
                                                 neighbours=4))
        section(res, "foreign_cost", lambda: ex.foreign_cost(
            lab, seconds=3 if args.quick else 10, neighbours=4))
        if "error" not in res["foreign_cost"]:
            print(f"  foreign traffic: {res['foreign_cost']['programs']['all']['ns_per_run']} "
                  "ns per run (all programs)", flush=True)
        print("records per answered probe", flush=True)
        section(res, "records", lambda: ex.records_per_probe(lab, 500, 0.01))
        if "error" not in res["records"]:
            print(f"  {res['records']['records_per_answered_probe']} records per answered "
                  "probe", flush=True)
        print("start-up", flush=True)
        section(res, "startup", lambda: ex.startup(lab, runs=5 if args.quick else 20))
        print("scaling", flush=True)
        section(res, "scaling", lambda: ex.scaling(lab, [1, 2, 4, 8], witness, 0.005,
                                                   neighbours=4, rounds=3 if args.quick else 5))
    with Lab(prefix=f"mbr{os.getpid() % 100000}", containers=1, routers=2) as routed:
        routed.warm_up()
        print("traceroute accuracy (routed lab, truth v2)", flush=True)
        section(res, "traceroute", lambda: ex.traceroute_accuracy(
            routed, traces=2 if args.quick else 10, queries=5 if args.quick else 10))
    res["duration_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    table = report.markdown(res)
    (args.out / "results.md").write_text(table)
    report.plots(res, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
