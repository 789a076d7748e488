"""Lab topologies beyond one veth + bridge: where a container's probes take other paths.

Each lab is a few network namespaces named {prefix}-{role} (prefix: letters and digits,
ours by construction), addressed from 198.18.16.0/20 so it never collides with
topology.py's 198.18.0.x / 198.18.1.x or the container tests' 198.18.2.0/30, and removed by
down(), also when building fails. Like topology.Lab, every lab has a prober netns (the
container), a host netns (where a container host's tool runs, entering the container's
netns with --netns) and a target; `outer_link` is the link truth v2 is captured on.

    MacvlanLab  {p}-c: eth0, a macvlan (bridge mode) on the host's low0 -- 198.18.16.10/24
                {p}-host: low0, a veth and the macvlan's lower device (no address)
                {p}-target: tgt0 198.18.16.1/24, low0's peer: the "wire"
    NapiLab     {p}-c: eth0 198.18.17.10/24 -> {p}-host: br0 198.18.17.1/24, NAT out of nic0
                nic0 198.18.18.1/30, a tap with IFF_NAPI (and IFF_NAPI_FRAGS when frags):
                what arrives on it comes through NAPI/GRO, as from a NIC. A tapwire
                process joins it to wtap0 in {p}-wire, bridged there to the veth wv0 <->
                {p}-target: tgt0 198.18.18.2/30 (so the request's far-end arrival, the
                truth's other end, is a veth's: the reference the veth labs validated).
    VxlanLab    {p}-c: eth0 198.18.19.10/24 -> {p}-host: br0 198.18.19.1/24, NAT out of
                vxlan0 198.18.20.1/24 (VNI 42, UDP 4789) over und0 198.18.21.1/30
                -> {p}-b: und0 198.18.21.2/30, vxlan0 198.18.20.2/24, routes to
                out0 198.18.22.1/30 -> {p}-target: tgt0 198.18.22.2/30
    NestedLab   {p}-c: eth0 198.18.23.10/24 -> {p}-inner (a host in a container, as
                Docker-in-Docker or a KinD node): br0 198.18.23.1/24, NAT out of its eth0
                198.18.24.10/24 -> {p}-host (the outermost host): br0 198.18.24.1/24, NAT
                out of out0 198.18.25.1/30 -> {p}-target: tgt0 198.18.25.2/30

`measure` runs the real mace-ping (from the host with --netns, or inside the container)
while truth v2 is captured on the lab's outer link, and pairs each reply with its truth.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar

from mace_tools.lab.capture import (
    Capture,
    CapturedEcho,
    IcmpPacket,
    TruthCapture,
    icmp_packet,
    pair_echoes,
)
from mace_tools.lab.demo import PingRun, ProbeRow, parse_ndjson, probe_rows
from mace_tools.lab.topology import NETNS_DIR, LabError, LabLifeCycle, OuterLink, ns_exec, run

VXLAN_PORT = 4789
VXLAN_HEADERS = 20 + 8 + 8 + 14  # outer IPv4, UDP, VXLAN, inner Ethernet
WIRE_START_S = 5.0  # how long a tapwire may take to create its taps


@dataclass
class PathLab(LabLifeCycle):
    """Namespaces {prefix}-{role} for each role in `roles`; subclasses wire them up."""

    prefix: str
    roles: ClassVar[tuple[str, ...]] = ("c", "host", "target")
    target_addr: ClassVar[str]
    outer_dev: ClassVar[str]  # the host's outer device, in host_ns
    truth_is_icmp: ClassVar[bool] = True  # the outer link carries the probes as plain ICMP

    def __post_init__(self) -> None:
        if not self.prefix.isalnum() or len(self.prefix) > 20:
            raise LabError("prefix must be alphanumeric, at most 20 characters")

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def prober_ns(self) -> str:
        return self.ns("c")

    @property
    def host_ns(self) -> str:
        return self.ns("host")

    @property
    def outer_link(self) -> OuterLink:
        raise NotImplementedError

    @staticmethod
    def netns_path(name: str) -> str:
        return str(NETNS_DIR / name)

    def inode(self, role: str) -> int:
        return os.stat(self.netns_path(self.ns(role))).st_ino

    def on_host(self, *command: str) -> list[str]:
        """command run in the host netns, as a container host's tool runs."""
        return ["ip", "netns", "exec", self.host_ns, *command]

    # building (up, down and the with-block: LabLifeCycle) ----------------------------
    def namespaces(self) -> list[str]:
        return [self.ns(role) for role in self.roles]

    def warm_up(self) -> None:
        """One ping from the container, so ARP and NAT state exist before measuring."""
        ns_exec(self.prober_ns, "ping", "-c", "1", "-W", "2", "-q", self.target_addr)

    # helpers for _build --------------------------------------------------------------
    def batch(self, role: str, *commands: str) -> None:
        ns = self.ns(role)
        proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                              capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise LabError(f"ip -n {ns} -batch: {lines[-1] if lines else 'failed'}")

    def sysctl(self, role: str, *settings: str) -> None:
        for setting in settings:
            ns_exec(self.ns(role), "sysctl", "-qw", setting)

    def masquerade(self, role: str, source: str, out: str) -> None:
        ns_exec(self.ns(role), "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", source,
                "-o", out, "-j", "MASQUERADE")

    def container_behind_bridge(self, host: str, subnet: str, uplink: str) -> None:
        """{p}-c's eth0 at subnet.10/24 on host's br0 (subnet.1), NAT out of uplink."""
        self.batch(host, "link add br0 type bridge", f"addr add {subnet}.1/24 dev br0",
                   "link set br0 up", f"link add vc0 type veth peer name eth0 netns "
                   f"{self.prober_ns}", "link set vc0 master br0", "link set vc0 up")
        self.batch("c", f"addr add {subnet}.10/24 dev eth0", "link set eth0 up",
                   f"route add default via {subnet}.1")
        self.sysctl(host, "net.ipv4.ip_forward=1")
        self.masquerade(host, f"{subnet}.0/24", uplink)

    # truth ---------------------------------------------------------------------------
    def truth_filter(self, nonce: bytes) -> str:
        """tcpdump filter of one run's probes on the outer link."""
        return Capture.nonce_filter(nonce)

    def truth(self, capture: TruthCapture, nonce: bytes) -> dict[int, CapturedEcho]:
        return capture.echoes(nonce)


