"""The measured party is hostile (issue 9, point 5): its files, its PID, its neighbours'
packets, and the environment a root process is started with.

- A fake container (a busybox process chrooted into a directory made here, in a netns made
  here) whose /etc/hosts is an absolute symlink to a host file, whose resolv.conf is a FIFO,
  or whose files lead into /proc: names resolve inside it, or the run stops with one line.
- PIDs are pinned (pidfd): a process that exits is never replaced by whoever gets its PID.
- $MACE_BPF_OBJECT is honoured only for a file nobody but root could have written.
- Capabilities are gone once set-up is done, and the run still measures fully.
- A neighbour forges ICMP (scapy) at the prober while it runs: nothing is mis-attributed,
  and the prober netns' own ICMP counters prove every forged packet arrived.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.packet import Packet, Raw

from mace_tools.errors import MaceError
from mace_tools.kernel import backend
from mace_tools.lab.topology import BRIDGE_ADDR, Lab
from mace_tools.probe import netns
from mace_tools.probe.icmp import NONCE_LEN
from mace_tools.probe.resolver import read_confined

REPO = Path(__file__).resolve().parents[1]
PREFIX = f"mh{os.getpid() % 100000}"  # this run's names: never another run's
BUSYBOX = Path("/bin/busybox")  # static (busybox-static): runs chrooted with no libraries


def mace(tool: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"mace_tools.cli.{tool}", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- a fake container -------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    root: Path
    pid: int
    netns: str


def _sleeping(pid: int, root: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/root") == str(root) and \
            Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] == [b"sleep"]
    except (OSError, IndexError):
        return False


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    """A busybox `sleep` chrooted into tmp_path/root (its own /proc mounted), in a netns of its
    own with lo up: the shape of a container's init, for --pid. Removed also on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, chroot)")
    if not BUSYBOX.exists():
        pytest.skip("needs a static busybox (Debian: busybox-static)")
    root = tmp_path / "root"
    for sub in ("bin", "etc", "proc"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    name = f"{PREFIX}-box"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)  # a leftover of ours
    subprocess.run(["ip", "netns", "add", name], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # ip netns exec and unshare exec in place: proc.pid becomes the box's init.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", name, "unshare", "--mount", "--root", str(root),
             "/bin/busybox", "sh", "-c",
             "/bin/busybox mount -t proc proc /proc && exec /bin/busybox sleep 600"])
        wait_until(lambda: _sleeping(proc.pid, root), "the box to start")
        yield Box(root, proc.pid, name)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def in_box(box: Box, path: str) -> Path:
    """Where an absolute path of the box lives on the host."""
    return box.root / path.lstrip("/")


