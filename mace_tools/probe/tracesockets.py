"""The sockets a traceroute run sends its probes from and reads the answers on.

RawSocket: with CAP_NET_RAW, raw sockets: the probe leaves exactly as ProbeFactory built
it (L4 header included), and a raw ICMP socket reads every answer.

Without it, as Linux traceroute and tracepath do unprivileged:
- UdpSocket (-U): an ordinary UDP socket bound to the run's source port, IP_TTL per
  probe, ICMP errors about the probes read from its error queue (IP_RECVERR). The kernel
  builds the UDP header; the payload is ours, so the eBPF side matches the probe as ever.
- PingTraceSocket (-I): an ICMP datagram ("ping") socket (sockets.PingSocket), where
  net.ipv4.ping_group_range allows: echo replies as datagrams, errors from its error queue.
Each presents what it reads as the IPv4 datagram a raw ICMP socket would have read (as
PingSocket does for mace-ping), so a run has one parsing path (trace.parse_answer).

IPv6 (traceroute -6): the same sockets of family AF_INET6 (RawSocket(family=6): raw
IPPROTO_UDP/TCP/ICMPV6 sockets, the hop limit per probe as IPV6_UNICAST_HOPS; the answers
from a raw ICMPv6 socket with its ICMP6_FILTER; UdpSocket and PingTraceSocket with
IPV6_RECVERR). A raw IPv6 socket reads no IP header: every answer is handed on behind a
fixed IPv6 header (sockets.ipv6_header), so parse_answer has one path per family.

Every socket a run sends from is set up as traceroute's tune_socket() sets its own
(SocketOptions: -d, --fwmark, -i, -s, -F/--mtu, -t, -r), failing in its words. A probe the
kernel refuses as too long for the MTU (-F) raises MessageTooBig with that MTU, which the
kernel reports as a local error on the error queue (IP_RECVERR).
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from mace_tools.errors import MaceError
from mace_tools.probe.addresses import sockaddr
from mace_tools.probe.sockets import (
    FILTER6,
    ICMP6_FILTER,
    IP_RECVERR,
    IP_RECVTTL,
    IPPROTO_IPV6,
    IPV6_RECVERR,
    IPV6_RECVHOPLIMIT,
    SO_TIMESTAMPNS,
    SOL_IP,
    ErrorMessage,
    NotPermitted,
    Ping6Socket,
    PingSocket,
    error_datagram,
    error_datagram6,
    read_datagram,
    read_datagram6,
    read_error,
)
from mace_tools.probe.trace import TAG_LEN

_UDP_HEADER = 8
_DROP_BATCH = 64
_NO_ROOM = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM)  # not a pending ICMP error
# linux/in.h and asm-generic/socket.h values Python 3.11's socket module lacks
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT, IP_PMTUDISC_DO, IP_PMTUDISC_PROBE = 0, 2, 3
SO_MARK = getattr(socket, "SO_MARK", 36)
IPV6_MTU_DISCOVER = 23  # (linux/in6.h: the IPV6_PMTUDISC_ values are IPv4's)
IPV6_DONTFRAG = 62
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def _is6(sock: socket.socket) -> bool:
    return sock.family == socket.AF_INET6


def set_hops(sock: socket.socket, ttl: int) -> None:
    """The TTL (IPv4) or hop limit (IPv6) of what sock sends next."""
    if _is6(sock):
        sock.setsockopt(IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


def set_recverr(sock: socket.socket, on: bool) -> None:
    """IP_RECVERR, or IPV6_RECVERR on an IPv6 socket."""
    if _is6(sock):
        sock.setsockopt(IPPROTO_IPV6, IPV6_RECVERR, int(on))
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, int(on))


class MessageTooBig(Exception):
    """sendto() refused the probe (EMSGSIZE, -F): mtu is what the kernel said fits (0:
    it did not say)."""

    def __init__(self, mtu: int) -> None:
        super().__init__(f"message too long (mtu {mtu})")
        self.mtu = mtu


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """What traceroute sets on each socket it sends from (tune_socket): SO_DEBUG (-d),
    SO_MARK (--fwmark), SO_BINDTODEVICE (-i), the source address (-s), IP_MTU_DISCOVER
    (probe with DF set for -F and --mtu, else never DF), IP_TOS (-t), SO_DONTROUTE (-r)."""

    device: str | None = None
    source: str | None = None
    tos: int = 0
    dontfrag: bool = False
    debug: bool = False
    dontroute: bool = False
    fwmark: int = 0


def _setsockopt(sock: socket.socket, level: int, name: int, value: int | bytes,
                what: str) -> None:
    try:
        sock.setsockopt(level, name, value)
    except OSError as exc:  # traceroute's error(): perror and exit 1
        raise MaceError(f"setsockopt {what}: {exc.strerror}", exit_code=1) from exc


def tune(sock: socket.socket, opts: SocketOptions, port: int = 0, *,
         any_port: bool = False) -> None:
    """Set sock up as traceroute's tune_socket() does, in its order and its words; bound
    to opts.source (or any address) and port (any_port: or, where it is taken, to one
    the kernel picks)."""
    tune_socket_level(sock, opts)
    _bind(sock, opts.source or _ANY[sock.family], port, any_port)
    tune_ip(sock, opts)


def tune_socket_level(sock: socket.socket, opts: SocketOptions) -> None:
    """The part of tune() before bind(): SO_DEBUG (-d), SO_MARK (--fwmark), the device
    (-i)."""
    if opts.debug:
        _setsockopt(sock, socket.SOL_SOCKET, socket.SO_DEBUG, 1, "SO_DEBUG")
    if opts.fwmark:
        _setsockopt(sock, socket.SOL_SOCKET, SO_MARK, opts.fwmark, "SO_MARK")
    if opts.device is not None:
        _setsockopt(sock, socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                    opts.device.encode() + b"\0", "SO_BINDTODEVICE")


def tune_ip(sock: socket.socket, opts: SocketOptions) -> None:
    """The IP-level part of tune(): DF (-F, --mtu), TOS (-t), SO_DONTROUTE (-r)."""
    if _is6(sock):
        _tune_ipv6(sock, opts)
        return
    mode = IP_PMTUDISC_PROBE if opts.dontfrag else IP_PMTUDISC_DONT
    try:
        sock.setsockopt(SOL_IP, IP_MTU_DISCOVER, mode)
    except OSError:  # a kernel before 2.6.22 has no PROBE: DO, as traceroute falls back
        _setsockopt(sock, SOL_IP, IP_MTU_DISCOVER,
                    IP_PMTUDISC_DO if opts.dontfrag else mode, "IP_MTU_DISCOVER")
    if opts.tos:
        _setsockopt(sock, SOL_IP, socket.IP_TOS, opts.tos, "IP_TOS")
    if opts.dontroute:
        _setsockopt(sock, socket.SOL_SOCKET, socket.SO_DONTROUTE, 1, "SO_DONTROUTE")


def _tune_ipv6(sock: socket.socket, opts: SocketOptions) -> None:
    """tune_ip for IPv6: no fragmenting at the source for -F/--mtu (IPV6_DONTFRAG: the
    kernel refuses a probe over the MTU, as IPv4's DF), the traffic class for -t."""
    mode = IP_PMTUDISC_PROBE if opts.dontfrag else IP_PMTUDISC_DONT
    _setsockopt(sock, IPPROTO_IPV6, IPV6_MTU_DISCOVER, mode, "IPV6_MTU_DISCOVER")
    if opts.dontfrag:
        _setsockopt(sock, IPPROTO_IPV6, IPV6_DONTFRAG, 1, "IPV6_DONTFRAG")
    if opts.tos:
        _setsockopt(sock, IPPROTO_IPV6, socket.IPV6_TCLASS, opts.tos, "IPV6_TCLASS")
    if opts.dontroute:
        _setsockopt(sock, socket.SOL_SOCKET, socket.SO_DONTROUTE, 1, "SO_DONTROUTE")


def _bind(sock: socket.socket, address: str, port: int, any_port: bool) -> None:
    try:
        sock.bind(sockaddr(address, port))
    except OSError as exc:
        if any_port and port and exc.errno == errno.EADDRINUSE:
            _bind(sock, address, 0, False)
            return
        raise MaceError(f"bind: {exc.strerror}", exit_code=1) from exc


def _local_mtu(sock: socket.socket, keep: deque[ErrorMessage] | None = None) -> int:
    """The MTU of the local "message too long" error a refused sendto() queued (0: none
    found). ICMP errors read past on the way go to keep (a socket whose only source of
    them is its error queue), or are dropped (a raw socket reads them as datagrams)."""
    found: list[int] = []

    def local(err: int, info: int) -> None:
        if err == errno.EMSGSIZE:
            found.append(info)

    while (got := read_error(sock, local)) is not None:
        if keep is not None:
            keep.append(got)
    return found[-1] if found else 0


class TraceSocket(Protocol):
    """What a trace run needs of a socket. ident: the ICMP id its echo requests carry;
    sport: the source port of its UDP and TCP probes."""

    ident: int
    sport: int

    def fileno(self) -> int: ...
    def send(self, message: bytes, dst: str, ttl: int) -> None: ...
    def recv(self) -> tuple[bytes, int] | None: ...
    def close(self) -> None: ...


class RawSocket:
    """A raw socket of protocol proto and family 4 or 6; refused (NotPermitted) without
    CAP_NET_RAW. opts: as traceroute tunes its sockets (SocketOptions)."""

    def __init__(self, proto: int, ident: int = 0, sport: int = 0,
                 opts: SocketOptions | None = None, family: int = 4) -> None:
        try:
            self.sock = socket.socket(FAMILIES[family], socket.SOCK_RAW, proto)
        except PermissionError as exc:
            raise NotPermitted("raw sockets not permitted: run as root (or with "
                               "CAP_NET_RAW)", exit_code=1) from exc
        except OSError as exc:
            raise MaceError(f"socket: {exc.strerror}", exit_code=1) from exc
        self.ident, self.sport, self.proto = ident, sport, proto
        self.dontfrag = opts is not None and opts.dontfrag
        try:
            if opts is not None:
                tune(self.sock, opts)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if family == 6:
                self._set_options6(proto)
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _set_options6(self, proto: int) -> None:
        """What an IPv6 raw socket needs to read answers as the IPv4 one does: the hop
        limit of each (IPV6_RECVHOPLIMIT); on an ICMPv6 socket, only echo replies and the
        errors quoting a probe (ICMP6_FILTER)."""
        self.sock.setsockopt(IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        if proto == socket.IPPROTO_ICMPV6:
            self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, FILTER6)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        """message: the whole L4 message (a trace.ProbeFactory probe's). With DF (-F), a
        probe longer than the device's MTU raises MessageTooBig: IP_RECVERR is on only
        while it is sent, so that the kernel queues the local error that says the MTU (a
        raw socket reads the ICMP errors as datagrams: its error queue is not needed)."""
        set_hops(self.sock, ttl)
        address = sockaddr(dst)
        if not self.dontfrag:
            self.sock.sendto(message, address)
            return
        set_recverr(self.sock, True)
        try:
            self.sock.sendto(message, address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            raise MessageTooBig(_local_mtu(self.sock)) from exc
        finally:
            set_recverr(self.sock, False)  # and the queue is purged

    def recv(self) -> tuple[bytes, int] | None:
        """The next datagram, None when none waits. An ICMP error about a probe that
        left with DF (or while IP_RECVERR was on) is also the socket's pending error,
        which one read reports instead of a datagram: that read is passed over (the
        raw ICMP socket has the error itself)."""
        for _ in range(2):
            try:
                if _is6(self.sock):  # (no IP header read: one is put in front)
                    return read_datagram6(self.sock, bytes(16), self.proto)
                return read_datagram(self.sock)
            except OSError:
                continue
        return None

    def close(self) -> None:
        self.sock.close()


class SentHeaders:
    """The UDP header of every probe a UdpSocket sent. The kernel built them, and the
    error queue gives back only the payload the router quoted; the answer's quote is
    rebuilt with the header found again by the payload's tag (nonce + probe number), or,
    where the router quoted less of the payload, by the destination port where only one
    probe went to it (classic mode; --paris sends all to one port: such an answer is
    not matched, and the probe times out)."""

    def __init__(self) -> None:
        self._by_tag: dict[bytes, bytes] = {}
        self._by_port: dict[int, bytes | None] = {}  # None: several probes went there

    def add(self, message: bytes) -> None:
        header = message[:_UDP_HEADER]
        self._by_tag[message[_UDP_HEADER:_UDP_HEADER + TAG_LEN]] = header
        port = int.from_bytes(header[2:4], "big")
        self._by_port[port] = None if port in self._by_port else header

    def find(self, payload: bytes, port: int) -> bytes | None:
        if len(payload) >= TAG_LEN:
            return self._by_tag.get(payload[:TAG_LEN])
        return self._by_port.get(port)


class UdpSocket:
    """A UDP socket for the run's probes (module docstring), bound to sport where that
    port is free (else one the kernel picks: sport says which), or failing as
    traceroute's bind() where the port was asked for (--sport: fixed)."""

    def __init__(self, sport: int, ident: int = 0, opts: SocketOptions | None = None,
                 fixed: bool = False, family: int = 4) -> None:
        self.sock = sock = socket.socket(FAMILIES[family], socket.SOCK_DGRAM)
        self.ident = ident
        self._sent = SentHeaders()
        self._pending: deque[ErrorMessage] = deque()  # read while looking for an MTU
        try:
            set_recverr(sock, True)
            # the error's TTL (hop limit), as a raw socket reads
            if family == 6:
                sock.setsockopt(IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_RECVTTL, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            tune(sock, opts or SocketOptions(), sport, any_port=not fixed)
        except OSError as exc:
            sock.close()
            raise MaceError(f"UDP socket: {exc.strerror}", exit_code=1) from exc
        except BaseException:
            sock.close()
            raise
        self.sport = sock.getsockname()[1]
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        """A UDP probe (header and payload, as trace.ProbeFactory builds it) as the raw
        path sends it: its payload to its destination port, from the same source port.
        The kernel's checksum over the same bytes is then ours (--paris: the probe's
        identifier), provided it computes it in full: it would leave it to a device that
        offloads checksums (veth, lo), sending the pseudo-header's sum, the same for
        every probe of one flow. MSG_MORE, then an empty send that pushes the datagram,
        makes it compute the sum itself (a corked datagram is never offloaded)."""
        self._sent.add(message)
        address = sockaddr(dst, int.from_bytes(message[2:4], "big"))
        set_hops(self.sock, ttl)
        payload = message[_UDP_HEADER:]
        try:
            try:
                self.sock.sendto(payload, socket.MSG_MORE, address)
            except OSError as exc:
                if exc.errno in _NO_ROOM:
                    raise
                # an earlier probe's ICMP error is also the socket's pending error, reported
                # once by this call, which sent nothing (as on a ping socket): send again
                self.sock.sendto(payload, socket.MSG_MORE, address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            raise MessageTooBig(_local_mtu(self.sock, self._pending)) from exc
        self.sock.sendto(b"", address)

    def recv(self) -> tuple[bytes, int] | None:
        """The next ICMP error about a probe, as a raw ICMP socket reads it; None when none
        waits. Datagrams sent to the port are read and dropped (a raw socket never passes
        them to the run either)."""
        while (got := self._next_error()) is not None:
            header = self._sent.find(got.quoted, got.port)
            if header is None:
                continue
            if _is6(self.sock):
                return error_datagram6(got.error, bytes(16), got.target, header + got.quoted,
                                       socket.IPPROTO_UDP), got.at
            return error_datagram(got.error, bytes(4), got.target, header + got.quoted,
                                  socket.IPPROTO_UDP), got.at
        self._drop_datagrams()
        return None

    def _next_error(self) -> ErrorMessage | None:
        return self._pending.popleft() if self._pending else read_error(self.sock)

    def _drop_datagrams(self) -> None:
        """At most a batch per call: a flood to the port cannot hold the run here (epoll
        reports the rest)."""
        for _ in range(_DROP_BATCH):
            try:
                self.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                continue  # the pending error of a queued ICMP error, reported once

    def close(self) -> None:
        self.sock.close()


class PingTraceSocket:
    """A ping socket (sockets.PingSocket) for -I. The kernel sets the ICMP id of what it
    sends (its own, ident) and the checksum: the probes must be built with that id, so
    the checksum the kernel computes is the probe's (and --paris keeps it constant)."""

    sport = 0

    def __init__(self, opts: SocketOptions | None = None, family: int = 4) -> None:
        opts = opts or SocketOptions()
        kind = Ping6Socket if family == 6 else PingSocket
        self.ping = kind(source=opts.source)  # bound now: the kernel picks the id
        self.ident = self.ping.ident
        self._pending: deque[ErrorMessage] = deque()  # read while looking for an MTU
        try:
            # bound already (to -s): the device is set after, which a datagram socket takes
            tune_socket_level(self.ping.sock, opts)
            tune_ip(self.ping.sock, opts)
        except BaseException:
            self.ping.close()
            raise

    def fileno(self) -> int:
        return self.ping.fileno()

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        set_hops(self.ping.sock, ttl)
        try:
            self.ping.send(message, sockaddr(dst))
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            raise MessageTooBig(_local_mtu(self.ping.sock, self._pending)) from exc

    def recv(self) -> tuple[bytes, int] | None:
        if self._pending:
            got = self._pending.popleft()
            make = error_datagram6 if _is6(self.ping.sock) else error_datagram
            return make(got.error, self.ping.local, got.target, got.quoted), got.at
        return self.ping.recv()

    def close(self) -> None:
        self.ping.close()
