"""The ICMP sockets the probes leave from and the replies come back to.

IcmpSocket: a raw IPPROTO_ICMP socket, as iputils uses when privileged: we write the whole
ICMP message (so the payload carries the run nonce at a fixed place) and read replies with
their kernel receive timestamp (SO_TIMESTAMPNS), which is what iputils' RTT ends at.
Datagrams are read with recvmsg() into a new bytes object, not with recvmsg_into() into a
preallocated buffer: measured on CPython 3.11, recvmsg_into() costs ~80-100 ns more per
call than the 64 KiB allocation it saves (malloc hands the same block back, and the
result is shrunk in place), and callers keep what they read (ParsedIcmp parses lazily),
so a view of a buffer that the next read overwrites would need a copy anyway.

PingSocket: without CAP_NET_RAW, an ICMP datagram ("ping") socket, where
net.ipv4.ping_group_range holds one of our groups (iputils ping does the same). The kernel
sets the ICMP id (the socket's "port": `ident`) and the checksum of what we send and keeps
our payload, so the nonce and probe number the eBPF side matches on leave unchanged. It
reads an echo reply without its IP header, and an ICMP error about a probe from the error
queue (IP_RECVERR): our own request as quoted, with a sock_extended_err beside it. recv()
hands both on as the IPv4 datagram a raw socket would have read (reply_datagram,
error_datagram), so a run has one parsing path for both sockets.

IPv6: Icmp6Socket and Ping6Socket are the same two sockets for ICMPv6. Neither reads an IP
header, so recv() hands each message on behind a fixed IPv6 header built from what the
kernel says (sender, hop limit): again one parsing path (probe/icmp.py) for all four.

open_icmp_socket() picks: raw where permitted, else a ping socket, else one clear line.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from mace_tools.errors import MaceError
from mace_tools.probe import sockfilter, sockopts
from mace_tools.probe.addresses import SockAddr, packed, sockaddr
from mace_tools.probe.icmp import (
    ERRORS6_WITH_QUOTE,
    ICMP6_ECHO_REPLY,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP_DEST_UNREACH,
    ICMP_PARAMETERPROB,
    checksum,
)
from mace_tools.probe.sockopts import SocketOptions

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

# ... and these (linux/in.h, linux/errqueue.h)
SOL_IP = 0
IP_RECVERR = 11
IP_RECVTTL = 12  # the reply's TTL, as an IP_TTL control message (an int)
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
_TTL = struct.Struct("=i")
# struct sock_extended_err, then the offender (struct sockaddr_in: family, port, address)
_EXTENDED_ERR = struct.Struct("=IBBBBII2x2x4s8x")
_PING_ANCILLARY = (_ANCILLARY + socket.CMSG_SPACE(_TTL.size)
                   + socket.CMSG_SPACE(_EXTENDED_ERR.size))
# ... and for IPv6 (linux/in6.h, linux/icmpv6.h)
IPPROTO_IPV6 = socket.IPPROTO_IPV6
IPV6_RECVERR = 25
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52  # the reply's hop limit, as a control message (an int)
ICMP6_FILTER = 1  # at level IPPROTO_ICMPV6: 256 bits, a set bit blocks its type
SO_EE_ORIGIN_ICMP6 = 3
FILTER6 = struct.pack("=8I", *(
    0xFFFFFFFF & ~sum(1 << (t & 31) for t in (ICMP6_ECHO_REPLY, *ERRORS6_WITH_QUOTE)
                      if t >> 5 == word) for word in range(8)))
# struct sock_extended_err, then the offender (struct sockaddr_in6: family, port,
# flowinfo, address, scope id)
_EXTENDED_ERR6 = struct.Struct("=IBBBBII2x2x4x16s4x")
_PING6_ANCILLARY = (_ANCILLARY + socket.CMSG_SPACE(_TTL.size)
                    + socket.CMSG_SPACE(_EXTENDED_ERR6.size))
_IPV6 = struct.Struct("!IHBB16s16s")
_NO_ROOM = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM)  # the run retries these itself
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ERROR_HEAD = struct.Struct("!BBHI")
ICMP_FRAG_NEEDED = 4  # a destination unreachable's code

NOT_PERMITTED = ("raw ICMP socket not permitted: run as root (or with CAP_NET_RAW, or in "
                 "a group of net.ipv4.ping_group_range for a ping socket)")


class NotPermitted(MaceError):
    """The kernel refused to create the socket at all (not one of its options)."""


def read_datagram(sock: socket.socket) -> tuple[bytes, int] | None:
    """One datagram from a non-blocking socket with SO_TIMESTAMPNS on, and its kernel
    receive time (CLOCK_REALTIME ns); None if none waits."""
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(MAX_DATAGRAM, _ANCILLARY)
    except BlockingIOError:
        return None
    return data, _receive_time(ancdata)


def _receive_time(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time among a datagram's control messages (CLOCK_REALTIME ns);
    now, if the kernel gave none."""
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(value) >= _TIMESTAMPNS.size:
            sec, nsec = _TIMESTAMPNS.unpack_from(value)
            return sec * 1_000_000_000 + nsec
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def _open(family: int, kind: int, proto: int, refused: str) -> socket.socket:
    try:
        return socket.socket(family, kind, proto)
    except PermissionError as exc:  # raw: EPERM; ping: EACCES (ping_group_range)
        raise NotPermitted(refused) from exc
    except OSError as exc:
        raise MaceError(f"socket: {exc.strerror}") from exc


