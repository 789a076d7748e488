"""The Python decoder agrees with struct mace_event in bpf/mace.h."""

import re
import socket
import struct
from pathlib import Path

from mace_tools.kernel import events
from mace_tools.kernel.events import EVENT, decode
from mace_tools.model import Hook, Packet

HEADER = Path(__file__).resolve().parents[1] / "bpf" / "mace.h"
_SIZES = {"__u64": 8, "__u32": 4, "__u16": 2, "__u8": 1}


def c_struct_size(name: str) -> int:
    """Size of a C struct from mace.h with natural alignment (fields are simple scalars)."""
    body = re.search(rf"struct {name} {{(.*?)}};", HEADER.read_text(), re.S).group(1)
    size = align = 0
    for ctype, _field, count in re.findall(r"(__u\d+|char)\s+(\w+)(?:\[(\d+)\])?;", body):
        width = _SIZES.get(ctype, 1)
        size = (size + width - 1) // width * width + width * int(count or 1)
        align = max(align, width)
    return (size + align - 1) // align * align


def test_event_layout_matches_header() -> None:
    assert c_struct_size("mace_event") == EVENT.size == 48


def test_decode_fields() -> None:
    raw = EVENT.pack(
        123456789, 4026531840, 7,
        int.from_bytes(socket.inet_aton("198.18.1.10"), "little"),
        int.from_bytes(socket.inet_aton("198.18.0.2"), "little"),
        513, 1, 1, b"veth0\0garbage\0\0\0", 1, 11, 0,
    )
    e = decode(raw)
    assert (e.ts_mono_ns, e.netns, e.ifindex, e.seq) == (123456789, 4026531840, 7, 513)
    assert e.packet is Packet.REPLY and e.hook is Hook.RX and not e.leaving
    assert (e.dev, e.src, e.dst) == ("veth0", "198.18.1.10", "198.18.0.2")
    assert (e.proto, e.icmp_type) == (1, 11)


def test_decode_at_offset() -> None:
    raw = bytes(8) + EVENT.pack(1, 2, 3, 0, 0, 4, 0, 0, b"lo", 1, 0, 0)
    assert decode(memoryview(raw), 8).dev == "lo"
    assert struct.calcsize("<QIIIIHBB16sBBH") == 48


def test_name_caches_stay_bounded() -> None:
    # Even if the kernel side sent different bytes after the NUL for every event.
    for i in range(10_000):
        raw = EVENT.pack(1, 2, 3, i, i, 4, 0, 0, b"eth0\0" + i.to_bytes(4, "little"), 1, 0, 0)
        assert decode(raw).dev == "eth0"
    assert len(events._dev_cache) <= events._CACHE_LIMIT
    assert len(events._addr_cache) <= events._CACHE_LIMIT
