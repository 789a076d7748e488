"""mace-ping beside iputils ping in the same two namespaces (tests/pair.py): the same
lines, counts and exit codes, option by option. Quick runs (-i 0.05 style)."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pair import BROADCAST, FAR, NEAR, REPO, Pair, counts, make_pair, untimed
from unprivileged import WITHOUT_CAPABILITIES

from mace_tools.probe import netns

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    yield from make_pair("mpp")


def replies(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " bytes from " in ln]


def test_count_with_deadline_keeps_sending_until_count_replies(pair: Pair) -> None:
    """-c 3 -w 5 with every other reply lost: 6 probes for 3 replies, as iputils."""
    results = []
    for tool in ("iputils", "mace"):
        with pair.drop_replies(every=2):
            results.append(pair.ping("-c", "3", "-w", "5", "-i", "0.05", FAR, tool=tool))
    iputils, mace = results
    assert counts(mace.stdout) == counts(iputils.stdout) == \
        "6 packets transmitted, 3 received, 50% packet loss"
    assert mace.returncode == iputils.returncode == 0


def test_wait_after_the_last_probe(pair: Pair) -> None:
    """-W is the wait while no reply came; once one came, max(2 x RTT, interval)."""
    with pair.drop_replies(every=2, packet=1):  # the second reply is lost
        mace = pair.ping("-c", "2", "-i", "0.2", "-W", "8", "-q", FAR)
    assert counts(mace.stdout) == "2 packets transmitted, 1 received, 50% packet loss"
    assert mace.wall_s < 5, mace.wall_s  # 0.2 s after the last probe, not 8
    with pair.drop_replies():
        mace = pair.ping("-c", "2", "-i", "0.1", "-W", "1", "-q", FAR)
    assert mace.returncode == 1 and mace.wall_s >= 1.1, mace.wall_s


def test_duplicates_are_marked(pair: Pair) -> None:
    with pair.duplicate_replies():
        iputils, mace = pair.both("-c", "3", "-i", "0.05", FAR)
    assert [untimed(ln) for ln in replies(mace.stdout)] == \
        [untimed(ln) for ln in replies(iputils.stdout)]
    assert sum("(DUP!)" in ln for ln in replies(mace.stdout)) == 2
    assert counts(mace.stdout) == counts(iputils.stdout) == \
        "3 packets transmitted, 3 received, +2 duplicates, 0% packet loss"


@pytest.mark.parametrize("args", [[], ["-n"]])
def test_name_target_as_iputils(pair: Pair, args: list[str]) -> None:
    """A name prints its canonical name in the header and summary, and replies as
    "from NAME (ADDR)" (a reverse lookup from A's files), unless -n."""
    iputils, mace = pair.both(*args, "-c", "2", "-i", "0.05", "far")
    assert mace.stdout.splitlines()[0] == iputils.stdout.splitlines()[0] == \
        f"PING far.pair.test ({FAR}) 56(84) bytes of data."
    shown = FAR if args else f"far.pair.test ({FAR})"
    assert [untimed(ln) for ln in replies(mace.stdout)] == \
        [untimed(ln) for ln in replies(iputils.stdout)] == \
        [f"64 bytes from {shown}: icmp_seq={n} ttl=64" for n in (1, 2)]
    assert "--- far.pair.test ping statistics ---" in mace.stdout


def test_names_from_the_probing_netns_files(pair: Pair) -> None:
    """Run from our own netns with --netns A: A's /etc/netns files name the hosts."""
    proc = subprocess.run(
        [sys.executable, "-m", "mace_tools.cli.ping", "--netns", pair.a, "-c", "1", "far"],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"PING far.pair.test ({FAR}) 56(84) bytes of data."
    assert replies(proc.stdout)[0].startswith(f"64 bytes from far.pair.test ({FAR}): ")


def test_an_address_target_is_not_looked_up(pair: Pair) -> None:
    mace = pair.ping("-c", "1", FAR)
    assert replies(mace.stdout)[0].startswith(f"64 bytes from {FAR}: icmp_seq=1 ")
    forced = pair.ping("-H", "-c", "1", FAR)  # -H: looked up all the same
    assert replies(forced.stdout)[0].startswith(f"64 bytes from far.pair.test ({FAR}): ")


@pytest.mark.parametrize("args", [["-I", "va"], ["-I", NEAR], ["-B"]])
def test_interface_and_source_in_the_header(pair: Pair, args: list[str]) -> None:
    iputils, mace = pair.both(*args, "-c", "1", FAR)
    assert mace.stdout.splitlines()[0] == iputils.stdout.splitlines()[0]
    assert mace.returncode == iputils.returncode == 0


def test_interface_that_is_not_there(pair: Pair) -> None:
    iputils, mace = pair.both("-I", "1", "-c", "1", FAR)  # a name: "1" is no address
    assert mace.stderr == iputils.stderr.replace("ping:", "mace-ping:") == \
        "mace-ping: SO_BINDTODEVICE 1: No such device\n"
    assert mace.returncode == iputils.returncode == 2


def test_broadcast(pair: Pair) -> None:
    iputils, mace = pair.both("-c", "1", BROADCAST)
    assert iputils.returncode == mace.returncode == 2
    assert mace.stderr == "mace-ping: Do you want to ping broadcast? Then -b. If not, " \
        "check your local firewall rules\n"
    iputils, mace = pair.both("-b", "-c", "2", "-i", "0.1", BROADCAST)
    assert "WARNING: pinging broadcast address" in mace.stderr
    assert [untimed(ln) for ln in replies(mace.stdout)] == \
        [untimed(ln) for ln in replies(iputils.stdout)]
    assert "DIFFERENT ADDRESS" not in mace.stdout and mace.returncode == 0


def test_summaries_pipe_and_ipg_ewma(pair: Pair) -> None:
    """-l: "pipe N"; -f and -A: iputils' "ipg/ewma" after the rtt figures."""
    for args, tail in ((["-l", "3", "-c", "3"], r", pipe 3$"),
                       (["-f", "-c", "200"], r", ipg/ewma \d+\.\d{3}/\d+\.\d{3} ms$"),
                       (["-A", "-c", "5"], r", ipg/ewma \d+\.\d{3}/\d+\.\d{3} ms$")):
        iputils, mace = pair.both(*args, "-q", FAR)
        for run in (iputils, mace):
            assert re.search(tail, run.stdout.splitlines()[-1]), (args, run.stdout)


def _requests_seen_by_b(pair: Pair, args: list[str],
                        prefix: tuple[str, ...] = ()) -> tuple[list[bytes], str]:
    """The echo requests B receives while mace-ping ARGS runs in A (IP header on), and
    what mace-ping printed."""
    with netns.entered(Path(f"/run/netns/{pair.b}")):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            if data[(data[0] & 0x0F) * 4] == 8:
                seen.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        mace = pair.ping(*args, "-c", "2", "-i", "0.05", FAR, prefix=prefix)
    finally:
        done.set()
        reader.join()
        sock.close()
    assert mace.returncode == 0, mace.stderr
    return seen, mace.stdout


def test_options_on_the_wire(pair: Pair) -> None:
    """-p -Q -t -e -M do -s as B receives them."""
    seen, _ = _requests_seen_by_b(pair, ["-p", "abc", "-Q", "0x20", "-t", "7", "-e", "4242",
                                      "-M", "do", "-s", "40"])
    assert len(seen) == 2
    for n, packet in enumerate(seen, start=1):
        tos, ttl, flags = packet[1], packet[8], packet[6] >> 5
        icmp = packet[20:]
        assert (tos, ttl, flags & 0b010) == (0x20, 7, 0b010)  # DF: -M do
        assert int.from_bytes(icmp[4:6], "big") == 4242 and int.from_bytes(icmp[6:8], "big") == n
        payload = icmp[8:]
        assert len(payload) == 40
        assert payload[12:] == bytes([0xAB, 0x0C] * 14)  # byte i: pattern[i % 2]


def test_pattern_line_and_echoed_payload(pair: Pair) -> None:
    iputils, mace = pair.both("-p", "abc", "-c", "1", FAR)
    assert mace.stdout.splitlines()[0] == iputils.stdout.splitlines()[0] == "PATTERN: 0xab0c"
    assert "wrong data" not in mace.stdout and mace.returncode == 0


def test_line_options(pair: Pair) -> None:
    """-D -v -3 -a -U together: stamp, ident, three decimals, bell; the run as usual."""
    mace = pair.ping("-D", "-v", "-3", "-a", "-U", "-e", "777", "-c", "1", FAR)
    line = replies(mace.stdout)[0]
    assert re.match(rf"^\[\d+\.\d{{6}}\] 64 bytes from {FAR}: icmp_seq=1 ident=777 ttl=64 "
                    r"time=\d+\.\d{3} ms ", line), line
    assert line.endswith("\a") and mace.returncode == 0


def test_socket_switches_run(pair: Pair) -> None:
    """-C -d -r -L -m -S -F: set as iputils sets them (read back in test_ping_options.py);
    the run is otherwise unchanged."""
    mace = pair.ping("-C", "-d", "-r", "-L", "-m", "5", "-S", "65536", "-F", "1", "-c", "2",
                     "-i", "0.05", FAR)
    assert mace.returncode == 0 and mace.stderr == "", mace.stderr
    assert counts(mace.stdout) == "2 packets transmitted, 2 received, 0% packet loss"


def test_json_lines(pair: Pair) -> None:
    mace = pair.ping("-j", "-c", "2", "-i", "0.05", "-l", "2", "far")
    objects = [json.loads(ln) for ln in mace.stdout.splitlines()]
    reply_keys = ["bytes", "host", "seq", "ttl", "time", "rtt_corrected", "egress", "ingress"]
    assert [list(o) for o in objects[:2]] == [reply_keys, reply_keys]
    assert [o["seq"] for o in objects[:2]] == [1, 2]
    assert objects[0]["host"] == f"far.pair.test ({FAR})" and objects[0]["bytes"] == 64
    assert re.fullmatch(r"\d+\.\d+", objects[0]["time"])
    stats = objects[2]
    assert list(stats) == ["host", "transmitted", "received", "duplicates", "corrupted",
                           "errors", "loss", "time", "rtt", "pipe", "mace"]
    assert (stats["host"], stats["transmitted"], stats["received"], stats["loss"]) == \
        ("far.pair.test", 2, 2, 0)
    assert list(stats["rtt"]) == ["min", "avg", "max", "mdev"]
    assert len(objects) == 3
    with pair.drop_replies():  # iputils prints no statistics object without a reply
        lost = pair.ping("-j", "-c", "1", "-W", "0.2", FAR)
    assert lost.stdout == "" and lost.returncode == 1


class PtrResponder:
    """A DNS responder bound to 127.0.0.1:53 inside a netns, answering PTR queries from
    a table (NXDOMAIN otherwise): the name in its answer points back at the question."""

    def __init__(self, ns: str, names: dict[str, str]) -> None:
        self.names, self.asked = names, []
        with netns.entered(Path(f"/run/netns/{ns}")):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            labels, pos = [], 12
            while query[pos]:
                labels.append(query[pos + 1:pos + 1 + query[pos]].decode())
                pos += 1 + query[pos]
            qname = ".".join(labels)
            self.asked.append(qname)
            name = self.names.get(qname)
            head = query[:2] + (b"\x81\x80" if name else b"\x81\x83") + b"\x00\x01" + \
                (b"\x00\x01" if name else b"\x00\x00") + b"\x00\x00\x00\x00"
            answer = b""
            if name:
                rdata = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 60, len(rdata)) + rdata
            self.sock.sendto(head + query[12:pos + 5] + answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_reverse_lookup_asks_the_probing_netns_dns(pair: Pair) -> None:
    """A sender not in A's hosts file is named by a PTR query to A's resolv.conf server,
    asked inside A (from our own netns, --netns A)."""
    responder = PtrResponder(pair.a, {"1.97.18.198.in-addr.arpa": "near.ptr.test"})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mace_tools.cli.ping", "--netns", pair.a, "-H", "-c", "1",
             NEAR], capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(REPO)})
    finally:
        responder.close()
    assert proc.returncode == 0, proc.stderr
    assert replies(proc.stdout)[0].startswith(f"64 bytes from near.ptr.test ({NEAR}): ")
    assert responder.asked == ["1.97.18.198.in-addr.arpa"]  # one lookup, cached


