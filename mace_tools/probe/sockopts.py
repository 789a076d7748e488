"""The socket options of iputils ping's command line, set on a run's ICMP socket as
ping.c sets them, failing (or warning) in its words.

cli/ping_options.py parses the values; this module only applies them, in iputils' order
and with its policy: a refused -Q, -M, -b, -L or -t ends the run (exit 2), a refused -m is
a warning (ping goes on without the mark), and -d and -r are best effort (ping ignores
their errors, as SO_DEBUG needs CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

from mace_tools.errors import MaceError

SO_MARK = getattr(socket, "SO_MARK", 36)
FLOWLABEL_MASK = 0xFFFFF  # IPV6_FLOWINFO_FLOWLABEL: 20 bits
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = 23  # linux/in6.h; its IPV6_PMTUDISC_* values are IPv4's
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)
# the IP-level options by family: (level, TOS/traffic class, PMTU discovery, multicast
# loop, multicast TTL/hops, unicast TTL/hops), as ping.c and ping6_common.c set them
_LEVEL = {
    4: (socket.IPPROTO_IP, socket.IP_TOS, IP_MTU_DISCOVER, socket.IP_MULTICAST_LOOP,
        socket.IP_MULTICAST_TTL, socket.IP_TTL),
    6: (socket.IPPROTO_IPV6, IPV6_TCLASS, IPV6_MTU_DISCOVER, socket.IPV6_MULTICAST_LOOP,
        socket.IPV6_MULTICAST_HOPS, socket.IPV6_UNICAST_HOPS),
}
# IP_PMTUDISC_* (linux/in.h), by ping's -M words
PMTUDISC = {"dont": 0, "want": 1, "do": 2, "probe": 3}


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """ping's socket options other than -t and -I (None or False: not asked for)."""

    tos: int = 0  # -Q: 0 leaves IP_TOS alone, as iputils does
    mark: int | None = None  # -m: SO_MARK
    pmtudisc: int | None = None  # -M: IP_MTU_DISCOVER (PMTUDISC values)
    sndbuf: int | None = None  # -S: SO_SNDBUF
    debug: bool = False  # -d: SO_DEBUG
    dontroute: bool = False  # -r: SO_DONTROUTE (bypass the routing table)
    broadcast: bool = False  # -b: SO_BROADCAST
    noloop: bool = False  # -L: no IP_MULTICAST_LOOP


def _fail(what: str, exc: OSError) -> MaceError:
    return MaceError(f"{what}: {exc.strerror}")


def apply(sock: socket.socket, opts: SocketOptions, ttl: int | None,
          family: int = 4) -> list[str]:
    """Set opts and ttl (-t) on sock, an IPv4 or IPv6 (family 6: traffic class, hop
    limit) socket; the warnings ping would print (a mark the kernel refused). MaceError,
    worded as ping, for an option ping cannot do without."""
    level, tos, pmtudisc, mloop, mttl, uttl = _LEVEL[family]
    warnings: list[str] = []
    if opts.tos:
        _set(sock, level, tos, opts.tos, "setsockopt")
    if opts.pmtudisc is not None:
        _set(sock, level, pmtudisc, opts.pmtudisc,
             "IPV6_MTU_DISCOVER" if family == 6 else "IP_MTU_DISCOVER")
    if opts.sndbuf is not None:
        _set(sock, socket.SOL_SOCKET, socket.SO_SNDBUF, opts.sndbuf, "setsockopt")
    if opts.broadcast:
        _set(sock, socket.SOL_SOCKET, socket.SO_BROADCAST, 1, "cannot set broadcasting")
    if opts.noloop:
        _set(sock, level, mloop, 0, "cannot disable multicast loopback")
    if ttl is not None:
        _set(sock, level, mttl, ttl, "cannot set multicast time-to-live")
        _set(sock, level, uttl, ttl, "cannot set unicast time-to-live")
    for wanted, option in ((opts.debug, socket.SO_DEBUG), (opts.dontroute, socket.SO_DONTROUTE)):
        if wanted:
            with contextlib.suppress(OSError):  # as iputils: these two are best effort
                sock.setsockopt(socket.SOL_SOCKET, option, 1)
    if opts.mark is not None:
        warnings += _set_mark(sock, opts.mark)
    return warnings


def _set(sock: socket.socket, level: int, option: int, value: int, what: str) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise _fail(what, exc) from None


def _set_mark(sock: socket.socket, mark: int) -> list[str]:
    """-m: SO_MARK, or ping's warnings (the run goes on unmarked)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        lines = [f"WARNING: failed to set mark: {mark}: {exc.strerror}"]
        if exc.errno == errno.EPERM:
            lines.append("=> missing cap_net_admin+p or cap_net_raw+p (since Linux 5.17) "
                         "capability?")
        return lines
    return []


# linux/in6.h: the flow label manager
IPV6_FLOWLABEL_MGR, IPV6_FLOWINFO_SEND = 32, 33
IPV6_FL_A_GET, IPV6_FL_S_EXCL, IPV6_FL_F_CREATE = 0, 1, 1
# struct in6_flowlabel_req: dst, label (network order), action, share, then flags,
# expires, linger and pad in host order
_FLOWLABEL_REQ = struct.Struct("=16s4sBBHHHI")


def lease_flowlabel(sock: socket.socket, dst: tuple, label: int) -> tuple:
    """-F for IPv6, as iputils: lease the label for dst from the kernel's flow label
    manager (exclusive, created), have the socket send flow info, and return dst's
    sockaddr carrying it (what sendto() puts in the header). Failures in ping's words."""
    host, port, _flowinfo, scope = dst
    request = _FLOWLABEL_REQ.pack(socket.inet_pton(socket.AF_INET6, host),
                                  (label & FLOWLABEL_MASK).to_bytes(4, "big"),
                                  IPV6_FL_A_GET, IPV6_FL_S_EXCL,
                                  IPV6_FL_F_CREATE, 0, 0, 0)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FLOWLABEL_MGR, request)
    except OSError as exc:
        raise _fail("can't set flowlabel", exc) from None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FLOWINFO_SEND, 1)
    except OSError as exc:
        raise _fail("can't send flowinfo", exc) from None
    return host, port, label & FLOWLABEL_MASK, scope


def bind_to_device(sock: socket.socket, device: str) -> None:
    """-I NAME: SO_BINDTODEVICE, failing as ping does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    except OSError as exc:
        raise _fail(f"SO_BINDTODEVICE {device}", exc) from None
