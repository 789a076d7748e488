"""`python -m bench.containers`: mace-ping against real Docker and Podman containers.

Per engine (started privately if none runs, host state restored afterwards; see
mace_tools.lab.engines) and per load setting (idle; 4 neighbour containers pinging the target
back to back with busybox `ping -A`), over N probes at 5 ms:
- mace-ping from the host with --container, and mace-ping inside a container built from the
  repo's Dockerfile: corrected minus truth v2 (inbound tcpdump captures, ns timestamps, at
  both ends of the host's outer link: the veth to the target netns), and kernel-data coverage;
- the prober container's own busybox ping: its mean RTT, the raw bias users get today.
Writes bench/results/containers.json and containers.md. Needs `make image-inputs`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.__main__ import RESULTS, machine
from bench.experiments import distribution
from mace_tools.lab.capture import Capture, TruthCapture
from mace_tools.lab.demo import PingRun, compare, parse_ndjson
from mace_tools.lab.engines import IN_CONTAINER_CAPS, Engine, started, uplinked_target
from mace_tools.lab.topology import LabError, OuterLink

RUN = os.getpid() % 100000
TARGET, HOST_SIDE, OUTER = "198.18.2.2", "198.18.2.1", f"mb{RUN}"
TARGET_NS = f"mb{RUN}-target"
NEIGHBOURS = 4
INTERVAL_S = 0.005
OWN_PINGS = 200


def _names(engine: Engine) -> dict[str, str]:
    tag = f"localhost/mb{RUN}-{engine.runtime}"
    return {"busybox": f"{tag}-busybox:1", "base": f"{tag}-base:bookworm",
            "mace": f"{tag}-mace:bench", "prober": f"mb{RUN}-prober"}


@contextmanager
def neighbours_flooding(engine: Engine, image: str, count: int) -> Iterator[None]:
    names = [f"mb{RUN}-n{i}" for i in range(count)]
    try:
        for name in names:  # -A: the next echo as soon as the reply is in
            engine.run("-d", "--rm", "--name", name, "--cap-add", "NET_RAW", image,
                       "ping", "-A", "-q", "-w", "600", TARGET)
        time.sleep(0.5)
        yield
    finally:
        if names:
            engine.remove(*names)


def truth(nonce: bytes, probes: int) -> TruthCapture:
    """Truth v2 on the host's outer link: our veth in the root netns, its end in the target."""
    return TruthCapture(OuterLink(None, OUTER, TARGET_NS, "tgt0"), Capture.nonce_filter(nonce),
                        expect_requests=probes)


def _measure(stdout: str, stderr: str, returncode: int, cap: TruthCapture) -> dict:
    records, summary = parse_ndjson(stdout)
    rows = compare(PingRun(records, summary, returncode, stderr), cap)
    errors = [r.error_us for r in rows if r.error_us is not None]
    corrected = [r.corrected_ms for r in rows if r.corrected_ms is not None]
    return {"replies": len(rows), "coverage": summary["mace"]["coverage"],
            "kernel_events_lost": summary["mace"]["kernel_events_lost"],
            "within_10us": sum(abs(e) <= 10 for e in errors) / max(1, len(errors)),
            "error_us": distribution(errors),
            "truth_residual_us": distribution([r.transit_us for r in rows
                                               if r.transit_us is not None]),
            "raw_mean_us": 1000 * sum(r.raw_ms for r in rows) / max(1, len(rows)),
            "corrected_mean_us": 1000 * sum(corrected) / max(1, len(corrected)),
            "outer_devs": sorted({r.get("outer_dev", "") for r in records})}


def from_host(engine: Engine, container: str, probes: int) -> dict:
    nonce = os.urandom(8)
    with truth(nonce, probes) as cap:
        proc = subprocess.run(
            [sys.executable, "-m", "mace_tools.cli.ping", "--runtime", engine.runtime,
             "--container", container, "--ndjson", "--nonce", nonce.hex(), "-c", str(probes),
             "-i", str(INTERVAL_S), TARGET],
            capture_output=True, text=True, timeout=600, env={**os.environ, **engine.env})
    if proc.returncode != 0:
        raise LabError(f"mace-ping --container exited {proc.returncode}: "
                       f"{proc.stderr.strip() or proc.stdout[-300:]}")
    return _measure(proc.stdout, proc.stderr, proc.returncode, cap)


def in_container(engine: Engine, image: str, probes: int) -> dict:
    nonce = os.urandom(8)
    with truth(nonce, probes) as cap:
        proc = engine.run("--rm", *IN_CONTAINER_CAPS, image, "--ndjson", "--nonce",
                          nonce.hex(), "-c", str(probes), "-i", str(INTERVAL_S), TARGET,
                          check=False, timeout=600)
    if proc.returncode != 0:
        raise LabError(f"in-container mace-ping failed: {proc.stderr.decode().strip()}")
    return _measure(proc.stdout.decode(), proc.stderr.decode(), proc.returncode, cap)


