"""The Python decoder agrees with the records of bpf/mace.h."""

import re
import socket
import struct
from pathlib import Path

from mace_tools.kernel import events, programs
from mace_tools.kernel.events import EVENT, PROBE_STATE, REC_EVENT, REC_PROBE, RECORD, decode
from mace_tools.model import Hook, Packet, ProbeRecord

HEADER = Path(__file__).resolve().parents[1] / "bpf" / "mace.h"
SOURCE = HEADER.parent
_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2, "__u8": 1}


def c_struct_size(name: str) -> int:
    """Size of a C struct from mace.h with natural alignment (fields are scalars or arrays
    of them; an array's length may be a MACE_ constant over a number)."""
    header = HEADER.read_text()
    body = re.search(rf"struct {name} {{(.*?)}};", header, re.S).group(1)
    size = align = 0
    for ctype, _field, count in re.findall(r"(__u\d+|char)\s+(\w+)(?:\[([^\]]+)\])?;", body):
        width = _SIZES.get(ctype, 1)
        size = (size + width - 1) // width * width + width * array_length(count, header)
        align = max(align, width)
    return (size + align - 1) // align * align


def array_length(expr: str, header: str) -> int:
    """1 for a scalar; N; or MACE_X / N with MACE_X #defined as a number in mace.h."""
    if not expr:
        return 1
    m = re.fullmatch(r"\s*(\w+)\s*(?:/\s*(\d+))?\s*", expr)
    assert m, f"array length {expr!r}: not a form this parser knows"
    name, divisor = m.groups()
    value = int(name) if name.isdigit() else \
        int(re.search(rf"#define {name}\s+(\d+)", header).group(1))
    return value // int(divisor or 1)


def test_layouts_match_header() -> None:
    assert c_struct_size("mace_event") == EVENT.size == 80
    assert c_struct_size("mace_probe_record") == RECORD.size == 56
    assert c_struct_size("mace_run") == programs.RUN.size
    assert c_struct_size("mace_switches") == programs.SWITCHES.size


def test_a_run_entry_carries_its_probe_limit() -> None:
    entry = programs.RunEntry(1, 2, 3, 4, 5, programs.probe_gap(20))
    raw = entry.pack()
    assert len(raw) == programs.RUN.size
    assert programs.RunEntry.unpack(raw) == entry
    assert raw[-8:] == bytes(8)  # the kernel's clock of the limit starts at 0
    assert programs.probe_gap(20) == 50_000_000
    assert programs.probe_gap(0) == 0  # no limit
    assert programs.probe_gap(999_999_999) == 1  # never 0, which would mean no limit


def test_probe_state_layout_matches_source() -> None:
    body = re.search(r"struct probe_state {(.*?)};", (SOURCE / "mace.bpf.c").read_text(),
                     re.S).group(1)
    fields = re.findall(r"(__u\d+|char)\s+(\w+)(?:\[(\d+)\])?;", body)
    assert sum(_SIZES.get(t, 1) * int(n or 1) for t, _, n in fields) == PROBE_STATE.size


def test_constants_match_header() -> None:
    header = HEADER.read_text()
    assert f"#define MACE_MAX_RUNS {programs.MAX_RUNS}\t" in header
    assert "#define MACE_RING_BYTES (1 << 20)" in header and programs.RING_BYTES == 1 << 20
    for name, value in (("RECORDS", programs.RUN_RECORDS), ("PATH", programs.RUN_PATH),
                        ("UDP", programs.RUN_UDP), ("TCP", programs.RUN_TCP),
                        ("ERRORS", programs.RUN_ERRORS)):
        assert re.search(rf"MACE_RUN_{name} = {value},", header)
    assert re.search(rf"MACE_REC_EVENT = {REC_EVENT},", header)
    assert re.search(rf"MACE_REC_PROBE = {REC_PROBE},", header)


def event(ts: int, netns: int, ifindex: int, saddr: bytes, daddr: bytes, number: int,
          packet: int, hook: int, dev: bytes, proto: int = 1, icmp_type: int = 0,
          family: int = 4) -> bytes:
    return EVENT.pack(REC_EVENT, packet, hook, proto, icmp_type, family, number & 0xFFFF,
                      number, netns, ifindex, ts, saddr, daddr, dev)


def test_decode_fields() -> None:
    raw = event(
        123456789, 4026531840, 7, socket.inet_aton("198.18.1.10"),
        socket.inet_aton("198.18.0.2"), 70_513, 1, 1, b"veth0\0garbage\0\0\0", 1, 11,
    )
    e = decode(raw)
    assert (e.ts_mono_ns, e.netns, e.ifindex, e.seq) == (123456789, 4026531840, 7, 70_513)
    assert e.packet is Packet.REPLY and e.hook is Hook.RX and not e.leaving
    assert (e.dev, e.src, e.dst) == ("veth0", "198.18.1.10", "198.18.0.2")
    assert (e.proto, e.icmp_type) == (1, 11)


def test_decode_at_offset() -> None:
    raw = bytes(8) + event(1, 2, 3, b"", b"", 4, 0, 0, b"lo")
    assert decode(memoryview(raw), 8).dev == "lo"


def test_decode_ipv6_addresses() -> None:
    """An IPv6 event's 16-byte addresses; an IPv4 address with the same first bytes stays
    IPv4 (the family decides, and each family has its own cache)."""
    six = event(1, 2, 3, socket.inet_pton(socket.AF_INET6, "2001:2:0:1::10"),
                socket.inet_pton(socket.AF_INET6, "2001:2::2"), 5, 0, 0, b"eth0", 58, 128, 6)
    four = event(1, 2, 3, socket.inet_pton(socket.AF_INET6, "2001:2::")[:4], b"", 5, 0, 0,
                 b"eth0")
    e6, e4 = decode(six), decode(four)
    assert (e6.src, e6.dst, e6.proto, e6.icmp_type) == ("2001:2:0:1::10", "2001:2::2", 58, 128)
    assert (e4.src, e4.dst) == ("32.1.0.2", "0.0.0.0")


def test_decode_probe_record() -> None:
    raw = RECORD.pack(REC_PROBE, Hook.RX, 2**32 - 1, 10, 20, 25, 4026531840, 3, b"out0\0x")
    assert decode(raw) == ProbeRecord(2**32 - 1, 10, 20, 25, 4026531840, 3, "out0", Hook.RX)


def test_unknown_kinds_are_dropped() -> None:
    assert decode(bytes([0]) + bytes(EVENT.size - 1)) is None
    assert decode(bytes([9]) + bytes(EVENT.size - 1)) is None
    assert struct.calcsize("<B3xIQQQII16s") == 56


def test_name_caches_stay_bounded() -> None:
    # Even if the kernel side sent different bytes after the NUL for every event.
    for i in range(10_000):
        addr = i.to_bytes(4, "little")
        raw = event(1, 2, 3, addr, addr, 4, 0, 0, b"eth0\0" + addr)
        assert decode(raw).dev == "eth0"
        decode(event(1, 2, 3, addr * 4, addr * 4, 4, 0, 0, b"eth0", family=6))
    assert len(events._dev_cache) <= events._CACHE_LIMIT
    assert all(len(cache) <= events._CACHE_LIMIT for cache in events._addr_caches.values())
