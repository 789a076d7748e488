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
import time
from collections.abc import Callable

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
# A producer (a BPF program on another CPU) fills a record between reserve and submit
# without sleeping: a record still BUSY is waited for this long before the reader gives up
# (and counts a stall, which marks the probes in flight incomplete).
_BUSY_WAIT_NS = 200_000


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
        self.stalls = 0  # records given up on while still BUSY

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
                    length = self._await_commit(off)
                    if length & _BUSY:
                        self.stalls += 1
                        self._cons[0] = cons
                        return count
                cons += ((length & ~_DISCARD) + _HDR + 7) & ~7
                if not length & _DISCARD:
                    handle(self._data, off + _HDR)
                    count += 1
            self._cons[0] = cons  # release the space to the producers
        return count

    def _await_commit(self, off: int) -> int:
        """The record's length word once its producer has committed it (or the wait ran out:
        then still BUSY). Records are consumed in order, so stopping here would hold back
        every record after it, the events of other probes among them."""
        deadline = time.monotonic_ns() + _BUSY_WAIT_NS
        while (length := self._data32[off >> 2]) & _BUSY and time.monotonic_ns() < deadline:
            pass
        return length

    def close(self) -> None:
        for view in (self._cons, self._prod, self._data, self._data32):
            view.release()
        self._cons_map.close()
        self._prod_map.close()
