"""ICMP echo probes: build them with the run's nonce, parse what a raw socket returns.

Probe payload layout (a contract with bpf/mace.bpf.c and the lab's capture):
    bytes 0..7   the run nonce: the key the kernel side and the receiver match on
    bytes 8..    byte i = i & 0xff, counted from the payload start (iputils' fill)
No send time is carried (iputils puts a timeval there): the sender keeps its own clock
readings, and a constant payload lets probes come from a template with an incremental
checksum, so the clock is read right before sendto() and not before Python's packet work.
A payload shorter than 8 bytes carries a truncated nonce: the kernel side cannot match
it (no correction), and the receiver falls back on the ICMP id, as iputils does.
Parsing never raises: malformed, truncated or foreign packets give None or False.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NONCE_LEN = 8
ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
_ERRORS_WITH_QUOTE = (ICMP_DEST_UNREACH, 4, 5, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)
_HDR = struct.Struct("!BBHHH")
_FILL = bytes(i & 0xFF for i in range(65536))


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF


def build_echo_request(ident: int, seq: int, nonce: bytes, size: int) -> bytes:
    """ICMP echo request (header + size payload bytes) with a valid checksum."""
    payload = (nonce + _FILL[NONCE_LEN:size])[:size]
    csum = checksum(_HDR.pack(ICMP_ECHO, 0, 0, ident, seq) + payload)
    return _HDR.pack(ICMP_ECHO, 0, csum, ident, seq) + payload


class EchoTemplate:
    """One run's echo requests, differing only in seq: the checksum of the seq-0 message
    is computed once and the seq added in ones' complement (RFC 1624), which keeps the
    per-probe work between the clock reading and sendto() to a few hundred ns."""

    def __init__(self, ident: int, nonce: bytes, size: int) -> None:
        base = build_echo_request(ident, 0, nonce, size)
        self._sum = ~int.from_bytes(base[2:4], "big") & 0xFFFF  # ones' complement sum
        self._head = base[:2]
        self._ident = base[4:6]
        self._payload = base[8:]

    def message(self, seq: int) -> bytes:
        total = self._sum + seq
        total = (total & 0xFFFF) + (total >> 16)
        csum = ~total & 0xFFFF
        return b"".join((self._head, csum.to_bytes(2, "big"), self._ident,
                         seq.to_bytes(2, "big"), self._payload))


@dataclass(frozen=True, slots=True)
class ParsedIcmp:
    src: str
    dst: str
    ttl: int
    icmp_type: int
    code: int
    ident: int
    seq: int
    payload: bytes
    icmp_len: int  # ICMP header + payload: iputils' "N bytes from"
    checksum_ok: bool
    quoted: bytes = b""  # an ICMP error's quoted datagram (IP header + >= 8 bytes)


def parse_ip_icmp(datagram: bytes) -> ParsedIcmp | None:
    """An IPv4 datagram carrying ICMP, as a raw socket returns it; None if malformed."""
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        return None
    ihl = (datagram[0] & 0x0F) * 4
    total = int.from_bytes(datagram[2:4], "big")
    if ihl < 20 or datagram[9] != socket.IPPROTO_ICMP or len(datagram) < ihl + 8:
        return None
    if total >= ihl + 8:
        datagram = datagram[:total]  # ignore trailing bytes beyond the IP length
    icmp = datagram[ihl:]
    icmp_type, code, _csum, ident, seq = _HDR.unpack_from(icmp)
    quoted = icmp[8:] if icmp_type in _ERRORS_WITH_QUOTE else b""
    return ParsedIcmp(
        src=socket.inet_ntoa(datagram[12:16]), dst=socket.inet_ntoa(datagram[16:20]),
        ttl=datagram[8], icmp_type=icmp_type, code=code, ident=ident, seq=seq,
        payload=icmp[8:], icmp_len=len(icmp), checksum_ok=checksum(icmp) == 0, quoted=quoted,
    )


def is_our_reply(p: ParsedIcmp, nonce: bytes, ident: int, size: int = NONCE_LEN) -> bool:
    """An echo reply to one of this run's probes (of `size` payload bytes): keyed on the
    nonce, not the ICMP id, which NAT may rewrite. Only a run whose probes are too short for
    the nonce falls back on the id, and its replies must echo their whole payload: a reply
    cut short is never taken for one of a full-size run (a forger can guess the id)."""
    if p.icmp_type != ICMP_ECHOREPLY or not p.checksum_ok:
        return False
    if size >= NONCE_LEN:
        return p.payload[:NONCE_LEN] == nonce
    return p.ident == ident and p.payload == nonce[:size]
