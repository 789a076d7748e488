"""What mace-ping says of each answer, as iputils says it: DUP!, BAD CHECKSUM!, (truncated),
wrong data byte, DIFFERENT ADDRESS!, redirects and source quench (shown, not counted), pipe,
-U, -a, -v, -3. A Pinger's receive path over a fake socket, printing through the real text
sink: no network, no kernel data."""

from __future__ import annotations

import io
import socket
import struct

import pytest

from mace_tools.model import Hook, ProbeRecord, RunResult
from mace_tools.output.live import TextSink
from mace_tools.pinger import Pinger, PingOptions
from mace_tools.probe.icmp import checksum
from mace_tools.probe.sockets import ipv6_header

TARGET, SOURCE, ROUTER = "198.18.0.2", "198.18.1.10", "198.18.1.1"
NONCE = bytes.fromhex("0a0b0c0d0e0f1011")
IDENT = 0x4D43


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[tuple[bytes, int]] = []

    def send(self, message: bytes, dst: str) -> None:
        self.sent.append(message)

    def recv(self) -> tuple[bytes, int] | None:
        return self.incoming.pop(0) if self.incoming else None


def ip(icmp: bytes, src: str = TARGET, ttl: int = 63) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, ttl, 1, 0,
                       socket.inet_aton(src), socket.inet_aton(SOURCE)) + icmp


def summed(icmp: bytes) -> bytes:
    icmp = icmp[:2] + b"\0\0" + icmp[4:]
    return icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]


def reply_to(request: bytes, cut: int | None = None, ident: int | None = None) -> bytes:
    """The echo reply to request (cut to `cut` bytes of ICMP, another id), summed."""
    icmp = b"\0" + request[1:]
    if ident is not None:
        icmp = icmp[:4] + ident.to_bytes(2, "big") + icmp[6:]
    return summed(icmp[:cut])


class Run:
    """A Pinger with probes 1..n sent over a FakeSocket, and what its text sink printed."""

    def __init__(self, n: int = 3, **options: object) -> None:
        self.out = io.StringIO()
        sink_options = {k: options.pop(k) for k in ("audible", "verbose", "precise",
                                                    "show_dup") if k in options}
        self.sink = TextSink(dst_name=TARGET, dst_addr=TARGET, size=56, out=self.out,
                             err=io.StringIO(), **sink_options)  # type: ignore[arg-type]
        self.pinger = Pinger(PingOptions(TARGET, ident=IDENT, **options),  # type: ignore[arg-type]
                             self.sink, nonce=NONCE)
        self.sink.start(SOURCE, IDENT)
        self.sock = FakeSocket()
        self.result = RunResult(NONCE, SOURCE)
        for number in range(1, n + 1):
            assert self.pinger._send(self.sock, number, self.result) is None  # type: ignore[arg-type]
            self.result.transmitted += 1

    def feed(self, *datagrams: bytes, at: int = 0) -> list[str]:
        """Hand datagrams to the receive path; the lines printed for them."""
        start = len(self.out.getvalue())
        self.sock.incoming = [(d, at) for d in datagrams]
        self.pinger._receive(self.sock, None, self.result)  # type: ignore[arg-type]
        return self.out.getvalue()[start:].splitlines()

    def request(self, number: int) -> bytes:
        return self.sock.sent[number - 1]


def test_a_duplicate_is_marked_and_counted_apart() -> None:
    run = Run()
    first = run.feed(ip(reply_to(run.request(1))))
    again = run.feed(ip(reply_to(run.request(1))))
    assert "(DUP!)" not in first[0] and again[0].endswith(" ms corrected=none (DUP!)")
    assert (run.result.tally.received, run.result.tally.duplicates) == (1, 1)


def test_a_bad_checksum_is_shown_and_counted_as_corrupted() -> None:
    run = Run()
    bad = bytearray(reply_to(run.request(2)))
    bad[2] ^= 0x5A
    line, = run.feed(ip(bytes(bad)))
    assert line.startswith("64 bytes from 198.18.0.2: icmp_seq=2 ttl=63 time=")
    assert line.endswith(" ms corrected=none (BAD CHECKSUM!)")
    assert (run.result.tally.received, run.result.tally.corrupted) == (0, 1)
    # the probe is still unanswered: its real reply counts
    assert "(DUP!)" not in run.feed(ip(reply_to(run.request(2))))[0]
    assert run.result.tally.received == 1
    line, = run.feed(ip(bytes(bad)))  # damaged again, now that it is answered: no DUP
    assert line.endswith(" ms corrected=none (BAD CHECKSUM!)")
    assert (run.result.tally.duplicates, run.result.tally.corrupted) == (0, 2)
    # a damaged reply must carry our id as well (iputils' own test)
    other = bytearray(reply_to(run.request(3), ident=IDENT ^ 1))
    other[2] ^= 0x5A
    assert run.feed(ip(bytes(other))) == [] and run.result.tally.corrupted == 2


