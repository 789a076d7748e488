"""Probe + reply + kernel events -> raw, corrected, egress, ingress and the per-stage path.

Definitions (README "What the numbers mean"):
- raw RTT: reply's kernel receive timestamp (SO_TIMESTAMPNS) minus the wall-clock time just
  before sendto(), as iputils measures it (CLOCK_REALTIME on both ends).
- outer device: the host's outermost device. The request leaves the prober's netns P; the
  first other netns it enters is the host netns H (the veth peer's side: Docker's host, the
  lab's host). The outer device is the last device the request leaves in H. When the request
  never leaves a device of another netns (probing from the host itself, or to a target
  beyond P's own devices), it is the last device the request leaves in P.
- corrected RTT: first arrival of the reply on the outer device minus the request's last
  departure from it. Both are bpf_ktime_get_ns() values (CLOCK_MONOTONIC).
- egress: that departure minus the probe's send point (CLOCK_MONOTONIC just before sendto()).
- ingress: the reply's delivery point (its first arrival at the last device it reaches in P,
  where the kernel takes the socket's receive timestamp) minus its arrival on the outer device.
A reply whose events do not give all of these gets none of them: never an invented correction.
"""

from __future__ import annotations

from collections.abc import Iterable

from mace_tools.model import Hook, KernelEvent, Measurement, Packet, Probe, Reply, Stage

_DeviceKey = tuple[Packet, int, int, bool]  # packet, netns, ifindex, leaving


def stages(events: Iterable[KernelEvent], sent_mono_ns: int) -> list[Stage]:
    """One stage per (packet, device, direction), at its earliest event, in time order.

    A packet arriving on a veth is seen twice (netif_rx, then netif_receive_skb after the
    backlog); its arrival is the first, which is also where captures timestamp it.
    """
    first: dict[_DeviceKey, KernelEvent] = {}
    xmit = Hook.XMIT
    for ev in events:
        key = (ev.packet, ev.netns, ev.ifindex, ev.hook is xmit)
        seen = first.get(key)
        if seen is None or ev.ts_mono_ns < seen.ts_mono_ns:
            first[key] = ev
    ordered = sorted(first.values(), key=lambda e: e.ts_mono_ns)
    return [
        Stage(e.packet, e.dev, e.ifindex, e.netns, e.hook is xmit, e.ts_mono_ns - sent_mono_ns,
              e.src, e.dst)
        for e in ordered
    ]


def outer_departure(path: list[Stage], prober_netns: int) -> Stage | None:
    """The request's last departure from the host's outermost device (see module doc)."""
    request = [s for s in path if s.packet is Packet.REQUEST]
    host_netns = next((s.netns for s in request if s.netns != prober_netns), None)
    for netns in (host_netns, prober_netns):
        leaving = [s for s in request if s.leaving and s.netns == netns]
        if leaving:
            return leaving[-1]
    return None


def correlate(
    probe: Probe, reply: Reply, events: Iterable[KernelEvent], prober_netns: int
) -> Measurement:
    """Build the measurement of one reply from its probe's kernel events."""
    path = stages(events, probe.sent_mono_ns)
    m = Measurement(
        seq=reply.seq,
        src=reply.src,
        ttl=reply.ttl,
        icmp_bytes=reply.icmp_bytes,
        rtt_raw_ns=reply.recv_real_ns - probe.sent_real_ns,
        path=path,
        recv_real_ns=reply.recv_real_ns,
    )
    out = outer_departure(path, prober_netns)
    if out is None:
        return m
    back = next(
        (s for s in path
         if s.packet is Packet.REPLY and not s.leaving
         and s.netns == out.netns and s.ifindex == out.ifindex and s.t_ns >= out.t_ns),
        None,
    )
    delivered = [s for s in path
                 if s.packet is Packet.REPLY and not s.leaving and s.netns == prober_netns]
    if back is None or not delivered:
        return m
    m.rtt_corrected_ns = back.t_ns - out.t_ns
    m.egress_ns = out.t_ns
    m.ingress_ns = delivered[-1].t_ns - back.t_ns
    m.outer_dev = out.label
    return m
