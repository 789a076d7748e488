"""mace-agent's service: one program set, many clients, each with runs of its own.

One thread serves every client over one epoll (selectors): a request is a few map
updates, and no record passes through the agent (the client reads its run's ring buffer
itself), so nothing a client does, or fails to do, can hold up the others: a client that
sends garbage is answered once and dropped; one that does not read its answers is
dropped; one that does not read its ring loses its own records (counted in its own lost
counter). What waits for the kernel (putting maps into the set and taking them out) is
done by the reservations worker (reservations.py); a run request that finds no
reservation ready is answered when the worker has made one.

Limits: runs per connection; runs per user (uid) and per network namespace, counting
every ring buffer handed to that user or netns that still exists, so a client that keeps
its rings after its runs ended cannot pile up kernel memory (containers often all run as
uid 0: the netns limit is the one that tells them apart); and the agent never takes the
last STANDALONE_SLOTS of the set's MAX_RUNS, which stay for privileged runs of their own.

Runs are tied to the client's connection: when it closes (the client ended, crashed or
was killed) its runs end. When the agent ends, its links close and, unless a standalone
run still holds the set, the programs detach; its entries die with its token.

An idle agent costs packets nothing: with no run on for idle_detach_s, it lets go of its
links (the programs detach unless a standalone run holds them) and keeps the loaded
programs and maps; the next run takes the links again (programs.reattach: ~0.5 ms, no
verifier; ~12 ms within an RCU grace period of the detach) before its entry goes in.
Attached while idle, the programs would cost every packet on the host their empty runs,
~14 a round trip (bench/hook_floor.py). Meanwhile a standalone run finds no set and loads
one of its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_tools.agent import listen, protocol
from mace_tools.agent import peer as peers
from mace_tools.agent.probeconfig import ProbeSpec
from mace_tools.agent.probes import PingMetrics, ProbeWorker, probe_idents
from mace_tools.agent.protocol import DEFAULT_PROBE_RATE, ProtocolError
from mace_tools.agent.reservations import Reservations
from mace_tools.errors import MaceError
from mace_tools.kernel import native, programs
from mace_tools.model import ProbeRecord

MESSAGES_PER_TURN = 8  # a busy client yields to the others after this many requests
STANDALONE_SLOTS = 16  # of the set's MAX_RUNS, never taken by the agent
ACCEPT_PAUSE_S = 0.5  # out of fds: the listener is not watched for this long
PROBES_STOP_S = 5.0  # how long close() waits for the probes' threads, all together


@dataclass(frozen=True, slots=True)
class AgentOptions:
    socket_path: Path = protocol.DEFAULT_SOCKET
    group: str | None = None  # only this group may connect (mode 0660); None: anyone (0666)
    reveal_path: bool = False  # clients see host-side device names and addresses
    max_clients: int = 512
    runs_per_client: int = 8
    runs_per_user: int = 64  # rings that still exist, per uid
    runs_per_netns: int = 16  # rings that still exist, per client netns
    probe_rate: int = DEFAULT_PROBE_RATE  # new probes a second per client run; 0: no limit
    ready_runs: int = 4  # reservations made ahead
    idle_detach_s: float | None = 5.0  # None: the programs stay attached while idle
    verbose: bool = False


@dataclass(slots=True)
class _Client:
    conn: socket.socket
    peer: peers.Peer
    runs: dict[int, programs.Reservation] = field(default_factory=dict)
    next_run: int = 1
    waiting: tuple[int, int] | None = None  # a run request (flags, netns) waiting


class Agent:
    """The service; a context manager (close() releases everything it holds)."""

    def __init__(self, options: AgentOptions, obj_path: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        from mace_tools.kernel.backend import object_path

        self.options = options
        self._log = log or (lambda line: print(f"mace-agent: {line}", file=sys.stderr))
        self._clients: dict[int, _Client] = {}
        self._waiting: deque[_Client] = deque()
        # ("uid", uid) or ("netns", inode) -> ids of the rings handed to it
        self._rings_of: dict[tuple[str, int], list[int]] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = False
        self._listener: socket.socket | None = None
        self._listener_inode: int | None = None
        self._accept_paused_until = 0.0
        self._no_fds_from_clients = False
        self._closer: queue.Queue[list[int] | None] = queue.Queue()
        self._closer_thread: threading.Thread | None = None
        # the agent's own probes (agent/probes.py): their runs, and the fd that stops them
        self._own_runs: set[programs.Reservation] = set()
        self._own_pending = 0  # own runs being made: their slots are taken already
        self._own_lock = threading.Lock()
        # activate/deactivate from the service thread and the probes' threads, one at a
        # time: each rewrites the switches from every entry (programs.update_switches)
        self._set_lock = threading.Lock()
        self._active = 0  # runs with switches in the set: while any, the set stays attached
        self._detach_at: float | None = None  # when an idle agent lets go of its links
        self._closed = False  # the set is closed: no run may attach it again
        self._probes: list[ProbeWorker] = []
        self._probes_stopping = threading.Event()
        self._probes_stop: tuple[int, int] | None = None  # a pipe, once probes start
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.host_netns = os.stat("/proc/self/ns/net").st_ino
        _raise_fd_limit()
        path = obj_path or object_path()
        try:
            self.pset, self.loaded = programs.attached_set(path)
        except OSError as exc:
            self._wake_r.close()
            self._wake_w.close()
            raise MaceError(f"cannot set up the BPF programs: {exc.strerror}") from exc
        self._token: int | None = None
        try:
            self._token = programs.new_token()
            token_id = native.map_id(self._token)
            self._idle = programs.RunEntry(0, 0, 0, token_id, os.getpid())
            self._token_id = token_id
            self._reservations = Reservations(self.pset, options.ready_runs, token_id,
                                              os.getpid(), self._wake)
            self._idle_detach_s = options.idle_detach_s
            if self._idle_detach_s is not None and not _may_walk_links():
                self._log("cannot walk the host's BPF links (no CAP_SYS_ADMIN): the "
                          "programs stay attached while idle")
                self._idle_detach_s = None
            self._schedule_detach()
        except BaseException:
            if self._token is not None:
                os.close(self._token)
            self.pset.close()
            self._wake_r.close()
            self._wake_w.close()
            raise

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the socket and the loop ---------------------------------------------------

    def listen(self) -> None:
        self._listener, self._no_fds_from_clients = listen.bind(self.options.socket_path,
                                                                self.options.group)
        # the file's inode (fstat of the socket would give its sockfs inode, never the file's)
        self._listener_inode = os.lstat(self.options.socket_path).st_ino
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._woken)
        if not self._no_fds_from_clients:
            # Without SO_PASSRIGHTS an fd a client sends reaches us, and its last close
            # may wait (a lingering TCP socket, a FUSE file): closed on a thread, not here.
            self._closer_thread = threading.Thread(target=self._close_fds, daemon=True,
                                                   name="mace-fd-closer")
            self._closer_thread.start()

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (or until() is true, checked every turn)."""
        assert self._listener is not None, "listen() first"
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while not self._stop and not (until is not None and until()):
                timeout = 1.0 if until else None
                for at in (self._accept_paused_until, self._detach_at):
                    if at:
                        wait = max(0.0, at - time.monotonic())
                        timeout = wait if timeout is None else min(timeout, wait)
                for key, _ in self._selector.select(timeout=timeout):
                    key.data(key.fileobj)
                self._resume_accepting()
                self._detach_if_idle()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = True

    def _wake(self) -> None:
        """From the reservations worker: a reservation is ready, or could not be made."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"r")

    def _woken(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
        self._answer_waiting()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: watching it now would spin. Said once
                    # per pause; clients wait in the backlog meanwhile.
                    self._log(f"accept: {exc.strerror}: not accepting for "
                              f"{ACCEPT_PAUSE_S} s")
                    self._selector.unregister(listener)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                    return
                self._log(f"accept: {exc.strerror}")
                return
            conn.setblocking(False)
            if len(self._clients) >= self.options.max_clients:
                _answer_and_close(conn, f"too many clients ({self.options.max_clients})")
                continue
            try:
                peer = peers.identify(conn)
            except (MaceError, OSError) as exc:
                _answer_and_close(conn, str(exc))
                continue
            self._clients[conn.fileno()] = _Client(conn, peer)
            self._selector.register(conn, selectors.EVENT_READ, self._readable)
            if self.options.verbose:
                self._log(f"client pid {peer.pid} uid {peer.uid} connected")

    def _resume_accepting(self) -> None:
        if self._accept_paused_until and time.monotonic() >= self._accept_paused_until \
                and self._listener is not None:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, self._accept)

    def _readable(self, conn: socket.socket) -> None:
        client = self._clients.get(conn.fileno())
        if client is None:
            return
        for _ in range(MESSAGES_PER_TURN):
            try:
                message, fds = protocol.receive(conn)
            except (BlockingIOError, InterruptedError):
                return
            except ProtocolError as exc:
                self._drop(client, str(exc))
                return
            except OSError:
                self._drop(client)
                return
            if fds:
                if self._closer_thread is not None:
                    self._closer.put(fds)
                else:
                    protocol.close_all(fds)
                self._drop(client, "a client sends no file descriptors")
                return
            if message is None:
                self._drop(client)
                return
            try:
                answer, out_fds = self._handle(client, message)
            except ProtocolError as exc:
                self._drop(client, str(exc))
                return
            except MaceError as exc:
                answer, out_fds = {"ok": False, "error": str(exc)}, ()
            if answer is None:
                return  # waits for a reservation: its connection is not read meanwhile
            if not self._send(client, answer, out_fds):
                return

    def _send(self, client: _Client, answer: dict[str, Any], fds: tuple[int, ...] = ()) \
            -> bool:
        try:
            protocol.send(client.conn, answer, fds)
        except OSError:  # not reading its answers (EAGAIN), or gone: dropped
            self._drop(client)
            return False
        return True

    def _close_fds(self) -> None:
        while (fds := self._closer.get()) is not None:
            protocol.close_all(fds)

    # --- requests ------------------------------------------------------------------

    def _handle(self, client: _Client, message: dict[str, Any]) \
            -> tuple[dict[str, Any] | None, tuple[int, ...]]:
        op = message.get("op")
        if op == "run":
            return self._run_request(client, message)
        if op == "state":
            return self._probe_state(client, message), ()
        if op == "end":
            run_id = protocol.integer(message, "run", 1, 2**31 - 1)
            reservation = client.runs.pop(run_id, None)
            if reservation is None:
                raise MaceError(f"no run {run_id} on this connection")
            self._end_run(reservation)
            return {"ok": True}, ()
        raise ProtocolError(f"unknown op {op!r}")

    def _run_request(self, client: _Client, message: dict[str, Any]) \
            -> tuple[dict[str, Any] | None, tuple[int, ...]]:
        """Checked now; answered now if a reservation is ready, else when one is."""
        flags = sum(bit for name, bit in programs.SWITCH_BITS.items()
                    if protocol.boolean(message, name))
        if len(client.runs) >= self.options.runs_per_client:
            raise MaceError(f"too many runs on one connection "
                            f"({self.options.runs_per_client})")
        prober = peers.netns_of(client.peer)
        for key, limit in ((("uid", client.peer.uid), self.options.runs_per_user),
                           (("netns", prober), self.options.runs_per_netns)):
            if self._live_rings(key) >= limit:
                raise MaceError(f"too many runs for {key[0]} {key[1]} ({limit}; ended ones "
                                "count while their ring buffers are still open)")
        if self._slots_held() >= programs.MAX_RUNS - STANDALONE_SLOTS:
            raise MaceError("too many concurrent runs on this host")
        reservation, failure = self._reservations.take()
        if reservation is None:
            if failure is not None:
                raise MaceError(f"cannot add the run: {failure}")
            client.waiting = (flags, prober)
            self._waiting.append(client)
            self._selector.unregister(client.conn)  # read again once answered
            return None, ()
        return self._start_run(client, flags, prober, reservation)

    def _answer_waiting(self) -> None:
        while self._waiting:
            client = self._waiting[0]
            if client.waiting is None or client.conn.fileno() not in self._clients:
                self._waiting.popleft()  # dropped meanwhile
                continue
            reservation, failure = self._reservations.take()
            if reservation is None and failure is None:
                return  # the worker is making one
            self._waiting.popleft()
            flags, prober = client.waiting
            client.waiting = None
            self._selector.register(client.conn, selectors.EVENT_READ, self._readable)
            if reservation is None:
                self._send(client, {"ok": False, "error": f"cannot add the run: {failure}"})
                continue
            try:
                answer, fds = self._start_run(client, flags, prober, reservation)
            except MaceError as exc:
                answer, fds = {"ok": False, "error": str(exc)}, ()
            self._send(client, answer, fds)

    def _start_run(self, client: _Client, flags: int, prober: int,
                   reservation: programs.Reservation) -> tuple[dict[str, Any], tuple[int, ...]]:
        try:
            if not self.options.reveal_path:
                flags |= programs.RUN_HIDE_HOST
            entry = programs.RunEntry(flags, prober, self.host_netns, self._token_id,
                                      max(client.peer.pid, 0),
                                      programs.probe_gap(self.options.probe_rate))
            ring_id = native.map_id(reservation.ring_fd)  # before: nothing may fail after
            self._activate(reservation.nonce, entry)
        except BaseException as exc:
            self._reservations.end(reservation)
            if isinstance(exc, OSError):
                raise MaceError(f"cannot add the run: {exc.strerror}") from None
            raise
        run_id = client.next_run
        client.next_run += 1
        client.runs[run_id] = reservation
        for key in (("uid", client.peer.uid), ("netns", prober)):
            self._rings_of.setdefault(key, []).append(ring_id)
        if self.options.verbose:
            self._log(f"client pid {client.peer.pid}: run {run_id} netns {prober}")
        return ({"ok": True, "run": run_id, "nonce": reservation.nonce.hex(),
                 "ring_bytes": programs.RING_BYTES, "host_details": self.options.reveal_path,
                 "probe_rate": self.options.probe_rate},
                (reservation.ring_fd, reservation.lost_fd))

    def _live_rings(self, key: tuple[str, int]) -> int:
        """Rings handed to a uid or netns that still exist (held by the agent for a run,
        or by a client that kept its fd after its run ended)."""
        live = [ring for ring in self._rings_of.get(key, []) if _map_exists(ring)]
        if live:
            self._rings_of[key] = live
        else:
            self._rings_of.pop(key, None)
        return len(live)

    def _slots_held(self) -> int:
        """Run slots of the set this agent holds (from any thread: list() of a dict's
        values is one step under the GIL)."""
        clients = list(self._clients.values())
        return (sum(len(c.runs) for c in clients) + len(self._own_runs)
                + self._own_pending + self._reservations.slots)

    # --- the agent's own probes (agent/probes.py) ---------------------------------

    def start_probes(self, specs: list[ProbeSpec], metrics: PingMetrics,
                     runtime: str = "auto") -> None:
        """A thread per probe, pinging until close()."""
        if self._probes_stop is None:
            # written once at close(), never read: readable for every probe's loop
            self._probes_stop = os.pipe2(os.O_CLOEXEC)
        for spec, ident in zip(specs, probe_idents(len(specs)), strict=True):
            worker = ProbeWorker(spec, self, metrics, self._probes_stop[0],
                                 self._probes_stopping, runtime, self._log, ident)
            self._probes.append(worker)
            worker.start()

    def start_own_run(self, flags: int, prober_netns: int, ring_bytes: int) \
            -> programs.Reservation:
        """A run of the set for one of the agent's own probes (any thread)."""
        if self._probes_stopping.is_set():
            raise MaceError("the agent is stopping")
        with self._own_lock:  # the slot is counted before the run is made
            if self._slots_held() >= programs.MAX_RUNS - STANDALONE_SLOTS:
                raise MaceError("too many concurrent runs on this host")
            self._own_pending += 1
        try:
            reservation = self._reservations.make_now(ring_bytes)
            try:
                entry = programs.RunEntry(flags, prober_netns, self.host_netns,
                                          self._token_id, os.getpid())
                self._activate(reservation.nonce, entry)
            except BaseException:
                self._reservations.end(reservation)
                raise
            with self._own_lock:
                self._own_runs.add(reservation)
        except OSError as exc:
            raise MaceError(f"cannot add the run: {exc.strerror}") from None
        finally:
            with self._own_lock:
                self._own_pending -= 1
        return reservation

    def end_own_run(self, reservation: programs.Reservation) -> None:
        with self._own_lock:
            self._own_runs.discard(reservation)
        self._end_run(reservation)

    def own_probe_state(self, nonce: bytes, number: int) -> ProbeRecord | None:
        try:
            return programs.probe_state(self.pset, nonce, number)
        except OSError:
            return None

    def _stop_probes(self) -> None:
        """Every probe's run ends (its loop wakes on the stop fd), then its thread."""
        self._probes_stopping.set()
        if self._probes_stop is not None:
            os.write(self._probes_stop[1], b"s")
        deadline = time.monotonic() + PROBES_STOP_S
        for worker in self._probes:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _probe_state(self, client: _Client, message: dict[str, Any]) -> dict[str, Any]:
        run_id = protocol.integer(message, "run", 1, 2**31 - 1)
        number = protocol.integer(message, "number", 0, 2**32 - 1)
        reservation = client.runs.get(run_id)
        if reservation is None:
            raise MaceError(f"no run {run_id} on this connection")
        r = programs.probe_state(self.pset, reservation.nonce, number)
        if r is None:
            return {"ok": True, "number": number, "state": None}
        return {"ok": True, "number": number, "state": {
            "departed": r.departed_ns, "returned": r.returned_ns,
            "delivered": r.delivered_ns, "outer_netns": r.outer_netns,
            "outer_ifindex": r.outer_ifindex, "returned_hook": r.returned_hook,
            # the name the kernel withholds from this client's records, withheld here too
            "outer_dev": r.outer_dev if self.options.reveal_path else ""}}

    def _end_run(self, reservation: programs.Reservation) -> None:
        """Back to an idle entry (nothing more is written to its ring), then out of the
        set on the worker. If that write fails the entry stays as it is, with its maps:
        taken out with the agent's token when it ends, never reused."""
        try:
            self._deactivate(reservation.nonce)
        except (OSError, MaceError) as exc:
            self._log(f"cannot end run {reservation.nonce.hex()}: {exc}")
            return
        self._reservations.end(reservation)

    # --- the set attached while runs are on -----------------------------------------

    def _activate(self, nonce: bytes, entry: programs.RunEntry) -> None:
        """A reservation's entry becomes a run, the set attached first (any thread)."""
        with self._set_lock:
            if self._closed:
                raise MaceError("the agent is stopping")
            try:
                if not self.pset.attached:
                    try:
                        programs.reattach(self.pset)
                    except OSError as exc:
                        raise MaceError(f"cannot attach the BPF programs: {exc.strerror}") \
                            from None
                    if self.options.verbose:
                        self._log("programs attached")
                programs.activate(self.pset, nonce, entry, idle=self._idle)
            except BaseException:
                if not self._active and self._detach_at is None:
                    self._schedule_detach()  # attached for a run that did not start
                    self._wake()
                raise
            self._active += 1
            self._detach_at = None

    def _deactivate(self, nonce: bytes) -> None:
        """A run's entry back to idle (any thread); the last one starts the idle clock.
        One that fails stays counted: its entry may still have switches."""
        with self._set_lock:
            programs.deactivate(self.pset, nonce, idle=self._idle)
            self._active -= 1
            if not self._active:
                self._schedule_detach()
        self._wake()  # the service loop's select() takes the new deadline

    def _schedule_detach(self) -> None:
        if self._idle_detach_s is not None:
            self._detach_at = time.monotonic() + self._idle_detach_s

    def _detach_if_idle(self) -> None:
        if self._detach_at is None or time.monotonic() < self._detach_at:
            return
        with self._set_lock:
            if self._active or self._detach_at is None or \
                    time.monotonic() < self._detach_at:
                return
            self._detach_at = None
            if self.pset.attached:
                self.pset.detach()
                if self.options.verbose:
                    self._log("idle: programs detached")

    @property
    def attached(self) -> bool:
        """Whether the agent holds the set's links now (idle: see the module doc)."""
        return self.pset.attached

    def _drop(self, client: _Client, why: str | None = None) -> None:
        """Answer a broken client once (best effort), end its runs, close it."""
        if why is not None:
            with contextlib.suppress(OSError):
                protocol.send(client.conn, {"ok": False, "error": why})
            if self.options.verbose:
                self._log(f"client pid {client.peer.pid} dropped: {why}")
        self._clients.pop(client.conn.fileno(), None)
        client.waiting = None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.conn)
        for reservation in client.runs.values():
            self._end_run(reservation)
        client.runs.clear()
        client.conn.close()
        client.peer.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def runs(self) -> int:
        """Runs on now: the clients' and the agent's own probes'."""
        return sum(len(c.runs) for c in list(self._clients.values())) + len(self._own_runs)

    def close(self) -> None:
        """End every client and run, take the reservations out, release the set (the
        programs detach unless a standalone run still holds them), remove the socket."""
        self._stop_probes()
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            listen.remove_if_ours(self.options.socket_path, self._listener_inode)
        if self._closer_thread is not None:
            self._closer.put(None)
            self._closer_thread.join(timeout=5)
        self._selector.close()
        try:
            self._reservations.close()
        finally:
            with self._set_lock:  # a probe thread still starting a run attaches nothing
                self._closed = True
            if self._token is not None:
                os.close(self._token)
            self.pset.close()
            self._wake_r.close()
            self._wake_w.close()
            if self._probes_stop is not None:
                for fd in self._probes_stop:
                    os.close(fd)


def _may_walk_links() -> bool:
    """Whether this process may walk the host's BPF links (programs.reattach needs to)."""
    try:
        native.link_ids()
    except PermissionError:
        return False
    return True


def _map_exists(map_id: int) -> bool:
    try:
        fd = native.map_fd(map_id)
    except OSError:
        return True  # cannot tell: counted
    if fd is None:
        return False
    os.close(fd)
    return True


def _raise_fd_limit() -> None:
    """Each client holds a connection and a pidfd, each run two map fds: the soft limit
    (1024 under systemd) goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _answer_and_close(conn: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError):
        protocol.send(conn, {"ok": False, "error": why})
    conn.close()
