"""ICMP errors that quote one of our probes: which probe, and what to call the error.

An ICMP error (destination unreachable, time exceeded, ...) carries the head of the
datagram it answers: its IP header and at least 8 bytes of what followed (RFC 792; routers
after RFC 1812 quote more). What is taken for one of a run's probes must be the first
fragment of a datagram sent to the run's target with the probe's protocol; the caller then
matches the quoted L4 bytes against its probes. Parsing never raises: anything malformed,
cut short or foreign gives None.
"""

from __future__ import annotations

import socket

from mace_tools.probe.icmp import (
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
    ICMP_ECHO,
    IPV6_HEADER,
    NONCE_LEN,
)

# iputils' wording of the ICMP messages ping reports (ping.c, pr_icmph), by type then code
_UNREACH = {
    0: "Destination Net Unreachable",
    1: "Destination Host Unreachable",
    2: "Destination Protocol Unreachable",
    3: "Destination Port Unreachable",
    5: "Source Route Failed",
    6: "Destination Net Unknown",
    7: "Destination Host Unknown",
    8: "Source Host Isolated",
    9: "Destination Net Prohibited",
    10: "Destination Host Prohibited",
    11: "Destination Net Unreachable for Type of Service",
    12: "Destination Host Unreachable for Type of Service",
    13: "Packet filtered",
    14: "Precedence Violation",
    15: "Precedence Cutoff",
}
_REDIRECT = {
    0: "Redirect Network",
    1: "Redirect Host",
    2: "Redirect Type of Service and Network",
    3: "Redirect Type of Service and Host",
}
_TIME_EXCEEDED = {0: "Time to live exceeded", 1: "Frag reassembly time exceeded"}
_OTHER = {0: "Echo Reply", 8: "Echo Request", 13: "Timestamp", 14: "Timestamp Reply",
          15: "Information Request", 16: "Information Reply", 17: "Address Mask Request",
          18: "Address Mask Reply"}
# ... and ICMPv6 errors (iputils' print_icmp in ping6_common.c)
_UNREACH6 = {
    0: "No route",
    1: "Administratively prohibited",
    2: "Beyond scope of source address",
    3: "Address unreachable",
    4: "Port unreachable",
    5: "Source address failed ingress/egress policy",
    6: "Reject route to destination",
}
_TIME_EXCEEDED6 = {0: "Hop limit", 1: "Defragmentation failure"}
_PARAM_PROB6 = {0: "Wrong header field ", 1: "Unknown header ", 2: "Unknown option "}
_NEXTHDR_FRAGMENT = 44
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
# answers ping shows but does not count as errors (iputils: they end no probe)
NOTICES = frozenset((ICMP_SOURCE_QUENCH, ICMP_REDIRECT))


def error_text(icmp_type: int, code: int, info: int = 0, family: int = 4) -> str:
    """How ping words an ICMP message (iputils' pr_icmph; for ICMPv6, family 6, its
    print_icmp). info: the second word of the ICMP header (a frag-needed's next-hop MTU,
    a parameter problem's pointer, a redirect's gateway; ICMPv6: the MTU, the pointer)."""
    if family == 6:
        return _error_text6(icmp_type, code, info)
    if icmp_type == 3:
        if code == 4:
            return f"Frag needed and DF set (mtu = {info & 0xFFFF})"
        return _UNREACH.get(code, f"Dest Unreachable, Bad Code: {code}")
    if icmp_type == ICMP_SOURCE_QUENCH:
        return "Source Quench"
    if icmp_type == ICMP_REDIRECT:
        gateway = socket.inet_ntoa((info & 0xFFFFFFFF).to_bytes(4, "big"))
        return _REDIRECT.get(code, f"Redirect, Bad Code: {code}") + \
            f"(New nexthop: {gateway})"
    if icmp_type == 11:
        return _TIME_EXCEEDED.get(code, f"Time exceeded, Bad Code: {code}")
    if icmp_type == 12:
        return f"Parameter problem: pointer = {(info >> 24) & 0xFF}"
    return _OTHER.get(icmp_type, f"Bad ICMP type: {icmp_type}")


