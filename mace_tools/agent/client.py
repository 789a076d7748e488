"""A run served by the host's mace-agent: the client's side (mace-ping, mace-traceroute).

The client needs no privilege: it connects to the agent's socket, asks for a run, and
gets the run's nonce and two file descriptors, its ring buffer and its lost counter,
which it maps and reads exactly as a privileged run reads its own (kernel/ringbuf.py).
The connection stays open for the run: closing it ends the run. If the agent goes away
mid-run, the programs stop with it: the run says so once on stderr, counts it as lost
records (so no probe in flight then is corrected) and goes on raw.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from mace_tools.agent import protocol
from mace_tools.errors import MaceError
from mace_tools.kernel.run_records import Reader, RunRecords
from mace_tools.model import KernelEvent, ProbeRecord

ENV = "MACE_AGENT"  # the agent's socket, when not the default
CONNECT_TIMEOUT_S = 2.0  # an agent answers in ms; a hung one must not hang the run
CHECK_EVERY_NS = 100_000_000  # how often a drain looks whether the agent is still there


def socket_path(explicit: str | None) -> tuple[Path, bool]:
    """The agent's socket: --agent, else $MACE_AGENT, else the default; and whether it was
    asked for (then an agent that cannot serve is an error, not a reason to fall back)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(ENV)
    if env:
        return Path(env), True
    return protocol.DEFAULT_SOCKET, False


def connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.connect(str(path))
    except OSError as exc:
        conn.close()
        raise MaceError(f"cannot reach mace-agent at {path}: {exc.strerror or exc}") from None
    return conn


def request(conn: socket.socket, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """One request and its answer (MaceError with the agent's words if it refused)."""
    try:
        protocol.send(conn, message)
        answer, fds = protocol.receive(conn)
    except TimeoutError:
        raise MaceError("mace-agent did not answer") from None
    except OSError as exc:
        raise MaceError(f"mace-agent: {exc.strerror or exc}") from None
    if answer is None:
        raise MaceError("mace-agent closed the connection")
    if answer.get("ok") is not True:
        protocol.close_all(fds)
        raise MaceError(f"mace-agent: {answer.get('error') or 'refused'}")
    return answer, fds


class AgentEvents:
    """session.EventSource for a run the agent serves."""

    kind = "agent"

    def __init__(self, conn: socket.socket, run_id: int, nonce: bytes, ring_fd: int,
                 lost_fd: int, ring_bytes: int,
                 warn: Callable[[str], None] | None = None, probe_rate: int = 0) -> None:
        self.nonce = nonce
        self.probe_rate = probe_rate  # the agent's limit on this run (0: none)
        self._conn = conn
        self._run = run_id
        self._fds = (ring_fd, lost_fd)
        self._records: RunRecords | None = RunRecords(ring_fd, lost_fd, ring_bytes)
        self._warn = warn or (lambda line: print(line, file=sys.stderr))
        self._gone = False
        self._poll = select.poll()
        self._poll.register(conn, select.POLLIN | select.POLLRDHUP)
        self._checked = time.monotonic_ns()

    @property
    def fd(self) -> int:
        return self._fds[0]

    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int:
        assert self._records is not None
        now = time.monotonic_ns()
        if not self._gone and now - self._checked >= CHECK_EVERY_NS:
            self._checked = now
            self._check_agent()
        if self._gone:
            # What still comes (the set lives on while another agent or run holds it)
            # is not read: the run said it goes on raw, and it does.
            return 0
        return self._records.drain(on_event, on_record)

    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) -> Reader:
        """(drain, lost) through this object: both look at whether the agent is gone."""
        return partial(self.drain, on_event, on_record), self.lost

    def _check_agent(self) -> None:
        """The agent is gone when its end of the connection is (it never writes to us
        unasked). A poll that does not wait: the socket itself keeps its timeout for
        requests."""
        events = self._poll.poll(0)
        if events and events[0][1] & (select.POLLHUP | select.POLLRDHUP | select.POLLERR
                                      | select.POLLIN):
            self._went_away()

    def _went_away(self) -> None:
        if not self._gone:
            self._gone = True
            self._warn("mace-agent went away: the rest of this run is measured raw")

    def lost(self) -> int:
        """The run's lost records (kernel/run_records.py), plus one once the agent is
        gone (every probe in flight then, or later, goes uncorrected)."""
        assert self._records is not None
        return self._records.lost() + (1 if self._gone else 0)

    def probe_state(self, number: int) -> ProbeRecord | None:
        """A probe's kernel state, asked of the agent (a reply that came with no record:
        macvlan). None when it cannot say. An answer must name the probe asked about; an
        agent that does not answer in time is taken for gone (a late answer would else
        be read as the next one's)."""
        if self._gone:
            return None
        number &= 0xFFFFFFFF
        try:
            answer, fds = request(self._conn, {"op": "state", "run": self._run,
                                               "number": number})
        except MaceError:
            self._went_away()
            return None
        protocol.close_all(fds)
        state = answer.get("state")
        if answer.get("number") != number:
            self._went_away()
            return None
        if not isinstance(state, dict):
            return None
        try:
            return ProbeRecord(number, int(state["departed"]), int(state["returned"]),
                               int(state["delivered"]), int(state["outer_netns"]),
                               int(state["outer_ifindex"]), str(state["outer_dev"]),
                               int(state.get("returned_hook", -1)))
        except (KeyError, TypeError, ValueError):
            return None

    def close(self) -> None:
        """End the run: closing the connection is enough (the agent ends a closed
        connection's runs)."""
        if self._records is not None:
            self._records.close()
            self._records = None
        for fd in self._fds:
            os.close(fd)
        self._conn.close()


def open_run(path: Path, warn: Callable[[str], None] | None = None, /,
             **switches: bool) -> AgentEvents:
    """Ask the agent at path for a run with these switches (kernel/backend.py's: one of
    them is called path, hence the positional-only parameters)."""
    conn = connect(path)
    try:
        answer, fds = request(conn, {"op": "run", **switches})
        try:
            nonce = bytes.fromhex(str(answer.get("nonce")))
            run_id = protocol.integer(answer, "run", 1, 2**31 - 1)
            ring_bytes = protocol.integer(answer, "ring_bytes", mmap.PAGESIZE, 1 << 30)
            # (an agent before --probe-rate does not say: no limit)
            probe_rate = protocol.integer(answer, "probe_rate", 0, 1_000_000_000) \
                if "probe_rate" in answer else 0
            if len(fds) != 2 or len(nonce) != 8 or ring_bytes & (ring_bytes - 1):
                raise ValueError
        except (ValueError, MaceError):
            protocol.close_all(fds)
            raise MaceError("mace-agent: a malformed answer to a run request") from None
        try:
            return AgentEvents(conn, run_id, nonce, fds[0], fds[1], ring_bytes, warn,
                               probe_rate)
        except (OSError, ValueError) as exc:
            protocol.close_all(fds)
            raise MaceError(f"cannot map the run's ring buffer: {exc}") from None
    except BaseException:
        conn.close()
        raise
