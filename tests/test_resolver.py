"""Names resolved as the container would: its hosts file, its resolv.conf, its netns."""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from fake_dns import FakeDns

from mace_tools.errors import MaceError
from mace_tools.kernel import native
from mace_tools.lab.topology import Lab
from mace_tools.probe import netns
from mace_tools.probe.resolver import (
    MAX_FILE_BYTES,
    ResolvConf,
    Vantage,
    build_query,
    candidates,
    lookup_hosts,
    parse_answer,
    parse_resolv_conf,
    read_confined,
    resolve,
    vantage_of,
)


def test_resolv_conf_follows_glibc_rules() -> None:
    conf = parse_resolv_conf(
        "# docker\nnameserver 127.0.0.11\nnameserver bogus\nnameserver 198.18.0.1\n"
        "nameserver ::1\nnameserver 198.18.0.2\ndomain a.test\nsearch b.test c.test.\n"
        "options ndots:2 timeout:1 attempts:3 edns0\n")
    assert conf == ResolvConf(("127.0.0.11", "198.18.0.1", "::1"), ("b.test", "c.test"),
                              2, 1.0, 3)
    assert parse_resolv_conf("") == ResolvConf()  # glibc: ask 127.0.0.1


def test_hosts_file_names_and_aliases() -> None:
    text = ("127.0.0.1 localhost\n::1 ip6-only\n198.18.0.9 Target.test tgt # lab\n"
            "#198.18.0.8 x\n2001:2::9 tgt\n")
    assert lookup_hosts(text, "target.TEST") == ["198.18.0.9"]
    assert lookup_hosts(text, "tgt.") == ["198.18.0.9"]
    assert lookup_hosts(text, "ip6-only") == []
    assert lookup_hosts(text, "x") == []
    assert lookup_hosts(text, "ip6-only", 6) == ["::1"]
    assert lookup_hosts(text, "tgt", None) == ["198.18.0.9", "2001:2::9"]


def test_search_order_depends_on_ndots() -> None:
    conf = ResolvConf(search=("a.test", "b.test"), ndots=1)
    assert candidates("web", conf) == ["web.a.test", "web.b.test", "web"]
    assert candidates("web.example", conf) == ["web.example", "web.example.a.test",
                                               "web.example.b.test"]
    assert candidates("web.", conf) == ["web"]


def _answer(qid: int, name: str, records: list[tuple[int, bytes]], flags: int = 0x8180) -> bytes:
    question = build_query(qid, name)[12:]
    body = b"".join(struct.pack("!HHHIH", 0xC00C, rtype, 1, 30, len(rdata)) + rdata
                    for rtype, rdata in records)
    return struct.pack("!HHHHHH", qid, flags, 1, len(records), 0, 0) + question + body


def test_answer_takes_a_records_after_cname() -> None:
    cname = b"\x03www\xc0\x0c"
    msg = _answer(7, "alias.test", [(5, cname), (1, bytes([198, 18, 0, 9]))])
    assert parse_answer(msg, 7) == (0, ["198.18.0.9"])
    assert parse_answer(msg, 8) is None  # not our query
    assert parse_answer(build_query(7, "alias.test"), 7) is None  # a query, not an answer
    assert parse_answer(_answer(7, "x.test", [], flags=0x8183), 7) == (3, [])


