"""Decoding of struct mace_event (bpf/mace.h) into model.KernelEvent."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from mace_tools.model import Hook, KernelEvent, Packet

# struct mace_event: ts_ns, netns, ifindex, saddr, daddr, seq, packet, hook, dev[16],
# proto, icmp_type, pad
EVENT = struct.Struct("<QIIIIHBB16sBBH")

_HOOKS = tuple(Hook)
_PACKETS = tuple(Packet)
_CACHE_LIMIT = 4096  # distinct device names / addresses worth remembering
_addr_cache: dict[int, str] = {}
_dev_cache: dict[bytes, str] = {}


def _addr(raw: int) -> str:
    # saddr/daddr were copied in network order and unpacked little-endian: repack the same way.
    text = _addr_cache.get(raw)
    if text is None:
        text = socket.inet_ntoa(raw.to_bytes(4, "little"))
        if len(_addr_cache) < _CACHE_LIMIT:
            _addr_cache[raw] = text
    return text


def _dev(raw: bytes) -> str:
    name = _dev_cache.get(raw)
    if name is None:
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        if len(_dev_cache) < _CACHE_LIMIT:  # bounded whatever the kernel sends
            _dev_cache[raw] = name
    return name


def decoder(sink: Callable[[KernelEvent], None]) -> Callable[[memoryview, int], None]:
    """A ring-buffer record handler that decodes into sink in one call per event (this is
    the per-event hot path at flood rates)."""
    unpack, packets, hooks, event = EVENT.unpack_from, _PACKETS, _HOOKS, KernelEvent
    devs, addrs = _dev_cache, _addr_cache
    n_packets, n_hooks = len(_PACKETS), len(_HOOKS)

    def handle(buf: memoryview, offset: int) -> None:
        ts, netns, ifindex, saddr, daddr, seq, packet, hook, dev, proto, icmp_type, _ = \
            unpack(buf, offset)
        if packet >= n_packets or hook >= n_hooks:
            return  # written by another build's mace.h (MACE_BPF_OBJECT): unknown, dropped
        sink(event(ts, seq, packets[packet], hooks[hook], ifindex, netns,
                   devs.get(dev) or _dev(dev), addrs.get(saddr) or _addr(saddr),
                   addrs.get(daddr) or _addr(daddr), proto, icmp_type))

    return handle


def decode(buf: memoryview | bytes, offset: int = 0) -> KernelEvent | None:
    """One record, or None if its packet kind or hook is not one this build knows."""
    ts, netns, ifindex, saddr, daddr, seq, packet, hook, dev, proto, icmp_type, _ = \
        EVENT.unpack_from(buf, offset)
    if packet >= len(_PACKETS) or hook >= len(_HOOKS):
        return None
    return KernelEvent(
        ts, seq, _PACKETS[packet], _HOOKS[hook], ifindex, netns, _dev(dev),
        _addr(saddr), _addr(daddr), proto, icmp_type,
    )
