"""How long a traceroute run waits for a probe: -w MAX,HERE,NEAR, as Linux traceroute
computes it (get_timeout() in its traceroute.c).

Only the probe that is printed next (the first one not done yet) is ever timed out, and
its wait is:
- HERE x the RTT of an answer already in from its own hop (the first such probe of the
  hop), if HERE is not 0;
- else NEAR x the RTT of an answer already in from a later probe (the first of those sent
  after it, up to the first one not sent yet), if NEAR is not 0;
- else MAX; and never more than MAX.
Each RTT gets 1 ms added first, as traceroute does "to avoid precision issues". With -w
MAX alone HERE and NEAR are 0 (traceroute's compatibility rule); the defaults are 5,3,10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

WAIT_PRECISION_S = 0.001  # traceroute's DEF_WAIT_PREC
DEFAULT_WAIT = (5.0, 3.0, 10.0)  # MAX seconds, HERE and NEAR factors


@dataclass(frozen=True, slots=True)
class WaitSpec:
    max_s: float = DEFAULT_WAIT[0]
    here: float = 0.0
    near: float = 0.0


# A probe's state for the wait: its answer's RTT in seconds (> 0), 0.0 if sent and not
# answered (or timed out), None if not sent yet.
ProbeRtt = Callable[[int], "float | None"]


def probe_wait_s(spec: WaitSpec, rtt: ProbeRtt, index: int, count: int,
                 per_hop: int) -> float:
    """Seconds to wait for probe `index` (0-based, in sending order, per_hop probes a hop)
    of `count`, given rtt(i) for every probe i (ProbeRtt)."""
    if spec.here:
        first = index - index % per_hop
        for i in range(first, min(first + per_hop, count)):
            if (value := rtt(i)) is not None and value > 0:
                return _scaled(value, spec.here, spec.max_s)
    if spec.near:
        for i in range(index + 1, count):
            value = rtt(i)
            if value is None:
                break  # not sent yet: nothing after it was either
            if value > 0:
                return _scaled(value, spec.near, spec.max_s)
    return spec.max_s


def _scaled(rtt_s: float, factor: float, max_s: float) -> float:
    return min((rtt_s + WAIT_PRECISION_S) * factor, max_s)