def _error_text6(icmp_type: int, code: int, info: int) -> str:
    if icmp_type == ICMP6_DST_UNREACH:
        return "Destination unreachable: " + _UNREACH6.get(code, f"Unknown code {code}")
    if icmp_type == ICMP6_PACKET_TOO_BIG:
        return f"Packet too big: mtu={info}" + (f", code={code}" if code else "")
    if icmp_type == ICMP6_TIME_EXCEEDED:
        return "Time exceeded: " + _TIME_EXCEEDED6.get(code, f"code {code}")
    if icmp_type == ICMP6_PARAM_PROB:
        return "Parameter problem: " + _PARAM_PROB6.get(code, f"code {code} ") + f"at {info}"
    return f"unknown icmp type: {icmp_type}"


def quoted_l4(quoted: bytes, proto: int, dst: str) -> bytes | None:
    """What follows the quoted IPv4 header (at least 8 bytes), if the quote is the first
    fragment of a datagram to dst with this IP protocol; else None. The destination is
    checked as iputils checks it: with only 8 bytes quoted, an id alone would take another
    program's probe to another host for ours. An IPv6 quote is read the same way (proto:
    its next header; a fragment header is looked through, no other extension header:
    our probes carry none)."""
    if quoted[:1] and quoted[0] >> 4 == 6:
        return _quoted_l4_v6(quoted, proto, dst)
    if len(quoted) < 20 or quoted[0] >> 4 != 4 or quoted[9] != proto:
        return None
    ihl = (quoted[0] & 0x0F) * 4
    if ihl < 20 or int.from_bytes(quoted[6:8], "big") & 0x1FFF \
            or socket.inet_ntoa(quoted[16:20]) != dst:
        return None  # (a later fragment: what follows its header is payload, not L4)
    l4 = quoted[ihl:]
    return l4 if len(l4) >= 8 else None


def _quoted_l4_v6(quoted: bytes, proto: int, dst: str) -> bytes | None:
    if len(quoted) < IPV6_HEADER:
        return None
    try:
        if quoted[24:40] != socket.inet_pton(socket.AF_INET6, dst.partition("%")[0]):
            return None
    except OSError:  # dst is no IPv6 address: the quote cannot be of our probe
        return None
    nexthdr, at = quoted[6], IPV6_HEADER
    if nexthdr == _NEXTHDR_FRAGMENT:
        fragment = quoted[at:at + 8]
        if len(fragment) < 8 or int.from_bytes(fragment[2:4], "big") & 0xFFF8:
            return None  # cut short, or a later fragment: no L4 header
        nexthdr, at = fragment[0], at + 8
    l4 = quoted[at:]
    return l4 if nexthdr == proto and len(l4) >= 8 else None


def quoted_probe_seq(quoted: bytes, ident: int, nonce: bytes, dst: str) -> int | None:
    """Seq of our echo request quoted in an ICMP error, or None if it is not ours: an echo
    request to our target carrying the run's nonce (when only 8 bytes are quoted, the
    run's ICMP id)."""
    six = quoted[:1] and quoted[0] >> 4 == 6
    icmp = quoted_l4(quoted, socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP, dst)
    if icmp is None or icmp[0] != (ICMP6_ECHO_REQUEST if six else ICMP_ECHO):
        return None
    seq = int.from_bytes(icmp[6:8], "big")
    payload = icmp[8:8 + NONCE_LEN]
    if len(payload) == NONCE_LEN:
        return seq if payload == nonce else None
    # RFC 792 quotes only 8 bytes: fall back on the id (not rewritten on our side of NAT).
    return seq if int.from_bytes(icmp[4:6], "big") == ident else None
