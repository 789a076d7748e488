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

open_icmp_socket() picks: raw where permitted, else a ping socket, else one clear line.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import NamedTuple

from mace_tools.errors import MaceError
from mace_tools.probe import sockfilter, sockopts
from mace_tools.probe.icmp import ICMP_DEST_UNREACH, ICMP_PARAMETERPROB, checksum
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
SO_EE_ORIGIN_ICMP = 2
_TTL = struct.Struct("=i")
# struct sock_extended_err, then the offender (struct sockaddr_in: family, port, address)
_EXTENDED_ERR = struct.Struct("=IBBBBII2x2x4s8x")
_PING_ANCILLARY = (_ANCILLARY + socket.CMSG_SPACE(_TTL.size)
                   + socket.CMSG_SPACE(_EXTENDED_ERR.size))
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


def _open(kind: int, refused: str) -> socket.socket:
    try:
        return socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
    except PermissionError as exc:  # raw: EPERM; ping: EACCES (ping_group_range)
        raise NotPermitted(refused) from exc
    except OSError as exc:
        raise MaceError(f"socket: {exc.strerror}") from exc


class IcmpSocket:
    """Raw ICMP socket, created in the current thread's network namespace. PingSocket
    below is one too for the run (same methods), opened differently."""

    KIND = socket.SOCK_RAW
    REFUSED = "raw ICMP socket not permitted: run as root (or with CAP_NET_RAW)"

    def __init__(self, ttl: int | None = None, device: str | None = None,
                 source: str | None = None, extra: SocketOptions | None = None,
                 ident: int | None = None) -> None:
        """extra: ping's other socket options (-Q -M -m -S -b -L -d -r); what they
        warn about is kept in `warnings`. Failures are MaceErrors in ping's words.
        ident (ping -e): the id a ping socket binds to (a raw socket sends the caller's)."""
        self._wanted_ident = ident
        self.sock = sock = _open(self.KIND, self.REFUSED)
        try:
            self._set_options()
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            if device is not None:
                sockopts.bind_to_device(sock, device)
            self.warnings = sockopts.apply(sock, extra or SocketOptions(), ttl)
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
            self.sock.bind((source, 0))

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

    def connect(self, dst: str) -> None:
        """ping -C: connect() the socket to the target, failing in ping's words."""
        try:
            self.sock.connect((dst, 0))
        except OSError as exc:
            raise MaceError(f"connect failed: {exc.strerror}") from exc

    def send(self, message: bytes, dst: str) -> None:
        self.sock.sendto(message, (dst, 0))

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
        self.sock.bind((source or "0.0.0.0", self._wanted_ident or 0))
        address, self._ident = self.sock.getsockname()
        self._local = socket.inet_aton(address)  # 0.0.0.0 unless -I gave one

    @property
    def ident(self) -> int:
        return self._ident

    def filter_replies(self, nonce: bytes | None, ident: int | None = None) -> None:
        """Nothing to do: the kernel queues on a ping socket only echo replies whose id
        is its own (ping_rcv looks the socket up by it), and errors about its own
        requests, so no other run's replies reach it. (A filter would see the ICMP
        header at offset 0, not the raw socket's IP header: sockfilter's program would
        drop every reply here.)"""

    def send(self, message: bytes, dst: str) -> None:
        """The kernel sets the id and checksum; the payload leaves as given."""
        try:
            self.sock.sendto(message, (dst, 0))
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
            # With IP_RECVERR each ICMP error is also the socket's pending error, which the
            # next call reports once: a sendto() then fails, sending nothing, while the
            # error waits in the error queue for recv(). Sent again, it goes; a real
            # failure (no route) fails again, and is raised.
            self.sock.sendto(message, (dst, 0))

    def recv(self) -> tuple[bytes, int] | None:
        """The next echo reply, else the next ICMP error, as the IPv4 datagram a raw
        socket reads, with the kernel's receive time; None when neither waits. The error
        queue is read when no reply waits: a batch of replies costs no extra call each."""
        try:
            icmp, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _PING_ANCILLARY)
        except OSError:
            # none waits (EAGAIN), or the pending error of an ICMP error (see send)
            return self._recv_error()
        at, ttl, _ = _controls(ancdata)
        sender = socket.inet_aton(addr[0]) if addr else bytes(4)  # (the kernel names it)
        return reply_datagram(icmp, sender, self._local, ttl), at

    def _recv_error(self) -> tuple[bytes, int] | None:
        """The next ICMP error about one of our requests (read_error), as a raw socket
        reads it."""
        if (got := read_error(self.sock)) is None:
            return None
        return error_datagram(got.error, self._local, got.target, got.quoted), got.at


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


def read_error(sock: socket.socket) -> ErrorMessage | None:
    """The next ICMP error in the error queue of a socket with IP_RECVERR (a ping or UDP
    socket), as reported by the router (or host) that sent it; None when the queue is
    empty. Errors of local origin are skipped (sendto() raised them)."""
    while True:
        try:
            quoted, ancdata, _flags, addr = sock.recvmsg(
                MAX_DATAGRAM, _PING_ANCILLARY, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: the queue is empty
            return None
        at, ttl, extended = _controls(ancdata)
        if extended is None or extended[1] != SO_EE_ORIGIN_ICMP:
            continue
        _errno, _origin, icmp_type, code, _pad, info, _data, offender = extended
        # the error queue names the datagram's destination as the message's address
        target, port = (socket.inet_aton(addr[0]), addr[1]) if addr else (bytes(4), 0)
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


def reply_datagram(icmp: bytes, src: bytes, dst: bytes, ttl: int) -> bytes:
    """An ICMP message read from a ping socket (src: its sender, packed), as a raw socket
    would read it: behind an IPv4 header with the sender, the TTL and the total length."""
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


def _rest_of_header(error: QueuedError) -> int:
    """The ICMP header's second word as the error carried it, where ee_info keeps it."""
    if error.icmp_type == ICMP_DEST_UNREACH and error.code == ICMP_FRAG_NEEDED:
        return error.info & 0xFFFF  # next-hop MTU (RFC 1191)
    if error.icmp_type == ICMP_PARAMETERPROB:
        return (error.info & 0xFF) << 24  # the pointer
    return 0


def open_icmp_socket(ttl: int | None = None, device: str | None = None,
                     source: str | None = None, extra: SocketOptions | None = None,
                     ident: int | None = None, raw_only: bool = False
                     ) -> IcmpSocket | PingSocket:
    """The run's ICMP socket in the current netns: raw where CAP_NET_RAW allows (it
    sends exactly our bytes), else a ping socket where net.ipv4.ping_group_range holds
    one of our groups (as iputils; not with raw_only: ping -e 0 needs a raw socket), else
    a one-line MaceError saying what would do."""
    try:
        return IcmpSocket(ttl, device, source, extra, ident)
    except NotPermitted:
        if raw_only:  # (the raw socket's own words: a ping socket would not do)
            raise
    try:
        return PingSocket(ttl, device, source, extra, ident)
    except NotPermitted:
        raise MaceError(NOT_PERMITTED) from None
