"""Where per-device attachment would stamp a probe, against truth v2:
`python -m bench.tcx_stamps [--probes N] [--out DIR]` (root; ~1 minute at 1,000 probes).

mace-ping runs from a lab container with `--corrections none` (no mace program is
attached, so none works between the stamps compared here) while a tc program
(bench/bpf/stamp_tc.bpf.c), attached by tcx to the host's outer device, stamps the run's
requests at egress and replies at ingress: what a per-device design would take as the
corrected RTT. The same program reads the kernel's receive stamps (skb->tstamp) of the
reply at the outer device and of the request at the link's far end: truth v2. Per probe:
tcx's RTT minus truth v2, split into the reply's part (tcx ingress after the kernel's
receive stamp: on veth, tc ingress runs after the backlog) and the request's part (tcx
egress to the far end's receive stamp). Idle and with 4 flooding neighbours. The lab's
outer device is a veth; a NIC's arrivals (NAPI) come in at netif_receive_skb, where tc
ingress runs too, so there the reply's part would differ. Writes results.json and
results.md to --out (default bench/results/tcx_stamps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from bench import experiments as ex
from bench import floor, standalone
from bench.tools import mace_ping
from mace_tools.kernel import native
from mace_tools.lab.topology import OUTER_DEV, Lab
from mace_tools.stats import percentile

RESULTS = Path(__file__).with_name("results") / "tcx_stamps"
SOURCE = Path(__file__).with_name("bpf") / "stamp_tc.bpf.c"
SETTINGS = [("idle", 0), ("4 floods", 4)]
EGRESS, INGRESS, KERNEL_RX, FAR_KERNEL_RX = range(4)  # stamp_tc.bpf.c's keys
# which programs each end attaches, and where (tcx attach type)
ENDS = {"near": ((b"stamp_egress", native.BPF_TCX_EGRESS),
                 (b"stamp_ingress", native.BPF_TCX_INGRESS)),
        "far": ((b"stamp_far", native.BPF_TCX_INGRESS),)}


def hold(obj_path: Path, end: str, device: str, nonce: bytes, out: Path) -> None:
    """In the device's netns: stamp this nonce's echoes there (ENDS[end]) until stdin
    closes, then write the stamps ({what: {seq: ns}}) to `out` as JSON."""
    lib = native.libbpf()

    def set_nonce(obj: int) -> None:
        native.map_initial_value(lib.bpf_object__find_map_by_name(obj, b".rodata"))[:8] = nonce

    with floor.loaded(obj_path, set_nonce) as obj:
        links = []
        try:
            for name, kind in ENDS[end]:
                prog = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, name))
                links.append(native.tcx_attach(prog, socket.if_nametoindex(device), kind))
            print("ready", flush=True)
            sys.stdin.read()
        finally:
            for fd in links:
                os.close(fd)
        stamps_fd = lib.bpf_map__fd(lib.bpf_object__find_map_by_name(obj, b"stamps"))
        stamps: dict[int, dict[int, int]] = {}
        for key in native.map_keys(stamps_fd, 8):
            what, seq = struct.unpack("II", key)
            value = native.map_lookup(stamps_fd, key, 8)
            if value is not None:
                stamps.setdefault(what, {})[seq] = struct.unpack("Q", value)[0]
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


def _stamped(lab: Lab, nonce: bytes, probes: int, interval: float
             ) -> tuple[dict[int, dict[int, int]], int]:
    """One run's stamps from both ends of the outer link, and its replies."""
    link = lab.outer_link
    obj = floor.object_file(SOURCE, floor.UAPI_INCLUDES)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {end: Path(tmp) / f"{end}.json" for end in ENDS}
        holders = [ex.held_by_child(
            ["ip", "netns", "exec", netns or lab.host_ns, sys.executable, "-m",
             "bench.tcx_stamps", "hold", str(obj), end, device, nonce.hex(), str(outs[end])],
            f"tcx stamps at the {end} end", cwd=ex.REPO)
            for end, netns, device in (("near", link.near_netns, link.near_dev),
                                       ("far", link.far_netns, link.far_dev))]
        with holders[0], holders[1]:
            run = mace_ping(lab, 0, nonce, probes, interval, "--corrections", "none").collect()
        stamps: dict[int, dict[int, int]] = {}
        for out in outs.values():
            for what, by_seq in json.loads(out.read_text()).items():
                stamps[int(what)] = {int(seq): ns for seq, ns in by_seq.items()}
    return stamps, len(run.rtt_ms)