def test_a_reply_that_did_not_echo_the_payload_counts_as_iputils() -> None:
    """Cut before the number: ours by id and seq while its probe is unanswered and if it
    still carries the nonce (iputils: counted, "(truncated)"); never for an answered
    probe, nor with another id, nor with no nonce left (an id and a seq alone are what a
    forger guesses: iputils would count that one, mace-ping does not)."""
    run = Run()
    assert run.feed(ip(reply_to(run.request(1), cut=16, ident=IDENT ^ 1))) == []
    assert run.feed(ip(reply_to(run.request(1), cut=8))) == []  # no payload at all
    assert run.feed(ip(reply_to(run.request(1), cut=15))) == []  # 7 bytes of the nonce
    line, = run.feed(ip(reply_to(run.request(1), cut=16)))
    assert line == "16 bytes from 198.18.0.2: icmp_seq=1 ttl=63 (truncated)"
    assert run.result.tally.received == 1
    assert run.feed(ip(reply_to(run.request(1), cut=12))) == []  # answered: not a DUP
    line, = run.feed(ip(reply_to(run.request(2), cut=60)))  # the number made it: keyed
    assert line == "60 bytes from 198.18.0.2: icmp_seq=2 ttl=63 (truncated)"
    assert run.feed(ip(summed(b"\0\0\0\0" + IDENT.to_bytes(2, "big") + b"\0\x03" +
                              b"\xff" * 4))) == []  # cut, but not what probe 3 sent
    assert run.result.tally.received == 2


def test_wrong_data_is_reported_as_iputils_and_counted() -> None:
    run = Run()
    reply = bytearray(reply_to(run.request(1)))
    reply[8 + 20] = 0  # payload byte 20 (byte i of the fill is i)
    lines = run.feed(ip(summed(bytes(reply))))
    assert lines[0].endswith(" ms corrected=none")  # the dump after the line's fields
    assert lines[1] == "wrong data byte #20 should be 0x14 but was 0x0"
    fill = " ".join(f"{i:x}" for i in range(12, 44)).replace(" 14 ", " 0 ") + " "
    assert lines[2] == f"#12\t{fill}"
    assert lines[3] == "#44\t" + " ".join(f"{i:x}" for i in range(44, 56)) + " "
    assert run.result.tally.received == 1


def test_a_reply_from_elsewhere_is_flagged_unless_broadcast() -> None:
    run = Run()
    assert run.feed(ip(reply_to(run.request(1)), src="198.18.0.6"))[0].endswith(
        " ms corrected=none (DIFFERENT ADDRESS!)")
    run = Run(multicast=True, show_dup=False)
    lines = run.feed(ip(reply_to(run.request(1)), src="198.18.0.6"),
                     ip(reply_to(run.request(1)), src="198.18.0.7"))
    assert "DIFFERENT ADDRESS" not in "".join(lines) and "DUP" not in "".join(lines)
    assert run.result.tally.duplicates == 1  # (counted all the same)


def error_quoting(request: bytes, icmp_type: int, code: int, word: int = 0) -> bytes:
    quote = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(request), 0, 0, 63, 1, 0,
                        socket.inet_aton(SOURCE), socket.inet_aton(TARGET)) + request
    return ip(summed(struct.pack("!BBHI", icmp_type, code, 0, word) + quote), src=ROUTER,
              ttl=64)


def test_redirect_and_source_quench_are_shown_not_counted() -> None:
    run = Run()
    gateway = int.from_bytes(socket.inet_aton("198.18.1.254"), "big")
    lines = run.feed(error_quoting(run.request(1), 5, 1, gateway),
                     error_quoting(run.request(2), 4, 0))
    assert lines == ["From 198.18.1.1: icmp_seq=1 Redirect Host(New nexthop: 198.18.1.254)",
                     "From 198.18.1.1: icmp_seq=2 Source Quench"]
    assert run.result.errors == 0
    lines = run.feed(error_quoting(run.request(3), 3, 4, 1400))
    assert lines == ["From 198.18.1.1 icmp_seq=3 Frag needed and DF set (mtu = 1400)"]
    assert run.result.errors == 1


def test_pipe_is_the_most_probes_in_flight() -> None:
    run = Run(n=3)
    run.feed(ip(reply_to(run.request(1))), ip(reply_to(run.request(2))))
    assert run.result.pipesize == 3  # probe 1 answered with 3 sent


