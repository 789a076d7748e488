"""Decoding of the records of a run's ring (bpf/mace.h): struct mace_event into
model.KernelEvent, struct mace_probe_record into model.ProbeRecord."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from mace_tools.model import Hook, KernelEvent, Packet, ProbeRecord

# struct mace_event: kind, packet, hook, proto, icmp_type, family, seq, number, netns,
# ifindex, pad, ts_ns, saddr[16], daddr[16], dev[16]
EVENT = struct.Struct("<BBBBBBHIIIxxxxQ16s16s16s")
# struct mace_probe_record: kind, returned_hook, pad[2], number, departed, returned,
# delivered, outer netns, outer ifindex, outer dev[16]
RECORD = struct.Struct("<BBxxIQQQII16s")
# struct probe_state (bpf/mace.bpf.c): departed, returned, delivered, outer dev address,
# delivered dev address, host netns, outer netns, outer ifindex, returned hook, outer dev
# name
PROBE_STATE = struct.Struct("=QQQQQIIII16s")
REC_EVENT, REC_PROBE = 1, 2  # enum mace_record_kind

_HOOKS = tuple(Hook)
_PACKETS = tuple(Packet)
_CACHE_LIMIT = 4096  # distinct device names / addresses worth remembering
_addr_caches: dict[int, dict[bytes, str]] = {4: {}, 6: {}}  # by family
_dev_cache: dict[bytes, str] = {}


def _addr(raw: bytes, family: int) -> str:
    """An event's address field as text: IPv4 (its first 4 bytes) unless family is 6."""
    cache = _addr_caches[6 if family == 6 else 4]
    text = cache.get(raw)
    if text is None:
        text = socket.inet_ntop(socket.AF_INET6, raw) if family == 6 \
            else socket.inet_ntoa(raw[:4])
        if len(cache) < _CACHE_LIMIT:
            cache[raw] = text
    return text


def _dev(raw: bytes) -> str:
    name = _dev_cache.get(raw)
    if name is None:
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        if len(_dev_cache) < _CACHE_LIMIT:  # bounded whatever the kernel sends
            _dev_cache[raw] = name
    return name


def dispatcher(on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None,
               ) -> Callable[[memoryview, int], None]:
    """A ring-buffer record handler: events decoded into on_event, probe records into
    on_record, in one call each (this is the per-record hot path at flood rates). A
    record of a kind this build does not know (another build's mace.h) is dropped."""
    unpack_event, unpack_record = EVENT.unpack_from, RECORD.unpack_from
    packets, hooks, event, probe_record = _PACKETS, _HOOKS, KernelEvent, ProbeRecord
    devs, addrs4, addrs6 = _dev_cache, _addr_caches[4], _addr_caches[6]
    n_packets, n_hooks = len(_PACKETS), len(_HOOKS)

    def handle(buf: memoryview, offset: int) -> None:
        kind = buf[offset]
        if kind == REC_PROBE:
            if on_record is not None:
                _, hook, number, departed, returned, delivered, netns, ifindex, dev = \
                    unpack_record(buf, offset)
                on_record(probe_record(number, departed, returned, delivered, netns, ifindex,
                                       devs.get(dev) or _dev(dev), hook))
            return
        if kind != REC_EVENT:
            return
        _, packet, hook, proto, icmp_type, family, _seq, number, netns, ifindex, ts, saddr, \
            daddr, dev = unpack_event(buf, offset)
        if packet >= n_packets or hook >= n_hooks:
            return
        addrs = addrs6 if family == 6 else addrs4
        on_event(event(ts, number, packets[packet], hooks[hook], ifindex, netns,
                       devs.get(dev) or _dev(dev), addrs.get(saddr) or _addr(saddr, family),
                       addrs.get(daddr) or _addr(daddr, family), proto, icmp_type))

    return handle


def decode(buf: memoryview | bytes, offset: int = 0) -> KernelEvent | ProbeRecord | None:
    """One record, or None if it is of a kind (or packet kind, or hook) this build does
    not know."""
    out: list[KernelEvent | ProbeRecord] = []
    dispatcher(out.append, out.append)(memoryview(buf), offset)
    return out[0] if out else None


def probe_record_from_state(number: int, raw: bytes) -> ProbeRecord:
    """A probe's kernel state (the probes map's value) as the record it would have sent."""
    departed, returned, delivered, _, _, _, netns, ifindex, hook, dev = \
        PROBE_STATE.unpack(raw)
    return ProbeRecord(number, departed, returned, delivered, netns, ifindex, _dev(dev), hook)