def test_malformed_answers_never_raise() -> None:
    rng = random.Random(5)
    good = _answer(9, "alias.test", [(1, bytes([198, 18, 0, 9]))])
    for cut in range(len(good)):
        assert parse_answer(good[:cut], 9) in (None, (0, []))
    for _ in range(3000):
        msg = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        result = parse_answer(bytes(msg), 9)
        assert result is None or isinstance(result[1], list)
    loop = struct.pack("!HHHHHH", 9, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"  # pointer to itself
    assert parse_answer(loop, 9) == (0, [])


def test_bad_names_are_refused_before_sending() -> None:
    with pytest.raises(ValueError):
        build_query(1, "a" * 64 + ".test")
    with pytest.raises(ValueError):
        build_query(1, "a..test")


def test_vantage_for_options() -> None:
    assert vantage_of(None, None, None) is None
    assert vantage_of("/proc/1/ns/net", None, Path("/proc/1/ns/net")).root == Path("/")
    own = vantage_of("x", None, Path("/proc/1/ns/net"))  # no /etc/netns/x: the host's files
    assert (own.root, own.file("hosts"), own.file("resolv.conf")) == \
        (Path("/"), "etc/hosts", "etc/resolv.conf")
    # the host's own files are read whole, as getaddrinfo would
    assert own.max_file_bytes is None
    assert vantage_of("/proc/1/ns/net", None, Path("/proc/1/ns/net")).max_file_bytes is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another process's root)")
def test_vantage_of_a_pid_is_its_pin() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        pinned = netns.pin(proc.pid)
        try:
            seen = vantage_of(None, proc.pid, Path(f"/proc/{proc.pid}/ns/net"))
            assert seen == Vantage(pinned.root_path, pinned.netns_path, label=f"pid {proc.pid}")
            assert seen.max_file_bytes == MAX_FILE_BYTES  # its files are the party's
        finally:
            netns.release(pinned)
    finally:
        proc.kill()
        proc.wait()


# --- the measured party's files, read confined to its root --------------------------------

@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A container-like root beside a host-like directory holding a marker name."""
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "hosts").write_text("198.18.5.5 marker.test\n")
    (tmp_path / "root" / "etc").mkdir(parents=True)
    return tmp_path / "root"


def test_absolute_and_dotdot_links_stay_inside_the_root(box: Path) -> None:
    host_file = box.parent / "host" / "hosts"
    (box / "etc" / "hosts").symlink_to(host_file)  # absolute: the host's path
    assert read_confined(box, "etc/hosts") is None  # no such path inside the root
    (box / "etc" / "hosts").unlink()
    (box / "etc" / "hosts").symlink_to("../../host/hosts")  # relative, climbing out
    assert read_confined(box, "etc/hosts") is None
    inside = box / str(host_file).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("127.0.0.7 marker.test\n")
    (box / "etc" / "hosts").unlink()
    (box / "etc" / "hosts").symlink_to(host_file)
    assert read_confined(box, "etc/hosts") == b"127.0.0.7 marker.test\n"  # as the box sees it
    assert resolve("marker.test", Vantage(box, label="pid 1"), 4) == "127.0.0.7"


def test_fifo_and_oversized_files_are_refused(box: Path) -> None:
    os.mkfifo(box / "etc" / "resolv.conf")
    start = time.monotonic()
    with pytest.raises(MaceError, match=r"^refusing to read /etc/resolv\.conf of pid 7: "
                                        r"not a regular file$"):
        resolve("name.test", Vantage(box, label="pid 7"), 4)
    assert time.monotonic() - start < 1
    (box / "etc" / "hosts").write_bytes(b"#" * MAX_FILE_BYTES + b"\n")
    with pytest.raises(MaceError, match=rf"^refusing to read /etc/hosts: larger than "
                                        rf"{MAX_FILE_BYTES} bytes$"):
        resolve("name.test", Vantage(box), 4)
    (box / "etc" / "hosts").write_bytes(b"#" * (MAX_FILE_BYTES - 1) + b"\n")  # at the bound
    assert len(read_confined(box, "etc/hosts")) == MAX_FILE_BYTES


def test_the_hosts_own_files_have_no_size_bound(box: Path) -> None:
    """A host's block-list hosts file runs to tens of MB: under --netns NAME it is read
    whole, as `ip netns exec` and getaddrinfo would, while a PID's is still bounded."""
    block_list = b"0.0.0.0 blocked.test\n" * (3 * MAX_FILE_BYTES // 21)
    (box / "etc" / "hosts").write_bytes(block_list + b"198.18.0.44 last.test\n")
    own = Vantage(box, max_file_bytes=None)
    assert resolve("last.test", own, 4) == "198.18.0.44"
    with pytest.raises(MaceError, match=r"^refusing to read /etc/hosts of pid 7: larger than "):
        resolve("last.test", Vantage(box, label="pid 7"), 4)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod)")
def test_device_nodes_are_never_opened(box: Path) -> None:
    """A container with CAP_MKNOD can plant a device node; opening some (a watchdog) acts.
    The file is looked at through an O_PATH fd, which opens nothing."""
    os.mknod(box / "etc" / "hosts", 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null
    with pytest.raises(MaceError, match=r"^refusing to read /etc/hosts: not a regular file$"):
        resolve("name.test", Vantage(box), 4)


def test_no_openat2_fails_closed(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (box / "etc" / "hosts").write_text("198.18.0.9 name.test\n")

    def enosys(*_args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(native, "openat2", enosys)
    with pytest.raises(MaceError, match=r"^cannot read /etc/hosts safely: the kernel has no "
                                        r"openat2 \(Linux >= 5\.6 needed\)$"):
        resolve("name.test", Vantage(box), 4)


@pytest.mark.lab
def test_resolves_from_inside_the_netns(lab: Lab, tmp_path: Path) -> None:
    ns = Path(lab.netns_path(lab.container_ns(5)))  # c0 has lab_dns on 127.0.0.11
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("198.18.0.77 from-hosts.test\n")
    (etc / "resolv.conf").write_text(
        "nameserver 127.0.0.12\nnameserver 127.0.0.11\nsearch lab.test\n"
        "options timeout:1 attempts:1\n")
    vantage = Vantage(tmp_path, ns)
    records = {"web.lab.test": "198.18.0.66"}
    # 127.0.0.11 exists only in that netns' loopback; 127.0.0.12 has nobody listening
    with FakeDns(ns, "127.0.0.11", records, forge_first=True) as dns:
        assert resolve("from-hosts.test", vantage, 4) == "198.18.0.77"
        assert resolve("web", vantage, 4) == "198.18.0.66"  # via the search list
        assert dns.queries == ["web.lab.test"] * 2  # A and AAAA, at once
        with pytest.raises(MaceError, match=r"^nope\.invalid: Name or service not known$"):
            resolve("nope.invalid", vantage, 4)
        assert resolve("198.18.0.5", vantage, 4) == "198.18.0.5"
        assert resolve("127.1", vantage, 4) == "127.0.0.1"
    (etc / "resolv.conf").write_text("nameserver 127.0.0.12\noptions timeout:1 attempts:1\n")
    start = time.monotonic()
    with pytest.raises(MaceError, match="Temporary failure in name resolution"):
        resolve("web.lab.test", vantage, 4)
    assert time.monotonic() - start < 3
    assert os.stat("/proc/self/ns/net").st_ino != os.stat(ns).st_ino  # we came back


@pytest.mark.lab
def test_a_and_aaaa_answers_are_ordered_as_getaddrinfo(lab: Lab, tmp_path: Path) -> None:
    """Both types are asked for; an address the netns has no route to comes last (this
    lab is IPv4 only: its IPv6 answer is unroutable there), -4/-6 take the first of their
    family, and a name with none of the family asked is iputils' EAI_ADDRFAMILY."""
    ns = Path(lab.netns_path(lab.container_ns(5)))
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions timeout:1 attempts:1\n")
    vantage = Vantage(tmp_path, ns)
    records: dict[str, str | list[str]] = {"dual.test": ["2001:2::66", "198.18.0.66"],
                                           "six.test": "2001:2::77"}
    with FakeDns(ns, "127.0.0.11", records) as dns:
        assert resolve("dual.test", vantage) == "198.18.0.66"
        assert resolve("dual.test", vantage, 6) == "2001:2::66"
        assert resolve("dual.test", vantage, 4) == "198.18.0.66"
        assert resolve("six.test", vantage) == "2001:2::77"
        with pytest.raises(MaceError, match=r"^six\.test: Address family for hostname not "
                                            r"supported$"):
            resolve("six.test", vantage, 4)
    assert sorted(set(dns.queries)) == ["dual.test", "six.test"]


def test_literals_never_reach_dns() -> None:
    """IPv6 literals keep their %scope as given (looked up in the probing netns later);
    what looks like one and is not fails at once, with no query; a literal of the other
    family than -4/-6 ask is EAI_ADDRFAMILY."""
    nowhere = Vantage(Path("/nonexistent"))
    assert resolve("fe80::1%eth9", nowhere) == "fe80::1%eth9"
    assert resolve("FE80:0::1%3", nowhere, 6) == "fe80::1%3"
    assert resolve("127.1", nowhere) == "127.0.0.1"
    for bad in ("fe80::zz", "fe80::1%", "1.2.3.4%eth0"):
        with pytest.raises(MaceError, match="Name or service not known"):
            resolve(bad, nowhere)
    with pytest.raises(MaceError, match="Address family for hostname not supported"):
        resolve("2001:2::1", nowhere, 4)
    with pytest.raises(MaceError, match="Address family for hostname not supported"):
        resolve("198.18.0.1", nowhere, 6)
