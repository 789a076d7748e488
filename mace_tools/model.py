"""Records that flow one way: probe sender -> kernel events -> correlation -> output.

Plain dataclasses, no behaviour beyond small derived properties, so every stage can be
unit-tested with hand-made values. Times are integers in nanoseconds; a name says which
clock: ``*_mono_ns`` is CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns), ``*_real_ns`` is
CLOCK_REALTIME (the clock of SO_TIMESTAMPNS and of packet captures). Only values of the same
clock are ever subtracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from mace_tools.stats import Tally


class Hook(IntEnum):
    """Kernel hook that produced an event (values shared with bpf/mace.h)."""

    XMIT = 0  # net:net_dev_start_xmit -- leaving a device, before the driver
    RX = 1  # net:netif_rx -- queued to a device's receive backlog (veth, lo)
    RECEIVE = 2  # net:netif_receive_skb -- processed by the stack (NICs, bridge, after backlog)


class Packet(IntEnum):
    """Which packet of a probe an event belongs to (values shared with bpf/mace.h)."""

    REQUEST = 0  # the probe: ICMP echo request, UDP datagram or TCP SYN
    REPLY = 1  # its answer: echo reply, ICMP error quoting it, SYN-ACK or RST


class KernelEvent(NamedTuple):
    """One probe packet seen at one device by the eBPF backend.

    A NamedTuple, not a dataclass: at flood rates tens of thousands are made per second
    and tuple construction is several times cheaper.
    """

    ts_mono_ns: int
    seq: int  # the probe number (the payload's u32 for ping, the ICMP seq or UDP/TCP tag
    # number for traceroute): the key the run tracks its probe by
    packet: Packet
    hook: Hook
    ifindex: int
    netns: int  # inode of the device's network namespace
    dev: str
    src: str  # IPv4 source/destination as seen at this device (shows NAT)
    dst: str
    proto: int = 1  # IP protocol of the packet (1 ICMP, 6 TCP, 17 UDP)
    icmp_type: int = 0  # for an ICMP answer: 0 echo reply, 11 time exceeded, 3 unreachable

    @property
    def leaving(self) -> bool:
        return self.hook is Hook.XMIT


class Stage(NamedTuple):
    """A device a probe packet crossed, as shown in the per-stage path (a NamedTuple for
    the same reason as KernelEvent: about ten are built per probe)."""

    packet: Packet
    dev: str
    ifindex: int
    netns: int
    leaving: bool
    t_ns: int  # since the probe's send point (CLOCK_MONOTONIC difference)
    src: str
    dst: str
    hook: Hook  # of the event the stage was taken from (correlate.returned_late)

    @property
    def label(self) -> str:
        return f"{self.dev}@{self.netns}"


@dataclass(frozen=True, slots=True)
class Namespaces:
    """A run's network namespaces, by inode: the one probes leave from, and the container
    host's when the tool knows it (it is the tool's own netns when the tool entered the
    prober's with --netns, --pid or --container). None: not known, correlate.py infers it."""

    prober: int
    host: int | None = None


@dataclass(slots=True)
class Probe:
    """An echo request as the sender sent it."""

    seq: int
    sent_mono_ns: int  # just before sendto(): the probe's send point for egress
    sent_real_ns: int  # just before sendto(): start of the raw RTT, as iputils does it
    lost_at_send: int = 0  # the backend's lost-events count then (Backend.lost())


class Reply(NamedTuple):
    """An echo reply as the receiver got it from the socket (a NamedTuple: one per reply,
    and a frozen dataclass takes 4x as long to make)."""

    seq: int
    src: str
    ttl: int
    icmp_bytes: int  # ICMP header + payload, as iputils prints it ("64 bytes from")
    recv_real_ns: int  # SO_TIMESTAMPNS: kernel receive timestamp, as iputils uses it


class WrongData(NamedTuple):
    """A reply whose payload differs from the probe's after the nonce and number: iputils'
    "wrong data byte #index should be 0x.. but was 0x.." and its dump."""

    index: int  # payload offset of the first byte that differs
    expected: int
    got: int
    start: int  # payload offset the dump starts at (the first byte checked)
    dump: bytes  # the reply's payload from `start`


@dataclass(slots=True)
class Measurement:
    """One reply with its raw and (when kernel data is complete) corrected times."""

    seq: int
    src: str
    ttl: int
    icmp_bytes: int
    rtt_raw_ns: int
    dup: bool = False
    # None when the kernel data is missing or incomplete: never an invented correction.
    rtt_corrected_ns: int | None = None
    egress_ns: int | None = None  # probe send point -> request leaves the host's outer device
    ingress_ns: int | None = None  # reply reaches the outer device -> reply reaches the prober
    outer_dev: str | None = None  # "dev@netns" of the host's outermost device
    path: Sequence[Stage] = ()  # (not a list made per reply: most replies show none)
    recv_real_ns: int = 0
    # kernel data refused: the reply's return was stamped after its receive stamp
    # (correlate.LATE_RETURN_SLACK_NS); shown raw, counted apart
    late_kernel_stamp: bool = False
    # what ping says of the reply beside its time (iputils' words in output/text.py)
    corrupted: bool = False  # bad ICMP checksum: "(BAD CHECKSUM!)", counted apart
    truncated: bool = False  # shorter than the probe: "(truncated)"
    wrong_data: WrongData | None = None  # payload not echoed as sent
    other_source: bool = False  # not from the target: "(DIFFERENT ADDRESS!)"

    @property
    def corrected(self) -> bool:
        return self.rtt_corrected_ns is not None