class IcmpSocket:
    """Raw ICMP socket, created in the current thread's network namespace. PingSocket
    below is one too for the run (same methods), opened differently."""

    FAMILY = socket.AF_INET
    PROTO = socket.IPPROTO_ICMP
    KIND = socket.SOCK_RAW
    REFUSED = "raw ICMP socket not permitted: run as root (or with CAP_NET_RAW)"
    MAX_MESSAGE = MAX_DATAGRAM  # what one recvmsg() takes: never truncated

    def __init__(self, ttl: int | None = None, device: str | None = None,
                 source: str | None = None, extra: SocketOptions | None = None,
                 ident: int | None = None) -> None:
        """extra: ping's other socket options (-Q -M -m -S -b -L -d -r); what they
        warn about is kept in `warnings`. Failures are MaceErrors in ping's words.
        ident (ping -e): the id a ping socket binds to (a raw socket sends the caller's)."""
        self._wanted_ident = ident
        self.sock = sock = _open(self.FAMILY, self.KIND, self.PROTO, self.REFUSED)
        try:
            self._set_options()
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if device is not None:
                sockopts.bind_to_device(sock, device)
            self.warnings = sockopts.apply(sock, extra or SocketOptions(), ttl,
                                           family=6 if self.FAMILY == socket.AF_INET6 else 4)
            self._bind(source)
        except OSError as exc:  # bind(): -I ADDR not ours, or the ping socket's id taken
            sock.close()
            raise MaceError(f"bind: {exc.strerror}") from exc
        except MaceError:
            sock.close()
            raise
        sock.setblocking(False)

    def _set_options(self) -> None:
        """Only echo replies and the errors worth reporting are queued (as iputils)."""
        self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", _FILTER_MASK))

    def _bind(self, source: str | None) -> None:
        if source is not None:
            self.sock.bind(sockaddr(source))

    @property
    def ident(self) -> int | None:
        """The ICMP id the kernel puts in every request; None: a raw socket sends the
        caller's."""
        return None

    def filter_replies(self, nonce: bytes | None, ident: int | None = None) -> None:
        """Have the kernel drop, before they are queued here, echo replies that do not
        carry this run's nonce and every ICMP type but echo reply and the quoting errors
        (module sockfilter). Pass None for a run whose probes are shorter than the nonce
        (size < 8): their replies do not carry it, so a nonce would drop them all; echo
        replies then pass on their type. ident: echo replies with this ICMP id pass too
        (a reply that did not echo the payload is still ping's). A one-line MaceError if
        the kernel refuses: the caller may go on without it, since every datagram is
        still matched after recv()."""
        try:
            sockfilter.attach(self.sock, sockfilter.reply_filter(nonce, ident))
        except OSError as exc:
            raise MaceError(f"cannot attach the reply filter: {exc.strerror}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def connect(self, dst: SockAddr) -> None:
        """ping -C: connect() the socket to the target (its sockaddr), failing in ping's
        words."""
        try:
            self.sock.connect(dst)
        except OSError as exc:
            raise MaceError(f"connect failed: {exc.strerror}") from exc

    def send(self, message: bytes, dst: SockAddr) -> None:
        """dst: the target's sockaddr (addresses.sockaddr)."""
        self.sock.sendto(message, dst)

    def recv(self) -> tuple[bytes, int] | None:
        return read_datagram(self.sock)

    def source_address(self) -> str:
        return self.sock.getsockname()[0]

    def close(self) -> None:
        self.sock.close()


class PingSocket(IcmpSocket):
    """ICMP datagram socket (module docstring), set up as iputils ping sets one up:
    IP_RECVERR (ICMP errors about our requests), IP_RECVTTL (the reply's TTL),
    SO_TIMESTAMPNS, -t as IP_TTL, -I as SO_BINDTODEVICE or bind()."""

    KIND = socket.SOCK_DGRAM
    REFUSED = "ping socket not permitted: none of our groups is in net.ipv4.ping_group_range"

    def _set_options(self) -> None:
        self.sock.setsockopt(SOL_IP, IP_RECVERR, 1)
        self.sock.setsockopt(SOL_IP, IP_RECVTTL, 1)

    def _bind(self, source: str | None) -> None:
        # Bound now (port 0: the kernel picks a free id, as on the first sendto()), the
        # ident is known before any reply or error has to be matched on it.
        host = source or _ANY[self.FAMILY]
        self.sock.bind(sockaddr(host, self._wanted_ident or 0))
        address, self._ident, *_ = self.sock.getsockname()
        self._local = packed(address)  # the wildcard unless -I gave one

    @property
    def ident(self) -> int:
        return self._ident

    @property
    def local(self) -> bytes:
        """The packed address it is bound to (the wildcard unless a source was given)."""
        return self._local

    def filter_replies(self, nonce: bytes | None, ident: int | None = None) -> None:
        """Nothing to do: the kernel queues on a ping socket only echo replies whose id
        is its own (ping_rcv looks the socket up by it), and errors about its own
        requests, so no other run's replies reach it. (A filter would see the ICMP
        header at offset 0, not the raw socket's IP header: sockfilter's program would
        drop every reply here.)"""

    def send(self, message: bytes, dst: SockAddr) -> None:
        """The kernel sets the id and checksum; the payload leaves as given."""
        try:
            self.sock.sendto(message, dst)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
            # With IP_RECVERR each ICMP error is also the socket's pending error, which the
            # next call reports once: a sendto() then fails, sending nothing, while the
            # error waits in the error queue for recv(). Sent again, it goes; a real
            # failure (no route) fails again, and is raised.
            self.sock.sendto(message, dst)

    def recv(self) -> tuple[bytes, int] | None:
        """The next echo reply, else the next ICMP error, as the IPv4 datagram a raw
        socket reads, with the kernel's receive time; None when neither waits. The error
        queue is read when no reply waits: a batch of replies costs no extra call each."""
        try:
            icmp, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _PING6_ANCILLARY)
        except OSError:
            # none waits (EAGAIN), or the pending error of an ICMP error (see send)
            return self._recv_error()
        at, ttl, _ = _controls(ancdata)
        sender = packed(addr[0]) if addr else bytes(len(self._local))  # (kernel names it)
        return reply_datagram(icmp, sender, self._local, ttl), at

    def _recv_error(self) -> tuple[bytes, int] | None:
        """The next ICMP error about one of our requests (read_error), as a raw socket
        reads it."""
        if (got := read_error(self.sock)) is None:
            return None
        make = error_datagram6 if self.FAMILY == socket.AF_INET6 else error_datagram
        return make(got.error, self._local, got.target, got.quoted), got.at