@pytest.mark.lab
def test_absolute_hosts_symlink_resolves_inside_the_container(box: Box, tmp_path: Path) -> None:
    host_file = tmp_path / "host-etc" / "hosts"
    host_file.parent.mkdir()
    host_file.write_text("198.18.5.5 marker.test\n")  # only the host's file knows the marker
    in_box(box, "/etc/hosts").symlink_to(host_file)
    in_box(box, "/etc/resolv.conf").write_text(
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")  # nobody answers in the box
    proc = mace("ping", "--pid", str(box.pid), "-c", "1", "-W", "1", "marker.test")
    assert one_error_line(proc) == "mace-ping: marker.test: Temporary failure in name resolution"
    assert "198.18.5.5" not in proc.stdout + proc.stderr
    # The same link, followed as the box's own libc would: to that path under the box's root.
    in_box(box, str(host_file)).parent.mkdir(parents=True)
    in_box(box, str(host_file)).write_text("127.0.0.7 marker.test\n")
    proc = mace("ping", "--pid", str(box.pid), "-c", "1", "-W", "2", "marker.test")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PING marker.test (127.0.0.7)"), proc.stdout
    assert "1 packets transmitted, 1 received" in proc.stdout


@pytest.mark.parametrize("fifo", ["resolv.conf", "hosts"])
def test_fifo_is_refused_not_waited_on(box: Box, fifo: str) -> None:
    os.mkfifo(in_box(box, f"/etc/{fifo}"))
    start = time.monotonic()
    proc = mace("ping", "--pid", str(box.pid), "-c", "1", "somewhere.test")
    assert one_error_line(proc) == \
        f"mace-ping: refusing to read /etc/{fifo} of pid {box.pid}: not a regular file"
    assert time.monotonic() - start < 10  # no open or read ever waited on the FIFO


def test_proc_magic_links_lead_nowhere(box: Box, tmp_path: Path) -> None:
    """/proc/self is resolved by the kernel for the *reader*: a root tool following the box's
    /proc/self/root would land in the host's root. Magic links are refused."""
    marker = tmp_path / "host-hosts"
    marker.write_text("198.18.5.6 magic.test\n")
    in_box(box, "/etc/hosts").symlink_to(f"/proc/self/root{marker}")
    proc = mace("ping", "--pid", str(box.pid), "-c", "1", "magic.test")
    assert one_error_line(proc) == (f"mace-ping: cannot read /etc/hosts of pid {box.pid}: "
                                    "Too many levels of symbolic links")


def test_resolv_conf_via_dotdot_stays_inside(box: Box) -> None:
    """`..` above the box's root stops at its root, as it does for the box itself."""
    in_box(box, "/etc/real-resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")
    in_box(box, "/etc/resolv.conf").symlink_to("../../../../../../../etc/real-resolv.conf")
    pinned = netns.pin(box.pid)
    try:
        seen = read_confined(pinned.root_path, "etc/resolv.conf")
    finally:
        netns.release(pinned)
    assert seen == b"nameserver 127.0.0.1\noptions timeout:1\n"


# --- PIDs are pinned ---------------------------------------------------------------------

@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another process's namespaces)")
@pytest.mark.parametrize("ioctl", [True, False], ids=["pidfd-ioctl", "proc-fallback"])
def test_pin_holds_that_process_and_no_other(sleeper: subprocess.Popen[bytes], ioctl: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if not ioctl:  # a kernel older than 6.11 has no PIDFD_GET_NET_NAMESPACE
        monkeypatch.setattr(netns, "PIDFD_GET_NET_NAMESPACE", 0xFFFE)  # answered ENOTTY
    pinned = netns.pin(sleeper.pid)
    holds = 1  # each pin() is a hold, released one by one (the last closes the fds)
    try:
        assert netns.pin(sleeper.pid) is pinned  # netns and root stay one process's
        holds += 1
        assert os.stat(pinned.netns_path).st_ino == os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino
        assert os.path.samestat(os.stat(pinned.root_path), os.stat("/"))
        assert netns.resolve(pid=sleeper.pid) == pinned.netns_path
        holds += 1
        sleeper.kill()
        sleeper.wait()  # reaped: from here on the kernel may give its PID to anyone
        with pytest.raises(MaceError, match=rf"^process {sleeper.pid} exited$"):
            netns.pin(sleeper.pid)
    finally:
        for _ in range(holds - 1):
            netns.release(pinned)
            os.fstat(pinned.netns_fd)  # another holder's pin is never closed under it
        netns.release(pinned)
        netns.release(pinned)  # once more: a no-op, never a second close
    with pytest.raises(MaceError, match=rf"^no process with pid {sleeper.pid}$"):
        netns.pin(sleeper.pid)


# --- $MACE_BPF_OBJECT ---------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of other owners)")
def test_bpf_object_override_must_be_roots_alone(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = Path(backend.__file__).with_name("mace.bpf.o")
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    good = safe / "mace.bpf.o"
    good.write_bytes(b"\x7fELF")
    good.chmod(0o644)
    monkeypatch.setenv("MACE_BPF_OBJECT", str(good))
    assert backend.object_path() == good
    (tmp_path / "link.o").symlink_to(good)  # what is checked and returned is the real file
    monkeypatch.setenv("MACE_BPF_OBJECT", str(tmp_path / "link.o"))
    assert backend.object_path() == good

    def refused(path: Path, why: str) -> None:
        monkeypatch.setenv("MACE_BPF_OBJECT", str(path))
        with pytest.raises(MaceError, match=rf"^MACE_BPF_OBJECT={re.escape(str(path))} not "
                                            rf"used: {why} \(needs a regular file owned by "
                                            r"root or by you, in directories no one else"):
            backend.object_path()

    good.chmod(0o666)
    refused(good, f"{re.escape(str(good))} is writable by group or others")
    good.chmod(0o644)
    os.chown(good, 65534, 65534)
    refused(good, f"{re.escape(str(good))} belongs to uid 65534")
    os.chown(good, 0, 0)
    safe.chmod(0o777)  # anyone could swap the file for another
    refused(good, f"{re.escape(str(safe))} is writable by group or others")
    safe.chmod(0o1777)  # sticky: only root may replace root's file
    assert backend.object_path() == good
    refused(Path("/dev/null"), "not a regular file")
    monkeypatch.setenv("MACE_BPF_OBJECT", str(shipped))
    assert backend.object_path() == shipped.resolve()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a raw socket comes first)")
def test_untrusted_bpf_object_is_one_line(tmp_path: Path) -> None:
    evil = tmp_path / "evil.bpf.o"
    evil.write_bytes(b"\x7fELF")
    evil.chmod(0o646)
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.ping", "-c", "1", "127.0.0.1"],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "MACE_BPF_OBJECT": str(evil)})
    assert one_error_line(proc).startswith(f"mace-ping: MACE_BPF_OBJECT={evil} not used: ")
    assert "0 received" not in proc.stdout  # stopped before a probe was counted


# --- privileges are dropped after set-up --------------------------------------------------

def _rest(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of stdout and stderr once stdout has been read line by line. Not
    communicate(): it reads the pipes' fds and would lose what the line reader buffered."""
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait()
    return out, err


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _status_after(lab: Lab, cmd: list[str], marker: str) -> tuple[dict[str, str], str, str, int]:
    """Run a mace module from the lab host (ip netns exec execs in place: same PID), wait for
    a stdout line containing marker (printed only after set-up) and read its /proc status
    then; (status, stdout, stderr, exit status)."""
    proc = subprocess.Popen(lab.on_host(sys.executable, "-m", *cmd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "PYTHONUNBUFFERED": "1"})
    killer = threading.Timer(60, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                status = _status(proc.pid)
                break
        else:
            raise AssertionError(f"no '{marker}' line: {''.join(seen)} {proc.stderr.read()}")
        out, err = _rest(proc)
    finally:
        killer.cancel()
    return status, "".join(seen) + out, err, proc.returncode


@pytest.mark.lab
def test_running_ping_holds_no_capability(lab: Lab) -> None:
    status, out, err, code = _status_after(
        lab, ["mace_tools.cli.ping", "--netns", lab.container_ns(0), "-c", "6", "-i", "0.1",
         lab.target_addr], "icmp_seq=1 ")
    assert (status["CapEff"], status["CapPrm"], status["CapInh"], status["CapAmb"]) == \
        ("0" * 16,) * 4
    assert status["NoNewPrivs"] == "1"
    assert status["Threads"] == "1"  # capabilities are per thread: no other kept any
    assert code == 0, err
    # and, without capabilities: ring buffer reads, map lookups, programs detached at close
    assert "6 packets transmitted, 6 received, 0% packet loss" in out
    assert "kernel data 6/6 replies (100%), 0 events lost" in out


@pytest.mark.lab
def test_running_traceroute_holds_no_capability(lab: Lab) -> None:
    status, out, err, code = _status_after(
        lab, ["mace_tools.cli.traceroute", "-I", "-n", "--netns", lab.container_ns(0), "-q",
              "1", lab.target_addr], "traceroute to ")
    assert (status["CapEff"], status["CapPrm"], status["NoNewPrivs"]) == ("0" * 16,) * 2 + ("1",)
    assert code == 0, err
    assert re.search(rf"^ 2  {re.escape(lab.target_addr)}  \S+ ms  corrected=[0-9.]+$", out,
                     re.MULTILINE), out


@pytest.mark.lab
def test_after_the_drop_maps_read_and_links_close() -> None:
    """What the run still does without capabilities, asked of the kernel directly (6.18):
    the lost-events counter reads (mapped memory), and closing leaves no BPF link behind."""
    script = """
import os, sys
from mace_tools.kernel import native
from mace_tools.kernel.backend import Backend
def links():
    out = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = open(f"/proc/self/fdinfo/{fd}").read()
        except OSError:
            continue
        out += [fd] if "link_type:" in text else []
    return out
b = Backend(os.urandom(8))
b.open()
assert len(links()) == 3, links()
native.drop_privileges()
assert open("/proc/self/status").read().count("CapEff:\\t0000000000000000") == 1
assert b.lost() == 0
b.close()
assert links() == [], links()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


# --- a neighbour forges ICMP at the prober --------------------------------------------------

NEVER_SENT = 40000  # a seq no run here reaches
_FILL = bytes(i & 0xFF for i in range(NONCE_LEN, 56))
_OPTIONS = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]  # IHL 6


@dataclass(frozen=True)
class Run:
    """What a forger knows of the run it attacks: it guessed the nonce, and the id (the
    prober's PID), and it saw which seq was sent."""
    nonce: bytes
    ident: int
    prober: str
    target: str
    sent_seq: int


def _bad_checksum(icmp: Packet) -> bytes:
    raw = bytearray(bytes(icmp))
    raw[3] ^= 0xFF  # never the same sum again (0x0000 and 0xFFFF would be)
    return bytes(raw)


def _patched(pkt: Packet, index: int, value: int) -> bytes:
    raw = bytearray(bytes(pkt))
    raw[index] = value
    return bytes(raw)


def _lies(run: Run) -> dict[str, bytes]:
    """ICMP messages (ICMP header on) that must never count as a reply or an error."""
    payload = run.nonce + _FILL

    def reply(seq: int) -> Packet:
        return ICMP(type=0, id=run.ident, seq=seq) / Raw(payload)

    def request(seq: int, **ip: object) -> Packet:  # our probe, as a router would quote it
        return IP(src=run.prober, dst=run.target, **{"ttl": 63, **ip}) / \
            ICMP(type=8, id=run.ident, seq=seq) / Raw(payload)

    def error(quote: bytes | Packet, icmp_type: int = 11, code: int = 0) -> Packet:
        return ICMP(type=icmp_type, code=code) / Raw(bytes(quote))

    sent = run.sent_seq
    return {
        "reply, seq never sent": bytes(reply(NEVER_SENT)),
        "reply, seq 0": bytes(reply(0)),
        "reply to a sent seq, bad checksum": _bad_checksum(reply(sent)),
        "reply to a sent seq, payload cut inside the nonce":
            bytes(ICMP(type=0, id=run.ident, seq=sent) / Raw(run.nonce[:4])),
        "reply to a sent seq, header only": bytes(ICMP(type=0, id=run.ident, seq=sent)),
        "reply, 4 bytes of ICMP": bytes(reply(sent))[:4],
        "reply, seq never sent, 1400 bytes": bytes(reply(NEVER_SENT) / Raw(b"\xa5" * 1344)),
        "error quoting our nonce, seq never sent": bytes(error(request(NEVER_SENT))),
        "error quoting our nonce and options, seq never sent":
            bytes(error(request(NEVER_SENT, options=_OPTIONS))),
        "error quoting UDP": bytes(error(
            IP(src=run.prober, dst=run.target, proto=17) /
            UDP(sport=33000, dport=33434) / Raw(payload), 3, 3)),
        "error quoting TCP": bytes(error(
            IP(src=run.prober, dst=run.target) /
            TCP(sport=33000, dport=80, flags="S", seq=sent) / Raw(payload), 3, 1)),
        "error quoting 12 bytes of an IP header": bytes(error(bytes(request(sent))[:12])),
        "error quoting IHL 15 over a 20-byte header":
            bytes(error(_patched(request(sent), 0, 0x4F))),
        "error quoting IHL 2": bytes(error(_patched(request(sent, ttl=8), 0, 0x42))),
        "error quoting IP version 6": bytes(error(_patched(request(sent), 0, 0x65))),
        "error quoting 8 bytes of ICMP, another id":
            bytes(error(bytes(IP(src=run.prober, dst=run.target) /
                              ICMP(type=8, id=run.ident ^ 0x5A5A, seq=sent))[:28])),
        "error quoting a sent seq, bad checksum": _bad_checksum(error(request(sent), 3, 1)),
        "error, 8 bytes only": bytes(ICMP(type=3, code=1)),
        "error with 1200 bytes after the quote":
            bytes(error(bytes(request(NEVER_SENT)) + b"\x5a" * 1200)),
    }


def _datagrams(run: Run) -> list[tuple[str, bytes]]:
    """Each lie in an IP datagram from the lab host to the prober; a few with IP options."""
    out = []
    for what, icmp in _lies(run).items():
        out.append((what, bytes(IP(src=BRIDGE_ADDR, dst=run.prober, proto=1) / Raw(icmp))))
        if what.startswith(("reply, seq never sent", "error quoting our nonce, seq")):
            out.append((f"{what}, IP options", bytes(
                IP(src=BRIDGE_ADDR, dst=run.prober, proto=1, options=_OPTIONS) / Raw(icmp))))
    return out


class Forger:
    """Sends datagrams (IP header included) from the lab host's netns to the prober, over and
    over until stopped; counts what it sent."""

    def __init__(self, lab: Lab) -> None:
        with netns.entered(Path(lab.netns_path(lab.host_ns))):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, datagrams: list[tuple[str, bytes]], dst: str, rounds: int = 10**6) -> None:
        def loop() -> None:
            for _ in range(rounds):
                for _what, datagram in datagrams:
                    self.sock.sendto(datagram, (dst, 0))
                    self.sent += 1
                if self._stop.wait(0.01):
                    return
        self._thread = threading.Thread(target=loop)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()


def _icmp_in(ns: str) -> int:
    """Icmp InMsgs of a netns: every ICMP message its IP layer delivered (bad checksums
    and truncated ones included; icmp_rcv counts before it checks)."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout
    head, values = (line.split() for line in text.splitlines() if line.startswith("Icmp:"))
    return int(values[head.index("InMsgs")])


def _ping_under_fire(lab: Lab, count: int, attack: Callable[[Run], list[tuple[str, bytes]]],
                     after_seq: int, rounds: int = 10**6) -> tuple[str, str, int, int, int]:
    """mace-ping from container 0 while a Forger in the lab host attacks it, starting once
    the reply to after_seq is printed. (stdout, stderr, exit, forged sent, Icmp InMsgs
    delta in the prober's netns)."""
    nonce = os.urandom(NONCE_LEN)
    ns = lab.container_ns(0)
    before = _icmp_in(ns)
    proc = subprocess.Popen(lab.on_host(  # a container host's tool, as deployed
        sys.executable, "-m", "mace_tools.cli.ping", "--netns", ns, "--nonce", nonce.hex(),
        "-c", str(count), "-i", "0.05", lab.target_addr),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    forger = Forger(lab)
    killer = threading.Timer(60, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if f"icmp_seq={after_seq} " in line:
                run = Run(nonce, proc.pid & 0xFFFF, lab.container_addr(0), lab.target_addr,
                          after_seq)
                forger.start(attack(run), run.prober, rounds)
                break
        out, err = _rest(proc)
    finally:
        killer.cancel()
        forger.stop()
        if proc.poll() is None:  # failed before it ended: its replies must not leak on
            proc.kill()
            proc.communicate()
    # the last forged datagrams may still be on their way through the bridge
    wait_until(lambda: _icmp_in(ns) - before >= count + forger.sent, "forged packets to land",
               timeout_s=2.0)
    return "".join(lines) + out, err, proc.returncode, forger.sent, _icmp_in(ns) - before


@pytest.mark.lab
def test_forged_icmp_is_never_attributed(lab: Lab) -> None:
    count = 20
    out, err, code, forged, icmp_in = _ping_under_fire(lab, count, _datagrams, after_seq=1)
    assert code == 0 and err == "", err
    assert forged >= len(_datagrams(Run(b"x" * 8, 1, "198.18.1.10", "198.18.0.2", 1)))
    # every forged datagram reached the prober netns' ICMP layer, beside the 20 real replies
    assert icmp_in == count + forged, (icmp_in, forged)
    assert f"{count} packets transmitted, {count} received, 0% packet loss," in out, out
    assert "DUP!" not in out and "errors" not in out and "From " not in out, out
    assert f"kernel data {count}/{count} replies (100%)" in out, out


@pytest.mark.lab
def test_forger_control_a_true_quote_is_attributed(lab: Lab) -> None:
    """The control: the same forger, quoting a sent probe with the right nonce, is heard.
    So the test above can fail, and its silence is the receiver's doing."""
    def truth(run: Run) -> list[tuple[str, bytes]]:
        quote = IP(src=run.prober, dst=run.target, ttl=63) / \
            ICMP(type=8, id=run.ident, seq=run.sent_seq) / Raw(run.nonce + _FILL)
        icmp = ICMP(type=3, code=1) / Raw(bytes(quote))
        return [("true quote", bytes(IP(src=BRIDGE_ADDR, dst=run.prober, proto=1) / icmp))]

    out, err, code, forged, icmp_in = _ping_under_fire(lab, 5, truth, after_seq=3, rounds=1)
    assert forged == 1 and icmp_in == 5 + 1, (forged, icmp_in)
    assert f"From {BRIDGE_ADDR} icmp_seq=3 Destination Host Unreachable" in out, out
    assert "5 packets transmitted, 5 received, +1 errors" in out, out
    assert code == 0, err