def test_outstanding_probes_with_stamps_even_when_quiet(pair: Pair) -> None:
    """-O -D -q: iputils prints "no answer yet", stamped, whatever -q keeps back."""
    with pair.drop_replies():
        iputils, mace = pair.both("-O", "-D", "-q", "-c", "2", "-i", "0.1", "-W", "0.2", FAR)

    def unstamped(text: str) -> list[str]:
        return [re.sub(r"^\[\d+\.\d{6}\] ", "[T] ", ln) for ln in text.splitlines()
                if "no answer" in ln]

    assert unstamped(mace.stdout) == unstamped(iputils.stdout) == \
        ["[T] no answer yet for icmp_seq=1"]
    assert mace.returncode == iputils.returncode == 1


def test_ident_on_a_ping_socket(pair: Pair) -> None:
    """Without CAP_NET_RAW (a ping socket, where ping_group_range allows), -e binds the
    socket to that id, as iputils: it goes out, and -v shows it."""
    subprocess.run(["ip", "netns", "exec", pair.a, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=0 2147483647"], check=True)
    seen, out = _requests_seen_by_b(pair, ["-e", "4242", "-v"], prefix=WITHOUT_CAPABILITIES)
    assert [int.from_bytes(p[24:26], "big") for p in seen] == [4242, 4242]
    assert [ln.split(" ttl=")[0] for ln in replies(out)] == \
        [f"64 bytes from {FAR}: icmp_seq={n} ident=4242" for n in (1, 2)]
