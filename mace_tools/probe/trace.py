"""Traceroute probes (UDP, TCP SYN, ICMP echo) and how their answers are recognised.

Every probe's payload starts with the run nonce and the probe number (the eBPF side
matches on it at every device). Answers only ever quote the IP header and the first 8
bytes of L4 (RFC 792), so each probe is remembered by those 8 bytes, its *quote key*,
which must differ between the probes of one run:
- UDP: source port constant; the default method varies the destination port (33434 for
  the first probe sent, then one more per probe, as traceroute); -U (`udp` method) holds
  it at one port (53) and the UDP checksum, which covers the probe number, tells the
  probes apart; --paris holds both ports constant and makes the checksum the probe's
  identifier (2 payload bytes are chosen for it, as paris-traceroute does).
- ICMP: id constant, seq = probe number (traceroute's -p sets the first); --paris also
  holds the ICMP checksum constant (2 payload bytes compensate the seq), so flow hashes
  over type/code/checksum stay put.
- TCP SYN: both ports constant (-p, default 80), seq = base + probe number: one flow.
- RAW (-P PROTO): the IP header and our payload only, of protocol PROTO; the payload
  starts with the probe number, so the 8 quoted bytes tell the probes apart. The kernel
  programs match only ICMP, UDP and TCP probes: these get no corrected time.
IPv6 (family 6, as traceroute -6): the same probes behind a 40-byte header, UDP and TCP
checksums over the IPv6 pseudo-header, ICMPv6 echo requests (type 128, whose checksum
covers the pseudo-header too); answers are ICMPv6 errors (time exceeded 3, unreachable 1,
packet too big 2) quoting the probe, echo replies (129) and TCP answers, each read from
the IPv6 datagram the sockets hand on (tracesockets.py).
Parsing never raises: foreign or malformed packets give None.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from mace_tools.probe.addresses import packed
from mace_tools.probe.icmp import (
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_TIME_EXCEEDED,
    ICMP_ECHO,
    IPV6_HEADER,
    NONCE_LEN,
    checksum,
)
from mace_tools.probe.icmp_errors import quoted_l4

UDP, TCP, ICMP, RAW = "UDP", "TCP", "ICMP", "RAW"
PROTO_NUMBERS = {ICMP: socket.IPPROTO_ICMP, TCP: socket.IPPROTO_TCP, UDP: socket.IPPROTO_UDP}
PROTO_NUMBERS6 = {**PROTO_NUMBERS, ICMP: socket.IPPROTO_ICMPV6}
DEFAULT_RAW_PROTOCOL = 253  # RFC 3692's, for experiments: traceroute's default for -P
HEADER_LEN = {UDP: 8, TCP: 20, ICMP: 8, RAW: 0}  # the L4 header each probe carries
IP_HEADER_LEN = 20
IP_HEADER_LENS = {4: IP_HEADER_LEN, 6: IPV6_HEADER}
TAG_LEN = NONCE_LEN + 2  # nonce + probe number
MIN_PAYLOAD = TAG_LEN + 2  # the tag and the 2 bytes --paris adjusts
_TCP_SYN = 0x02
_TCP_RST = 0x04
_TCP_ACK = 0x10


@dataclass(frozen=True, slots=True)
class TraceProbe:
    number: int
    message: bytes  # the L4 message (the kernel adds the IP header)
    quote_key: bytes  # first 8 L4 bytes: what an ICMP error quotes of it


def _sum16(data: bytes) -> int:
    """Ones' complement sum (not inverted)."""
    return ~checksum(data) & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    """The pseudo-header UDP, TCP (and ICMPv6) checksums cover: IPv4's, or IPv6's (RFC 8200
    8.1) where the addresses are IPv6 ones."""
    if ":" in dst:
        return (packed(src) + packed(dst) + struct.pack("!I3xB", length, proto))
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def _compensate(total_without: int, wanted_checksum: int) -> int:
    """The 16-bit word w that makes the checksum `wanted` when added to a message whose
    ones' complement sum is total_without: w = ~wanted - total, in ones' complement."""
    x = (~wanted_checksum & 0xFFFF) + (~total_without & 0xFFFF)
    return (x & 0xFFFF) + (x >> 16)


