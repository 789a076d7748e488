"""ICMP echo probes: build them with the run's nonce, parse what a raw socket returns.

Probe payload layout v2 (a contract with bpf/mace.bpf.c and the lab's capture):
    bytes 0..7    the run nonce: the key the kernel side and the receiver match on
    bytes 8..11   the probe number, u32 in network byte order: the run's count of probes
                  sent (1, 2, 3, ...), not wrapped at 65536 as the ICMP seq (number & 0xffff)
                  is, so a late reply from an earlier lap of the seq is never taken for the
                  probe that reuses it (wraps at 2**32 only)
    bytes 12..    byte i = i & 0xff, counted from the payload start (iputils' fill); with
                  ping -p, byte i of the pattern repeated from the payload start
A payload of 8..11 bytes carries the nonce and fill, no number; one shorter than 8 bytes a
truncated nonce: the kernel side cannot match it (no correction), and the receiver falls
back on the ICMP id, as iputils does.
No send time is carried (iputils puts a timeval there): the sender keeps its own clock
readings, and an otherwise constant payload lets probes come from a template with an
incremental checksum, so the clock is read right before sendto() and not before Python's
packet work.
Parsing never raises: malformed, truncated or foreign packets give None or False. What a
foreign packet does not need (addresses, checksum, payload copies) is computed only when
asked for, so rejecting one costs a header unpack and a nonce compare.

IPv6 (ICMPv6 echo, types 128/129) uses the same payload and the same parsing path: a
socket hands every message on behind a fixed IPv6 header (probe/sockets.py builds it, as
an ICMPv6 socket reads no IP header), and parse_ip_icmp reads either version. The kernel
computes and checks ICMPv6 checksums itself on both kinds of socket (the pseudo-header
needs addresses only it knows for sure), so a v6 message that reaches us has a good one.
"""

from __future__ import annotations

import os
import socket
import struct

from mace_tools.probe.addresses import address_text

NONCE_LEN = 8
TAG_LEN = NONCE_LEN + 4  # nonce + probe number


def new_nonce() -> bytes:
    """A run's random probe nonce (never all zero: the kernel side reads zero as unset)."""
    while True:
        nonce = os.urandom(NONCE_LEN)
        if any(nonce):
            return nonce


ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
ERRORS_WITH_QUOTE = (ICMP_DEST_UNREACH, 4, 5, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)
_ERRORS_WITH_QUOTE = frozenset(ERRORS_WITH_QUOTE)
# ICMPv6 (RFC 4443): errors are types 1..4, each quoting as much of the packet as fits
ICMP6_DST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROB = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ERRORS6_WITH_QUOTE = (ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED,
                      ICMP6_PARAM_PROB)
_ERRORS6_WITH_QUOTE = frozenset(ERRORS6_WITH_QUOTE)
IPV6_HEADER = 40
_HDR = struct.Struct("!BBHHH")
_NUMBER = struct.Struct("!I")
_FILL = bytes(range(256)) * 256  # byte i = i & 0xff (a generator took 2 ms of start-up)


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum. The ones' complement sum of 16-bit words is the data,
    read as one big-endian number, modulo 0xffff (2**16 is 1 modulo 0xffff), except that a
    non-zero multiple of 0xffff sums to 0xffff, not 0: one C-speed reduction instead of a
    Python sum over the words."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # the odd byte is the high half of a last word padded with zero
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    return ~total & 0xFFFF


