"""A Docker-like topology built entirely inside network namespaces this code creates.

    {p}-c0 .. {p}-cK-1         containers: eth0 198.18.1.(10+i)/24, default via 198.18.1.1
          | veth (vcI in host, on br0)
    {p}-host                   br0 198.18.1.1/24, ip_forward, MASQUERADE out of out0
          | veth out0 198.18.0.1/30 <-> tgt0 198.18.0.2/30
    {p}-target                 the "internet": answers every probe (icmp_ratelimit 0)

With routers=R > 0 the outer link leads through a routed path instead:
    {p}-host out0 198.18.0.1 -> {p}-r1 (198.18.0.2 / .5) -> ... -> {p}-rR -> {p}-target
each link a /30 (link k: 198.18.0.4k+1 <-> 198.18.0.4k+2), each router forwarding with
icmp_ratelimit 0 so that every hop answers every probe; the target is 198.18.0.(4R+2).

With ipv6=True the same lab is dual-stack, from 2001:2::/48 (RFC 5180, benchmarking):
containers 2001:2:0:1::(10+i)/64 behind br0 2001:2:0:1::1, NAT66 as Docker does it
(ip6tables MASQUERADE out of out0), the outer link 2001:2::1/126 <-> 2001:2::2/126 and
routed link k 2001:2::(4k+1) <-> 2001:2::(4k+2), /126 each. Without it IPv6 is off in
every lab namespace (no neighbour discovery or MLD traffic beside the probes).

Nothing in the root namespace is touched: every link is created inside (or moved into)
the lab's namespaces, and the names carry the prefix so parallel or leftover runs never
clash. Used by `mace-lab`, the tests and the bench.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Self

NETNS_DIR = Path("/run/netns")
TARGET_ADDR = "198.18.0.2"  # with no routers
HOST_OUTER_ADDR = "198.18.0.1"
BRIDGE_ADDR = "198.18.1.1"
CONTAINER_NET = "198.18.1.0/24"
BRIDGE_ADDR6 = "2001:2:0:1::1"
CONTAINER_NET6 = "2001:2:0:1::/64"
HOST_OUTER_ADDR6 = "2001:2::1"
OUTER_DEV = "out0"
MAX_CONTAINERS = 200


class LabError(Exception):
    """A lab step failed; the message is one line."""


@dataclass(frozen=True, slots=True)
class OuterLink:
    """The host's outer link, where the truth is captured: the outer device (near) and its
    peer (far), each in a netns (None: the caller's)."""

    near_netns: str | None
    near_dev: str
    far_netns: str | None
    far_dev: str


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{' '.join(args)}: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc


def ns_exec(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *args, check=check)


def lab_namespaces(prefix: str) -> list[str]:
    """Namespaces named {prefix}-*, ours by construction."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{prefix}-"))


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove every {prefix}-* namespace, killing what still runs inside first."""
    removed = []
    for ns in lab_namespaces(prefix):
        pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
        if pids:
            run("kill", "-KILL", *pids, check=False)
        run("ip", "netns", "delete", ns, check=False)
        removed.append(ns)
    return removed


def add_namespace(ns: str, ipv6: bool = False) -> None:
    """A new netns with lo up; IPv6 off unless asked for, and then without duplicate
    address detection (no address of a lab waits ~1 s as tentative: DAD is for shared
    links, and every link here is ours)."""
    run("ip", "netns", "add", ns)
    if not ipv6:
        ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    else:
        ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.default.accept_ra=0")
    run("ip", "-n", ns, "link", "set", "lo", "up")


class LabLifeCycle:
    """Life cycle of a lab of namespaces {prefix}-*: up() removes leftovers with this
    prefix (ours by name), adds namespaces() and wires them (_build); down() removes them
    all, also when building fails. A with-block does both."""

    prefix: str
    ipv6: bool = False

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the lab; leftovers with this prefix (ours by name) are removed first."""
        cleanup_prefix(self.prefix)
        try:
            for ns in self.namespaces():
                add_namespace(ns, self.ipv6)
            self._build()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        cleanup_prefix(self.prefix)

    def namespaces(self) -> list[str]:
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError


def link_addr(link: int, side: int) -> str:
    """Address of side 1 (towards the host) or 2 of routed link `link` (/30 each)."""
    return f"198.18.0.{4 * link + side}"


def link_addr6(link: int, side: int) -> str:
    """The IPv6 twin of link_addr (/126 each)."""
    return f"2001:2::{4 * link + side:x}"


@dataclass
class Lab(LabLifeCycle):
    prefix: str = "mace"
    containers: int = 1
    routers: int = 0
    ipv6: bool = False  # dual-stack (module docstring)

    def __post_init__(self) -> None:
        if not 0 <= self.routers <= 8:
            raise LabError("routers must be 0..8")
        if not 1 <= self.containers <= MAX_CONTAINERS:
            raise LabError(f"containers must be 1..{MAX_CONTAINERS}")
        if not self.prefix.replace("_", "").isalnum() or len(self.prefix) > 20:
            raise LabError("prefix must be alphanumeric (and _), at most 20 characters")

    # names and addresses -------------------------------------------------------------
    @property
    def host_ns(self) -> str:
        return f"{self.prefix}-host"

    @property
    def target_ns(self) -> str:
        return f"{self.prefix}-target"

    def container_ns(self, i: int) -> str:
        return f"{self.prefix}-c{i}"

    @staticmethod
    def container_addr(i: int) -> str:
        return f"198.18.1.{10 + i}"

    @staticmethod
    def container_addr6(i: int) -> str:
        return f"2001:2:0:1::{10 + i:x}"

    def router_ns(self, i: int) -> str:
        return f"{self.prefix}-r{i}"

    @staticmethod
    def netns_path(name: str) -> str:
        return str(NETNS_DIR / name)

    @property
    def target_addr(self) -> str:
        return link_addr(self.routers, 2)

    @property
    def target_addr6(self) -> str:
        return link_addr6(self.routers, 2)

    @property
    def hop_addrs(self) -> list[str]:
        """What a traceroute from a container shows: the bridge, each router, the target."""
        return [BRIDGE_ADDR, *(link_addr(i, 2) for i in range(self.routers)), self.target_addr]

    @property
    def hop_addrs6(self) -> list[str]:
        """hop_addrs over IPv6 (ipv6=True)."""
        return [BRIDGE_ADDR6, *(link_addr6(i, 2) for i in range(self.routers)),
                self.target_addr6]

    outer_dev = OUTER_DEV

    def on_host(self, *command: str) -> list[str]:
        """command run in the lab's host netns, where a container host's tools run: a tool
        that enters a container's netns from there knows the host's netns (its own)."""
        return ["ip", "netns", "exec", self.host_ns, *command]

    @property
    def outer_link(self) -> OuterLink:
        """out0 in the host netns and its peer: tgt0 in the target, or in0 in router 1."""
        if self.routers:
            return OuterLink(self.host_ns, OUTER_DEV, self.router_ns(1), "in0")
        return OuterLink(self.host_ns, OUTER_DEV, self.target_ns, "tgt0")

    # building (up, down and the with-block: LabLifeCycle) ----------------------------
    def namespaces(self) -> list[str]:
        return [self.host_ns, self.target_ns,
                *(self.router_ns(i) for i in range(1, self.routers + 1)),
                *map(self.container_ns, range(self.containers))]

    def _build(self) -> None:
        host, target = self.host_ns, self.target_ns
        routers = [self.router_ns(i) for i in range(1, self.routers + 1)]
        batch = [
            "link add br0 type bridge",
            f"addr add {BRIDGE_ADDR}/24 dev br0",
            "link set br0 up",
            f"link add {OUTER_DEV} type veth peer name "
            f"{'in0' if routers else 'tgt0'} netns {routers[0] if routers else target}",
            f"addr add {HOST_OUTER_ADDR}/30 dev {OUTER_DEV}",
            f"link set {OUTER_DEV} up",
        ]
        if routers:
            batch.append(f"route add default via {link_addr(0, 2)}")
        for i in range(self.containers):
            batch += [
                f"link add vc{i} type veth peer name eth0 netns {self.container_ns(i)}",
                f"link set vc{i} master br0",
                f"link set vc{i} up",
            ]
        if self.ipv6:
            batch += [f"addr add {BRIDGE_ADDR6}/64 dev br0 nodad",
                      f"addr add {HOST_OUTER_ADDR6}/126 dev {OUTER_DEV} nodad"]
            if routers:
                batch.append(f"route add default via {link_addr6(0, 2)}")
        self._batch(host, batch)
        self._build_routers(routers)
        last = self.routers
        self._batch(target, [f"addr add {link_addr(last, 2)}/30 dev tgt0", "link set tgt0 up",
                             *([f"route add default via {link_addr(last, 1)}"] if routers
                               else [])])
        if self.ipv6:
            self._batch(target, [f"addr add {link_addr6(last, 2)}/126 dev tgt0 nodad",
                                 *([f"route add default via {link_addr6(last, 1)}"]
                                   if routers else [])])
        for i in range(self.containers):
            v6 = [f"addr add {self.container_addr6(i)}/64 dev eth0 nodad",
                  f"route add default via {BRIDGE_ADDR6}"] if self.ipv6 else []
            self._batch(self.container_ns(i), [
                f"addr add {self.container_addr(i)}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {BRIDGE_ADDR}",
                *v6,
            ])
        ns_exec(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns_exec(target, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
        ns_exec(target, "sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=100000", check=False)
        ns_exec(host, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
        ns_exec(host, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", CONTAINER_NET,
                "-o", OUTER_DEV, "-j", "MASQUERADE")
        if self.ipv6:
            for ns in (host, *routers):
                ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            for ns in (host, target, *routers):
                ns_exec(ns, "sysctl", "-qw", "net.ipv6.icmp.ratelimit=0")
            ns_exec(host, "ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", CONTAINER_NET6,
                    "-o", OUTER_DEV, "-j", "MASQUERADE")

    def _build_routers(self, routers: list[str]) -> None:
        """Router i (1-based) joins link i-1 (in0, towards the host) and link i (out0)."""
        for i, ns in enumerate(routers, start=1):
            nxt = routers[i] if i < len(routers) else self.target_ns
            cmds = [f"addr add {link_addr(i - 1, 2)}/30 dev in0", "link set in0 up",
                    f"link add out0 type veth peer name {'in0' if i < len(routers) else 'tgt0'}"
                    f" netns {nxt}",
                    f"addr add {link_addr(i, 1)}/30 dev out0", "link set out0 up",
                    f"route add default via {link_addr(i - 1, 1)}"]
            cmds += [f"route add 198.18.0.{4 * j}/30 via {link_addr(i, 2)}"
                     for j in range(i + 1, self.routers + 1)]
            if self.ipv6:
                cmds += [f"addr add {link_addr6(i - 1, 2)}/126 dev in0 nodad",
                         f"addr add {link_addr6(i, 1)}/126 dev out0 nodad",
                         f"route add default via {link_addr6(i - 1, 1)}"]
                cmds += [f"route add {link_addr6(j, 0)}/126 via {link_addr6(i, 2)}"
                         for j in range(i + 1, self.routers + 1)]
            self._batch(ns, cmds)
            ns_exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns_exec(ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
            ns_exec(ns, "sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=100000", check=False)

    @staticmethod
    def _batch(ns: str, commands: list[str]) -> None:
        proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabError(f"ip -n {ns} -batch: {proc.stderr.strip().splitlines()[-1]}")

    def warm_up(self) -> None:
        """One ping from each container, so ARP and NAT state exist before measuring."""
        for i in range(self.containers):
            ns_exec(self.container_ns(i), "ping", "-c", "1", "-W", "1", "-q", self.target_addr)
            if self.ipv6:
                ns_exec(self.container_ns(i), "ping", "-c", "1", "-W", "1", "-q",
                        self.target_addr6)

    def status(self) -> dict[str, list[str]]:
        """Each lab namespace with its addresses (empty when the lab is down)."""
        out: dict[str, list[str]] = {}
        for ns in lab_namespaces(self.prefix):
            lines = run("ip", "-n", ns, "-o", "addr", "show", "scope", "global",
                        check=False).stdout
            out[ns] = [f"{f[1]} {f[3]}" for f in (ln.split() for ln in lines.splitlines())
                       if len(f) > 3 and f[1] != "lo"]
        return out
