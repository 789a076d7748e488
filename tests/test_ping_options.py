"""mace-ping's iputils options: bad values fail with ping's line and exit 2, and the
socket options reach the socket (read back with getsockopt)."""

from __future__ import annotations

import os
import socket

import pytest

from mace_tools.cli import ping as ping_cli
from mace_tools.cli import ping_options
from mace_tools.errors import MaceError
from mace_tools.probe import sockopts
from mace_tools.probe.sockets import IcmpSocket
from mace_tools.probe.sockopts import SocketOptions

ROOT = os.geteuid() == 0


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run mace-ping in process; it must exit 2 with one line on stderr and print
    nothing else. That line, without the program's name."""
    status = ping_cli.main(argv)
    out, err = capsys.readouterr()
    assert (status, out) == (2, ""), (status, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mace-ping: "), err
    return lines[0].removeprefix("mace-ping: ")


# iputils' own words (checked against iputils-ping 20221126 here); exit 2 throughout
# (iputils exits 1 for its strtol_or_err family: module docstring of cli/ping_options.py)
BAD_VALUES = [
    (["-e", "70000"], "invalid argument: '70000': out of range: 0 <= value <= 65535"),
    (["-e", "-1"], "invalid argument: '-1': out of range: 0 <= value <= 65535"),
    (["-e", "x"], "invalid argument: 'x'"),
    (["-m", "-1"], "invalid argument: '-1': out of range: 0 <= value <= 4294967295"),
    (["-m", "99999999999999999999999"],
     "invalid argument: '99999999999999999999999': Numerical result out of range"),
    (["-l", "0"], "invalid argument: '0': out of range: 1 <= value <= 65536"),
    (["-l", "70000"], "invalid argument: '70000': out of range: 1 <= value <= 65536"),
    (["-S", "0"], "invalid argument: '0': out of range: 1 <= value <= 2147483647"),
    (["-Q", "300"], "the decimal value of TOS bits must be in range 0-255: 300"),
    (["-Q", "0x1ff"], "the decimal value of TOS bits must be in range 0-255: 511"),
    (["-Q", "zz"], "bad TOS value: zz"),
    (["-M", "foo"], "invalid -M argument: foo"),
    (["-p", "12zz"], "patterns must be specified as hex digits: zz"),
    (["-F", "zz"], "bad value for flowinfo: zz"),
    (["-F", "0x1fffff"], "flow value is greater than 20 bits: 0x1fffff"),
    (["-F", "-1"], "flow value is greater than 20 bits: -1"),
    (["-T", "foo"], "invalid timestamp type: foo"),
    (["-R", "-T", "tsonly"], "only one of -T or -R may be used"),
    (["-j", "--ndjson"], "-j, --json and --ndjson are mutually exclusive"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES)
def test_bad_values_in_pings_words(args: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error(["-c", "1", "-W", "0.1", *args, "127.0.0.1"], capsys) == message


def test_no_destination_is_pings_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error([], capsys) == "usage error: Destination address required"
    assert usage_error(["-c", "3", "-q"], capsys) == "usage error: Destination address required"


@pytest.mark.parametrize("args", [["-R"], ["-T", "tsonly"], ["-T", "tsprespec"]])
def test_ip_options_are_refused_in_one_line(args: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error([*args, "127.0.0.1"], capsys)
    assert line.startswith(("-R (record route) is not supported: ",
                            "-T (IP timestamp) is not supported: "))
    assert "eBPF programs match echo probes without options only" in line


def test_parsers_take_what_ping_takes() -> None:
    assert ping_options.parse_tos("0x10") == 16 and ping_options.parse_tos("184") == 184
    assert ping_options.parse_tos("") == 0  # strtol reads nothing and stops at the end
    assert ping_options.parse_pattern("abc") == b"\xab\x0c"  # sscanf %2x: as iputils
    assert ping_options.parse_pattern("ff" * 20) == b"\xff" * 16  # 16 bytes at most
    assert ping_options.parse_flowlabel("0xfffff") == 0xFFFFF
    assert [ping_options.parse_pmtudisc(w) for w in ("dont", "want", "do", "probe")] == \
        [0, 1, 2, 3]
    assert ping_options.strtoul_or_err("65535", 0, 65535) == 65535


def test_user_limits_as_iputils(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """A user other than root: -l up to 3, 2 ms between probes, broadcast once a second."""
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    with pytest.raises(MaceError, match=r"^cannot set preload to value greater than 3: 4$"):
        ping_options.parse_preload("4")
    assert ping_options.parse_preload("3") == 3
    assert usage_error(["-i", "0.001", "127.0.0.1"], capsys) == (
        "cannot flood, minimal interval for user must be >= 2 ms, use -i 0.002 (or higher)")
    assert usage_error(["-f", "127.0.0.1"], capsys).startswith("cannot flood,")
    assert usage_error(["-b", "-i", "0.5", "127.0.0.1"], capsys) == (
        "minimal interval for broadcast ping for user must be >= 1000 ms, use -i 1 "
        "(or higher)")
    assert usage_error(["-b", "-M", "dont", "127.0.0.1"], capsys) == \
        "broadcast ping does not fragment"


def test_json_version(capsys: pytest.CaptureFixture[str]) -> None:
    """-j -V: iputils' {"version": ...} object."""
    assert ping_cli.main(["-j", "-V"]) == 0
    out, _ = capsys.readouterr()
    assert list(__import__("json").loads(out)) == ["version"]


@pytest.mark.parametrize(("value", "device", "source"), [
    ("eth0", "eth0", None), ("198.18.1.10", None, "198.18.1.10"),
    ("1", "1", None),  # inet_aton would read 0.0.0.1; ping (inet_pton) takes a device
    ("127.1", "127.1", None),
])
def test_interface_name_or_address(value: str, device: str | None, source: str | None) -> None:
    assert ping_cli._split_interface(value) == (device, source)


# --- the options on a real socket -----------------------------------------------------------

needs_root = pytest.mark.skipif(not ROOT, reason="needs root (a raw ICMP socket)")


@needs_root
def test_socket_options_reach_the_socket() -> None:
    opts = SocketOptions(tos=0x10, mark=7, pmtudisc=sockopts.PMTUDISC["do"], sndbuf=100_000,
                         debug=True, dontroute=True, broadcast=True, noloop=True)
    sock = IcmpSocket(ttl=9, extra=opts)
    try:
        s = sock.sock
        get = s.getsockopt
        assert get(socket.IPPROTO_IP, socket.IP_TOS) == 0x10
        assert get(socket.SOL_SOCKET, sockopts.SO_MARK) == 7
        assert get(socket.IPPROTO_IP, sockopts.IP_MTU_DISCOVER) == 2
        assert get(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 100_000  # (the kernel doubles it)
        assert get(socket.SOL_SOCKET, socket.SO_DEBUG) == 1
        assert get(socket.SOL_SOCKET, socket.SO_DONTROUTE) == 1
        assert get(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1
        assert get(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 0
        assert get(socket.IPPROTO_IP, socket.IP_TTL) == 9
        assert get(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 9
        assert sock.warnings == []
    finally:
        sock.close()
    plain = IcmpSocket()
    try:  # and nothing of it by default
        assert plain.sock.getsockopt(socket.SOL_SOCKET, socket.SO_DEBUG) == 0
        assert plain.sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 1
    finally:
        plain.close()


@needs_root
def test_connect_and_bind_as_ping() -> None:
    """-C connects the socket to the target; -I NAME of no device and -I ADDR that is not
    ours fail in ping's words."""
    from mace_tools.probe.icmp import build_echo_request

    probe = build_echo_request(0x4D43, 1, b"\x01" * 8, 16)
    sock = IcmpSocket()
    try:  # a raw socket has no peer name: a send() without an address shows it
        with pytest.raises(OSError):
            sock.sock.send(probe)
        sock.connect(("127.0.0.1", 0))
        assert sock.sock.send(probe) == len(probe)  # (to loopback)
    finally:
        sock.close()
    with pytest.raises(MaceError, match=r"^SO_BINDTODEVICE nonexisting: No such device$"):
        IcmpSocket(device="nonexisting")
    with pytest.raises(MaceError, match=r"^bind: Cannot assign requested address$"):
        IcmpSocket(source="198.18.250.250")


def test_a_refused_mark_is_a_warning() -> None:
    """-m that the kernel refuses: ping's two warning lines, and the run goes on."""
    class Refusing:
        def setsockopt(self, level: int, option: int, value: int) -> None:
            raise PermissionError(1, "Operation not permitted")

    assert sockopts._set_mark(Refusing(), 5) == [  # type: ignore[arg-type]
        "WARNING: failed to set mark: 5: Operation not permitted",
        "=> missing cap_net_admin+p or cap_net_raw+p (since Linux 5.17) capability?"]
