"""The independent truth: tcpdump captures with nanosecond timestamps.

Truth v2 (what the demo, the tests and the bench compare against) stamps only *arrivals*,
at both ends of the host's outer link, with captures that never tap a departing packet
(`tcpdump -Q in`: PACKET_IGNORE_OUTGOING):
  - a request's arrival at the far end of the outer link (the target's side),
  - its reply's arrival on the outer device.
truth = reply-in(outer) - request-in(far end). Both are the kernel's netif_rx prequeue stamps
(netdev_tstamp_prequeue=1), taken before the tap does any work, so nothing the capture does
delays what it stamps. The truth is shorter than the outer device's departure-to-arrival
time by the request's transit of the outer link: its residual, 0.3 to 0.7 µs mean on a veth
here (mace's own events show it: lab/demo.py outer_link_transit_us; the bench reports it).

Why not one capture on the outer device (truth v1, kept only as a bench row that shows its
bias): its tap stamps a departing packet in dev_queue_xmit_nit and then filters and copies it
*before* net_dev_start_xmit, where mace stamps the departure, so its request stamps come out
early by 1 to 40 µs (most on a cold path), and corrected minus capture looks negative.

Captures are filtered in the kernel to one run's probes where possible (by nonce), use
TPACKET_V3 blocks without immediate mode, and after the run wait until the kernel has retired
the last block (libpcap's 1 s timeout) so tcpdump has written every packet. Timestamps are
CLOCK_REALTIME: only differences within one machine are compared with mace's CLOCK_MONOTONIC
ones. IPv6 frames are read too: ICMPv6 echoes (types 128/129) right after the fixed header,
as every probe of ours is sent.
"""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mace_tools.lab.topology import LabError, OuterLink

PCAP_NANO_MAGIC = 0xA1B23C4D
QUIET_S = 2.0  # a capture file that stopped growing this long has been written out
LINKTYPE_ETHERNET = 1
_ETH_P_IP = b"\x08\x00"
_ETH_P_IPV6 = b"\x86\xdd"
ECHO_REQUESTS = (8, 128)  # ICMP and ICMPv6 echo request types
ECHO_REPLIES = (0, 129)


@dataclass(frozen=True, slots=True)
class CapturedEcho:
    seq: int
    request_real_ns: int
    reply_real_ns: int | None

    @property
    def rtt_ns(self) -> int | None:
        return None if self.reply_real_ns is None else self.reply_real_ns - self.request_real_ns


@dataclass(frozen=True, slots=True)
class IcmpPacket:
    ts_real_ns: int
    src: bytes
    dst: bytes
    icmp_type: int
    ident: int
    seq: int
    payload: bytes


