"""What a hook costs a neighbour's ping before any program does work there:
`python -m bench.hook_floor [--rounds N] [--out DIR]` (root; ~10 minutes at 100 rounds).

The witness (an iputils ping from a lab container mace never probes) under five
conditions, shuffled per round as in the perturbation section: nothing attached; empty
programs on mace's three tracepoints (every packet on the host crosses them ~14 times per
round trip); an empty tc program attached by tcx, ingress and egress, to the lab host's
outer device (the witness's packets cross it twice per round trip), or to a device the
witness never crosses; and the child that holds those links, loading the program without
attaching it. Each is held by a child process of the same kind, given an object compiled
once. The tracepoint row is the floor under mace's
programs as they are; the outer-device row the floor under per-device attachment; the
last two tell the attachment's global effects and the holder's from the runs' own.
Writes results.json and results.md to --out (default bench/results/hook_floor).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from bench import experiments as ex
from bench import floor, standalone
from mace_tools.lab.topology import OUTER_DEV, Lab

RESULTS = Path(__file__).with_name("results") / "hook_floor"
SETTINGS = [("idle", 0, "flood"), ("4 floods", 4, "flood")]
BLOCK, INTERVAL = 62, 0.005  # the perturbation section's witness blocks
# the host side of container 0's veth: a device of the host the witness never crosses
ELSEWHERE_DEV = "vc0"
CONDITIONS = ("tracepoints", "tcx", "tcx_elsewhere", "holder")


def tcx_held(lab: Lab, device: str, attach: bool = True) -> AbstractContextManager[None]:
    """The empty tc program on a device of the lab host (attach False: loaded, not
    attached: the holder alone), held by a child in the host netns (a tcx link is made in
    its device's netns)."""
    return ex.held_by_child(["ip", "netns", "exec", lab.host_ns, sys.executable, "-m",
                             "bench.floor", "hold-tcx", str(floor.object_file(floor.TC_SOURCE)),
                             device, *([] if attach else ["--no-attach"])],
                            "tcx link", cwd=ex.REPO)


def measure(lab: Lab, rounds: int, seed: int = 7) -> list[dict]:
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "base": nullcontext, "tracepoints": ex.floor_attached,
        "tcx": lambda: tcx_held(lab, OUTER_DEV),
        "tcx_elsewhere": lambda: tcx_held(lab, ELSEWHERE_DEV),
        "holder": lambda: tcx_held(lab, OUTER_DEV, attach=False)}
    order = random.Random(seed)
    rows = []
    for name, neighbours, kind in SETTINGS:
        samples = ex.witness_blocks(lab, conditions, rounds, order, neighbours, kind, BLOCK,
                                    INTERVAL)
        rows.append(ex.delta_row(name, rounds, BLOCK, samples,
                                 {cond: (cond, "base") for cond in CONDITIONS}))
    return rows


def markdown(res: dict) -> str:
    out = ["# Hook floor: what attaching costs a neighbour's ping, before any work\n",
           f"{res['date']} · commit `{res['commit']}` · kernel {res['kernel']} · "
           f"{res['cpus']} CPUs ({res['cpu_model']}) · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           "Witness: iputils ping from a lab container every 5 ms, blocks of 62. Each round "
           "runs one block per condition in a shuffled order; Δ is the mean over rounds of "
           "(block mean - that round's baseline block mean) ± its standard error. "
           "Each condition is held by a child process of the same kind. Tracepoints: "
           "programs that return at once on mace's three tracepoints "
           "(bench/bpf/floor.bpf.c). tcx: a program that returns at once "
           "(bench/bpf/floor_tc.bpf.c), attached by tcx, ingress and egress, to the lab "
           f"host's outer device ({OUTER_DEV}: the witness's packets cross it twice per round "
           f"trip) or to a device the witness never crosses ({ELSEWHERE_DEV}: what attaching "
           "anywhere costs). Holder: the same child, loading the tc program without "
           "attaching it.\n",
           "| setting | rounds x block | baseline mean µs | empty tracepoint programs Δ µs "
           f"| tcx on {OUTER_DEV} Δ µs | tcx on {ELSEWHERE_DEV} Δ µs | holder alone Δ µs |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cells = " | ".join(ex.delta_cell(r, c) for c in CONDITIONS)
        out.append(f"| {r['setting']} | {r['rounds']} x {r['block']} | "
                   f"{r['baseline_mean_us']:.1f} | {cells} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hook_floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return standalone.run(
        "bench.hook_floor",
        lambda: Lab(prefix=f"mhf{os.getpid() % 100000}", containers=ex.CONTAINERS),
        lambda lab: measure(lab, args.rounds), markdown, args.out)


if __name__ == "__main__":
    sys.exit(main())
