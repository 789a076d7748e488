"""ICMP extensions (RFC 4884) of a traceroute answer, as `traceroute -e` prints them.

A time exceeded, destination unreachable or parameter problem may carry an extension
structure after the datagram it quotes: version 2, a checksum, then objects (length,
class, type, data in 32-bit words). MPLS label stacks (RFC 4950: class 1, type 1) are
shown parsed, `MPLS:L=label,E=exp,S=bottom-of-stack,T=ttl` (entries joined by `/`);
other objects as `CLASS/TYPE:` and their words in hex, comma-separated; objects are
joined by `;`. This is traceroute's extension.c format.

Where the structure starts: RFC 4884's length field (the ICMP header's sixth byte, in
32-bit words) gives the quoted datagram's length; a router that leaves it 0 (RFC 4884's
"compliant" mode for older receivers) pads the quote to 128 bytes, so the structure is
looked for there, as traceroute does. Parsing never raises: anything malformed gives "".
"""

from __future__ import annotations

import struct

from mace_tools.probe.icmp import checksum

_ERRORS_WITH_EXTENSIONS = (3, 11, 12)  # unreachable, time exceeded, parameter problem
_COMPAT_QUOTE_LEN = 128  # RFC 4884: a quote followed by extensions is padded to 128
_HEADER_LEN = 4  # version/reserved, reserved, checksum
_OBJECT_HEADER_LEN = 4  # length, class, c-type
_MPLS = (1, 1)


def describe_extensions(datagram: bytes) -> str:
    """The extensions of an IPv4 ICMP error (a raw ICMP socket's datagram) as traceroute
    -e shows them, or "" if it has none (or they are malformed)."""
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        return ""
    l4 = datagram[(datagram[0] & 0x0F) * 4:]
    if len(l4) < 8 or l4[0] not in _ERRORS_WITH_EXTENSIONS:
        return ""
    quote = l4[8:]
    length = l4[5] * 4
    if length:
        if length < _COMPAT_QUOTE_LEN or length >= len(quote):
            return ""  # RFC 4884: a quote with extensions is at least 128 bytes
        return parse_structure(quote[length:])
    if len(quote) < _COMPAT_QUOTE_LEN + _HEADER_LEN + _OBJECT_HEADER_LEN:
        return ""
    return parse_structure(quote[_COMPAT_QUOTE_LEN:])


def parse_structure(data: bytes) -> str:
    """An extension structure (header and objects) as text; "" if it is not one."""
    if len(data) < _HEADER_LEN + _OBJECT_HEADER_LEN or data[0] >> 4 != 2:
        return ""
    if data[2:4] != b"\0\0" and checksum(data) != 0:
        return ""
    pos, parts = _HEADER_LEN, []
    while len(data) - pos >= _OBJECT_HEADER_LEN:
        length, cls, ctype = struct.unpack_from("!HBB", data, pos)
        if length < _OBJECT_HEADER_LEN or pos + length > len(data) or length % 4:
            return ""
        words = struct.unpack_from(f"!{(length - _OBJECT_HEADER_LEN) // 4}I", data,
                                   pos + _OBJECT_HEADER_LEN)
        parts.append(_object_text(cls, ctype, words))
        pos += length
    return ";".join(parts) if pos == len(data) else ""


def _object_text(cls: int, ctype: int, words: tuple[int, ...]) -> str:
    if (cls, ctype) == _MPLS and words:
        return "MPLS:" + "/".join(f"L={w >> 12},E={(w >> 9) & 7},S={(w >> 8) & 1},"
                                  f"T={w & 0xFF}" for w in words)
    return f"{cls}/{ctype}:" + ",".join(f"{w:08x}" for w in words)