def read_ip_packets(path: Path) -> list[tuple[int, bytes]]:
    """(CLOCK_REALTIME ns, IP packet) of every IPv4 and IPv6 frame of a nanosecond pcap."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic, = struct.unpack_from("<I", data)
    if magic != PCAP_NANO_MAGIC:
        raise LabError(f"{path}: not a nanosecond pcap (magic {magic:#x})")
    linktype, = struct.unpack_from("<I", data, 20)
    if linktype != LINKTYPE_ETHERNET:
        raise LabError(f"{path}: link type {linktype}, expected Ethernet")
    packets, off = [], 24
    while off + 16 <= len(data):
        sec, nsec, caplen, _ = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16: off + 16 + caplen]
        off += 16 + caplen
        if len(frame) >= 14 + 20 and frame[12:14] in (_ETH_P_IP, _ETH_P_IPV6):
            packets.append((sec * 1_000_000_000 + nsec, frame[14:]))
    return packets


def icmp_packet(ts_real_ns: int, ip: bytes) -> IcmpPacket | None:
    """The ICMP message of an IPv4 datagram (or the ICMPv6 message right after an IPv6
    header) stamped ts_real_ns; None if it holds none."""
    if ip[0] >> 4 == 6:
        if len(ip) < 48 or ip[6] != 58:
            return None
        ident, seq = struct.unpack_from("!HH", ip, 44)
        return IcmpPacket(ts_real_ns, ip[8:24], ip[24:40], ip[40], ident, seq, ip[48:])
    if len(ip) < 20 or ip[9] != 1:
        return None
    ihl = (ip[0] & 0x0F) * 4
    if len(ip) < ihl + 8:
        return None
    icmp = ip[ihl:]
    ident, seq = struct.unpack_from("!HH", icmp, 4)
    return IcmpPacket(ts_real_ns, ip[12:16], ip[16:20], icmp[0], ident, seq, icmp[8:])


def read_pcap(path: Path) -> list[IcmpPacket]:
    """ICMP packets of a nanosecond Ethernet pcap (others are skipped)."""
    return [p for ts, ip in read_ip_packets(path) if (p := icmp_packet(ts, ip)) is not None]


def match_echoes(packets: list[IcmpPacket],
                 key: Callable[[IcmpPacket], bool]) -> dict[int, CapturedEcho]:
    """Request -> first reply per seq, for packets whose key(packet) is truthy."""
    requests: dict[int, int] = {}
    replies: dict[int, int] = {}
    for p in packets:
        if not key(p):
            continue
        if p.icmp_type in ECHO_REQUESTS:
            requests.setdefault(p.seq, p.ts_real_ns)
        elif p.icmp_type in ECHO_REPLIES and p.seq in requests:
            replies.setdefault(p.seq, p.ts_real_ns)
    return {seq: CapturedEcho(seq, t, replies.get(seq)) for seq, t in requests.items()}


def pair_echoes(far: list[IcmpPacket], near: list[IcmpPacket],
                key: Callable[[IcmpPacket], bool]) -> dict[int, CapturedEcho]:
    """Truth v2's pairing by seq: each request (key(packet) truthy) as it arrived at the far
    end of the outer link, with its first reply as it arrived on the outer device."""
    requests = [p for p in far if p.icmp_type in ECHO_REQUESTS and key(p)]
    replies = [p for p in near if p.icmp_type in ECHO_REPLIES and key(p)]
    return match_echoes(requests + replies, lambda p: True)


class Capture:
    """tcpdump on `dev` in netns `netns` for the duration of a with-block; `inbound` taps
    arriving packets only (-Q in), so departures on dev pay nothing for the capture."""

    def __init__(self, netns: str | None, dev: str, bpf_filter: str = "icmp",
                 expect_packets: int | None = None, inbound: bool = False) -> None:
        if shutil.which("tcpdump") is None:
            raise LabError("tcpdump not found (apt-get install tcpdump)")
        self.netns, self.dev, self.bpf_filter = netns, dev, bpf_filter
        self.expect_packets = expect_packets
        self.inbound = inbound
        self._dir = Path(tempfile.mkdtemp(prefix="mace-cap-"))
        self.path = self._dir / "capture.pcap"
        self._proc: subprocess.Popen[bytes] | None = None
        self._packets: list[IcmpPacket] | None = None
        self.ip_packets: list[tuple[int, bytes]] = []

    def __enter__(self) -> Capture:
        where = ["ip", "netns", "exec", self.netns] if self.netns else []  # None: this netns
        direction = ["-Q", "in"] if self.inbound else []
        cmd = [*where, "tcpdump", "-i", self.dev, *direction, "-n", "-U",
               "--time-stamp-precision=nano", "-B", "16384", "-w", str(self.path),
               self.bpf_filter]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self._proc.stderr.readline().decode(errors="replace") if self._proc.stderr else ""
        if "listening on" not in line:
            self._stop()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise LabError(f"tcpdump did not start: {line.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._await_flush()
            self._stop()
            self.ip_packets = read_ip_packets(self.path) if self.path.exists() else []
            self._packets = [p for ts, ip in self.ip_packets
                             if (p := icmp_packet(ts, ip)) is not None]
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _await_flush(self, timeout_s: float = 15.0) -> None:
        """Wait until the expected packets are on disk, or else until the file has not
        grown for QUIET_S: longer than libpcap's 1 s block timeout, so the block that was
        open when the run ended has been retired and written (on a loaded machine tcpdump
        may write it late: a fixed wait lost the last probes' truth)."""
        deadline = time.monotonic() + timeout_s
        size, unchanged_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = self.path.stat().st_size if self.path.exists() else 0
            if now_size != size:
                size, unchanged_since = now_size, time.monotonic()
                if self.expect_packets is not None \
                        and len(read_pcap(self.path)) >= self.expect_packets:
                    return
            elif time.monotonic() - unchanged_since >= QUIET_S:
                return
            time.sleep(0.1)

    def _stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    @property
    def packets(self) -> list[IcmpPacket]:
        if self._packets is None:
            raise LabError("capture not finished: read it after the with-block")
        return self._packets

    @staticmethod
    def nonce_filter(nonce: bytes) -> str:
        """tcpdump filter for one run's probes, either family: payload bytes 0..7 are its
        nonce."""
        words = f"[8:4] = 0x{nonce[:4].hex()} and {{0}}[12:4] = 0x{nonce[4:8].hex()}"
        return f"(icmp and icmp{words.format('icmp')}) or (icmp6 and icmp6{words.format('icmp6')})"

    def echoes(self, nonce: bytes) -> dict[int, CapturedEcho]:
        """mace probes of one run: payload starts with its nonce (NAT may change the id)."""
        return match_echoes(self.packets, lambda p: p.payload[: len(nonce)] == nonce)

    def echoes_by_id(self, ident: int) -> dict[int, CapturedEcho]:
        """Any ping's echoes by ICMP id as seen on this device (NAT keeps it consistent)."""
        return match_echoes(self.packets, lambda p: p.ident == ident)


class TruthCapture:
    """Truth v2 for the duration of a with-block: inbound-only captures at both ends of the
    outer link (module doc). `expect_requests`: how many requests (and as many replies) to
    wait for on disk before stopping."""

    def __init__(self, link: OuterLink, bpf_filter: str = "icmp",
                 expect_requests: int | None = None) -> None:
        self.link = link
        self.far = Capture(link.far_netns, link.far_dev, bpf_filter, expect_requests,
                           inbound=True)
        self.near = Capture(link.near_netns, link.near_dev, bpf_filter, expect_requests,
                            inbound=True)

    def __enter__(self) -> TruthCapture:
        self.far.__enter__()
        try:
            self.near.__enter__()
        except BaseException:
            self.far.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.near.__exit__(*exc)
        finally:
            self.far.__exit__(*exc)

    def echoes(self, nonce: bytes) -> dict[int, CapturedEcho]:
        """One run's echoes by seq: request in at the far end, reply in on the outer device
        (probes keyed by their payload's nonce: NAT may change the id)."""
        return pair_echoes(self.far.packets, self.near.packets,
                           lambda p: p.payload[: len(nonce)] == nonce)

    def echoes_by_id(self, ident: int) -> dict[int, CapturedEcho]:
        """Any ping's echoes by ICMP id as seen on the outer link (outside any NAT)."""
        return pair_echoes(self.far.packets, self.near.packets, lambda p: p.ident == ident)

    def trace(self, nonce: bytes, method: str, packet_len: int) -> dict[int, float]:
        """mace-traceroute probe number -> truth (µs): its answer's arrival on the outer
        device minus the probe's arrival at the far end."""
        return trace_truth(self.far.ip_packets, self.near.ip_packets, nonce, method,
                           packet_len)


_TAG_AT = {"udp": 8, "icmp": 8, "tcp": 20}  # where a traceroute probe's nonce sits in L4
_PROTO = {"udp": 17, "icmp": 1, "tcp": 6}
_ICMP_PROTOS = (1, 58)  # ICMP, ICMPv6
# by IP version: echo request, echo reply, the error types that quote a probe
_ECHO = {4: (8, 0, (3, 11)), 6: (128, 129, (1, 2, 3))}


def _l4(ip: bytes) -> tuple[int, int, bytes]:
    """(IP version, protocol, L4 message) of an IPv4 datagram or an IPv6 packet (its
    fixed header only: the lab's packets carry no extension headers)."""
    if ip[0] >> 4 == 6:
        return 6, ip[6], ip[40:]
    return 4, ip[9], ip[(ip[0] & 0x0F) * 4:]


def _proto(method: str, version: int) -> int:
    return 58 if (method, version) == ("icmp", 6) else _PROTO[method]


def trace_truth(probes: list[tuple[int, bytes]], answers: list[tuple[int, bytes]],
                nonce: bytes, method: str, packet_len: int) -> dict[int, float]:
    """mace-traceroute probe number -> first answer in `answers` minus first sight of the
    probe in `probes` (µs). Truth v2 passes the far end's inbound packets as probes and the
    outer device's inbound packets as answers; one capture can pass its packets as both.

    Probes are found by their payload (nonce, then the probe number); ICMP errors by the
    probe they quote (Linux quotes the whole probe, not only the 8 bytes RFC 792 asks
    for); a TCP RST by its ack, which must be seq + 1 + payload length of one of this
    run's probes (seq holds the run's ident, so other runs in the capture do not match).
    IPv4 and IPv6 alike (packet_len: the probes' IP packet length, of their family).
    """
    at = _TAG_AT[method]
    sent: dict[int, int] = {}
    rst_acks: dict[int, int] = {}  # ack a RST to probe n carries -> n
    for ts, ip in probes:
        version, proto, l4 = _l4(ip)
        if proto != _proto(method, version) or len(l4) < at + 10 or l4[at:at + 8] != nonce:
            continue
        if method == "icmp" and l4[0] != _ECHO[version][0]:
            continue  # an echo reply carries the nonce too
        number = struct.unpack_from("!H", l4, at + 8)[0]
        sent.setdefault(number, ts)
        if method == "tcp":
            payload_len = packet_len - (len(ip) - len(l4)) - at
            seq = struct.unpack_from("!I", l4, 4)[0]
            rst_acks[(seq + 1 + payload_len) & 0xFFFFFFFF] = number
    answered: dict[int, int] = {}
    for ts, ip in answers:
        version, proto, l4 = _l4(ip)
        if len(l4) < 8:
            continue
        _request, reply, errors = _ECHO[version]
        if proto in _ICMP_PROTOS and l4[0] in errors:
            inner = l4[8:]
            q = (40 if version == 6 else (inner[0] & 0x0F) * 4) + at if inner else 0
            if inner and inner[q:q + 8] == nonce:
                answered.setdefault(struct.unpack_from("!H", inner, q + 8)[0], ts)
        elif method == "tcp" and proto == 6 and len(l4) >= 14 and l4[13] & 0x04:
            number = rst_acks.get(struct.unpack_from("!I", l4, 8)[0])
            if number is not None:
                answered.setdefault(number, ts)
        elif method == "icmp" and l4[0] == reply and l4[at:at + 8] == nonce:
            answered.setdefault(struct.unpack_from("!H", l4, 6)[0], ts)
    return {n: (answered[n] - t) / 1000 for n, t in sent.items() if n in answered}
