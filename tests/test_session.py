"""The measuring session (loop, event source, Ctrl-C, SIGQUIT) and the ping run on top of it:
flood sends the next probe before the reply is correlated, the sink still hears iputils'
order. No privilege, no network: fake sockets and a fake event source."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from mace_tools import pacing, pinger
from mace_tools.model import KernelEvent, Measurement, ProbeRecord, RunResult
from mace_tools.pinger import Pinger, PingOptions
from mace_tools.probe.icmp import checksum
from mace_tools.probe.icmp_errors import error_text
from mace_tools.session import Session

TARGET, SOURCE = "198.18.0.2", "198.18.0.1"
NONCE = bytes.fromhex("0102030405060708")


class FakeEvents:
    """An event source that only logs what the run asks of it."""

    kind = "local"
    probe_rate = 0

    def __init__(self, log: list[tuple[str, int]], nonce: bytes = NONCE) -> None:
        self.log = log
        self.closed = False
        self.nonce = nonce

    @property
    def fd(self) -> int:
        return -1

    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int:
        self.log.append(("drain", 0))
        return 0

    def lost(self) -> int:
        return 0

    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) \
            -> tuple[Callable[[], int], Callable[[], int]]:
        return (lambda: self.drain(on_event, on_record)), self.lost

    def probe_state(self, number: int) -> ProbeRecord | None:
        return None

    def close(self) -> None:
        self.closed = True
        self.log.append(("events closed", 0))


class FakeNet:
    """An ICMP socket to a target that echoes every probe; pollable (one end of a
    socketpair, readable while answers wait). `delayed`: an answer is not seen by the
    read that was going on when its probe left (a path slower than Python), only by the
    next; else it is there at once, as when the path answers within sendto() (loopback,
    a netns lab)."""

    ident = None  # as a raw socket's: the run's own id goes out
    warnings = ()  # nothing to say about socket options

    def __init__(self, log: list[tuple[str, int]], delayed: bool,
                 drop: frozenset[int] = frozenset(), refuse: frozenset[int] = frozenset()) \
            -> None:
        """drop: seqs the target never answers; refuse: seqs whose first sendto() fails
        with ENOBUFS (a full device queue), as the kernel refuses a probe."""
        self.log, self.delayed = log, delayed
        self.drop, self.refuse = drop, set(refuse)
        self._poll_end, self._peer = socket.socketpair()
        self._readable = False
        self.ready: list[bytes] = []
        self.pending: list[bytes] = []
        self.closed = False

    def _set_readable(self, readable: bool) -> None:
        if readable and not self._readable:
            self._peer.send(b"x")
        elif self._readable and not readable:
            self._poll_end.recv(1)
        self._readable = readable

    def filter_replies(self, nonce: bytes | None, ident: int | None = None) -> None:
        self.filtered = nonce  # the kernel's job; the fake passes every answer

    def fileno(self) -> int:
        return self._poll_end.fileno()

    def send(self, message: bytes, dst: str) -> None:
        seq = int.from_bytes(message[6:8], "big")
        if seq in self.refuse:
            self.refuse.discard(seq)
            self.log.append(("refused", seq))
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        self.log.append(("sendto", seq))
        if seq in self.drop:
            return
        (self.pending if self.delayed else self.ready).append(echo_reply(message))
        self._set_readable(True)

    def recv(self) -> tuple[bytes, int] | None:
        if self.ready:
            return self.ready.pop(0), 0
        self.ready, self.pending = self.pending, []
        self._set_readable(bool(self.ready))
        return None

    def close(self) -> None:
        self.closed = True
        self._poll_end.close()
        self._peer.close()


def echo_reply(request: bytes) -> bytes:
    """The target's answer to an echo request, as a raw socket returns it."""
    icmp = b"\0\0\0\0" + request[4:]
    icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                         socket.inet_aton(TARGET), socket.inet_aton(SOURCE))
    return header + icmp


class LogSink:
    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def reply(self, m: Measurement) -> None:
        self.log.append(("reply", m.seq))

    def sent(self, seq: int) -> None:
        self.log.append(("sent", seq))

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None  # start, timeout, status, ...: not what is checked here


def ping(monkeypatch: pytest.MonkeyPatch, delayed: bool,
         keep_going: Callable[[], bool] | None = None, drop: frozenset[int] = frozenset(),
         refuse: frozenset[int] = frozenset(), min_interval_ns: int = 60 * 10**9,
         **opts: object) -> tuple[RunResult, list[tuple[str, int]], FakeNet, FakeEvents]:
    """A whole ping run (Pinger.run) over FakeNet and FakeEvents; its log. By default no
    100/s minimum-rate probes: in flood, only replies send (whatever the VM's load)."""
    log: list[tuple[str, int]] = []
    nets: list[FakeNet] = []
    events: list[FakeEvents] = []

    def fake_socket(*args: object, **kwargs: object) -> FakeNet:
        nets.append(FakeNet(log, delayed, drop, refuse))
        return nets[-1]

    def fake_events(nonce: bytes, ns: object, **switches: bool) -> FakeEvents:
        assert nonce == NONCE
        events.append(FakeEvents(log))
        return events[-1]

    monkeypatch.setattr(pinger, "open_icmp_socket", fake_socket)
    monkeypatch.setattr(pacing, "MIN_INTERVAL_NS", min_interval_ns)
    options = PingOptions(TARGET, source=SOURCE, **opts)  # type: ignore[arg-type]
    result = Pinger(options, LogSink(log), nonce=NONCE,  # type: ignore[arg-type]
                    backend_factory=fake_events,  # type: ignore[arg-type]
                    keep_going=keep_going).run()
    return result, log, nets[0], events[0]


