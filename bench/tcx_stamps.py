"""Where per-device attachment would stamp a probe, against where mace stamps it:
`python -m bench.tcx_stamps [--probes N] [--out DIR]` (root; ~1 minute at 1,000 probes).

mace-ping runs from a lab container as usual (its corrected RTT: the reply's netif_rx
minus the request's net_dev_start_xmit on the host's outer device, from its
tracepoints) while a tc program (bench/bpf/stamp_tc.bpf.c), attached by tcx to the same
device, stamps the same run's requests at egress and replies at ingress. Per probe: the
tcx "corrected" RTT (ingress - egress) minus mace's, and how long after the kernel's own
receive stamp of the reply (skb->tstamp, taken at netif_rx on veth: where truth v2 and
mace stamp it) tcx ingress ran. Idle and with 4 flooding neighbours. The lab's outer
device is a veth; a NIC's arrivals (NAPI) come in at netif_receive_skb, where tcx ingress
runs too, so there the ingress part would not apply. Writes results.json and results.md
to --out (default bench/results/tcx_stamps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import experiments as ex
from bench import floor
from bench.tools import mace_ping
from mace_tools.kernel import native
from mace_tools.lab.topology import OUTER_DEV, Lab
from mace_tools.stats import percentile

RESULTS = Path(__file__).with_name("results") / "tcx_stamps"
SOURCE = Path(__file__).with_name("bpf") / "stamp_tc.bpf.c"
SETTINGS = [("idle", 0), ("4 floods", 4)]
EGRESS, INGRESS, KERNEL_RX = 0, 1, 2  # stamp_tc.bpf.c's keys


def hold(device: str, nonce: bytes, out: Path) -> None:
    """In the device's netns: stamp this nonce's echoes on it until stdin closes, then
    write the stamps ({seq: [egress, ingress, kernel rx]}) to `out` as JSON."""
    lib = native.libbpf()

    def set_nonce(obj: int) -> None:
        native.map_initial_value(lib.bpf_object__find_map_by_name(obj, b".rodata"))[:8] = nonce

    with floor.loaded(SOURCE, floor.UAPI_INCLUDES, set_nonce) as obj:
        links = []
        try:
            for name, kind in ((b"stamp_egress", native.BPF_TCX_EGRESS),
                               (b"stamp_ingress", native.BPF_TCX_INGRESS)):
                prog = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, name))
                links.append(native.tcx_attach(prog, socket.if_nametoindex(device), kind))
            print("ready", flush=True)
            sys.stdin.read()
        finally:
            for fd in links:
                os.close(fd)
        stamps_fd = lib.bpf_map__fd(lib.bpf_object__find_map_by_name(obj, b"stamps"))
        stamps: dict[int, list[int | None]] = {}
        for key in native.map_keys(stamps_fd, 8):
            what, seq = struct.unpack("II", key)
            value = native.map_lookup(stamps_fd, key, 8)
            if value is not None:
                stamps.setdefault(seq, [None, None, None])[what] = struct.unpack("Q", value)[0]
    out.write_text(json.dumps(stamps))


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of 50 bracketing reads."""
    reads = []
    for _ in range(50):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        real = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        reads.append((after - before, real - (before + after) // 2))
    return min(reads)[1]


def _summary(values: list[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    return {"n": len(values), "mean": statistics.fmean(values),
            "median": statistics.median(values), "p1": percentile(ordered, 1),
            "p99": percentile(ordered, 99)}


def measure(lab: Lab, probes: int, interval: float) -> list[dict]:
    rows = []
    for name, neighbours in SETTINGS:
        nonce = os.urandom(8)
        with tempfile.TemporaryDirectory() as tmp, \
                ex.load_setting(lab, neighbours, "flood", probes * interval + 60):
            out = Path(tmp) / "stamps.json"
            with ex.held_by_child(["ip", "netns", "exec", lab.host_ns, sys.executable, "-m",
                                   "bench.tcx_stamps", "hold", OUTER_DEV, nonce.hex(),
                                   str(out)], "tcx stamps", cwd=ex.REPO):
                run = mace_ping(lab, 0, nonce, probes, interval).collect()
            stamps = {int(k): v for k, v in json.loads(out.read_text()).items()}
        offset = realtime_offset_ns()
        extra, after_rx = [], []
        for seq, corrected in run.corrected_ms.items():
            egress, ingress, kernel_rx = stamps.get(seq, (None, None, None))
            if corrected is None or egress is None or ingress is None:
                continue
            extra.append((ingress - egress) / 1000 - corrected * 1000)
            if kernel_rx:
                after_rx.append((ingress - (kernel_rx - offset)) / 1000)
        if not extra:
            raise ex.NotMeasured(f"{name}: no probe stamped by both ({run.stderr[-200:]})")
        rows.append({"setting": name, "probes": probes, "replies": len(run.rtt_ms),
                     "tcx_minus_mace_us": _summary(extra),
                     "ingress_after_kernel_rx_us": _summary(after_rx) if after_rx else None})
        print(f"  {name}: tcx - mace {statistics.fmean(extra):+.2f} µs mean over "
              f"{len(extra)} probes", flush=True)
    return rows


def _cells(s: dict | None) -> str:
    if s is None:
        return "- | - | - | -"
    return f"{s['mean']:+.2f} | {s['median']:+.2f} | {s['p1']:+.2f} | {s['p99']:+.2f}"


def markdown(res: dict) -> str:
    out = ["# Per-device (tcx) stamps on the outer device, against mace's tracepoint stamps\n",
           f"{res['date']} · commit `{res['commit']}` · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           f"mace-ping -i {res['interval']} from c0; a tc program attached by "
           f"tcx to the lab host's outer device ({OUTER_DEV}, a veth) stamps the same run's "
           "requests at egress and replies at ingress. tcx - mace: (tcx ingress - tcx "
           "egress) - mace's corrected RTT, per probe. Ingress after the kernel's stamp: "
           "tcx ingress - the reply's skb->tstamp (netif_rx, where truth v2 and mace stamp "
           "it; REALTIME set against MONOTONIC by the offset read after the run). µs.\n",
           "| setting | probes | tcx - mace: mean | median | p1 | p99 | ingress after the "
           "kernel's stamp: mean | median | p1 | p99 |", "|---" * 10 + "|"]
    for r in res["rows"]:
        out.append(f"| {r['setting']} | {r['tcx_minus_mace_us']['n']} | "
                   f"{_cells(r['tcx_minus_mace_us'])} | "
                   f"{_cells(r['ingress_after_kernel_rx_us'])} |")
    return "\n".join(out) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["hold"]:  # (the child, in the host netns)
        hold(sys.argv[2], bytes.fromhex(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.tcx_stamps", description=__doc__)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.tcx_stamps: must run as root (BPF, network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ex.REPO,
                            capture_output=True, text=True).stdout.strip()
    with Lab(prefix=f"mts{os.getpid() % 100000}", containers=6) as lab:
        lab.warm_up()
        rows = measure(lab, args.probes, args.interval)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
           "command": " ".join(["python -m bench.tcx_stamps", *sys.argv[1:]]),
           "duration_s": time.monotonic() - started, "interval": args.interval, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    (args.out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
