"""Reading one run's records: its ring buffer and its lost counter, both mapped.

The same for a run that joined the program set itself (kernel/backend.py) and for one the
host's mace-agent serves (agent/client.py): the fds are the run's own either way.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from functools import partial

from mace_tools.kernel.events import dispatcher
from mace_tools.kernel.ringbuf import RingBuffer
from mace_tools.model import KernelEvent, ProbeRecord

# (drain, lost): an event source's drain() for one pair of sinks and its lost(), as calls
# of no argument (session.EventSource.reader). A run calls them for every probe, so a
# source hands out its most direct ones.
Reader = tuple[Callable[[], int], Callable[[], int]]


class RunRecords:
    """Maps of a run's ring (fd ring_fd, ring_bytes of data) and lost counter (one u64,
    BPF_F_MMAPABLE: read with a memory load, no syscall and no privilege per reply). The
    fds stay the caller's."""

    def __init__(self, ring_fd: int, lost_fd: int, ring_bytes: int) -> None:
        self.fd = ring_fd  # pollable: readable when records wait
        self._ring = RingBuffer(ring_fd, ring_bytes)
        try:
            self._lost_map = mmap.mmap(lost_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            self._ring.close()
            raise
        self._lost = memoryview(self._lost_map)[:8].cast("Q")
        # the record handler of the sinks last drained into: built once, not per drain
        self._handler: tuple[object, object, Callable[[memoryview, int], None]] | None = None

    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int:
        """Decode every waiting record into its sink; return how many."""
        if self._handler is None or self._handler[:2] != (on_event, on_record):
            self._handler = (on_event, on_record, dispatcher(on_event, on_record))
        return self._ring.consume(self._handler[2])

    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) -> Reader:
        """drain() with these sinks and lost(), as calls of no argument (session.Reader):
        the ring's own consume, its handler built once."""
        return partial(self._ring.consume, dispatcher(on_event, on_record)), self.lost

    def lost(self) -> int:
        """Records the kernel side could not write to the ring (full), plus the times the
        reader gave up on a record still being written."""
        return self._lost[0] + self._ring.stalls

    def close(self) -> None:
        self._ring.close()
        self._lost.release()
        self._lost_map.close()