class Icmp6Socket(IcmpSocket):
    """Raw ICMPv6 socket: as IcmpSocket, but the kernel writes the checksum (RFC 3542:
    always, for ICMPv6) and hands each message on without its IP header, the sender as
    the message's address and the hop limit as a control message (IPV6_RECVHOPLIMIT)."""

    FAMILY = socket.AF_INET6
    PROTO = socket.IPPROTO_ICMPV6
    REFUSED = "raw ICMPv6 socket not permitted: run as root (or with CAP_NET_RAW)"

    def _set_options(self) -> None:
        """Only echo replies and the errors that quote a probe are queued (as iputils)."""
        self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, FILTER6)
        self.sock.setsockopt(IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)

    def _bind(self, source: str | None) -> None:
        super()._bind(source)
        self._local = packed(self.sock.getsockname()[0])  # :: unless -I gave one

    def filter_replies(self, nonce: bytes | None, ident: int | None = None) -> None:
        """As IcmpSocket's, for ICMPv6: the filter sees the message from its ICMPv6
        header on (module sockfilter)."""
        try:
            sockfilter.attach(self.sock, sockfilter.reply_filter(nonce, ident, family=6))
        except OSError as exc:
            raise MaceError(f"cannot attach the reply filter: {exc.strerror}") from exc

    def recv(self) -> tuple[bytes, int] | None:
        return read_datagram6(self.sock, self._local)