def without(log: list[tuple[str, int]], *kinds: str) -> list[tuple[str, int]]:
    return [entry for entry in log if entry[0] not in kinds]


def test_flood_sends_the_next_probe_before_correlating_the_reply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    result, log, net, events = ping(monkeypatch, delayed=True, count=4, interval_s=0.0,
                                    flood=True)
    assert (result.transmitted, result.tally.received) == (4, 4)
    # sendto of probe n+1 comes before reply n is drained for, correlated and reported;
    # the sink hears reply n, then probe n+1 (iputils' order of "\b \b" and ".")
    assert without(log, "events closed") == [
        ("sendto", 1), ("sent", 1),
        ("drain", 0),  # the turn's drain
        ("drain", 0), ("sendto", 2), ("drain", 0), ("reply", 1), ("sent", 2),
        ("drain", 0), ("sendto", 3), ("drain", 0), ("reply", 2), ("sent", 3),
        ("drain", 0), ("sendto", 4), ("drain", 0), ("reply", 3), ("sent", 4),
        ("drain", 0), ("drain", 0), ("reply", 4)]
    assert net.closed and events.closed and log[-1] == ("events closed", 0)


def test_flood_over_a_path_that_answers_within_sendto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each probe sent ahead is answered in the same read, so one batch of replies sends
    on (no turn, no poll between probes) for AHEAD_PER_BATCH probes, then a turn comes
    (a service's keep_going is asked there); every probe's dot before its reply."""
    count = 2 * pinger.AHEAD_PER_BATCH + 5
    asked: list[int] = []

    def keep_going() -> bool:
        asked.append(1)
        return True

    result, log, _, _ = ping(monkeypatch, delayed=False, keep_going=keep_going, count=count,
                             interval_s=0.0, flood=True)
    assert (result.transmitted, result.tally.received) == (count, count)
    sink_order = [e for e in log if e[0] in ("sent", "reply")]
    assert sink_order == [(kind, n) for n in range(1, count + 1) for kind in ("sent", "reply")]
    sends = [seq for kind, seq in without(log, "drain", "events closed") if kind == "sendto"]
    assert sends == list(range(1, count + 1))
    # turns that sent: the first probe, then one after each full batch
    assert len(asked) == 3


def test_flood_waits_for_a_lost_last_reply_as_long_as_iputils(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The last probe of -c goes out within the batch of the replies before it: they
    count already, so its lost reply is awaited max(2 x the longest RTT, 10 ms), as
    iputils, not the whole -W (which is for a run that got no reply at all)."""
    start = time.monotonic()
    result, _, _, _ = ping(monkeypatch, delayed=False, drop=frozenset({3}), count=3,
                           interval_s=0.0, flood=True, linger_s=20.0,
                           min_interval_ns=pacing.MIN_INTERVAL_NS)
    assert (result.transmitted, result.tally.received) == (3, 2)
    assert time.monotonic() - start < 10  # not -W 20


def test_flood_tries_a_refused_probe_again_at_a_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """-l 4: the first reply of the batch of four sends probe 5 ahead; the kernel refuses
    it (ENOBUFS). The other replies of that batch do not try again at once, one after
    another (each try would count towards -W's limit on retries): the next try is the
    next turn's, once the batch is read."""
    result, log, _, _ = ping(monkeypatch, delayed=False, refuse=frozenset({5}), count=8,
                             interval_s=0.0, flood=True, preload=4)
    assert (result.transmitted, result.tally.received) == (8, 8)
    order = [e for e in log if e in (("refused", 5), ("sendto", 5)) or e[0] == "reply"]
    assert order[:6] == [("refused", 5), ("reply", 1), ("reply", 2), ("reply", 3),
                         ("reply", 4), ("sendto", 5)]


def test_paced_ping_sends_on_its_schedule_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """-i 0.05: a reply never sends the next probe (nor makes it due)."""
    result, log, _, _ = ping(monkeypatch, delayed=True, count=3, interval_s=0.05,
                             linger_s=1.0)
    assert (result.transmitted, result.tally.received) == (3, 3)
    order = without(log, "drain", "events closed")
    assert order == [("sendto", 1), ("sent", 1), ("reply", 1), ("sendto", 2), ("sent", 2),
                     ("reply", 2), ("sendto", 3), ("sent", 3), ("reply", 3)]


def test_probes_too_short_for_the_nonce_open_no_event_source(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(pinger, "open_icmp_socket",
                        lambda *args, **kwargs: FakeNet(log, delayed=True))
    result = Pinger(PingOptions(TARGET, source=SOURCE, size=4, count=2, interval_s=0.0),
                    LogSink(log), nonce=NONCE,  # type: ignore[arg-type]
                    backend_factory=lambda *_, **__: pytest.fail("no source wanted")).run()
    assert not result.kernel and result.tally.received == 2
    assert ("drain", 0) not in log


# --- the session on its own ---------------------------------------------------------------

@pytest.fixture
def session() -> Iterator[tuple[Session, list[tuple[str, int]]]]:
    log: list[tuple[str, int]] = []
    s = Session(None, NONCE, after_setup=lambda: log.append(("after_setup", 0)),
                events_factory=lambda nonce, ns, **switches: FakeEvents(log))
    with s:
        yield s, log


def test_setup_runs_once_the_event_source_and_sockets_are_open(
        session: tuple[Session, list[tuple[str, int]]]) -> None:
    s, log = session
    assert s.open_events(lambda ev: None) == NONCE and s.source == "local"
    (net,), source = s.open_sockets(lambda: [FakeNet(log, delayed=True)], TARGET,
                                    source=SOURCE)
    assert source == SOURCE and log == []
    s.ready()
    assert log == [("after_setup", 0)]
    s.drain()
    assert log[-1] == ("drain", 0)
    s.close()
    assert net.closed and log[-1] == ("events closed", 0)


def test_ctrl_c_ends_the_loop_and_sigquit_is_left_alone_without_a_status_line(
        session: tuple[Session, list[tuple[str, int]]]) -> None:
    s, log = session
    s.open_events(lambda ev: None)
    (net,), _ = s.open_sockets(lambda: [FakeNet(log, delayed=True)], TARGET, source=SOURCE)
    s.ready()
    net.send(bytes([8, 0, 0, 0, 0, 1, 0, 1]) + NONCE, TARGET)  # readable from now on
    log.clear()
    before = signal.getsignal(signal.SIGQUIT)
    seen: list[object] = []

    def turn() -> float | None:
        seen.append(signal.getsignal(signal.SIGQUIT))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return 0.0

    s.loop(turn, lambda fd: log.append(("receive", fd)))  # returns: Ctrl-C ends the loop
    assert seen == [before] * 3
    assert log == [("drain", 0), ("receive", net.fileno())] * 2


def test_sigquit_calls_status_and_the_loop_goes_on(
        session: tuple[Session, list[tuple[str, int]]]) -> None:
    s, _ = session
    before = signal.getsignal(signal.SIGQUIT)
    status: list[int] = []
    turns = iter([0.0, 5.0, None])  # the second wait ends on the signal, not its 5 s

    def turn() -> float | None:
        wait = next(turns)
        if wait == 5.0:
            os.kill(os.getpid(), signal.SIGQUIT)
        return wait

    started = time.monotonic()
    s.loop(turn, lambda fd: None, status=lambda: status.append(1))
    assert status == [1] and time.monotonic() - started < 4
    assert signal.getsignal(signal.SIGQUIT) == before  # given back


def test_ping_error_texts_are_iputils() -> None:
    assert error_text(3, 1) == "Destination Host Unreachable"
    assert error_text(11, 0) == "Time to live exceeded"
    # every code and type iputils' pr_icmph names, in its words
    assert error_text(3, 7) == "Destination Host Unknown"
    assert error_text(3, 4, 1400) == "Frag needed and DF set (mtu = 1400)"
    assert error_text(3, 99) == "Dest Unreachable, Bad Code: 99"
    assert error_text(12, 0, 5 << 24) == "Parameter problem: pointer = 5"
    assert error_text(5, 1, 0xC6120001) == "Redirect Host(New nexthop: 198.18.0.1)"
    assert error_text(4, 0) == "Source Quench"
    assert error_text(11, 7) == "Time exceeded, Bad Code: 7"
    assert error_text(42, 0) == "Bad ICMP type: 42"


def test_a_nonce_the_event_source_chose_is_the_one_replies_are_recognised_by(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent chooses the run's nonce: the probes carry it, and the plain lane (echo_check.
    PlainReply) recognises replies by it, not by the nonce the run started with (else a
    reply forged with that one would be taken, and the real ones all parsed)."""
    chosen = bytes.fromhex("a1a2a3a4a5a6a7a8")
    log: list[tuple[str, int]] = []
    parsed: list[bytes] = []
    monkeypatch.setattr(pinger, "open_icmp_socket",
                        lambda *args, **kwargs: FakeNet(log, delayed=False))
    monkeypatch.setattr(pinger, "parse_ip_icmp", lambda data: parsed.append(data))
    run = Pinger(PingOptions(TARGET, source=SOURCE, count=3, interval_s=0.0),
                 LogSink(log),  # type: ignore[arg-type]
                 backend_factory=lambda nonce, ns, **switches: FakeEvents(log, chosen))
    result = run.run()
    assert result.nonce == chosen and result.tally.received == 3
    assert parsed == []  # every reply was the lane's
