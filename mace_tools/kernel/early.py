"""The host's program set found or loaded on a thread while the command starts up, and
the run's nonce made ready in it.

Loading the set is ~80 ms, nearly all of it the kernel's verifier; putting a run's ring
and counter into it waits ~15 ms for RCU grace periods (done while the verifier works:
programs.load); and meanwhile the command spends ~60 ms importing and parsing its
options before it asks for the set. On two CPUs these overlap.

A command that will most likely load its own programs calls start() before its heavy
imports (cli.launch); a run with no nonce of its own takes nonce() for its probes, and
Backend.open takes the set and the prepared run when it gets there. What is never taken
(the options chose the agent, or no corrections, or an error ended the run) costs only
the work: the set is detached when the process exits, and the prepared run's entry names
a token that dies with it, so the next run to join clears it. A failure is not reported
here: join() then loads or reserves again and meets the error itself.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from mace_tools.kernel import programs
from mace_tools.probe.icmp import new_nonce


@dataclass(frozen=True, slots=True)
class EarlySet:
    pset: programs.ProgramSet
    loaded: bool  # loaded by this process (no run had the set attached)
    prepared: programs.PreparedRun | None  # the nonce() run, if it could be made ready


class _Load(threading.Thread):
    def __init__(self, path: Path, prepare: bool) -> None:
        super().__init__(name="mace-early-load", daemon=True)
        self.path = path
        self.nonce = new_nonce() if prepare else None
        self.prepared: programs.PreparedRun | None = None
        self.result: EarlySet | None = None

    def run(self) -> None:
        try:
            pset, loaded = programs.attached_set(self.path, self._prepare)
        except BaseException:  # join() meets it again and reports it
            if self.prepared is not None:  # in a set that is gone: only our fds are left
                self.prepared.reservation.close()
                os.close(self.prepared.token_fd)
            return
        self.result = EarlySet(pset, loaded, self.prepared)

    def _prepare(self, pset: programs.ProgramSet) -> None:
        if self.nonce is None:
            return
        try:
            self.prepared = programs.prepare_run(pset, self.nonce)
        except BaseException:  # join() reserves on its own and reports a failure
            self.prepared = None


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
        if got.prepared is not None:
            programs.discard_run(got.pset, got.prepared)
        got.pset.close()
        return None
    return got
