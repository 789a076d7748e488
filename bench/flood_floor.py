"""How fast can a Python flood loop go here? `python -m bench.flood_floor [--seconds N]
[--repeats N] [--out DIR]` (root; ~1 minute at the defaults).

From lab container c0, one probe in flight, each for N seconds, in a shuffled order per
repeat: iputils `ping -f`; mace-ping -f; and two minimal Python loops that send the same
echo requests (probe/icmp.EchoTemplate) and wait for each reply (recvmsg, then its type,
nonce and number compared in place), one with no kernel side ("bare") and one joined to
mace's program set as a records-only run ("with records": it drains its ring after each
reply and takes the corrected RTT from the probe's record, as mace-ping does). What the
minimal loops leave out is what mace-ping's Python does beyond them per reply: the window
of the last 65,536 probes, checksum and payload checks, DUP and late-stamp rules, lost
records, pacing (-c, -w, -l), statistics and output. The star lab's target answers inside
the sender's sendto() (README "Accuracy and cost"), so all of that adds to each probe's
time. Writes results.json and results.md to --out (default bench/results/flood_floor).
"""

from __future__ import annotations

import argparse
import os
import random
import select
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

from bench import experiments as ex
from bench import standalone
from bench.experiments import NotMeasured
from mace_tools.kernel.backend import Backend
from mace_tools.lab.topology import Lab
from mace_tools.model import ProbeRecord
from mace_tools.probe import netns
from mace_tools.probe.icmp import NONCE_LEN, EchoTemplate, new_nonce

RESULTS = Path(__file__).with_name("results") / "flood_floor"
SO_TIMESTAMPNS = 35
REPLY_WAIT_NS = 1_000_000_000  # a reply not back by then: the loop is not measured
_NUMBER = struct.Struct("!I")
TOOLS = ("iputils ping -f", "mace-ping -f", "bare loop", "loop with records")


def python_loop(lab: Lab, seconds: float, records: bool) -> dict:
    """One minimal loop for `seconds` (module docstring): its rate, and with records how
    many replies got a corrected RTT from the kernel's record."""
    prober_path = Path(lab.netns_path(lab.container_ns(0)))
    nonce, ident = new_nonce(), os.getpid() & 0xFFFF
    template = EchoTemplate(ident, nonce, 56)
    got: dict[int, ProbeRecord] = {}
    backend = None
    if records:
        backend = Backend(nonce, records=True, path=False,
                          prober_netns=os.stat(prober_path).st_ino,
                          host_netns=os.stat(lab.netns_path(lab.host_ns)).st_ino)
        backend.open()
    try:
        with netns.entered(prober_path):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            return _flood(sock, (lab.target_addr, 0), template, nonce, seconds, backend,
                          got)
    finally:
        if backend is not None:
            backend.close()


def _flood(sock: socket.socket, dst: tuple[str, int], template: EchoTemplate, nonce: bytes,
           seconds: float, backend: Backend | None, got: dict[int, ProbeRecord]) -> dict:
    buf = bytearray(2048)

    def on_event(_ev: object) -> None:
        pass  # a records-only run is sent none

    def on_record(record: ProbeRecord) -> None:
        got[record.number] = record

    n = corrected = 0
    start = time.monotonic_ns()
    end = start + int(seconds * 1e9)
    sent = start
    while sent < end:
        n += 1
        message = template.message(n)
        sent = time.monotonic_ns()
        try:
            sock.sendto(message, dst)
        except OSError as exc:
            raise NotMeasured(f"sendto: {exc.strerror}") from None
        while True:
            try:
                sock.recvmsg_into([buf], 64)
            except BlockingIOError:
                if time.monotonic_ns() - sent > REPLY_WAIT_NS:
                    raise NotMeasured(f"probe {n} got no reply within 1 s") from None
                select.select([sock], [], [], 0.01)
                continue
            at = (buf[0] & 0x0F) * 4
            if buf[at] == 0 and buf[at + 8:at + 8 + NONCE_LEN] == nonce \
                    and _NUMBER.unpack_from(buf, at + 8 + NONCE_LEN)[0] == n:
                break
        if backend is not None:
            backend.drain(on_event, on_record)
            record = got.pop(n, None)
            corrected += record is not None and sent <= record.departed_ns \
                <= record.returned_ns
    elapsed = (time.monotonic_ns() - start) / 1e9
    return {"probes": n, "probes_per_s": n / elapsed,
            "corrected": corrected if backend is not None else None}


def measure(lab: Lab, seconds: int, repeats: int) -> list[dict]:
    runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    order = random.Random(11)
    measure_tool = {
        "iputils ping -f": lambda: ex.iputils_flood(lab, seconds),
        "mace-ping -f": lambda: ex.mace_flood(lab, seconds),
        "bare loop": lambda: python_loop(lab, seconds, records=False),
        "loop with records": lambda: python_loop(lab, seconds, records=True),
    }
    for i in range(repeats):
        for tool in order.sample(TOOLS, k=len(TOOLS)):
            runs[tool].append(measure_tool[tool]())
        print(f"  repeat {i + 1}: " + ", ".join(
            f"{tool} {runs[tool][-1]['probes_per_s']:.0f}/s" for tool in TOOLS), flush=True)
    iputils = statistics.median(r["probes_per_s"] for r in runs["iputils ping -f"])
    return [{"tool": tool,
             "probes_per_s_runs": [r["probes_per_s"] for r in runs[tool]],
             "probes_per_s": statistics.median(r["probes_per_s"] for r in runs[tool]),
             "us_per_probe": 1e6 / statistics.median(r["probes_per_s"] for r in runs[tool]),
             "vs_iputils": statistics.median(r["probes_per_s"] for r in runs[tool]) / iputils,
             "corrected_share": (min(r["corrected"] / r["probes"] for r in runs[tool])
                                 if tool == "loop with records" else None)}
            for tool in TOOLS]


def markdown(res: dict) -> str:
    out = ["# Flood floor: how fast a Python flood loop can go on this lab\n",
           f"{res['date']} · commit `{res['commit']}` · kernel {res['kernel']} · "
           f"{res['cpus']} CPUs ({res['cpu_model']}) · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           "From lab container c0 (star lab: the target answers inside the sender's "
           "sendto()), one probe in flight, each tool for "
           f"{res['seconds']} s per repeat, in a shuffled order. The loops are minimal "
           "(bench/flood_floor.py): what they leave out is what mace-ping's per-reply "
           "Python adds. vs iputils: median rate over iputils' median rate.\n",
           "| tool | probes/s (median; every run) | µs per probe | vs iputils -f | replies "
           "corrected from the record (lowest share) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        share = "-" if r["corrected_share"] is None else f"{r['corrected_share'] * 100:.2f}%"
        runs = ", ".join(f"{x:.0f}" for x in r["probes_per_s_runs"])
        out.append(f"| {r['tool']} | **{r['probes_per_s']:.0f}** ({runs}) | "
                   f"{r['us_per_probe']:.1f} | {r['vs_iputils']:.2f}x | {share} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood_floor", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return standalone.run(
        "bench.flood_floor", lambda: Lab(prefix=f"mff{os.getpid() % 100000}", containers=1),
        lambda lab: measure(lab, args.seconds, args.repeats), markdown, args.out,
        seconds=args.seconds, repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