def fill_bytes(size: int, pattern: bytes | None = None) -> bytes:
    """size bytes of fill: byte i = i & 0xff, or pattern[i % len(pattern)] (ping -p)."""
    if not pattern:
        return _FILL[:size]
    return (pattern * (size // len(pattern) + 1))[:size]


def echo_payload(nonce: bytes, size: int, number: int = 0,
                 pattern: bytes | None = None) -> bytes:
    """The size-byte payload of probe `number` (layout v2 above)."""
    fill = fill_bytes(size, pattern)
    if size < TAG_LEN:
        return (nonce + fill[NONCE_LEN:size])[:size]
    return nonce + _NUMBER.pack(number & 0xFFFFFFFF) + fill[TAG_LEN:size]


def build_echo_request(ident: int, number: int, nonce: bytes, size: int,
                       pattern: bytes | None = None, echo_type: int = ICMP_ECHO) -> bytes:
    """ICMP echo request for probe `number` (seq number & 0xffff; a seq < 65536 is its own
    number), header + size payload bytes, with a valid checksum (for ICMPv6, echo_type
    128, the kernel writes the real one over it)."""
    seq = number & 0xFFFF
    payload = echo_payload(nonce, size, number, pattern)
    csum = checksum(_HDR.pack(echo_type, 0, 0, ident, seq) + payload)
    return _HDR.pack(echo_type, 0, csum, ident, seq) + payload


class EchoTemplate:
    """One run's echo requests, differing only in seq and number: the checksum of probe 0's
    message is computed once and the seq and the number's two 16-bit words added in ones'
    complement (RFC 1624), which keeps the per-probe work between the clock reading and
    sendto() to a few hundred ns (one struct pack)."""

    def __init__(self, ident: int, nonce: bytes, size: int, pattern: bytes | None = None,
                 family: int = 4) -> None:
        self._type = type_ = ICMP6_ECHO_REQUEST if family == 6 else ICMP_ECHO
        base = build_echo_request(ident, 0, nonce, size, pattern, type_)
        self._sum = ~int.from_bytes(base[2:4], "big") & 0xFFFF  # ones' complement sum
        self._ident = ident
        self._nonce = nonce
        self._numbered = size >= TAG_LEN
        tail = base[8 + TAG_LEN:] if self._numbered else base[8:]
        self._tail = tail
        fmt = f"!BBHHH{NONCE_LEN}sI{len(tail)}s" if self._numbered else f"!BBHHH{len(tail)}s"
        self._pack = struct.Struct(fmt).pack

    def message(self, number: int) -> bytes:
        """Probe `number`'s message (numbers past 2**32 - 1 wrap there)."""
        seq = number & 0xFFFF
        if not self._numbered:
            total = self._sum + seq
            total = (total & 0xFFFF) + (total >> 16)
            return self._pack(self._type, 0, ~total & 0xFFFF, self._ident, seq, self._tail)
        number &= 0xFFFFFFFF
        total = self._sum + seq + (number >> 16) + (number & 0xFFFF)
        total = (total & 0xFFFF) + (total >> 16)  # at most 0xFFFF + 3: folds twice
        total = (total & 0xFFFF) + (total >> 16)
        return self._pack(self._type, 0, ~total & 0xFFFF, self._ident, seq, self._nonce,
                          number, self._tail)


def reply_number(payload: bytes) -> int | None:
    """The probe number an echo reply's payload carries (layout v2), None if the payload is
    too short to carry one. Read it only once the nonce matched: on a foreign reply the
    bytes mean nothing."""
    if len(payload) < TAG_LEN:
        return None
    return _NUMBER.unpack_from(payload, NONCE_LEN)[0]


class ParsedIcmp:
    """An IPv4 datagram carrying ICMP. The header fields are decoded at once; addresses,
    payload, quote and checksum on first use, from the datagram kept as received (a
    foreign reply is rejected before any of them is needed)."""

    __slots__ = ("_data", "_end", "_icmp", "code", "icmp_len", "icmp_type", "ident", "seq",
                 "ttl")
    family = 4
    ECHO_REPLY = ICMP_ECHOREPLY  # this family's echo reply type
    _QUOTING = _ERRORS_WITH_QUOTE
    ttl: int
    icmp_type: int
    code: int
    ident: int
    seq: int
    icmp_len: int  # ICMP header + payload: iputils' "N bytes from"

    def __init__(self, data: bytes, icmp_at: int, end: int) -> None:
        """data[icmp_at:end] is the ICMP message, at least its 8-byte header."""
        self._data = data
        self._icmp = icmp_at
        self._end = end
        self.ttl = data[8]
        self.icmp_type, self.code, _csum, self.ident, self.seq = _HDR.unpack_from(data, icmp_at)
        self.icmp_len = end - icmp_at

    @property
    def src(self) -> str:
        return address_text(self._data[12:16])

    @property
    def dst(self) -> str:
        return address_text(self._data[16:20])

    @property
    def payload(self) -> bytes:
        return self._data[self._icmp + 8:self._end]

    @property
    def quoted(self) -> bytes:
        """An ICMP error's quoted datagram (IP header + >= 8 bytes); b"" for other types."""
        return self.payload if self.icmp_type in self._QUOTING else b""

    @property
    def info(self) -> int:
        """The second word of the ICMP header: an error's MTU or pointer (RFC 1191, 4443)."""
        return _NUMBER.unpack_from(self._data, self._icmp + 4)[0]

    @property
    def checksum_ok(self) -> bool:
        return checksum(self._data[self._icmp:self._end]) == 0

    @property
    def number(self) -> int | None:
        """The probe number of an echo reply's payload (reply_number)."""
        at = self._icmp + 8 + NONCE_LEN
        if self._end - at < 4:
            return None
        return _NUMBER.unpack_from(self._data, at)[0]

    def __repr__(self) -> str:
        return (f"ParsedIcmp(src={self.src!r}, dst={self.dst!r}, ttl={self.ttl}, "
                f"icmp_type={self.icmp_type}, code={self.code}, ident={self.ident}, "
                f"seq={self.seq}, icmp_len={self.icmp_len}, payload={self.payload!r})")


class ParsedIcmp6(ParsedIcmp):
    """An ICMPv6 message behind a fixed IPv6 header (no extension headers: the socket
    built it, module docstring)."""

    __slots__ = ()
    family = 6
    ECHO_REPLY = ICMP6_ECHO_REPLY
    _QUOTING = _ERRORS6_WITH_QUOTE

    def __init__(self, data: bytes, icmp_at: int, end: int) -> None:
        super().__init__(data, icmp_at, end)
        self.ttl = data[7]  # the hop limit

    @property
    def src(self) -> str:
        return address_text(self._data[8:24])

    @property
    def dst(self) -> str:
        return address_text(self._data[24:40])

    @property
    def checksum_ok(self) -> bool:
        return True  # checked by the kernel before any socket got it (module docstring)


def parse_ip_icmp(datagram: bytes) -> ParsedIcmp | None:
    """An IPv4 datagram carrying ICMP, as a raw socket returns it, or an IPv6 one carrying
    ICMPv6 as our sockets hand it on; None if malformed."""
    size = len(datagram)
    if size and datagram[0] >> 4 == 6:
        return _parse_ip6_icmp(datagram)
    if size < 20 or datagram[0] >> 4 != 4:
        return None
    ihl = (datagram[0] & 0x0F) * 4
    if ihl < 20 or datagram[9] != socket.IPPROTO_ICMP or size < ihl + 8:
        return None
    total = int.from_bytes(datagram[2:4], "big")
    end = total if ihl + 8 <= total < size else size  # ignore bytes beyond the IP length
    return ParsedIcmp(bytes(datagram), ihl, end)


def _parse_ip6_icmp(datagram: bytes) -> ParsedIcmp | None:
    size = len(datagram)
    if size < IPV6_HEADER + 8 or datagram[6] != socket.IPPROTO_ICMPV6:
        return None
    end = min(size, IPV6_HEADER + int.from_bytes(datagram[4:6], "big"))
    if end < IPV6_HEADER + 8:
        return None
    return ParsedIcmp6(bytes(datagram), IPV6_HEADER, end)


def is_our_reply(p: ParsedIcmp, nonce: bytes, ident: int, size: int = NONCE_LEN) -> bool:
    """An echo reply to one of this run's probes (of `size` payload bytes): keyed on the
    nonce, not the ICMP id, which NAT may rewrite. Only a run whose probes are too short for
    the nonce falls back on the id, and its replies must echo their whole payload: a reply
    cut short is never taken for one of a full-size run (a forger can guess the id).
    The nonce is compared first and the checksum verified only for a match: a foreign
    reply costs a compare, not a checksum."""
    if p.icmp_type != p.ECHO_REPLY:
        return False
    if size >= NONCE_LEN:
        if not p._data.startswith(nonce, p._icmp + 8, p._end):  # in place: no copy
            return False
    elif p.ident != ident or p.payload != nonce[:size]:
        return False
    return p.checksum_ok