@dataclass
class MacvlanLab(PathLab):
    """A macvlan container (module doc): its frames leave through the host's low0."""

    target_addr: ClassVar[str] = "198.18.16.1"
    outer_dev: ClassVar[str] = "low0"

    @property
    def outer_link(self) -> OuterLink:
        return OuterLink(self.host_ns, "low0", self.ns("target"), "tgt0")

    def _build(self) -> None:
        self.batch("host", f"link add low0 type veth peer name tgt0 netns {self.ns('target')}",
                   "link set low0 up", "link add eth0 link low0 type macvlan mode bridge",
                   f"link set eth0 netns {self.prober_ns}")
        self.batch("target", f"addr add {self.target_addr}/24 dev tgt0", "link set tgt0 up")
        self.batch("c", "addr add 198.18.16.10/24 dev eth0", "link set eth0 up")

    def ipvlan_error(self) -> str | None:
        """Why an ipvlan on low0 cannot be made here (None: it can, and is removed again)."""
        proc = run("ip", "-n", self.host_ns, "link", "add", "ipv0", "link", "low0", "type",
                   "ipvlan", "mode", "l2", check=False)
        if proc.returncode == 0:
            run("ip", "-n", self.host_ns, "link", "del", "ipv0", check=False)
            return None
        return (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"


@dataclass
class NapiLab(PathLab):
    """The host's outer device is a tap receiving through NAPI/GRO (module doc). The wire
    between nic0 and the wire netns' tap is a tapwire process, bounded by wire_seconds."""

    frags: bool = False
    wire_seconds: float = 120.0
    roles: ClassVar[tuple[str, ...]] = ("c", "host", "wire", "target")
    target_addr: ClassVar[str] = "198.18.18.2"
    outer_dev: ClassVar[str] = "nic0"
    _wire: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)

    @property
    def outer_link(self) -> OuterLink:
        return OuterLink(self.host_ns, "nic0", self.ns("target"), "tgt0")

    def _build(self) -> None:
        self._start_wire()
        self.container_behind_bridge("host", "198.18.17", "nic0")
        self.batch("host", "addr add 198.18.18.1/30 dev nic0", "link set nic0 up")
        self.batch("wire", "link add br0 type bridge", "link set br0 up",
                   "link set wtap0 master br0", "link set wtap0 up",
                   f"link add wv0 type veth peer name tgt0 netns {self.ns('target')}",
                   "link set wv0 master br0", "link set wv0 up")
        self.batch("target", f"addr add {self.target_addr}/30 dev tgt0", "link set tgt0 up")

    def _start_wire(self) -> None:
        cmd = [sys.executable, "-m", "mace_tools.lab.tapwire", self.netns_path(self.host_ns),
               "nic0", self.netns_path(self.ns("wire")), "wtap0", "--seconds",
               str(self.wire_seconds), *(["--frags"] if self.frags else [])]
        # Run in the host netns, so that cleanup_prefix finds (and kills) it there.
        self._wire = subprocess.Popen(self.on_host(*cmd), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._wire.stdout is not None
        ready, _, _ = select.select([self._wire.stdout], [], [], WIRE_START_S)
        line = self._wire.stdout.readline().strip() if ready else ""
        if line != "ready":
            said = self._stop_wire().splitlines()
            raise LabError(f"tapwire did not start: {said[-1] if said else 'no answer'}")

    def _stop_wire(self) -> str:
        """Stop the wire (closing its stdin ends it) and return what it said on stderr."""
        wire, self._wire = self._wire, None
        if wire is None:
            return ""
        try:
            _, err = wire.communicate(input="", timeout=3)
        except subprocess.TimeoutExpired:
            wire.kill()
            _, err = wire.communicate()
        return err.strip()

    def down(self) -> None:
        try:
            self._stop_wire()
        finally:
            super().down()


@dataclass
class VxlanLab(PathLab):
    """A VXLAN overlay between two hosts (module doc); the host's outer device is the
    underlay's und0, where the probe travels inside UDP to port 4789."""

    roles: ClassVar[tuple[str, ...]] = ("c", "host", "b", "target")
    target_addr: ClassVar[str] = "198.18.22.2"
    outer_dev: ClassVar[str] = "und0"
    truth_is_icmp: ClassVar[bool] = False

    @property
    def outer_link(self) -> OuterLink:
        return OuterLink(self.host_ns, "und0", self.ns("b"), "und0")

    def _build(self) -> None:
        self.batch("host", f"link add und0 type veth peer name und0 netns {self.ns('b')}",
                   "addr add 198.18.21.1/30 dev und0", "link set und0 up",
                   "link add vxlan0 type vxlan id 42 local 198.18.21.1 remote 198.18.21.2 "
                   f"dstport {VXLAN_PORT} dev und0",
                   "addr add 198.18.20.1/24 dev vxlan0", "link set vxlan0 up",
                   "route add 198.18.22.0/30 via 198.18.20.2")
        self.batch("b", "addr add 198.18.21.2/30 dev und0", "link set und0 up",
                   "link add vxlan0 type vxlan id 42 local 198.18.21.2 remote 198.18.21.1 "
                   f"dstport {VXLAN_PORT} dev und0",
                   "addr add 198.18.20.2/24 dev vxlan0", "link set vxlan0 up",
                   f"link add out0 type veth peer name tgt0 netns {self.ns('target')}",
                   "addr add 198.18.22.1/30 dev out0", "link set out0 up")
        self.batch("target", f"addr add {self.target_addr}/30 dev tgt0", "link set tgt0 up",
                   "route add default via 198.18.22.1")
        self.sysctl("b", "net.ipv4.ip_forward=1")
        self.container_behind_bridge("host", "198.18.19", "vxlan0")

    def truth_filter(self, nonce: bytes) -> str:
        """The run's probes inside VXLAN: the inner ICMP payload starts 58 bytes into the
        UDP datagram (UDP 8, VXLAN 8, Ethernet 14, IPv4 20, ICMP 8)."""
        return (f"udp dst port {VXLAN_PORT} and udp[58:4] = 0x{nonce[:4].hex()} "
                f"and udp[62:4] = 0x{nonce[4:8].hex()}")

    def truth(self, capture: TruthCapture, nonce: bytes) -> dict[int, CapturedEcho]:
        """Truth v2 on the underlay: the encapsulated request's arrival at B's und0, the
        encapsulated reply's arrival on the host's und0, paired by the inner ICMP seq."""
        far, near = inner_icmp(capture.far.ip_packets), inner_icmp(capture.near.ip_packets)
        return pair_echoes(far, near, lambda p: p.payload[:8] == nonce)


def inner_icmp(packets: list[tuple[int, bytes]]) -> list[IcmpPacket]:
    """The ICMP packets inside VXLAN datagrams (outer IPv4 without options)."""
    found = []
    for ts, outer in packets:
        if len(outer) < VXLAN_HEADERS + 28 or outer[9] != 17 or outer[0] != 0x45:
            continue
        if struct.unpack_from("!H", outer, 22)[0] != VXLAN_PORT \
                or outer[VXLAN_HEADERS - 2:VXLAN_HEADERS] != b"\x08\x00":
            continue
        if (packet := icmp_packet(ts, outer[VXLAN_HEADERS:])) is not None:
            found.append(packet)
    return found


@dataclass
class NestedLab(PathLab):
    """A container inside a container host that is itself a container (module doc)."""

    roles: ClassVar[tuple[str, ...]] = ("c", "inner", "host", "target")
    target_addr: ClassVar[str] = "198.18.25.2"
    outer_dev: ClassVar[str] = "out0"

    @property
    def outer_link(self) -> OuterLink:
        return OuterLink(self.host_ns, "out0", self.ns("target"), "tgt0")

    @property
    def inner_link(self) -> OuterLink:
        """The inner host's outer link: its eth0 and the outer host's vi0."""
        return OuterLink(self.ns("inner"), "eth0", self.host_ns, "vi0")

    def _build(self) -> None:
        self.batch("host", "link add br0 type bridge", "addr add 198.18.24.1/24 dev br0",
                   "link set br0 up",
                   f"link add vi0 type veth peer name eth0 netns {self.ns('inner')}",
                   "link set vi0 master br0", "link set vi0 up",
                   f"link add out0 type veth peer name tgt0 netns {self.ns('target')}",
                   "addr add 198.18.25.1/30 dev out0", "link set out0 up")
        self.batch("target", f"addr add {self.target_addr}/30 dev tgt0", "link set tgt0 up")
        self.sysctl("host", "net.ipv4.ip_forward=1")
        self.masquerade("host", "198.18.24.0/24", "out0")
        self.batch("inner", "addr add 198.18.24.10/24 dev eth0", "link set eth0 up",
                   "route add default via 198.18.24.1")
        self.container_behind_bridge("inner", "198.18.23", "eth0")


# measuring ---------------------------------------------------------------------------
def ping_command(lab: PathLab, *args: str, inside: bool = False) -> list[str]:
    """mace-ping --ndjson against the lab's target: from the host with --netns into the
    container (so it knows the host's netns: its own), or run inside the container."""
    ping = [sys.executable, "-m", "mace_tools.cli.ping", "--ndjson"]
    if inside:
        return ["ip", "netns", "exec", lab.prober_ns, *ping, *args, lab.target_addr]
    return lab.on_host(*ping, "--netns", lab.netns_path(lab.prober_ns), *args,
                       lab.target_addr)


def run_ping(command: list[str], timeout_s: float = 120) -> PingRun:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode == 2:
        raise LabError(f"mace-ping failed: {proc.stderr.strip()}")
    records, summary = parse_ndjson(proc.stdout)
    return PingRun(records, summary, proc.returncode, proc.stderr)


@dataclass
class Measured:
    """One mace-ping run, its replies paired with their truth, and the truth's captures."""

    run: PingRun
    rows: list[ProbeRow]
    truth: TruthCapture

    def records(self) -> dict[int, dict]:
        """The run's distinct replies by seq."""
        return {r["seq"]: r for r in self.run.records
                if r.get("type") == "reply" and not r.get("dup")}


def measure(lab: PathLab, count: int, *args: str, inside: bool = False,
            link: OuterLink | None = None) -> Measured:
    """mace-ping -c count against truth v2 on `link` (default: the lab's outer link; any
    other link is captured with the plain ICMP filter)."""
    nonce = os.urandom(8)
    link = link or lab.outer_link
    on_outer = link == lab.outer_link
    bpf_filter = lab.truth_filter(nonce) if on_outer else Capture.nonce_filter(nonce)
    command = ping_command(lab, "-c", str(count), "--nonce", nonce.hex(), *args,
                           inside=inside)
    # the underlay truth of VXLAN is UDP, which Capture cannot count: wait its block out
    expect = count if lab.truth_is_icmp or not on_outer else None
    with TruthCapture(link, bpf_filter, expect_requests=expect) as cap:
        run = run_ping(command)
    truth = lab.truth(cap, nonce) if on_outer else cap.echoes(nonce)
    return Measured(run, probe_rows(run, truth), cap)
