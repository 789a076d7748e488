"""The ping run loop: sendto errors go on as iputils, -i 0 still reads replies, SIGQUIT
prints iputils' status line, and per-probe bookkeeping stays bounded on long runs."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import pytest

from mace_tools.model import Probe
from mace_tools.pinger import _Probes

NETNS = f"mtrl{os.getpid() % 100000}"  # per-run name: parallel or leftover runs never clash
SOURCE = "198.18.77.1"
# destination -> (route in our netns, sendto's error); none: no route at all
ROUTES = {
    "198.18.77.100": ("unreachable", "No route to host"),
    "198.18.77.101": ("prohibit", "Permission denied"),
    "198.18.77.102": ("blackhole", "Invalid argument"),
    "198.18.77.103": (None, "Network is unreachable"),
}


def ping_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mace_tools.cli.ping", *args]


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def no_route_netns() -> Iterator[str]:
    """A netns of our own: lo up with SOURCE, and routes that make sendto() fail."""
    _ip("netns", "add", NETNS)
    try:
        _ip("-n", NETNS, "link", "set", "lo", "up")
        _ip("-n", NETNS, "addr", "add", f"{SOURCE}/32", "dev", "lo")
        for dst, (kind, _) in ROUTES.items():
            if kind is not None:
                _ip("-n", NETNS, "route", "add", kind, dst)
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.mark.lab
@pytest.mark.parametrize("dst", sorted(ROUTES))
def test_sendto_errors_are_reported_counted_and_the_run_goes_on(no_route_netns: str,
                                                                  dst: str) -> None:
    """-I ADDR skips the route check at start (as iputils), so every sendto() fails: each
    is one iputils line on stderr, counted in the summary, and the run sends all -c."""
    proc = run(["ip", "netns", "exec", no_route_netns,
                *ping_cmd("-I", SOURCE, "-c", "3", "-i", "0.05", dst)])
    text = ROUTES[dst][1]
    assert proc.returncode == 1, proc.stderr  # nothing received, as ping
    assert proc.stderr.splitlines() == [f"mace-ping: sendmsg: {text}"] * 3
    assert "Traceback" not in proc.stderr
    assert "3 packets transmitted, 0 received, +3 errors, 100% packet loss" in proc.stdout


@pytest.mark.lab
def test_sendto_errors_in_flood_and_ndjson(no_route_netns: str) -> None:
    exec_ns = ["ip", "netns", "exec", no_route_netns]
    proc = run([*exec_ns, *ping_cmd("-I", SOURCE, "-f", "-c", "3", "198.18.77.100")])
    assert proc.stdout.splitlines()[1] == "EEE"  # iputils -f: an E per failed probe
    assert proc.stderr == ""
    proc = run([*exec_ns, *ping_cmd("-I", SOURCE, "-c", "2", "-i", "0.05", "--ndjson",
                                    "198.18.77.100")])
    records = [ln for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    assert len(records) == 2 and '"error": "sendmsg: No route to host"' in records[0]
    assert '"type": "timeout"' not in proc.stdout  # never sent: an error, not a timeout


def _counts(stdout: str) -> tuple[int, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", stdout)
    assert found, stdout
    return int(found.group(1)), int(found.group(2))


@pytest.mark.lab
def test_interval_zero_still_reads_replies() -> None:
    """-i 0 without -f paces as iputils (next probe on reply): replies are read all along,
    not after the last probe (without -c there was no last probe: nothing was read)."""
    proc = run(ping_cmd("-i", "0", "-w", "1", "-q", "127.0.0.1"))
    assert proc.returncode == 0, proc.stderr
    sent, received = _counts(proc.stdout)
    # (the old loop read none); a few may still be in flight at the deadline
    assert received >= 10 and received >= 0.9 * sent, proc.stdout


def _read_line(stream: IO[bytes], timeout: float) -> str | None:
    """The next line of a child's pipe, or None after timeout seconds. Bytes, decoded
    here: a text pipe would end a line at the status line's leading \\r."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return stream.readline().decode()