class Ping6Socket(PingSocket):
    """ICMPv6 datagram socket, as iputils sets one up: IPV6_RECVERR, IPV6_RECVHOPLIMIT."""

    FAMILY = socket.AF_INET6
    PROTO = socket.IPPROTO_ICMPV6
    REFUSED = "ping socket not permitted: none of our groups is in net.ipv4.ping_group_range"

    def _set_options(self) -> None:
        self.sock.setsockopt(IPPROTO_IPV6, IPV6_RECVERR, 1)
        self.sock.setsockopt(IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)


def read_datagram6(sock: socket.socket, local: bytes,
                   nexthdr: int = socket.IPPROTO_ICMPV6) -> tuple[bytes, int] | None:
    """One message from a non-blocking raw IPv6 socket (SO_TIMESTAMPNS and
    IPV6_RECVHOPLIMIT on), which reads no IP header: behind a fixed IPv6 header from its
    sender to local (packed), with its hop limit; and its kernel receive time. None if
    none waits."""
    try:
        message, ancdata, _flags, addr = sock.recvmsg(MAX_DATAGRAM, _PING6_ANCILLARY)
    except BlockingIOError:
        return None
    at, hops, _ = _controls(ancdata)
    return ipv6_header(len(message), hops, packed(addr[0]), local, nexthdr) + message, at


_ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


class QueuedError(NamedTuple):
    """An ICMP error about one of our requests, as the error queue describes it."""

    icmp_type: int
    code: int
    info: int  # ee_info: a frag-needed's next-hop MTU, a parameter problem's pointer
    offender: bytes  # who sent it (packed IPv4 address)
    ttl: int  # its own TTL on arrival


class ErrorMessage(NamedTuple):
    """One message of a socket's error queue: an ICMP error and what it quoted of ours."""

    error: QueuedError
    quoted: bytes  # our datagram from its L4 message (ping) or payload (UDP) on, as quoted
    target: bytes  # the datagram's destination (packed)
    port: int  # ... and destination port (UDP; 0 on a ping socket)
    at: int  # kernel receive time of the error, CLOCK_REALTIME ns


