"""The host's program set found or loaded on a thread while the command starts up, and
the run's nonce made ready in it.

Loading the set is ~80 ms, nearly all of it the kernel's verifier; putting a run's ring
and counter into it waits ~15 ms for RCU grace periods (done while the verifier works:
programs.load); and meanwhile the command spends ~60 ms importing and parsing its
options before it asks for the set. On two CPUs these overlap.

A command that will most likely load its own programs calls start() before its heavy
imports (cli.launch); a run with no nonce of its own takes nonce() for its probes, and
Backend.open takes the set and the prepared run when it gets there. A run that settles on
another source (the agent, none, probes too short for the nonce) calls release(): the
prepared run goes and the set is let go as soon as the thread is done, without waiting
for it. A process that ends first leaves nothing either: the set detaches when its last
holder goes, and the prepared run's entry (made before its maps) names a token that dies
with the process, so the next run to join clears it. A failure is not reported here:
join() then loads or reserves again and meets the error itself.

Importing this module binds nothing (programs and libbpf come with start()), so a run
that uses the agent can call release() at no cost.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mace_tools.probe.icmp import new_nonce

if TYPE_CHECKING:
    from mace_tools.kernel.programs import PreparedRun, ProgramSet


@dataclass(frozen=True, slots=True)
class EarlySet:
    pset: ProgramSet
    loaded: bool  # loaded by this process (no run had the set attached)
    prepared: PreparedRun | None  # the nonce() run, if it could be made ready


def _give_back(got: EarlySet) -> None:
    from mace_tools.kernel import programs

    try:
        if got.prepared is not None:
            programs.discard_run(got.pset, got.prepared)
    finally:
        got.pset.close()


class _Load(threading.Thread):
    def __init__(self, path: Path, prepare: bool) -> None:
        super().__init__(name="mace-early-load", daemon=True)
        self.path = path
        self.nonce = new_nonce() if prepare else None
        self.prepared: PreparedRun | None = None
        self.result: EarlySet | None = None
        self._lock = threading.Lock()
        self._unwanted = False

    def run(self) -> None:
        from mace_tools.kernel import programs

        try:
            pset, loaded = programs.attached_set(self.path, self._prepare)
        except BaseException:  # join() meets it again and reports it
            if self.prepared is not None:  # in a set that is gone: only our fds are left
                self.prepared.reservation.close()
                os.close(self.prepared.token_fd)
            return
        got = EarlySet(pset, loaded, self.prepared)
        with self._lock:
            if not self._unwanted:
                self.result = got
                return
        _give_back(got)

    def _prepare(self, pset: ProgramSet) -> None:
        from mace_tools.kernel import programs

        if self.nonce is None:
            return
        try:
            self.prepared = programs.prepare_run(pset, self.nonce)
        except BaseException:  # join() reserves on its own and reports a failure
            self.prepared = None

    def give_back(self) -> None:
        """Whatever the thread got goes back: now if it is done, else when it is."""
        with self._lock:
            self._unwanted = True
            got, self.result = self.result, None
        if got is not None:
            _give_back(got)


_pending: _Load | None = None


def start(path: Path, prepare: bool) -> None:
    """Find or load the set of the object at path on a thread (once per process); with
    prepare, also make a run with nonce() ready in it."""
    global _pending
    if _pending is None:
        _pending = _Load(path, prepare)
        _pending.start()


def nonce() -> bytes | None:
    """The nonce start() is preparing a run for (no waiting), or None."""
    return _pending.nonce if _pending is not None else None


def take(path: Path) -> EarlySet | None:
    """What start() got for this object (waiting for the thread); None if nothing: not
    started, another object's, or the set could not be had. Only once: the caller holds
    the set (and the prepared run) from then on."""
    global _pending
    load, _pending = _pending, None
    if load is None:
        return None
    load.join()
    got = load.result
    if got is not None and load.path != path:
        _give_back(got)
        return None
    return got


def release() -> None:
    """The run will not take what start() gets: it goes back (see the module's text)."""
    global _pending
    load, _pending = _pending, None
    if load is not None:
        load.give_back()
