"""Bad input gets one clear line on stderr and ping's exit code; never a traceback."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from unprivileged import LEAST_PRIVILEGE, with_capabilities

from mace_tools.cli import ping as ping_cli
from mace_tools.cli import traceroute as traceroute_cli
from mace_tools.errors import MaceError
from mace_tools.kernel import backend, native, programs
from mace_tools.lab.topology import Lab
from mace_tools.probe.icmp import build_echo_request, checksum


def mace_ping(*args: str, capabilities: tuple[str, ...] | None = None,
              via_netns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mace_tools.cli.ping", *args]
    if capabilities is not None:
        cmd = [*with_capabilities(*capabilities), *cmd]
    if via_netns is not None:
        cmd = ["ip", "netns", "exec", via_netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mace-ping: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["-c", "0", "127.0.0.1"], "invalid argument: '0': out of range"),
    (["-s", "70000", "127.0.0.1"], "invalid -s value: '70000'"),
    (["-t", "256", "127.0.0.1"], "invalid argument: '256'"),
    (["-i", "-1", "127.0.0.1"], "bad timing interval: -1"),
    (["--bogus", "127.0.0.1"], "--bogus"),
    (["-c", "1"], "usage error: Destination address required"),
    (["--netns", "mace-no-such-netns", "127.0.0.1"], "network namespace 'mace-no-such-netns'"),
    (["--pid", "999999999", "127.0.0.1"], "no process with pid 999999999"),
    (["--netns", "x", "--pid", "1", "127.0.0.1"], "mutually exclusive"),
    (["--json", "--ndjson", "127.0.0.1"], "mutually exclusive"),
    (["--nonce", "xyz", "127.0.0.1"], "invalid nonce"),
])
def test_bad_arguments(args: list[str], needle: str) -> None:
    assert_one_line_error(mace_ping(*args), needle)


def assert_usage_error(main: object, argv: list[str], message: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """In process (fast): exit 2 and exactly `message` as the only line on stderr. A
    traceback would be an exception here, failing the test."""
    status = main(argv)  # type: ignore[operator]
    out, err = capsys.readouterr()
    assert (status, err) == (2, message + "\n"), out
    assert out == ""


# Numbers checked as iputils' ping.c checks them (ping_strtod, strtol_or_err): its words.
# Only the last value of an option counts, so a check that failed would ping loopback once.
PING_NUMBERS = [
    (["-W", "nan"], "bad linger time: nan: Numerical result out of range"),
    (["-W", "inf"], "bad linger time: inf: Numerical result out of range"),
    (["-W", "1e999"], "bad linger time: 1e999: Numerical result out of range"),
    (["-W", "-1"], "bad linger time: -1"),
    (["-W", "4295"], "bad linger time: 4295"),  # > UINT_MAX µs
    (["-i", "nan"], "bad timing interval: nan: Numerical result out of range"),
    (["-i", "-inf"], "bad timing interval: -inf: Numerical result out of range"),
    (["-i", "1e999"], "bad timing interval: 1e999: Numerical result out of range"),
    (["-i", "1e-310"], "bad timing interval: 1e-310: Numerical result out of range"),
    (["-i", "2147484"], "bad timing interval: 2147484"),  # > INT_MAX ms
    (["-i", "1x"], "bad timing interval: 1x"),
    (["-w", "nan"], "invalid argument: 'nan'"),
    (["-w", "inf"], "invalid argument: 'inf'"),
    (["-w", "1e999"], "invalid argument: '1e999'"),
    (["-w", "-1"], "invalid argument: '-1': out of range: 0 <= value <= 2147483647"),
    (["-w", "2147483648"],
     "invalid argument: '2147483648': out of range: 0 <= value <= 2147483647"),
    (["-c", "99999999999999999999"],
     "invalid argument: '99999999999999999999': Numerical result out of range"),
    (["-c", "-5"], "invalid argument: '-5': out of range: 1 <= value <= 9223372036854775807"),
    (["-c", "1_000"], "invalid argument: '1_000'"),  # Python's int() would take it
    (["-c", "1.5"], "invalid argument: '1.5'"),
    (["-s", "nan"], "invalid argument: 'nan'"),
    (["-s", "65508"], "invalid -s value: '65508': out of range: 0 <= value <= 65507"),
    (["-t", "256"], "invalid argument: '256': out of range: 0 <= value <= 255"),
    (["-t", "0"], "cannot set unicast time-to-live: Invalid argument"),  # the kernel's no
    (["--pid", "99999999999999999999"],  # was: OverflowError
     "invalid --pid value: '99999999999999999999': Numerical result out of range"),
    (["--pid", "0"], "invalid --pid value: '0': out of range: 1 <= value <= 2147483647"),
    (["--pid", "1x"], "invalid --pid value: '1x'"),
]


@pytest.mark.parametrize(("bad", "message"), PING_NUMBERS)
def test_ping_numbers_as_iputils(bad: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(ping_cli.main, ["-c", "1", "-W", "1", *bad, "127.0.0.1"],
                       f"mace-ping: {message}", capsys)


# As Linux traceroute 2.1 words them (traceroute.c, its option parser clif.c: the position
# of the word at fault as `(argc N)`); exit 2. The command line below puts *bad at 7.
TRACEROUTE_NUMBERS = [
    (["-w", "-1"], "bad wait specifications `-1,0,0' used"),
    (["-w", "1,-2"], "bad wait specifications `1,-2,0' used"),
    (["-w", "5,3,-0.5"], "bad wait specifications `5,3,-0.5' used"),
    (["-w", "x"], "Cannot handle `-w' option with arg `x' (argc 8)"),
    (["-w", "1,2,3,4"], "Cannot handle `-w' option with arg `1,2,3,4' (argc 8)"),
    (["--wait=1,x"], "Cannot handle `--wait' option with arg `1,x' (argc 7)"),
    # traceroute takes these, then waits forever (or never); refused in its words here
    (["-w", "nan"], "bad wait specifications `nan,0,0' used"),
    (["-w", "inf"], "bad wait specifications `inf,0,0' used"),
    (["-w", "1e999"], "bad wait specifications `inf,0,0' used"),
    (["-w", "1e308"], "bad wait specifications `1e+308,0,0' used"),
    (["-w", "1,nan,2"], "bad wait specifications `1,nan,2' used"),
    (["-z", "nan"], "bad sendtime `nan' specified"),
    (["-z", "inf"], "bad sendtime `inf' specified"),
    (["-z", "-1"], "bad sendtime `-1' specified"),
    (["-z", "x"], "Cannot handle `-z' option with arg `x' (argc 8)"),
    (["-m", "256"], "max hops cannot be more than 255"),
    (["-m", "0"], "first hop out of range"),
    (["-f", "0"], "first hop out of range"),
    (["-f", "2", "-m", "1"], "first hop out of range"),
    (["-f", "-1"], "first hop out of range"),  # strtoul: 4294967295
    (["-q", "11"], "no more than 10 probes per hop"),
    (["-q", "0"], "no more than 10 probes per hop"),
    (["-q", "0xb"], "no more than 10 probes per hop"),  # base 0: hex
    (["-q", "013"], "no more than 10 probes per hop"),  # base 0: octal (11)
    (["-q", "nan"], "Cannot handle `-q' option with arg `nan' (argc 8)"),
    (["-qnan"], "Cannot handle `-q' option with arg `nan' (argc 7)"),
    (["--queries=3x"], "Cannot handle `--queries' option with arg `3x' (argc 7)"),
    (["-f", "99999999999999999999"], "first hop out of range"),
    (["-N", "x"], "Cannot handle `-N' option with arg `x' (argc 8)"),
    (["-p", "no-such-service"], "Cannot handle `-p' option with arg `no-such-service' (argc 8)"),
    (["-t", "x"], "Cannot handle `-t' option with arg `x' (argc 8)"),
    (["-P", "no-such-protocol"],
     "Cannot handle `protocol' keyword with arg `no-such-protocol' (argc 8)"),
    (["-M", "nosuch"], "Unknown traceroute module nosuch"),
    (["-X"], "Bad option `-X' (argc 7)"),
    (["--bogus=1"], "Bad option `--bogus=1' (with arg `1') (argc 7)"),
    (["-q"], "Option `-q' (argc 7) requires an argument: `-q nqueries'"),
    (["-I", "-O", "foo"], "`foo' (argc 9): arguments are not allowed"),
    (["-T", "-O", "ecn"], "-O ecn: not supported: mace's TCP probes are plain SYNs, with the "
                          "mace tag as payload and no TCP options, matched by their SYN-ACK "
                          "or RST"),
    (["-M", "dccp"], "method `dccp' not supported: DCCP probes: the kernel programs match "
                     "only ICMP, UDP and TCP probes"),
    (["-A"], "-A: not supported: AS path lookups ask a routing registry's whois server on "
             "the Internet (whois.radb.net), outside the path measured"),
    (["-l", "5"], "-l: not supported: IPv6 flow labels: a label the kernel sends needs a "
                  "lease from its flow label manager (IPV6_FLOWLABEL_MGR), not built"),
    (["--pid", "99999999999999999999"],
     "Invalid value for '--pid': 99999999999999999999 is not in the range 1<=x<=2147483647."),
]


@pytest.mark.parametrize(("bad", "message"), TRACEROUTE_NUMBERS)
def test_traceroute_numbers_as_linux_traceroute(bad: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-m", "1", "-q", "1", "-w", "0.2", *bad, "127.0.0.1"]
    if bad == ["-q"]:
        argv = argv[:-1]  # -q last: nothing left for it
    assert_usage_error(traceroute_cli.main, argv, f"mace-traceroute: {message}", capsys)


@pytest.mark.parametrize(("packetlen", "message"), [
    ("70000", "too big packetlen 70000 specified"),
    ("0x11171", "too big packetlen 70001 specified"),  # strtol base 0
    ("nan", 'Cannot handle "packetlen" cmdline arg `nan\' on position 2 (argc 8)'),
])
def test_traceroute_packetlen(packetlen: str, message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(traceroute_cli.main, ["-m", "1", "-q", "1", "-w", "0.2", "127.0.0.1",
                                             packetlen], f"mace-traceroute: {message}", capsys)


def test_traceroute_extra_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(traceroute_cli.main, ["127.0.0.1", "60", "70"],
                       "mace-traceroute: Extra arg `70' (position 3, argc 3)", capsys)


@pytest.mark.parametrize(("cli", "prog"), [(ping_cli.main, "mace-ping"),
                                           (traceroute_cli.main, "mace-traceroute")])
def test_corrections_is_checked_before_anything_runs(cli: object, prog: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(cli, ["--corrections", "none", "--agent", "/x.sock", "127.0.0.1"],
                       f"{prog}: --agent cannot go with --corrections none", capsys)
    assert_usage_error(cli, ["--corrections", "agent", "--netns", "x", "127.0.0.1"],
                       f"{prog}: --corrections agent: the agent serves runs from this "
                       "process's own netns, not with --netns, --pid or --container", capsys)
    assert_usage_error(cli, ["--corrections", "agent", "--nonce", "0123456789abcdef",
                             "127.0.0.1"], f"{prog}: --corrections agent: the agent chooses "
                       "the nonces, not with --nonce", capsys)
    status = cli(["--corrections", "somewhere", "127.0.0.1"])  # type: ignore[operator]
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: ") and "'somewhere' is not one of" in err, err


@pytest.mark.parametrize("module", ["mace_tools.cli.ping", "mace_tools.cli.traceroute"])
def test_no_option_is_defined_twice(module: str) -> None:
    """click only warns of an option name given twice (and the first one wins): an error
    here, as --corrections was once --source, traceroute's source address. (mace-ping's
    table refuses a name twice itself, at import: gnu_options.OptionTable.)"""
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", module, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_traceroute_needs_a_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(traceroute_cli.main, ["-q", "1"],
                       'mace-traceroute: Specify "host" missing argument.', capsys)


MACE_PING_SCRIPT = str(Path(sys.executable).with_name("mace-ping"))


def test_a_reader_that_goes_ends_mace_ping_as_sigpipe_ends_ping() -> None:
    """`mace-ping ... | head -1`: once the reader has gone, the next line ends the run
    silently by SIGPIPE, as iputils ping ends (was: a BrokenPipeError traceback). The run
    would go on for 20 s: however late the close comes, a line comes after it."""
    proc = subprocess.Popen([MACE_PING_SCRIPT, "--corrections", "none", "-c", "100", "-i",
                             "0.2", "127.0.0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"PING 127.0.0.1")
        proc.stdout.close()
        assert proc.wait(timeout=30) == -signal.SIGPIPE
        assert proc.stderr.read() == b""
    finally:
        proc.kill()
        proc.wait()


def test_an_error_line_to_a_reader_that_went_ends_by_sigpipe() -> None:
    """The last words too (a bad option's line, here into a closed pipe)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([MACE_PING_SCRIPT, "-x"], stdout=write, stderr=write,
                              timeout=30)
    finally:
        os.close(write)
    assert proc.returncode == -signal.SIGPIPE


