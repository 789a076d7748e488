"""Probe + reply + kernel events -> raw, corrected, egress, ingress and the per-stage path.

Definitions (README "What the numbers mean"):
- raw RTT: reply's kernel receive timestamp (SO_TIMESTAMPNS) minus the wall-clock time just
  before sendto(), as iputils measures it (CLOCK_REALTIME on both ends).
- host netns H: the container host's. Known when the tool entered the prober's netns P from
  its own (then H is the tool's netns); otherwise the first other netns the request enters
  (the veth peer's side: Docker's host, the lab's host), or P itself when the request
  enters none (probing from a host with a physical NIC). From inside a nested container,
  the first host is the inner one: run from the outermost host to correct at its device.
- outer device: the last device the request leaves in H.
- corrected RTT: first arrival of the reply on the outer device minus the request's last
  departure from it. Both are bpf_ktime_get_ns() values (CLOCK_MONOTONIC).
- egress: that departure minus the probe's send point (CLOCK_MONOTONIC just before sendto()).
- ingress: the reply's delivery point (its first arrival at the last device it reaches in P,
  where the kernel takes the socket's receive timestamp) minus its arrival on the outer
  device. None when no device of P reported the delivery (a macvlan's receive path fires no
  tracepoint in P): the corrected RTT does not depend on it.
Never an invented correction: events older than the probe's send point are stale (an earlier
probe with the same seq) and ignored; when the request is not seen leaving H, or the reply
not seen arriving where it left, there is no corrected RTT. No other device stands in.
Nor when the reply's return, stamped at netif_rx, comes after the socket's receive stamp of
it (see LATE_RETURN_SLACK_NS): then our program ran late, the correction would be wrong by
as much, and the reply is shown raw, counted as a late kernel stamp.

A ping run gets the same figures from the kernel, which applies these rules to each probe
as it crosses the devices and sends one record per answer (bpf/mace.bpf.c): measured()
turns that record into a Measurement. correlate() does it from per-device events, for
traceroute and whenever the path is shown; the tests hold the two to each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mace_tools.model import (
    Hook,
    KernelEvent,
    Measurement,
    Namespaces,
    Packet,
    Probe,
    ProbeRecord,
    Reply,
    Stage,
)

_DeviceKey = tuple[Packet, int, int, bool]  # packet, netns, ifindex, leaving

# At netif_rx the kernel stamps a packet for sockets (net_timestamp_check) and fires the
# tracepoint our program stamps it at, back to back. A reply's receive stamp (SO_TIMESTAMPNS)
# is taken where it enters the prober's netns: at its return to the outer device when that
# is one device (a prober in the host netns; a macvlan's lower device), later otherwise
# (crossing into another netns clears the stamp). So a return our program stamped at
# netif_rx may follow the receive stamp only by the program's own delay: measured on the
# macvlan lab (3,200 probes, both CPUs busy) 0.10 µs at the median, 0.17 at p99.9, and
# 1.95 once. Once in a fresh-clone suite it came 31 µs after (the CPU held between the two),
# and the correction came out 33 µs high. Beyond this slack the return stamp is refused.
# Where the two stamps are one instant, a late program can then move a correction by no
# more than the slack; elsewhere by no more than the reply's ingress plus the slack.
# (Only netif_rx: after netif_receive_skb's stamp the tracepoint may come much later, past
# RPS or a GRO batch, and a tunnel keeps its underlay's stamp; a correction taken there is
# not checked. The receive stamp is CLOCK_REALTIME, set against the monotonic send point
# through the probe's REALTIME - MONOTONIC offset, read real first: any error there is
# leniency. A backward step of the wall clock during a probe makes its raw RTT short, and
# refuses its correction too.)
LATE_RETURN_SLACK_NS = 1_000


def returned_late(returned_after_send_ns: int, hook: int, m: Measurement) -> bool:
    """Whether a reply's return, stamped by `hook` at returned_after_send_ns after the
    probe's monotonic send point, comes after its socket receive stamp (m's raw RTT after
    the REALTIME send point) by more than LATE_RETURN_SLACK_NS: then the return stamp is
    wrong and nothing is corrected. Checked for netif_rx stamps only (above)."""
    return hook == Hook.RX and returned_after_send_ns > m.rtt_raw_ns + LATE_RETURN_SLACK_NS


def stages(events: Iterable[KernelEvent], sent_mono_ns: int) -> list[Stage]:
    """One stage per (packet, device, direction), in time order: an arrival at its
    earliest event, a departure at its latest (as the kernel's record takes them).

    A packet arriving on a veth is seen twice (netif_rx, then netif_receive_skb after the
    backlog); its arrival is the first, which is also where captures timestamp it. A
    departure the driver refused (NETDEV_TX_BUSY) is tried again: it left at the last
    try. Events before the send point belong to an earlier probe: left out.
    """
    first: dict[_DeviceKey, KernelEvent] = {}
    xmit = Hook.XMIT
    for ev in events:
        if ev.ts_mono_ns < sent_mono_ns:
            continue
        leaving = ev.hook is xmit
        key = (ev.packet, ev.netns, ev.ifindex, leaving)
        seen = first.get(key)
        if seen is None or (ev.ts_mono_ns > seen.ts_mono_ns if leaving
                            else ev.ts_mono_ns < seen.ts_mono_ns):
            first[key] = ev
    ordered = sorted(first.values(), key=lambda e: e.ts_mono_ns)
    return [
        Stage(e.packet, e.dev, e.ifindex, e.netns, e.hook is xmit, e.ts_mono_ns - sent_mono_ns,
              e.src, e.dst, e.hook)
        for e in ordered
    ]


def host_netns(path: Sequence[Stage], ns: Namespaces) -> int:
    """H (module doc): known, or inferred from where the request went. Inferred, a netns
    the request entered and did not leave stays H (its departure may be the missing
    event): no correction then, rather than one taken inside the container."""
    if ns.host is not None:
        return ns.host
    return next((s.netns for s in path
                 if s.packet is Packet.REQUEST and s.netns != ns.prober), ns.prober)


def outer_departure(path: Sequence[Stage], ns: Namespaces) -> Stage | None:
    """The request's last departure from the host's outer device, or None if not seen."""
    host = host_netns(path, ns)
    leaving = [s for s in path if s.packet is Packet.REQUEST and s.leaving and s.netns == host]
    return leaving[-1] if leaving else None


def raw_measurement(probe: Probe, reply: Reply, path: Sequence[Stage]) -> Measurement:
    """A reply's measurement before any correction: its raw RTT, as iputils has it."""
    # (positional: made for every reply, and keywords cost more than half again)
    m = Measurement(reply.seq, reply.src, reply.ttl, reply.icmp_bytes,
                    reply.recv_real_ns - probe.sent_real_ns, recv_real_ns=reply.recv_real_ns)
    if path:
        m.path = path
    return m


def correlate(probe: Probe, reply: Reply, events: Iterable[KernelEvent],
              ns: Namespaces, complete: bool = True) -> Measurement:
    """Build the measurement of one reply from its probe's kernel events. `complete` is
    False when events may have been lost while the probe was in flight (the ring was full,
    or a record could not be read): then its path is shown, but nothing is corrected, as
    any device could be missing from it (the last one the request left, say)."""
    path = stages(events, probe.sent_mono_ns)
    m = raw_measurement(probe, reply, path)
    out = outer_departure(path, ns) if complete else None
    if out is None:
        return m
    back = next(
        (s for s in path
         if s.packet is Packet.REPLY and not s.leaving
         and s.netns == out.netns and s.ifindex == out.ifindex and s.t_ns >= out.t_ns),
        None,
    )
    if back is None:
        return m
    if returned_late(back.t_ns, back.hook, m):
        m.late_kernel_stamp = True
        return m
    delivered = [s for s in path
                 if s.packet is Packet.REPLY and not s.leaving and s.netns == ns.prober
                 and s.t_ns >= back.t_ns]
    m.rtt_corrected_ns = back.t_ns - out.t_ns
    m.egress_ns = out.t_ns
    m.ingress_ns = delivered[-1].t_ns - back.t_ns if delivered else None
    m.outer_dev = out.label
    return m


def measured(probe: Probe, reply: Reply, record: ProbeRecord | None, complete: bool = True,
             path: Sequence[Stage] | None = None) -> Measurement:
    """The measurement of one reply from the kernel's record of its probe (None: no
    record came). Same rules as correlate(): nothing corrected unless the request was
    seen leaving the host netns after this probe was sent and the reply arriving back
    on that device, no later than its receive stamp; ingress only when the delivery was
    seen after that."""
    m = raw_measurement(probe, reply, path or ())
    if record is None or not complete:
        return m
    sent = probe.sent_mono_ns
    _, departed, returned, delivered, _, _, _, hook = record  # (one unpacking per reply)
    if not departed or not returned or departed < sent or returned < departed:
        return m
    if returned_late(returned - sent, hook, m):
        m.late_kernel_stamp = True
        return m
    m.rtt_corrected_ns = returned - departed
    m.egress_ns = departed - sent
    m.ingress_ns = delivered - returned if delivered >= returned else None
    m.outer_dev = record.outer_label
    return m
