"""The ICMP socket the probes leave from and the replies come back to.

A raw IPPROTO_ICMP socket, as iputils uses when privileged: we write the whole ICMP
message (so the payload carries the run nonce at a fixed place) and read replies with
their kernel receive timestamp (SO_TIMESTAMPNS), which is what iputils' RTT ends at.
Datagrams are read with recvmsg() into a new bytes object, not with recvmsg_into() into a
preallocated buffer: measured on CPython 3.11, recvmsg_into() costs ~80-100 ns more per
call than the 64 KiB allocation it saves (malloc hands the same block back, and the
result is shrunk in place), and callers keep what they read (ParsedIcmp parses lazily),
so a view of a buffer that the next read overwrites would need a copy anyway.
"""

from __future__ import annotations

import socket
import struct
import time

from mace_tools.errors import MaceError
from mace_tools.probe import sockfilter

SOL_RAW = 255
ICMP_FILTER = 1
# ICMP types the socket passes up (as iputils): echo reply and the errors worth reporting.
_PASSED_TYPES = (0, 3, 4, 5, 11, 12)
_FILTER_MASK = ~sum(1 << t for t in _PASSED_TYPES) & 0xFFFFFFFF
# Python 3.11's socket module lacks these (asm-generic/socket.h; SO_ == SCM_ here).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESTAMPNS = struct.Struct("=qq")  # struct timespec, 64-bit
_ANCILLARY = socket.CMSG_SPACE(_TIMESTAMPNS.size)  # room for the one control message
MAX_DATAGRAM = 65535  # an IPv4 datagram's largest total length: never truncated
RECV_BUFFER = 1 << 20  # room for a flood's replies while we drain kernel events


def read_datagram(sock: socket.socket) -> tuple[bytes, int] | None:
    """One datagram from a non-blocking socket with SO_TIMESTAMPNS on, and its kernel
    receive time (CLOCK_REALTIME ns); None if none waits."""
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(MAX_DATAGRAM, _ANCILLARY)
    except BlockingIOError:
        return None
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(value) >= _TIMESTAMPNS.size:
            sec, nsec = _TIMESTAMPNS.unpack_from(value)
            return data, sec * 1_000_000_000 + nsec
    return data, time.clock_gettime_ns(time.CLOCK_REALTIME)


class IcmpSocket:
    """Raw ICMP socket, created in the current thread's network namespace."""

    def __init__(self, ttl: int | None = None, device: str | None = None,
                 source: str | None = None) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError as exc:
            raise MaceError("raw ICMP socket not permitted: run as root (or with CAP_NET_RAW)") \
                from exc
        self.sock = sock
        try:
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", _FILTER_MASK))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if ttl is not None:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            if device is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            if source is not None:
                sock.bind((source, 0))
        except OSError as exc:
            sock.close()
            what = f"interface '{device}'" if device else f"address '{source}'" if source else ""
            raise MaceError(f"cannot use {what or 'socket option'}: {exc.strerror}") from exc
        sock.setblocking(False)

    def filter_replies(self, nonce: bytes | None) -> None:
        """Have the kernel drop, before they are queued here, echo replies that do not
        carry this run's nonce and every ICMP type but echo reply and the quoting errors
        (module sockfilter). Pass None for a run whose probes are shorter than the nonce
        (size < 8): their replies do not carry it, so a nonce would drop them all; echo
        replies then pass on their type. A one-line MaceError if the kernel refuses: the
        caller may go on without it, since every datagram is still matched after recv()."""
        try:
            sockfilter.attach(self.sock, sockfilter.reply_filter(nonce))
        except OSError as exc:
            raise MaceError(f"cannot attach the reply filter: {exc.strerror}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes, dst: str) -> None:
        self.sock.sendto(message, (dst, 0))

    def recv(self) -> tuple[bytes, int] | None:
        return read_datagram(self.sock)

    def source_address(self) -> str:
        return self.sock.getsockname()[0]

    def close(self) -> None:
        self.sock.close()
