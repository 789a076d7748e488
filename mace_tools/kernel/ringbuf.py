"""Reader for a BPF ring buffer map, over mmap, without libbpf callbacks.

libbpf's ring_buffer__poll would call back into Python through ctypes once per event,
which costs more than decoding the event. The ring buffer's memory layout is stable uapi
(see kernel/bpf/ringbuf.c and libbpf's ringbuf.c): page 0 holds the consumer position
(we write it), page 1 the producer position, then the data area mapped twice so a record
never wraps. The map fd itself is pollable (readable when records wait). Each record has
an 8-byte header: u32 length with BUSY (bit 31, still being written) and DISCARD (bit 30)
flags, and a u32 page offset.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    def __init__(self, map_fd: int, data_size: int) -> None:
        page = mmap.PAGESIZE
        self.fd = map_fd
        self._mask = data_size - 1
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._prod_map = mmap.mmap(
            map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        # Native-width casts: each position read/write is one aligned 8-byte access.
        self._cons = memoryview(self._cons_map).cast("Q")
        self._prod = memoryview(self._prod_map)[:8].cast("Q")
        self._data = memoryview(self._prod_map)[page:]
        self._data32 = self._data.cast("I")

    def consume(self, handle: Callable[[memoryview, int], None]) -> int:
        """Call handle(data, offset) for every committed record; return how many."""
        cons = self._cons[0]
        count = 0
        while True:
            prod = self._prod[0]
            if cons >= prod:
                break
            while cons < prod:
                off = cons & self._mask
                length = self._data32[off >> 2]
                if length & _BUSY:
                    self._cons[0] = cons
                    return count
                cons += ((length & ~_DISCARD) + _HDR + 7) & ~7
                if not length & _DISCARD:
                    handle(self._data, off + _HDR)
                    count += 1
            self._cons[0] = cons  # release the space to the producers
        return count

    def close(self) -> None:
        for view in (self._cons, self._prod, self._data, self._data32):
            view.release()
        self._cons_map.close()
        self._prod_map.close()