def test_a_full_stdout_is_one_line_and_exit_1() -> None:
    """`mace-ping ... >/dev/full`: iputils' `write error: No space left on device`."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([MACE_PING_SCRIPT, "--corrections", "none", "-c", "1", "-W",
                               "5", "127.0.0.1"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (
        1, "mace-ping: write error: No space left on device\n")


@pytest.mark.parametrize("closed", [[1], [1, 2]])
def test_a_closed_stdout_is_no_traceback(closed: list[int]) -> None:
    """`mace-ping ... >&-` (and 2>&-): the run goes on, its output to nowhere, as
    ping's; its exit status is the run's (was: an AttributeError traceback)."""
    def close() -> None:
        for fd in closed:
            os.close(fd)

    proc = subprocess.run([MACE_PING_SCRIPT, "--corrections", "none", "-c", "1", "-W", "5",
                           "127.0.0.1"], preexec_fn=close, stderr=subprocess.PIPE
                          if closed == [1] else None, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr


@pytest.fixture(scope="module")
def offline_netns() -> Iterator[str]:
    """A netns of our own with no network at all (lo down): a name that glibc did not
    refuse itself could not reach any resolver from here."""
    name = f"mtbi{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.lab
@pytest.mark.parametrize("tool", ["ping", "traceroute"])
@pytest.mark.parametrize(("host", "message"), [
    ("a" * 300, "Name or service not known"),  # was: UnicodeError (label too long)
    ("a" * 64 + ".example", "Name or service not known"),
    ("a..example", "Name or service not known"),
    ("\u00fc" * 70, "Parameter string not correctly encoded"),  # IDNA cannot encode it
])
def test_host_names_dns_cannot_carry(offline_netns: str, tool: str, host: str,
                                     message: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", offline_netns, sys.executable, "-m", f"mace_tools.cli.{tool}",
         host], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"mace-{tool}: {host}: {message}\n"


@pytest.mark.lab
def test_unknown_host(lab_dns: tuple[str, object]) -> None:
    # resolved by getaddrinfo under `ip netns exec`, which shows it the lab's resolv.conf
    ns, _ = lab_dns
    assert_one_line_error(mace_ping("nosuchhost.invalid", via_netns=ns),
                          "nosuchhost.invalid: Name or service not known")


@pytest.mark.lab
def test_not_root() -> None:
    """No capability, no ping socket (the root netns keeps ping_group_range closed): the
    probes cannot leave; one line says why."""
    proc = mace_ping("-c", "1", "127.0.0.1", capabilities=())
    assert_one_line_error(proc, "not permitted")


@pytest.mark.lab
def test_least_privilege_is_enough(lab: Lab) -> None:
    """CAP_BPF + CAP_PERFMON + CAP_NET_RAW measure fully. Without BPF privilege (and no
    agent) the run is measured raw, and one line says how to get corrections; without
    CAP_NET_RAW (and no ping socket allowed) nothing can be sent: one clear error."""
    ns = lab.container_ns(0)
    proc = mace_ping("-c", "3", "-i", "0.01", lab.target_addr, capabilities=LEAST_PRIVILEGE,
                     via_netns=ns)
    assert proc.returncode == 0, proc.stderr
    assert "kernel data 3/3 replies (100%)" in proc.stdout
    for missing in ("bpf", "perfmon"):
        caps = tuple(c for c in LEAST_PRIVILEGE if c != missing)
        proc = mace_ping("-c", "2", "-i", "0.01", lab.target_addr, capabilities=caps,
                         via_netns=ns)
        assert proc.returncode == 0, proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert line.startswith("mace-ping: no mace-agent at ") and "no BPF privilege" in line
        assert proc.stdout.count("corrected=none") == 2
        assert "mace corrected: none (no kernel data: measured raw)" \
            in proc.stdout
    proc = mace_ping("-c", "1", lab.target_addr, capabilities=("bpf", "perfmon"),
                     via_netns=ns)
    assert_one_line_error(proc, "not permitted")
    # entering another netns is what needs CAP_SYS_ADMIN
    proc = mace_ping("--netns", ns, "-c", "1", lab.target_addr, capabilities=LEAST_PRIVILEGE)
    assert_one_line_error(proc, "cannot enter network namespace: Operation not permitted "
                                "(needs CAP_SYS_ADMIN)")


@pytest.mark.lab
def test_no_btf(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike) -> None:
    monkeypatch.setattr(backend, "VMLINUX_BTF", tmp_path / "missing")
    with pytest.raises(MaceError, match="kernel has no BTF"):
        backend.Backend(os.urandom(8)).open()


def test_no_bpf_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A $MACE_BPF_OBJECT that is not there is refused at once, not handed to libbpf:
    anyone may create a missing path (in /tmp, say) before libbpf opens it. A dangling
    symbolic link is no better."""
    missing = tmp_path / "none.bpf.o"
    (tmp_path / "link.o").symlink_to(missing)
    for named in (missing, tmp_path / "link.o"):
        monkeypatch.setenv("MACE_BPF_OBJECT", str(named))
        with pytest.raises(MaceError,
                           match=rf"^MACE_BPF_OBJECT={re.escape(str(named))}: no such file$"):
            backend.Backend(os.urandom(8))
        assert not missing.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a raw socket comes first)")
