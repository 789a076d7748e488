"""Runs made ahead and taken out behind, on a thread of their own.

Putting a map into a map of maps, or taking it out, waits for an RCU grace period (~20 ms
each here). A run needs two of each (its ring and its lost counter), so the agent's one
service thread never does them: this worker keeps a few reservations ready (a nonce whose
ring and counter are in the set, inert until the agent adds the run's entry) and takes
ended runs' maps out, ended ones first, so a client that ends and starts runs in a loop
cannot fill the set's slots. ctypes releases the GIL around each syscall.

Each reservation also has an entry in the runs map with no switches (flags 0, which the
programs ignore) under the agent's token: if the agent dies, the next run that joins the
set clears those entries and their maps as it clears any dead run's (programs.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable

from mace_tools.errors import MaceError
from mace_tools.kernel import programs
from mace_tools.probe.icmp import new_nonce


class Reservations:
    """The worker. notify() is called (from the worker thread) whenever a reservation
    became ready or making one failed: the service loop then answers the clients waiting."""

    def __init__(self, pset: programs.ProgramSet, ready: int, token_id: int, owner_pid: int,
                 notify: Callable[[], None]) -> None:
        self._pset = pset
        self._want = ready
        self._idle_entry = programs.RunEntry(0, 0, 0, token_id, owner_pid)
        self._notify = notify
        self._lock = threading.Condition()
        self._ready: deque[programs.Reservation] = deque()
        self._ended: deque[programs.Reservation] = deque()
        self._stop = False
        self.failure: str | None = None  # why the last reservation could not be made
        self._thread = threading.Thread(target=self._work, name="mace-reservations",
                                        daemon=True)
        self._thread.start()

    def take(self) -> tuple[programs.Reservation | None, str | None]:
        """A ready reservation; else None and why the last one could not be made (None:
        one is being made, notify() will say). A failure is said once: the worker then
        tries again."""
        with self._lock:
            self._lock.notify()  # make another
            if self._ready:
                return self._ready.popleft(), None
            failure, self.failure = self.failure, None
            return None, failure

    def end(self, reservation: programs.Reservation) -> None:
        with self._lock:
            self._ended.append(reservation)
            self._lock.notify()

    @property
    def slots(self) -> int:
        """Entries of the set's maps this agent holds that are not runs: ready, or ended
        and not yet taken out."""
        with self._lock:
            return len(self._ready) + len(self._ended)

    def make_now(self, ring_bytes: int) -> programs.Reservation:
        """A reservation made on the caller's thread (which waits for the RCU grace
        periods), with a ring of ring_bytes: the agent's own probes, which read few
        records, map a small ring each. Ended with end(), as any other."""
        return self._make(ring_bytes)

    def _make(self, ring_bytes: int = programs.RING_BYTES) -> programs.Reservation:
        while True:
            try:  # (entry first: programs.reserve_idle)
                return programs.reserve_idle(self._pset, new_nonce(), self._idle_entry,
                                             ring_bytes)
            except MaceError:
                continue  # the nonce is someone's (2**-64): another

    def _take_out(self, reservation: programs.Reservation) -> None:
        with contextlib.suppress(OSError):
            programs.remove_entry(self._pset, reservation.nonce)
        with contextlib.suppress(OSError):
            programs.unreserve(self._pset, reservation)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._ended and \
                        (len(self._ready) >= self._want or self.failure is not None):
                    self._lock.wait()
                if self._stop:
                    return
                ended = self._ended.popleft() if self._ended else None
                if ended is not None:
                    self.failure = None  # a slot is free again: worth another try
            if ended is not None:
                self._take_out(ended)
                continue
            try:
                made = self._make()
            except (OSError, MaceError) as exc:
                with self._lock:
                    self.failure = getattr(exc, "strerror", None) or str(exc)
                self._notify()
                continue
            except BaseException as exc:  # a bug: said, and no more reservations made
                with self._lock:
                    self.failure = f"internal error: {exc!r}"
                self._notify()
                continue
            with self._lock:
                self._ready.append(made)
            self._notify()

    def close(self) -> None:
        """Stop the worker, then take every reservation out (ready and ended)."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join()
        while self._ready or self._ended:
            self._take_out((self._ready or self._ended).popleft())