@dataclass(frozen=True, slots=True)
class RttStats:
    """Statistics of one RTT series, in ms; built by stats.py."""

    min: float
    avg: float
    max: float
    mdev: float  # population standard deviation, as iputils: sqrt(mean(x^2) - mean(x)^2)
    p50: float  # nearest rank; from a run's sketch: within stats.RELATIVE_ERROR (nan: the
    # series keeps no sketch: every one but corrected RTTs, stats.Tally)
    p95: float
    p99: float
    n: int = 0  # values in the series


@dataclass(slots=True)
class RunSummary:
    """What a run adds up to; built by stats.Tally.summary() from running sums, so it holds
    no per-reply values however long the run."""

    transmitted: int
    received: int  # distinct sequence numbers answered (duplicates excluded, as iputils)
    duplicates: int
    errors: int
    elapsed_ms: int  # first send to last activity, as iputils' "time Nms"
    rtt_raw: RttStats | None  # received, non-duplicate replies (None: none)
    rtt_corrected: RttStats | None  # the subset with kernel data
    egress_avg_ms: float | None  # over that subset
    ingress_avg_ms: float | None
    kernel_events_lost: int  # records the run's ring had no room for
    kernel_records: int = 0  # records and events read from the kernel (1 per answer)
    late_kernel_stamps: int = 0  # replies whose kernel data was refused as late: raw only
    corrupted: int = 0  # replies with a bad checksum (iputils' "+N corrupted")
    pipe: int = 0  # iputils' "pipe N" (shown when > 1)
    ipg_ewma_us: tuple[int, int] | None = None  # iputils' flood "ipg/ewma": µs, 8 x µs

    @property
    def loss_percent(self) -> float:
        if self.transmitted == 0:
            return 0.0
        return 100.0 * (self.transmitted - self.received) / self.transmitted

    @property
    def corrected_count(self) -> int:
        return self.rtt_corrected.n if self.rtt_corrected else 0

    @property
    def coverage(self) -> float:
        """Fraction of received replies that got a corrected RTT (1.0 when none received)."""
        if self.rtt_raw is None:
            return 1.0
        return self.corrected_count / self.rtt_raw.n


class ProbeRecord(NamedTuple):
    """One answered ping probe as the kernel correlated it (struct mace_probe_record):
    CLOCK_MONOTONIC times, 0 where the kernel did not see that point."""

    number: int  # the probe number its payload carries
    departed_ns: int  # the request's last departure from the host netns (outer device)
    returned_ns: int  # the reply's first arrival on that device after it
    delivered_ns: int  # the reply's arrival in the prober netns
    outer_netns: int
    outer_ifindex: int
    outer_dev: str
    # the hook that stamped returned_ns (Hook), -1 unknown: only a netif_rx stamp follows
    # the kernel's own receive stamp back to back (correlate.returned_late)
    returned_hook: int = -1

    @property
    def outer_label(self) -> str:
        return f"{self.outer_dev}@{self.outer_netns}"


# --- what a run hands to the output layer (output/ imports these, never a run loop) ---

def _new_tally() -> Tally:
    # stats.py builds on this module's records, so it is imported when a result is made,
    # not when this module is: the import graph stays one way (stats -> model).
    from mace_tools.stats import Tally

    return Tally()


@dataclass(slots=True)
class RunResult:
    """A ping run as it goes: its counts, and its replies as a running Tally (nothing per
    reply is kept, so a flood of hours stays small)."""

    nonce: bytes
    source_addr: str
    transmitted: int = 0
    errors: int = 0
    elapsed_ms: int = 0
    start_real_ns: int = 0
    kernel_events_lost: int = 0
    kernel_records: int = 0  # records and events read from the kernel (1 per answer)
    kernel: bool = True  # False when probes cannot carry nonce and number (size < 12)
    source: str = "local"  # of the kernel data: "local", "agent", or "none" (measured raw)
    tally: Tally = field(default_factory=_new_tally)
    pipesize: int = 0  # iputils' "pipe": most probes found in flight by an answer
    elapsed_us: int = 0  # first send to last send (iputils' "time" and ipg)
    ipg_ewma: bool = False  # the summary shows iputils' ipg/ewma (-f, -A, -i 0)


@dataclass(slots=True)
class HopReply:
    """One traceroute probe's outcome: a measurement with its annotation (" !H" ...), or a
    timeout (measurement None)."""

    ttl: int
    measurement: Measurement | None = None
    annotation: str = ""
    host_internal: bool = False  # answered from inside the container host (README)
    reached: bool = False
    ext: str = ""  # the answer's ICMP extensions as traceroute -e prints them (RFC 4884)
    mtu: int = 0  # --mtu: the MTU this probe was sent again for (traceroute's F=MTU)


@dataclass(slots=True)
class TraceResult:
    """A traceroute run: its hops' outcomes, in probe order, by TTL."""

    nonce: bytes
    source_addr: str
    start_real_ns: int = 0
    end_real_ns: int = 0
    hops: dict[int, list[HopReply]] = field(default_factory=dict)
    kernel_events_lost: int = 0
    source: str = "local"  # of the kernel data: "local", "agent", or "none" (measured raw)