def test_no_bpf_object_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "none.bpf.o"
    monkeypatch.setenv("MACE_BPF_OBJECT", str(missing))
    assert_one_line_error(mace_ping("-c", "1", "127.0.0.1"),
                          f"MACE_BPF_OBJECT={missing}: no such file")


@pytest.mark.lab
def test_no_packaged_bpf_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The object shipped in the package not built: loading says how to build it."""
    monkeypatch.delenv("MACE_BPF_OBJECT", raising=False)
    monkeypatch.setattr(backend, "SHIPPED_OBJECT", tmp_path / "mace.bpf.o")
    with pytest.raises(MaceError, match=rf"^BPF object {re.escape(str(tmp_path))}/mace\.bpf\.o "
                                        r"not found: build it with 'make build'$"):
        backend.Backend(os.urandom(8)).open()


def test_libbpf_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LIBBPF", "libbpf-not-there.so.9")
    monkeypatch.setattr(native, "_lib", None)
    with pytest.raises(MaceError, match=r"libbpf-not-there\.so\.9 not found"):
        native.libbpf()


@pytest.mark.lab
def test_missing_tracepoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(programs.PROGRAMS, "mace_no_such_prog", "net:no_such_tracepoint")
    with pytest.raises(MaceError, match="cannot attach to tracepoint net:no_such_tracepoint"):
        backend.Backend(os.urandom(8)).open()


def _forged_packets(nonce: bytes) -> list[bytes]:
    """ICMP messages that must never be taken for replies of the run with this nonce."""
    good = bytearray(build_echo_request(0x4242, 1, nonce, 56))
    good[0] = 0  # an echo *reply* with our nonce and seq 1 ...
    bad_sum = bytes(good[:2]) + b"\x12\x34" + bytes(good[4:])  # ... but a wrong checksum
    def fix(msg: bytes) -> bytes:
        return msg[:2] + struct.pack("!H", checksum(msg[:2] + b"\0\0" + msg[4:])) + msg[4:]
    unknown_seq = fix(bytes(good[:6]) + struct.pack("!H", 60000) + bytes(good[8:]))
    other_nonce = fix(bytes(good[:8]) + os.urandom(8) + bytes(good[16:]))
    truncated = bytes(good[:4])
    quote_garbage = fix(bytes([11, 0, 0, 0, 0, 0, 0, 0]) + os.urandom(12))
    quote_short_ip = fix(bytes([3, 1, 0, 0, 0, 0, 0, 0]) + bytes([0x45]) + bytes(27))
    return [bad_sum, unknown_seq, other_nonce, truncated, quote_garbage, quote_short_ip]


@pytest.mark.lab
def test_forged_and_malformed_icmp_never_confuse_the_receiver(lab: Lab) -> None:
    nonce = os.urandom(8)
    stop = threading.Event()

    def forge() -> None:
        # From the lab host, straight at the container's address, while mace-ping runs.
        fd = os.open(lab.netns_path(lab.host_ns), os.O_RDONLY)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            native.setns(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        finally:
            native.setns(home)
            os.close(fd)
            os.close(home)
        with sock:
            while not stop.is_set():
                for pkt in _forged_packets(nonce):
                    sock.sendto(pkt, (lab.container_addr(0), 0))
                time.sleep(0.002)

    forger = threading.Thread(target=forge)
    forger.start()
    try:
        proc = subprocess.run(lab.on_host(
            sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
            "--nonce", nonce.hex(), "-c", "20", "-i", "0.02", "-q", lab.target_addr),
            capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        forger.join()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "20 packets transmitted, 20 received, 0% packet loss" in proc.stdout
    assert "duplicates" not in proc.stdout and "errors" not in proc.stdout
    assert "kernel data 20/20 replies (100%)" in proc.stdout


@pytest.mark.lab
def test_loopback_is_corrected() -> None:
    proc = mace_ping("-c", "3", "-i", "0.01", "-q", "127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert "kernel data 3/3 replies (100%)" in proc.stdout