@contextmanager
def ping_process(*args: str, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """mace-ping ARGS running for the with-block, killed at its end if it still runs. Its
    pipes are unbuffered on our side: _read_line selects on the fd, and a buffered reader
    could hold the next line already read (the reply that came with the header), leaving
    the fd silent until the next probe's."""
    proc = subprocess.Popen(ping_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, bufsize=0,
                            **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def interrupt_after_one_reply(proc: subprocess.Popen[bytes]) -> bytes:
    """Ctrl-C a run that got one reply: it ends at once, exit 0, with iputils' summary;
    returns what it printed on stderr."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"1 packets transmitted, 1 received, 0% packet loss" in out
    return err


@pytest.mark.lab
def test_sigquit_prints_status_at_once_and_the_run_goes_on() -> None:
    with ping_process("-i", "10", "127.0.0.1") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert (_read_line(proc.stdout, 20) or "").startswith("PING ")
        reply = _read_line(proc.stdout, 20)
        assert reply and reply.startswith("64 bytes from 127.0.0.1"), reply
        asked = time.monotonic()
        proc.send_signal(signal.SIGQUIT)
        status = _read_line(proc.stderr, 8)
        # printed on the signal, not at the next probe 10 s later
        assert status is not None and time.monotonic() - asked < 8
        found = re.fullmatch(r"\r1/1 packets, 0% loss, min/avg/ewma/max = "
                             r"(\d+\.\d{3})/(\d+\.\d{3})/(\d+\.\d{3})/(\d+\.\d{3}) ms\n", status)
        assert found, repr(status)
        assert len(set(found.groups())) == 1  # one reply: min = avg = ewma = max
        assert proc.poll() is None  # SIGQUIT does not end the run (nor dump core)
        err = interrupt_after_one_reply(proc)
    assert err == b""  # nothing else: one status line, no traceback


@pytest.mark.lab
def test_sigint_ends_the_run_even_when_started_ignored() -> None:
    """A background job of a script (or nohup) starts with SIGINT ignored; as iputils,
    mace-ping takes it anyway: the run ends with its summary."""
    with ping_process("-i", "10", "127.0.0.1",
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as proc:
        assert proc.stdout is not None
        assert (_read_line(proc.stdout, 20) or "").startswith("PING ")
        assert (_read_line(proc.stdout, 20) or "").startswith("64 bytes from 127.0.0.1")
        interrupt_after_one_reply(proc)


@pytest.mark.parametrize("numbered", [True, False], ids=["by number", "by seq"])
def test_probe_bookkeeping_is_bounded_and_reports_each_loss_once(numbered: bool) -> None:
    """Seqs wrap at 65536: a probe unanswered when the one 65536 after it is sent is
    reported lost then, once; the tables never exceed 65536 entries; the end lists the last
    window's losses. Numbered probes are keyed by number, so a reply to a probe of an
    earlier lap finds nothing; seq-keyed ones (payload too short) by seq."""
    probes = _Probes(numbered)
    lost_at = []
    for n in range(1, 70_001):
        if probes.add(n, Probe(n & 0xFFFF, 0, 0)):
            lost_at.append(n)
        if n % 1000 and n != 69_999:  # probes 1000, 2000, ... and 69999 go unanswered
            probes.answered.add(probes.key(n))
    assert lost_at == [n + 0x10000 for n in (1000, 2000, 3000, 4000)]
    assert len(probes.sent) <= 0x10000 and len(probes.answered) <= 0x10000
    assert probes.unanswered(70_000) == [n & 0xFFFF for n in
                                         (*range(5000, 70_000, 1000), 69_999, 70_000)]
    assert (1000 in probes.sent) is not numbered  # number 1000 left the window; seq 1000 is
    # probe 66536's
    assert probes.key_of_seq(1000, 70_000) == probes.key(66_536)
    assert probes.key_of_seq(69_999 & 0xFFFF, 70_000) == probes.key(69_999)
    probes.forget(probes.key(69_999))  # sendto failed: an error, never also a timeout
    assert probes.key_of_seq(69_999 & 0xFFFF, 70_000) is None  # no error can name it now
    assert probes.unanswered(70_000)[-2:] == [69_000 & 0xFFFF, 70_000 & 0xFFFF]


class _Replies:
    """A socket that sends nothing anywhere and hands the run the datagrams queued."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.incoming: list[bytes] = []

    def send(self, message: bytes, dst: str) -> None:
        self.sent.append(message)

    def recv(self) -> tuple[bytes, int] | None:
        return (self.incoming.pop(0), 0) if self.incoming else None


class _Seen:
    def __init__(self) -> None:
        self.replies: list[int] = []

    def reply(self, m: Any) -> None:
        self.replies.append(m.seq)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def _as_reply(request: bytes) -> bytes:
    """The echo reply a target sends for an echo request (IPv4 header in front)."""
    from mace_tools.probe.icmp import checksum

    body = b"\0\0\0\0" + request[4:]
    icmp = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    header = bytes([0x45, 0]) + (20 + len(icmp)).to_bytes(2, "big") + bytes(4) + \
        bytes([64, 1, 0, 0]) + bytes([198, 18, 0, 2, 198, 18, 1, 10])
    return header + icmp


def test_a_reply_from_an_earlier_lap_is_not_taken_for_the_new_probe() -> None:
    """Probe 5 and probe 65541 share seq 5. Probe 5's reply, late by one lap, names its
    own number in the payload: it is not counted for probe 65541, whose own reply is."""
    from mace_tools.model import RunResult
    from mace_tools.pinger import Pinger, PingOptions

    sink, sock = _Seen(), _Replies()
    pinger = Pinger(PingOptions("198.18.0.2", size=56), sink, nonce=b"\x07" * 8)
    result = RunResult(b"\x07" * 8, "198.18.1.10")
    for n in range(1, 65_542):
        assert pinger._send(sock, n, result) is None  # type: ignore[arg-type]
    early, late = sock.sent[4], sock.sent[65_540]
    assert early[6:8] == late[6:8] == (5).to_bytes(2, "big")  # the same seq
    sock.incoming = [_as_reply(early)]
    assert pinger._receive(sock, None, result) == 0  # type: ignore[arg-type]
    assert sink.replies == []
    sock.incoming = [_as_reply(late)]
    assert pinger._receive(sock, None, result) == 1  # type: ignore[arg-type]
    assert sink.replies == [5]