def read_error(sock: socket.socket,
               on_local: Callable[[int, int], None] | None = None) -> ErrorMessage | None:
    """The next ICMP error in the error queue of a socket with IP_RECVERR (a ping or UDP
    socket), as reported by the router (or host) that sent it; None when the queue is
    empty. Errors of local origin are skipped (sendto() raised them), after on_local
    (errno, info) if given: a "message too long" carries the MTU that refused it."""
    while True:
        try:
            quoted, ancdata, _flags, addr = sock.recvmsg(
                MAX_DATAGRAM, _PING6_ANCILLARY, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: the queue is empty
            return None
        at, ttl, extended = _controls(ancdata)
        if extended is not None and extended[1] == SO_EE_ORIGIN_LOCAL and on_local:
            on_local(extended[0], extended[5])
        if extended is None or extended[1] not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            continue
        _errno, _origin, icmp_type, code, _pad, info, _data, offender = extended
        # the error queue names the datagram's destination as the message's address
        target, port = (packed(addr[0]), addr[1]) if addr else (bytes(4), 0)
        return ErrorMessage(QueuedError(icmp_type, code, info, offender, ttl), quoted,
                            target, port, at)


def _controls(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int, tuple | None]:
    """A ping socket message's kernel receive time (now if the kernel gave none), TTL (0
    if it gave none) and sock_extended_err fields (None on a reply): one pass, as it is
    done for every reply."""
    at, ttl, extended = 0, 0, None
    for level, kind, value in ancdata:
        if level == SOL_IP:
            if kind == socket.IP_TTL and len(value) >= _TTL.size:
                ttl = _TTL.unpack_from(value)[0]
            elif kind == IP_RECVERR and len(value) >= _EXTENDED_ERR.size:
                extended = _EXTENDED_ERR.unpack_from(value)
        elif level == IPPROTO_IPV6:
            if kind == IPV6_HOPLIMIT and len(value) >= _TTL.size:
                ttl = _TTL.unpack_from(value)[0]
            elif kind == IPV6_RECVERR and len(value) >= _EXTENDED_ERR6.size:
                extended = _EXTENDED_ERR6.unpack_from(value)
        elif kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET \
                and len(value) >= _TIMESTAMPNS.size:
            sec, nsec = _TIMESTAMPNS.unpack_from(value)
            at = sec * 1_000_000_000 + nsec
    return at or time.clock_gettime_ns(time.CLOCK_REALTIME), ttl, extended


def ipv4_header(length: int, ttl: int, src: bytes, dst: bytes,
                proto: int = socket.IPPROTO_ICMP) -> bytes:
    """The 20-byte header of an IPv4 datagram of `length` bytes carrying proto, with its
    checksum (the identification and fragment fields are 0: not ours to know)."""
    length = min(length, 0xFFFF)
    ttl &= 0xFF
    unsummed = _IPV4.pack(0x45, 0, length, 0, 0, ttl, proto, 0, src, dst)
    return _IPV4.pack(0x45, 0, length, 0, 0, ttl, proto, checksum(unsummed), src, dst)


def ipv6_header(payload_len: int, hop_limit: int, src: bytes, dst: bytes,
                nexthdr: int = socket.IPPROTO_ICMPV6) -> bytes:
    """The fixed 40-byte header of an IPv6 packet with payload_len bytes after it."""
    return _IPV6.pack(0x60000000, min(payload_len, 0xFFFF), nexthdr, hop_limit & 0xFF, src,
                      dst)


def reply_datagram(icmp: bytes, src: bytes, dst: bytes, ttl: int) -> bytes:
    """An ICMP message read from a ping socket (src: its sender, packed), as a raw socket
    would read it: behind an IPv4 header with the sender, the TTL and the total length
    (an IPv6 header for an ICMPv6 message, src and dst 16 bytes)."""
    if len(src) == 16:
        return ipv6_header(len(icmp), ttl, src, dst) + icmp
    return ipv4_header(20 + len(icmp), ttl, src, dst) + icmp


def error_datagram(error: QueuedError, local: bytes, target: bytes, request: bytes,
                   proto: int = socket.IPPROTO_ICMP) -> bytes:
    """An ICMP error read from an error queue (our request, as quoted: its L4 message of
    protocol proto), as a raw socket would read it: an IPv4 header from the offender,
    then an ICMP error of the error's type and code (its checksum correct) quoting an
    IPv4 header from `local` to the request's destination `target` and the request. The
    quoted header's TTL is 0 and its length the quote's: the error queue keeps neither."""
    quote = ipv4_header(20 + len(request), 0, local, target, proto) + request
    body = _ICMP_ERROR_HEAD.pack(error.icmp_type, error.code, 0, _rest_of_header(error)) \
        + quote
    body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    return ipv4_header(20 + len(body), error.ttl, error.offender, local) + body


def error_datagram6(error: QueuedError, local: bytes, target: bytes, request: bytes,
                    nexthdr: int = socket.IPPROTO_ICMPV6) -> bytes:
    """As error_datagram, for an ICMPv6 error about an IPv6 request: behind an IPv6 header
    from the offender, quoting an IPv6 header from `local` to `target` (hop limit 0), and
    the request. Its checksum is left 0: the kernel checked the real one (probe/icmp.py)."""
    quote = ipv6_header(len(request), 0, local, target, nexthdr) + request
    body = _ICMP_ERROR_HEAD.pack(error.icmp_type, error.code, 0, _rest_of_header6(error)) \
        + quote
    return ipv6_header(len(body), error.ttl, error.offender, local) + body


def _rest_of_header6(error: QueuedError) -> int:
    """An ICMPv6 error's second header word, from ee_info: the MTU or the pointer."""
    if error.icmp_type in (ICMP6_PACKET_TOO_BIG, ICMP6_PARAM_PROB):
        return error.info & 0xFFFFFFFF
    return 0


def _rest_of_header(error: QueuedError) -> int:
    """The ICMP header's second word as the error carried it, where ee_info keeps it."""
    if error.icmp_type == ICMP_DEST_UNREACH and error.code == ICMP_FRAG_NEEDED:
        return error.info & 0xFFFF  # next-hop MTU (RFC 1191)
    if error.icmp_type == ICMP_PARAMETERPROB:
        return (error.info & 0xFF) << 24  # the pointer
    return 0


def open_icmp_socket(ttl: int | None = None, device: str | None = None,
                     source: str | None = None, extra: SocketOptions | None = None,
                     ident: int | None = None, raw_only: bool = False, family: int = 4
                     ) -> IcmpSocket:
    """The run's ICMP (family 6: ICMPv6) socket in the current netns: raw where
    CAP_NET_RAW allows (it sends exactly our bytes), else a ping socket where
    net.ipv4.ping_group_range holds one of our groups (as iputils, for both families; not
    with raw_only: ping -e 0 needs a raw socket), else a one-line MaceError saying what
    would do."""
    raw, ping = (Icmp6Socket, Ping6Socket) if family == 6 else (IcmpSocket, PingSocket)
    try:
        return raw(ttl, device, source, extra, ident)
    except NotPermitted:
        if raw_only:  # (the raw socket's own words: a ping socket would not do)
            raise
    try:
        return ping(ttl, device, source, extra, ident)
    except NotPermitted:
        raise MaceError(NOT_PERMITTED) from None