def measure(lab: Lab, probes: int, interval: float) -> list[dict]:
    rows = []
    for name, neighbours in SETTINGS:
        sets = ex.await_program_sets()  # mace's programs would work between the stamps
        if sets:
            raise ex.NotMeasured(f"{sets} mace program set(s) attached: not measured")
        with ex.load_setting(lab, neighbours, "flood", probes * interval + 60):
            stamps, replies = _stamped(lab, os.urandom(8), probes, interval)
        offset = realtime_offset_ns()
        minus_truth, reply_part, request_part = [], [], []
        for seq, ingress in stamps.get(INGRESS, {}).items():
            egress = stamps.get(EGRESS, {}).get(seq)
            kernel_rx = stamps.get(KERNEL_RX, {}).get(seq)
            far_rx = stamps.get(FAR_KERNEL_RX, {}).get(seq)
            if not (egress and kernel_rx and far_rx):
                continue  # (a kernel stamp of 0: none was taken)
            reply_part.append((ingress - (kernel_rx - offset)) / 1000)
            request_part.append(((far_rx - offset) - egress) / 1000)
            minus_truth.append(((ingress - egress) - (kernel_rx - far_rx)) / 1000)
        if not minus_truth:
            raise ex.NotMeasured(f"{name}: no probe stamped at both ends")
        rows.append({"setting": name, "probes": probes, "replies": replies,
                     "tcx_minus_truth_us": _summary(minus_truth),
                     "reply_after_kernel_rx_us": _summary(reply_part),
                     "request_to_far_kernel_rx_us": _summary(request_part)})
        print(f"  {name}: tcx - truth v2 {statistics.fmean(minus_truth):+.2f} µs mean over "
              f"{len(minus_truth)} probes", flush=True)
    return rows


def _cells(s: dict) -> str:
    return f"{s['mean']:+.2f} | {s['median']:+.2f} | {s['p1']:+.2f} | {s['p99']:+.2f}"


def markdown(res: dict) -> str:
    out = ["# Per-device (tcx) stamps on the outer device, against truth v2\n",
           f"{res['date']} · commit `{res['commit']}` · kernel {res['kernel']} · "
           f"{res['cpus']} CPUs ({res['cpu_model']}) · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           f"mace-ping --corrections none -i {res['interval']} from c0 (no mace program "
           f"attached); a tc program attached by tcx to the lab host's outer device "
           f"({OUTER_DEV}, a veth) stamps its requests at egress and its replies at "
           "ingress, and reads the kernel's receive stamps (skb->tstamp) of the reply there "
           "and of the request at the link's far end: truth v2. tcx - truth v2: (tcx "
           "ingress - tcx egress) - (reply's receive stamp - request's receive stamp). Its "
           "two parts: the reply's (tcx ingress after the kernel's receive stamp) and the "
           "request's (tcx egress to the far end's receive stamp: the link transit that "
           "mace's corrected RTT also counts, and the part of the transmit path before it). "
           "REALTIME stamps set against MONOTONIC by the offset read after each run. µs. "
           "For comparison, mace's corrected minus truth v2 is that link transit alone "
           "(results.md, Accuracy).\n",
           "| setting | probes | tcx - truth v2: mean | median | p1 | p99 | reply's part: "
           "mean | median | p1 | p99 | request's part: mean | median | p1 | p99 |",
           "|---" * 14 + "|"]
    for r in res["rows"]:
        out.append(f"| {r['setting']} | {r['tcx_minus_truth_us']['n']} | "
                   f"{_cells(r['tcx_minus_truth_us'])} | "
                   f"{_cells(r['reply_after_kernel_rx_us'])} | "
                   f"{_cells(r['request_to_far_kernel_rx_us'])} |")
    return "\n".join(out) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["hold"]:  # (a child, in one end's netns)
        _, obj, end, device, nonce, out = sys.argv[1:]
        hold(Path(obj), end, device, bytes.fromhex(nonce), Path(out))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.tcx_stamps", description=__doc__)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return standalone.run(
        "bench.tcx_stamps", lambda: Lab(prefix=f"mts{os.getpid() % 100000}", containers=6),
        lambda lab: measure(lab, args.probes, args.interval), markdown, args.out,
        interval=args.interval)


if __name__ == "__main__":
    sys.exit(main())
