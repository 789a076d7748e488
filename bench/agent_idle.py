"""What an idle mace-agent costs a neighbour's ping: `python -m bench.agent_idle
[--rounds N] [--out DIR]` (root; ~5 minutes at 40 rounds).

The witness (an iputils ping from a lab container mace never probes) under three
conditions, shuffled per round as in bench/hook_floor.py: no agent; an agent serving no
one with its programs kept attached (`--idle-detach never`: every agent before
--idle-detach was like this); and an agent serving no one that has let go of them
(`--idle-detach 0`, the state the default reaches after 5 s with no run). Each block
starts its own agent in the lab's host netns, lets it settle, and stops it after. "attached" minus
"detached" is what idle programs cost every packet on the host; "detached" minus "none"
is the agent process alone. Writes results.json and results.md to --out (default
bench/results/agent_idle).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from bench import experiments as ex
from bench import standalone
from mace_tools.lab.agent import AgentProcess
from mace_tools.lab.topology import Lab

RESULTS = Path(__file__).with_name("results") / "agent_idle"
SETTINGS = [("idle", 0, "flood"), ("4 floods", 4, "flood")]
BLOCK, INTERVAL = 62, 0.005  # the perturbation section's witness blocks
# each figure: (condition, the condition it is measured against)
DELTAS = {"attached": ("attached", "base"), "detached": ("detached", "base"),
          "attached_minus_detached": ("attached", "detached")}
DETACHED_LINE = "idle: programs detached"
SETTLE_S = 1.5  # after the agent is up (and detached): its start-up work done


@contextmanager
def idle_agent(lab: Lab, idle_detach: str) -> Iterator[None]:
    """An agent in the lab's host netns with no client, its programs attached
    (idle_detach "never") or let go of (it says so in its log)."""
    with AgentProcess("-v", "--idle-detach", idle_detach, prefix=lab.on_host()) as agent:
        deadline = time.monotonic() + 10.0
        while idle_detach != "never" and DETACHED_LINE not in agent.log_text():
            if time.monotonic() > deadline:
                raise ex.NotMeasured(f"the agent did not detach: {agent.log_text().strip()}")
            time.sleep(0.01)
        time.sleep(SETTLE_S)
        yield


def measure(lab: Lab, rounds: int, seed: int = 11) -> list[dict]:
    if (sets := ex.loaded_program_sets()):
        raise ex.NotMeasured(f"{sets} mace program set(s) loaded already: not measured")
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "base": nullcontext, "attached": lambda: idle_agent(lab, "never"),
        "detached": lambda: idle_agent(lab, "0")}
    order = random.Random(seed)
    rows = []
    for name, neighbours, kind in SETTINGS:
        samples = ex.witness_blocks(lab, conditions, rounds, order, neighbours, kind, BLOCK,
                                    INTERVAL, SETTLE_S,
                                    after=lambda: ex.await_program_sets(0, 3.0))
        rows.append(ex.delta_row(name, rounds, BLOCK, samples, DELTAS))
    return rows


def markdown(res: dict) -> str:
    out = ["# An idle mace-agent: what it costs a neighbour's ping, attached and detached\n",
           f"{res['date']} · commit `{res['commit']}` · kernel {res['kernel']} · "
           f"{res['cpus']} CPUs ({res['cpu_model']}) · `{res['command']}` · "
           f"{res['duration_s']:.0f} s\n",
           "Witness: iputils ping from a lab container every 5 ms, blocks of 62. Each round "
           "runs one block per condition in a shuffled order; Δ is the mean over rounds of "
           "(block mean - that round's other block mean) ± its standard error. Each block "
           "starts an agent with no client in the lab's host netns and waits "
           f"{SETTLE_S} s (its start-up work done): `--idle-detach never` (attached: what "
           "every idle agent cost before this option) or `--idle-detach 0` (detached: the "
           "default's state after 5 s with no run).\n",
           "| setting | rounds x block | baseline mean µs | idle agent, attached Δ µs "
           "| idle agent, detached Δ µs | attached - detached µs |",
           "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cells = " | ".join(ex.delta_cell(r, name) for name in DELTAS)
        out.append(f"| {r['setting']} | {r['rounds']} x {r['block']} | "
                   f"{r['baseline_mean_us']:.1f} | {cells} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_idle", description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return standalone.run(
        "bench.agent_idle",
        lambda: Lab(prefix=f"mai{os.getpid() % 100000}", containers=ex.CONTAINERS),
        lambda lab: measure(lab, args.rounds), markdown, args.out)


if __name__ == "__main__":
    sys.exit(main())