def own_ping(engine: Engine, container: str) -> dict:
    out = engine("exec", container, "ping", "-c", str(OWN_PINGS), "-i", str(INTERVAL_S),
                 TARGET, check=False).stdout.decode()
    rtts = [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", out)]
    return {"n": len(rtts), "mean_us": sum(rtts) / max(1, len(rtts)),
            "p50_us": sorted(rtts)[len(rtts) // 2] if rtts else None}


def bench_engine(runtime: str, probes: int) -> dict:
    with started(runtime) as engine:
        names = _names(engine)
        try:
            engine.import_busybox(names["busybox"])
            engine.build_mace_image(names["base"], names["mace"])
            engine.run("-d", "--rm", "--name", names["prober"], "--cap-add", "NET_RAW",
                       names["busybox"], "sleep", "3600")
            engine("exec", names["prober"], "ping", "-c", "2", TARGET, check=False)  # ARP
            side = "Server" if runtime == "docker" else "Client"  # podman: no daemon
            version = engine("version", "--format", f"{{{{.{side}.Version}}}}",
                             check=False).stdout.decode().strip()
            out: dict = {"runtime": runtime, "version": version, "settings": {}}
            for label, count in (("idle", 0), (f"{NEIGHBOURS} floods", NEIGHBOURS)):
                print(f"  {runtime}: {label}", flush=True)
                with neighbours_flooding(engine, names["busybox"], count):
                    out["settings"][label] = {
                        "from_host": from_host(engine, names["prober"], probes),
                        "in_container": in_container(engine, names["mace"], probes),
                        "own_ping": own_ping(engine, names["prober"]),
                    }
            return out
        finally:
            engine.remove(names["prober"])
            engine("rmi", "-f", names["mace"], names["base"], names["busybox"], check=False)


def markdown(res: dict) -> str:
    lines = [f"# mace-ping in real containers ({res['machine']['date']}, commit "
             f"{res['machine']['commit']}, kernel {res['machine']['kernel']})", "",
             f"{res['probes']} probes per cell at {INTERVAL_S * 1000:g} ms; error = corrected "
             "minus truth v2 on the host's outer link (µs); targets |mean| <= 2, p99 <= 10, "
             "coverage 100%. Residual: the request's transit of that link (mace's events), "
             "by which truth v2 is shorter than the outer device's time.", "",
             "| engine | load | run | coverage | mean | p50 | p99 abs | max abs | within 10 µs "
             "| residual mean | raw mean | corrected mean | container's ping mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for eng in res["engines"]:
        if "skipped" in eng:
            lines.append(f"| {eng['runtime']} | skipped: {eng['skipped']} ||||||||||||")
            continue
        for label, cell in eng["settings"].items():
            for run in ("from_host", "in_container"):
                m, e = cell[run], cell[run]["error_us"]
                lines.append(
                    f"| {eng['runtime']} {eng['version']} | {label} | "
                    f"{'--container' if run == 'from_host' else 'inside'} | "
                    f"{m['coverage'] * 100:.1f}% | {e['mean']:+.2f} | {e['p50']:+.2f} | "
                    f"{e['abs_p99']:.2f} | {e['abs_max']:.1f} | {m['within_10us'] * 100:.1f}% | "
                    f"{m.get('truth_residual_us', {}).get('mean', float('nan')):.2f} | "
                    f"{m['raw_mean_us']:.1f} | {m['corrected_mean_us']:.1f} | "
                    f"{cell['own_ping']['mean_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.containers", description=__doc__)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--engines", default="docker,podman")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite containers.md from containers.json, measure nothing")
    args = parser.parse_args()
    if args.table_only:
        table = markdown(json.loads((args.out / "containers.json").read_text()))
        (args.out / "containers.md").write_text(table)
        print(table)
        return 0
    if os.geteuid() != 0:
        print("bench.containers: must run as root", file=sys.stderr)
        return 2
    res: dict = {"machine": machine(), "probes": args.probes, "engines": []}
    with uplinked_target(TARGET_NS, OUTER, HOST_SIDE, TARGET):
        for runtime in args.engines.split(","):
            print(runtime, flush=True)
            try:
                res["engines"].append(bench_engine(runtime, args.probes))
            except LabError as exc:
                print(f"  skipped: {exc}", flush=True)
                res["engines"].append({"runtime": runtime, "skipped": str(exc)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "containers.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (args.out / "containers.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
