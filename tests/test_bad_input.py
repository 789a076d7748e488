"""Bad input gets one clear line on stderr and ping's exit code; never a traceback."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from unprivileged import LEAST_PRIVILEGE, with_capabilities

from mace_tools.errors import MaceError
from mace_tools.kernel import backend, native
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
    (["-c", "0", "127.0.0.1"], "'-c'"),
    (["-s", "70000", "127.0.0.1"], "'-s'"),
    (["-t", "256", "127.0.0.1"], "'-t'"),
    (["-i", "-1", "127.0.0.1"], "'-i'"),
    (["--bogus", "127.0.0.1"], "--bogus"),
    (["-c", "1"], "HOST"),
    (["--netns", "mace-no-such-netns", "127.0.0.1"], "network namespace 'mace-no-such-netns'"),
    (["--pid", "999999999", "127.0.0.1"], "no process with pid 999999999"),
    (["--netns", "x", "--pid", "1", "127.0.0.1"], "mutually exclusive"),
    (["--json", "--ndjson", "127.0.0.1"], "mutually exclusive"),
    (["--nonce", "xyz", "127.0.0.1"], "invalid nonce"),
])
def test_bad_arguments(args: list[str], needle: str) -> None:
    assert_one_line_error(mace_ping(*args), needle)


@pytest.mark.lab
def test_unknown_host(lab_dns: tuple[str, object]) -> None:
    # resolved by getaddrinfo under `ip netns exec`, which shows it the lab's resolv.conf
    ns, _ = lab_dns
    assert_one_line_error(mace_ping("nosuchhost.invalid", via_netns=ns),
                          "nosuchhost.invalid: Name or service not known")


@pytest.mark.lab
def test_not_root() -> None:
    proc = mace_ping("-c", "1", "127.0.0.1", capabilities=())
    assert_one_line_error(proc, "run as root")


@pytest.mark.lab
def test_least_privilege_is_enough(lab: Lab) -> None:
    """CAP_BPF + CAP_PERFMON + CAP_NET_RAW measure fully; without any one, one clear line."""
    ns = lab.container_ns(0)
    proc = mace_ping("-c", "3", "-i", "0.01", lab.target_addr, capabilities=LEAST_PRIVILEGE,
                     via_netns=ns)
    assert proc.returncode == 0, proc.stderr
    assert "kernel data 3/3 replies (100%)" in proc.stdout
    for missing, needle in (("bpf", "loading BPF programs"), ("perfmon", "loading BPF programs"),
                            ("net_raw", "raw ICMP socket not permitted")):
        caps = tuple(c for c in LEAST_PRIVILEGE if c != missing)
        proc = mace_ping("-c", "1", lab.target_addr, capabilities=caps, via_netns=ns)
        assert_one_line_error(proc, needle)
    # entering another netns is what needs CAP_SYS_ADMIN
    proc = mace_ping("--netns", ns, "-c", "1", lab.target_addr, capabilities=LEAST_PRIVILEGE)
    assert_one_line_error(proc, "cannot enter network namespace: Operation not permitted "
                                "(needs CAP_SYS_ADMIN)")


@pytest.mark.lab
def test_no_btf(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike) -> None:
    monkeypatch.setattr(backend, "VMLINUX_BTF", tmp_path / "missing")
    with pytest.raises(MaceError, match="kernel has no BTF"):
        backend.Backend(os.urandom(8)).open()


@pytest.mark.lab
def test_no_bpf_object(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike) -> None:
    monkeypatch.setenv("MACE_BPF_OBJECT", str(tmp_path / "none.bpf.o"))
    with pytest.raises(MaceError, match="make build"):
        backend.Backend(os.urandom(8)).open()


def test_libbpf_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LIBBPF", "libbpf-not-there.so.9")
    monkeypatch.setattr(native, "_lib", None)
    with pytest.raises(MaceError, match=r"libbpf-not-there\.so\.9 not found"):
        native.libbpf()


@pytest.mark.lab
def test_missing_tracepoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backend.PROGRAMS, "mace_no_such_prog", "net:no_such_tracepoint")
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
        proc = subprocess.run(
            [sys.executable, "-m", "mace_tools.cli.ping", "--netns", lab.container_ns(0),
             "--nonce", nonce.hex(), "-c", "20", "-i", "0.02", "-q", lab.target_addr],
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