def test_user_latency_ends_the_time_when_the_reply_is_read() -> None:
    """-U: not the kernel's receive stamp (the fake gives 0, the epoch) but our clock."""
    stamped = Run()
    stamped.feed(ip(reply_to(stamped.request(1))), at=0)
    assert stamped.result.tally.raw.max < 0  # the kernel's stamp was taken as given
    user = Run(user_latency=True)
    user.feed(ip(reply_to(user.request(1))), at=0)
    assert 0 <= user.result.tally.raw.max < 10**9


@pytest.mark.parametrize(("options", "expected"), [
    ({"verbose": True}, "64 bytes from 198.18.0.2: icmp_seq=1 ident=19779 ttl=63 time="),
    ({"audible": True}, "\a"),
])
def test_verbose_ident_and_bell(options: dict[str, object], expected: str) -> None:
    run = Run(**options)
    line, = run.feed(ip(reply_to(run.request(1))), at=0)
    assert expected in line
    assert line.endswith("corrected=none" + ("\a" if options.get("audible") else ""))


def test_pattern_payload_is_echoed_without_complaint() -> None:
    run = Run(pattern=b"\xab\x0c")
    payload = run.request(1)[8:]
    assert payload[12:20] == b"\xab\x0c" * 4  # byte i = pattern[i % 2], after the tag
    line, = run.feed(ip(reply_to(run.request(1))))
    assert "wrong data" not in line and run.result.tally.received == 1


class FakeSession:
    """Kernel records handed to the run when it drains, as a session's."""

    def __init__(self, pinger: Pinger) -> None:
        self.pending: list[ProbeRecord] = []
        self._take = pinger._probes.add_record

    def drain(self) -> None:
        for record in self.pending:
            self._take(record)
        self.pending = []

    def lost(self) -> int:
        return 0

    def probe_state(self, number: int) -> ProbeRecord | None:
        return None  # (the kernel freed it when it sent the record)


def test_a_damaged_copy_leaves_the_real_reply_raw() -> None:
    """The kernel checks no checksum: the record it sends comes from the first copy that
    reaches the prober, here a damaged one. The real reply after it is counted, but
    shown raw: it is never corrected from another packet's times."""
    run = Run()
    session = FakeSession(run.pinger)

    def record(number: int) -> ProbeRecord:
        sent = run.pinger._probes.sent[number].sent_mono_ns
        return ProbeRecord(number, sent + 1_000, sent + 2_000, sent + 2_100, 1, 2, "out0")

    def receive(datagram: bytes, number: int) -> str:
        at = run.pinger._probes.sent[number].sent_real_ns + 3_000
        run.sock.incoming = [(datagram, at)]
        run.pinger._receive(run.sock, session, run.result)  # type: ignore[arg-type]
        return run.out.getvalue().splitlines()[-1]

    session.pending = [record(1)]
    bad = bytearray(reply_to(run.request(1)))
    bad[40] ^= 0x55
    assert receive(ip(bytes(bad)), 1).endswith("corrected=none (BAD CHECKSUM!)")
    real = receive(ip(reply_to(run.request(1))), 1)
    assert real.endswith("corrected=none") and "(DUP!)" not in real
    assert run.result.tally.received == 1 and run.result.tally.corrupted == 1
    # a probe answered cleanly keeps its record: corrected
    session.pending = [record(2)]
    assert "corrected=0.001 ms" in receive(ip(reply_to(run.request(2))), 2)


def test_a_return_stamped_after_the_receive_stamp_leaves_the_reply_raw() -> None:
    """The kernel's record says the reply came back 31 µs after the socket stamped it (the
    program ran late): the reply is shown raw and counted as late, not corrected 31 µs
    high; a record within the slack corrects as usual."""
    run = Run()
    session = FakeSession(run.pinger)

    def receive(number: int, returned_us: int) -> str:
        probe = run.pinger._probes.sent[number]
        session.pending = [ProbeRecord(number, probe.sent_mono_ns + 5_000,
                                       probe.sent_mono_ns + returned_us * 1000, 0, 1, 2,
                                       "out0", Hook.RX)]
        run.sock.incoming = [(ip(reply_to(run.request(number))), probe.sent_real_ns + 17_000)]
        run.pinger._receive(run.sock, session, run.result)  # type: ignore[arg-type]
        return run.out.getvalue().splitlines()[-1]

    assert receive(1, 48).endswith("time=0.017 ms corrected=none")
    assert "corrected=0.012 ms" in receive(2, 17)
    tally = run.result.tally
    assert (tally.received, tally.corrected.count, tally.late_kernel_stamps) == (2, 1, 1)


