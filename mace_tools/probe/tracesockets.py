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
"""

from __future__ import annotations

import errno
import socket
from typing import Protocol

from mace_tools.errors import MaceError
from mace_tools.probe.sockets import (
    IP_RECVERR,
    IP_RECVTTL,
    SO_TIMESTAMPNS,
    SOL_IP,
    NotPermitted,
    PingSocket,
    error_datagram,
    read_datagram,
    read_error,
)
from mace_tools.probe.trace import TAG_LEN

_UDP_HEADER = 8
_DROP_BATCH = 64
_NO_ROOM = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM)  # not a pending ICMP error


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
    """A raw socket of protocol proto; refused (NotPermitted) without CAP_NET_RAW."""

    def __init__(self, proto: int, ident: int = 0, sport: int = 0) -> None:
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        except PermissionError as exc:
            raise NotPermitted("raw sockets not permitted: run as root (or with "
                               "CAP_NET_RAW)", exit_code=1) from exc
        except OSError as exc:
            raise MaceError(f"socket: {exc.strerror}", exit_code=1) from exc
        self.ident, self.sport = ident, sport
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        """message: the whole L4 message (a trace.ProbeFactory probe's)."""
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        self.sock.sendto(message, (dst, 0))

    def recv(self) -> tuple[bytes, int] | None:
        return read_datagram(self.sock)

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
    port is free (else one the kernel picks: sport says which)."""

    def __init__(self, sport: int, ident: int = 0) -> None:
        self.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ident = ident
        self._sent = SentHeaders()
        try:
            sock.setsockopt(SOL_IP, IP_RECVERR, 1)
            sock.setsockopt(SOL_IP, IP_RECVTTL, 1)  # the error's TTL, as a raw socket reads
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._bind(sport)
        except OSError as exc:
            sock.close()
            raise MaceError(f"UDP socket: {exc.strerror}", exit_code=1) from exc
        self.sport = sock.getsockname()[1]
        sock.setblocking(False)

    def _bind(self, sport: int) -> None:
        try:
            self.sock.bind(("0.0.0.0", sport))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            self.sock.bind(("0.0.0.0", 0))

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
        address = (dst, int.from_bytes(message[2:4], "big"))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        payload = message[_UDP_HEADER:]
        try:
            self.sock.sendto(payload, socket.MSG_MORE, address)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
            # an earlier probe's ICMP error is also the socket's pending error, reported
            # once by this call, which sent nothing (as on a ping socket): send again
            self.sock.sendto(payload, socket.MSG_MORE, address)
        self.sock.sendto(b"", address)

    def recv(self) -> tuple[bytes, int] | None:
        """The next ICMP error about a probe, as a raw ICMP socket reads it; None when none
        waits. Datagrams sent to the port are read and dropped (a raw socket never passes
        them to the run either)."""
        while (got := read_error(self.sock)) is not None:
            header = self._sent.find(got.quoted, got.port)
            if header is not None:
                return error_datagram(got.error, bytes(4), got.target, header + got.quoted,
                                      socket.IPPROTO_UDP), got.at
        self._drop_datagrams()
        return None

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

    def __init__(self) -> None:
        self.ping = PingSocket()
        self.ident = self.ping.ident

    def fileno(self) -> int:
        return self.ping.fileno()

    def send(self, message: bytes, dst: str, ttl: int) -> None:
        self.ping.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        self.ping.send(message, (dst, 0))

    def recv(self) -> tuple[bytes, int] | None:
        return self.ping.recv()

    def close(self) -> None:
        self.ping.close()