def packet_len(method: str, size: int, family: int = 4) -> int:
    """The IP packet a probe really is for traceroute's packet_len `size`: the IP (family
    4 or 6) and L4 headers and at least MIN_PAYLOAD bytes (what the header line says)."""
    header = IP_HEADER_LENS[family] + HEADER_LEN[method]
    return header + max(MIN_PAYLOAD, size - header)


class ProbeFactory:
    """Builds one run's probes; payload = nonce, probe number, 2 adjustable bytes, fill.
    fixed_port: -U, every UDP probe to `port`; protocol: the RAW method's IP protocol."""

    def __init__(self, method: str, nonce: bytes, src: str, dst: str, size: int, port: int,
                 sport: int, ident: int, paris: bool, *, fixed_port: bool = False,
                 protocol: int = DEFAULT_RAW_PROTOCOL, family: int = 4) -> None:
        self.method, self.nonce, self.src, self.dst = method, nonce, src, dst
        self.port, self.sport, self.ident, self.paris = port, sport, ident, paris
        self.fixed_port, self.family = fixed_port, family
        numbers = PROTO_NUMBERS6 if family == 6 else PROTO_NUMBERS
        self.protocol = numbers.get(method, protocol)
        self.resize(size)

    def resize(self, size: int) -> None:
        """Probes from now on are `size` bytes long (IP packet), or the least they can be
        (packet_len): --mtu shrinks them to the MTU found."""
        self.packet_len = packet_len(self.method, size, self.family)
        self.payload_len = self.packet_len - IP_HEADER_LENS[self.family] - HEADER_LEN[self.method]

    def payload(self, number: int, adjust: int = 0) -> bytes:
        fill = bytes(i & 0xFF for i in range(MIN_PAYLOAD, self.payload_len))
        return self.nonce + struct.pack("!HH", number, adjust) + fill

    def build(self, number: int) -> TraceProbe:
        return {UDP: self._udp, TCP: self._tcp, ICMP: self._icmp,
                RAW: self._raw}[self.method](number)

    def _udp(self, number: int) -> TraceProbe:
        # the default method's first probe goes to the base port, as traceroute's
        fixed = self.paris or self.fixed_port
        dport = self.port if fixed else (self.port + number - 1) & 0xFFFF
        length = 8 + self.payload_len
        adjust = 0
        if self.paris:  # the checksum identifies the probe: choose the 2 adjustable bytes
            base = self.payload(number, 0)
            head = struct.pack("!HHHH", self.sport, dport, length, 0)
            total = _sum16(_pseudo(self.src, self.dst, socket.IPPROTO_UDP, length) + head + base)
            adjust = _compensate(total, 0x8000 + number)
        payload = self.payload(number, adjust)
        head = struct.pack("!HHHH", self.sport, dport, length, 0)
        csum = checksum(_pseudo(self.src, self.dst, socket.IPPROTO_UDP, length) + head
                        + payload) or 0xFFFF
        head = struct.pack("!HHHH", self.sport, dport, length, csum)
        return TraceProbe(number, head + payload, head)

    def _tcp(self, number: int) -> TraceProbe:
        seq = (self.ident << 16 | number) & 0xFFFFFFFF
        head = struct.pack("!HHIIBBHHH", self.sport, self.port, seq, 0, 5 << 4, _TCP_SYN,
                           64240, 0, 0)
        payload = self.payload(number)
        csum = checksum(_pseudo(self.src, self.dst, socket.IPPROTO_TCP, len(head) + len(payload))
                        + head + payload)
        head = head[:16] + struct.pack("!H", csum) + head[18:]
        return TraceProbe(number, head + payload, head[:8])

    def _icmp(self, number: int) -> TraceProbe:
        kind = ICMP6_ECHO_REQUEST if self.family == 6 else ICMP_ECHO
        # ICMPv6's checksum covers the pseudo-header too (the kernel writes the same sum)
        pseudo = _pseudo(self.src, self.dst, self.protocol, 8 + self.payload_len) \
            if self.family == 6 else b""
        adjust = 0
        if self.paris:  # hold the checksum constant whatever the seq
            total = _sum16(pseudo + struct.pack("!BBHHH", kind, 0, 0, self.ident, number)
                           + self.payload(number, 0))
            adjust = _compensate(total, 0x1234)
        payload = self.payload(number, adjust)
        head = struct.pack("!BBHHH", kind, 0, 0, self.ident, number)
        csum = checksum(pseudo + head + payload)
        head = struct.pack("!BBHHH", kind, 0, csum, self.ident, number)
        return TraceProbe(number, head + payload, head)

    def _raw(self, number: int) -> TraceProbe:
        """No L4 header: the number leads, so the 8 bytes an answer quotes differ."""
        message = struct.pack("!H", number) + self.payload(number)[:self.payload_len - 2]
        return TraceProbe(number, message, message[:8])


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back for a probe."""

    quote_key: bytes | None  # for ICMP errors: the quoted first 8 L4 bytes
    probe_number: int | None  # for echo replies / TCP answers: known directly
    src: str
    ttl: int
    icmp_type: int  # -1 for TCP answers
    icmp_code: int
    size: int
    reached: bool  # the destination answered: the trace ends at this hop
    mtu: int = 0  # a "fragmentation needed" (v6: "packet too big") answer's MTU, else 0
    family: int = 4  # 6: an ICMPv6 answer (its types and codes are ICMPv6's)

    @property
    def too_big(self) -> bool:
        """A router said the probe does not fit the path (--mtu: it says the MTU)."""
        if self.family == 6:
            return self.icmp_type == ICMP6_PACKET_TOO_BIG
        return (self.icmp_type, self.icmp_code) == (3, 4)


def parse_answer(datagram: bytes, factory: ProbeFactory) -> Answer | None:
    """An IPv4 (or, for a family 6 factory, IPv6) datagram from a raw ICMP or TCP socket,
    or as tracesockets hands one on -> Answer, or None if not ours."""
    if factory.family == 6:
        return _parse_answer6(datagram, factory)
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        return None
    ihl = (datagram[0] & 0x0F) * 4
    if ihl < 20 or len(datagram) < ihl + 8:
        return None
    src = socket.inet_ntoa(datagram[12:16])
    ttl, proto, l4 = datagram[8], datagram[9], datagram[ihl:]
    if proto == socket.IPPROTO_TCP:
        return _tcp_answer(l4, src, ttl, factory)
    if proto != socket.IPPROTO_ICMP or checksum(l4) != 0:
        return None
    icmp_type, code = l4[0], l4[1]
    if icmp_type == 0:  # echo reply: the destination, for -I
        # the payload's tag (nonce, probe number) must agree with the header's seq
        if factory.method != ICMP or l4[8:8 + TAG_LEN] != factory.nonce + l4[6:8]:
            return None
        number = struct.unpack_from("!H", l4, 6)[0]
        return Answer(None, number, src, ttl, 0, 0, len(l4), True)
    if icmp_type not in (3, 11) or len(l4) < 8 + 20 + 8:
        return None
    quoted = l4[8:]
    qihl = (quoted[0] & 0x0F) * 4
    if quoted[0] >> 4 != 4 or qihl < 20 or len(quoted) < qihl + 8:
        return None
    if int.from_bytes(quoted[6:8], "big") & 0x1FFF:
        return None  # a later fragment: what follows its header is payload, not L4
    if quoted[9] != factory.protocol:
        return None
    if socket.inet_ntoa(quoted[16:20]) != factory.dst:
        return None
    reached = icmp_type == 3 and src == factory.dst
    mtu = int.from_bytes(l4[6:8], "big") if (icmp_type, code) == (3, 4) else 0
    return Answer(bytes(quoted[qihl:qihl + 8]), None, src, ttl, icmp_type, code, len(l4),
                  reached, mtu)


def _parse_answer6(datagram: bytes, factory: ProbeFactory) -> Answer | None:
    """An IPv6 datagram (its fixed header, then TCP or ICMPv6: the sockets build it so)
    -> Answer. The ICMPv6 checksum is not checked: the kernel did (RFC 3542)."""
    if len(datagram) < IPV6_HEADER + 8 or datagram[0] >> 4 != 6:
        return None
    src = socket.inet_ntop(socket.AF_INET6, datagram[8:24])
    nexthdr, hops, l4 = datagram[6], datagram[7], datagram[IPV6_HEADER:]
    if nexthdr == socket.IPPROTO_TCP:
        return _tcp_answer(l4, src, hops, factory)
    if nexthdr != socket.IPPROTO_ICMPV6:
        return None
    icmp_type, code = l4[0], l4[1]
    if icmp_type == ICMP6_ECHO_REPLY:  # the destination, for -I
        if factory.method != ICMP or l4[8:8 + TAG_LEN] != factory.nonce + l4[6:8]:
            return None
        number = struct.unpack_from("!H", l4, 6)[0]
        return Answer(None, number, src, hops, icmp_type, 0, len(l4), True, family=6)
    if icmp_type not in (ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED):
        return None
    quoted = quoted_l4(l4[8:], factory.protocol, factory.dst)
    if quoted is None:
        return None
    reached = icmp_type == ICMP6_DST_UNREACH and _same6(src, factory.dst)
    mtu = int.from_bytes(l4[4:8], "big") if icmp_type == ICMP6_PACKET_TOO_BIG else 0
    return Answer(bytes(quoted[:8]), None, src, hops, icmp_type, code, len(l4), reached,
                  mtu, family=6)


def _same6(a: str, b: str) -> bool:
    """Two IPv6 addresses in text are one (whatever their spelling; a %scope ignored)."""
    try:
        return packed(a) == packed(b)
    except OSError:
        return False


def _tcp_answer(l4: bytes, src: str, ttl: int, factory: ProbeFactory) -> Answer | None:
    same = _same6(src, factory.dst) if factory.family == 6 else src == factory.dst
    if factory.method != TCP or not same or len(l4) < 20:
        return None
    sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", l4)
    if sport != factory.port or dport != factory.sport:
        return None
    # A SYN-ACK acks seq + 1; a RST from a closed port acks seq + 1 + our payload length.
    if flags & _TCP_RST:
        seq = (ack - 1 - factory.payload_len) & 0xFFFFFFFF
    elif flags & (_TCP_SYN | _TCP_ACK) == (_TCP_SYN | _TCP_ACK):
        seq = (ack - 1) & 0xFFFFFFFF
    else:
        return None
    if seq >> 16 != factory.ident:
        return None
    return Answer(None, seq & 0xFFFF, src, ttl, -1, 0, len(l4), True, family=factory.family)


_UNREACH_MARKS = {0: "!N", 6: "!N", 8: "!N", 11: "!N", 1: "!H", 7: "!H", 12: "!H",
                  9: "!X", 10: "!X", 13: "!X", 2: "!P", 5: "!S", 14: "!V", 15: "!C"}


# traceroute -6's marks for an unreachable (parse_icmp_res, its AF_INET6 branch); port
# unreachable (4) is the normal end of a UDP trace: no mark
_UNREACH_MARKS6 = {0: "!N", 1: "!X", 2: "!H", 3: "!H", 4: ""}


def _annotation6(answer: Answer) -> str:
    if answer.icmp_type == ICMP6_TIME_EXCEEDED:
        return "" if answer.icmp_code == 0 else f" !<{answer.icmp_type}-{answer.icmp_code}>"
    if answer.icmp_type == ICMP6_PACKET_TOO_BIG:
        return f" !F-{answer.mtu}"
    if answer.icmp_type != ICMP6_DST_UNREACH:
        return ""  # an echo reply or a TCP answer
    mark = _UNREACH_MARKS6.get(answer.icmp_code, f"!<{answer.icmp_code}>")
    return f" {mark}" if mark else ""


def annotation(answer: Answer) -> str:
    """traceroute's marks for an answer that ends the trace (parse_icmp_res there): !N !H
    !X !P !S !V !C, !F-MTU, !<code> for other unreachables, !<type-code> for a time
    exceeded that is not "TTL exceeded in transit"; none for port unreachable (the normal
    end of a UDP trace), a time exceeded in transit, or a TCP or echo answer. ICMPv6:
    !N !X !H, !F-MTU for packet too big, !<code>, !<3-code> (_annotation6)."""
    if answer.family == 6:
        return _annotation6(answer)
    if answer.icmp_type == 11:
        return "" if answer.icmp_code == 0 else f" !<11-{answer.icmp_code}>"
    if answer.icmp_type != 3 or answer.icmp_code == 3:
        return ""
    if answer.icmp_code == 4:
        return f" !F-{answer.mtu}"
    return " " + _UNREACH_MARKS.get(answer.icmp_code, f"!<{answer.icmp_code}>")


def final(answer: Answer) -> bool:
    """The answer ends the trace at its hop, as in traceroute: the destination answered,
    or any error but "TTL exceeded in transit"."""
    if answer.family == 6:
        return answer.reached or answer.icmp_type != ICMP6_TIME_EXCEEDED or \
            answer.icmp_code != 0
    return answer.reached or answer.icmp_type == 3 or \
        (answer.icmp_type == 11 and answer.icmp_code != 0)