def test_the_plain_lane_says_and_counts_what_the_full_checks_say() -> None:
    """A flood's clean replies skip parsing (echo_check.PlainReply); the same datagrams
    through the full checks alone must print the same lines, count the same and correct
    the same, and the lane must have taken the clean ones (else this proves nothing)."""

    def play(lane: bool) -> tuple[list[str], tuple[int, ...], int]:
        run = Run(n=6)
        if not lane:
            run.pinger._plain = None
        session = FakeSession(run.pinger)
        parsed = 0
        judge = run.pinger._judge

        def counted(*args: object) -> object:
            nonlocal parsed
            parsed += 1
            return judge(*args)  # type: ignore[arg-type]

        run.pinger._judge = counted  # type: ignore[method-assign]
        bad = bytearray(reply_to(run.request(3)))
        bad[40] ^= 0x55
        wrong = bytearray(reply_to(run.request(4)))
        wrong[8 + 30] ^= 0xFF
        datagrams = [ip(reply_to(run.request(1))), ip(reply_to(run.request(1))),  # DUP
                     ip(reply_to(run.request(2)), ttl=50), ip(bytes(bad)),
                     ip(reply_to(run.request(3))), ip(summed(bytes(wrong))),
                     ip(reply_to(run.request(5)), src="198.18.0.6"),
                     ip(reply_to(run.request(6), cut=40))]
        lines = []
        for n, data in zip([1, 1, 2, 3, 3, 4, 5, 6], datagrams, strict=True):
            probe = run.pinger._probes.sent[n]
            session.pending = [ProbeRecord(n, probe.sent_mono_ns + 1_000,
                                           probe.sent_mono_ns + 4_000 + n * 1_000,
                                           probe.sent_mono_ns + 9_000 + n * 1_000, 1, 2,
                                           "out0", Hook.RX)]
            run.sock.incoming = [(data, probe.sent_real_ns + 10_000 + n * 1_000)]
            run.pinger._receive(run.sock, session, run.result)  # type: ignore[arg-type]
            lines.append(run.out.getvalue().splitlines()[-1])
        tally = run.result.tally
        counts = (tally.received, tally.duplicates, tally.corrupted, tally.corrected.count,
                  tally.corrected.total, tally.raw.total, tally.ingress.total,
                  run.result.pipesize)
        return lines, counts, parsed

    lines, counts, parsed = play(lane=True)
    assert (lines, counts) == play(lane=False)[:2]
    assert parsed == 5  # the clean replies of probes 1, 2 and 3 were the lane's
    assert "corrected=0.004 ms" in lines[0] and "(DUP!)" in lines[1]
    assert "ttl=50" in lines[2] and "corrected=0.005 ms" in lines[2]
    assert lines[3].endswith("(BAD CHECKSUM!)") and lines[4].endswith("corrected=none")


@pytest.mark.parametrize("lane", [True, False])
@pytest.mark.parametrize("target", ["fe80::1%lo", "2001:2:0:0::2"])
def test_an_ipv6_target_written_otherwise_is_still_where_replies_come_from(
        target: str, lane: bool) -> None:
    """fe80::1%lo's replies come from fe80::1, 2001:2:0:0::2's from 2001:2::2: the same
    address, so no "(DIFFERENT ADDRESS!)", whether the plain lane or the full checks take
    the reply."""
    out = io.StringIO()
    sink = TextSink(dst_name=target, dst_addr=target, size=56, out=out, err=io.StringIO())
    ping = Pinger(PingOptions(target, ident=IDENT), sink, nonce=NONCE)
    if not lane:
        ping._plain = None
    sock, result = FakeSocket(), RunResult(NONCE, "fe80::2")
    assert ping._send(sock, 1, result) is None  # type: ignore[arg-type]
    result.transmitted = 1
    reply = bytes([129]) + sock.sent[0][1:]  # (an ICMPv6 checksum is the kernel's to check)
    source = socket.inet_pton(socket.AF_INET6, target.partition("%")[0])
    sock.incoming = [(ipv6_header(len(reply), 64, source, bytes(16)) + reply, 0)]
    ping._receive(sock, None, result)  # type: ignore[arg-type]
    line = out.getvalue().splitlines()[-1]
    assert line.startswith(f"64 bytes from {socket.inet_ntop(socket.AF_INET6, source)}: ")
    assert "DIFFERENT ADDRESS" not in line and result.tally.received == 1


def test_a_target_given_by_name_makes_a_run_all_the_same() -> None:
    """A library caller may pass a name (sendto resolves it): no reply can be plain, and
    the run is still made (the command always passes an address)."""
    ping = Pinger(PingOptions("localhost"), TextSink(dst_name="localhost",
                                                      dst_addr="localhost", size=56,
                                                      out=io.StringIO(), err=io.StringIO()))
    assert ping._plain is None
