"""mace-agent's service: one program set, many clients, each with runs of its own.

One thread serves every client over one epoll (selectors): a request is a few map
updates, and no record passes through the agent (the client reads its run's ring buffer
itself), so nothing a client does, or fails to do, can hold up the others: a client that
sends garbage is answered once and dropped; one that does not read its answers is
dropped; one that does not read its ring loses its own records (counted in its own lost
counter). A second thread keeps a few reservations (a nonce with its ring and counter
already in the set) made ahead and takes ended runs' maps out behind: each of those map
updates waits for an RCU grace period (~10 ms), which a client should not wait for.

Runs are tied to the client's connection: when it closes (the client ended, crashed or
was killed) its runs end. When the agent ends, its links close and, unless a standalone
run still holds the set, the programs detach; its runs' entries die with its token.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import queue
import selectors
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_tools.agent import peer as peers
from mace_tools.agent import protocol
from mace_tools.agent.protocol import ProtocolError
from mace_tools.errors import MaceError
from mace_tools.kernel import native, programs
from mace_tools.kernel.events import PROBE_STATE, probe_record_from_state
from mace_tools.session import new_nonce

MESSAGES_PER_TURN = 8  # a busy client yields to the others after this many requests
SWITCHES = ("records", "path", "udp", "tcp", "errors")
_FLAGS = {"records": programs.RUN_RECORDS, "path": programs.RUN_PATH,
          "udp": programs.RUN_UDP, "tcp": programs.RUN_TCP, "errors": programs.RUN_ERRORS}


@dataclass(frozen=True, slots=True)
class AgentOptions:
    socket_path: Path = protocol.DEFAULT_SOCKET
    group: str | None = None  # only this group may connect (mode 0660); None: anyone (0666)
    reveal_path: bool = False  # clients see host-side device names and addresses
    max_clients: int = 512
    runs_per_client: int = 8
    ready_runs: int = 4  # reservations made ahead
    verbose: bool = False


@dataclass(slots=True)
class _Run:
    nonce: bytes
    reservation: programs.Reservation


@dataclass(slots=True)
class _Client:
    conn: socket.socket
    peer: peers.Peer
    runs: dict[int, _Run] = field(default_factory=dict)
    next_run: int = 1


class _Reservations:
    """Reservations made ahead, and ended runs' maps taken out behind, on a thread of
    their own (ctypes releases the GIL around each syscall)."""

    def __init__(self, pset: programs.ProgramSet, ready: int) -> None:
        self._pset = pset
        self._ready: queue.Queue[programs.Reservation] = queue.Queue()
        self._ended: queue.Queue[programs.Reservation | None] = queue.Queue()
        self._want = ready
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mace-reservations",
                                        daemon=True)
        self._thread.start()

    def take(self) -> programs.Reservation:
        """A reservation: made ahead if one is ready, else made now."""
        try:
            reservation = self._ready.get_nowait()
        except queue.Empty:
            reservation = self._make()
        self._ended.put_nowait(None)  # wakes the thread to make another
        return reservation

    def end(self, reservation: programs.Reservation) -> None:
        self._ended.put_nowait(reservation)

    def _make(self) -> programs.Reservation:
        while True:
            try:
                return programs.reserve(self._pset, new_nonce())
            except MaceError:
                continue  # the nonce is someone's (2**-64): another

    def _work(self) -> None:
        while True:
            while self._ready.qsize() < self._want:
                try:
                    self._ready.put(self._make())
                except (OSError, MaceError) as exc:  # the set is full; take() will say so
                    self._failed = exc
                    break
            item = self._ended.get()
            if item is _STOP:
                return
            if item is not None:
                with contextlib.suppress(OSError):
                    programs.unreserve(self._pset, item)

    def close(self) -> None:
        """Stop the thread, then take every reservation out (ready and ended)."""
        self._ended.put(_STOP)  # type: ignore[arg-type]
        self._thread.join()
        for q in (self._ended, self._ready):
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, programs.Reservation):
                    with contextlib.suppress(OSError):
                        programs.unreserve(self._pset, item)


_STOP = object()


class Agent:
    """The service; a context manager (close() releases everything it holds)."""

    def __init__(self, options: AgentOptions, obj_path: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        from mace_tools.kernel.backend import object_path

        self.options = options
        self._log = log or (lambda line: print(f"mace-agent: {line}", file=sys.stderr))
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = False
        self._listener: socket.socket | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self.host_netns = os.stat("/proc/self/ns/net").st_ino
        path = obj_path or object_path()
        try:
            self.pset, self.loaded = programs.attached_set(path)
        except OSError as exc:
            raise MaceError(f"cannot set up the BPF programs: {exc.strerror}") from exc
        try:
            self._token = programs.new_token()
            self._token_id = native.map_id(self._token)
            self._reservations = _Reservations(self.pset, options.ready_runs)
        except BaseException:
            self.pset.close()
            raise

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the socket and the loop ---------------------------------------------------

    def listen(self) -> None:
        """Bind the socket (a stale one left by a dead agent is replaced; a live agent's
        is not), with the access the options give, and listen."""
        path = self.options.socket_path
        _claim(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # no one else may connect before the chmod below
        try:
            listener.bind(str(path))
        except OSError as exc:
            listener.close()
            raise MaceError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if self.options.group is not None:
            os.chown(path, -1, _group_id(self.options.group))
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o666)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, self._accept)

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (or until() is true, checked every turn)."""
        assert self._listener is not None, "listen() first"
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wakeup = (wake_r, wake_w)
        self._selector.register(wake_r, selectors.EVENT_READ, self._woken)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while not self._stop and not (until is not None and until()):
                for key, _ in self._selector.select(timeout=1.0 if until else None):
                    key.data(key.fileobj)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = True

    def _woken(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.recv(64)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ...: the client waits in the backlog
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
            if message is None:
                self._drop(client)
                return
            if fds:
                protocol.close_all(fds)
                self._drop(client, "a client sends no file descriptors")
                return
            try:
                answer, out_fds = self._handle(client, message)
            except ProtocolError as exc:
                self._drop(client, str(exc))
                return
            except MaceError as exc:
                answer, out_fds = {"ok": False, "error": str(exc)}, ()
            try:
                protocol.send(conn, answer, out_fds)
            except OSError:  # not reading its answers (EAGAIN), or gone: dropped
                self._drop(client)
                return

    # --- requests ------------------------------------------------------------------

    def _handle(self, client: _Client, message: dict[str, Any]) \
            -> tuple[dict[str, Any], tuple[int, ...]]:
        op = message.get("op")
        if op == "run":
            return self._start_run(client, message)
        if op == "state":
            return self._probe_state(client, message), ()
        if op == "end":
            run_id = protocol.integer(message, "run", 1, 2**31 - 1)
            run = client.runs.pop(run_id, None)
            if run is None:
                raise MaceError(f"no run {run_id} on this connection")
            self._end_run(run)
            return {"ok": True}, ()
        raise ProtocolError(f"unknown op {op!r}")

    def _start_run(self, client: _Client, message: dict[str, Any]) \
            -> tuple[dict[str, Any], tuple[int, ...]]:
        switches = {name: protocol.boolean(message, name) for name in SWITCHES}
        if len(client.runs) >= self.options.runs_per_client:
            raise MaceError(f"too many runs on one connection "
                            f"({self.options.runs_per_client})")
        prober = peers.netns_of(client.peer)
        flags = sum(_FLAGS[name] for name, on in switches.items() if on)
        if not self.options.reveal_path:
            flags |= programs.RUN_HIDE_HOST
        entry = programs.RunEntry(flags, prober, self.host_netns, self._token_id,
                                  max(client.peer.pid, 0))
        try:
            reservation = self._reservations.take()
        except OSError as exc:
            raise _run_error(exc) from None
        try:
            programs.activate(self.pset, reservation.nonce, entry)
        except BaseException as exc:
            self._reservations.end(reservation)
            if isinstance(exc, OSError):
                raise _run_error(exc) from None
            raise
        run_id = client.next_run
        client.next_run += 1
        client.runs[run_id] = _Run(reservation.nonce, reservation)
        if self.options.verbose:
            self._log(f"client pid {client.peer.pid}: run {run_id} nonce "
                      f"{reservation.nonce.hex()} netns {prober}")
        return ({"ok": True, "run": run_id, "nonce": reservation.nonce.hex(),
                 "ring_bytes": programs.RING_BYTES, "host_details": self.options.reveal_path},
                (reservation.ring_fd, reservation.lost_fd))

    def _probe_state(self, client: _Client, message: dict[str, Any]) -> dict[str, Any]:
        run_id = protocol.integer(message, "run", 1, 2**31 - 1)
        number = protocol.integer(message, "number", 0, 2**32 - 1)
        run = client.runs.get(run_id)
        if run is None:
            raise MaceError(f"no run {run_id} on this connection")
        key = run.nonce + number.to_bytes(4, "little") + bytes(4)
        raw = native.map_lookup(self.pset.fds["probes"], key, PROBE_STATE.size)
        if raw is None:
            return {"ok": True, "state": None}
        r = probe_record_from_state(number, raw)
        hidden = not self.options.reveal_path  # as the kernel withholds it from records
        return {"ok": True, "state": {
            "departed": r.departed_ns, "returned": r.returned_ns,
            "delivered": r.delivered_ns, "outer_netns": r.outer_netns,
            "outer_ifindex": r.outer_ifindex, "outer_dev": "" if hidden else r.outer_dev}}

    def _end_run(self, run: _Run) -> None:
        try:
            programs.deactivate(self.pset, run.nonce)
        except (OSError, MaceError) as exc:
            self._log(f"cannot end run {run.nonce.hex()}: {exc}")
        self._reservations.end(run.reservation)

    def _drop(self, client: _Client, why: str | None = None) -> None:
        """Answer a broken client once (best effort), end its runs, close it."""
        if why is not None:
            with contextlib.suppress(OSError):
                protocol.send(client.conn, {"ok": False, "error": why})
            if self.options.verbose:
                self._log(f"client pid {client.peer.pid} dropped: {why}")
        self._clients.pop(client.conn.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.conn)
        for run in client.runs.values():
            self._end_run(run)
        client.runs.clear()
        client.conn.close()
        client.peer.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def runs(self) -> int:
        return sum(len(c.runs) for c in self._clients.values())

    def close(self) -> None:
        """End every client and run, take the reservations out, release the set (the
        programs detach unless a standalone run still holds them), remove the socket."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.options.socket_path)
        if self._wakeup is not None:
            for s in self._wakeup:
                s.close()
            self._wakeup = None
        self._selector.close()
        try:
            self._reservations.close()
        finally:
            os.close(self._token)
            self.pset.close()


def _run_error(exc: OSError) -> MaceError:
    if exc.errno == errno.E2BIG:
        return MaceError(f"too many concurrent runs on this host ({programs.MAX_RUNS})")
    return MaceError(f"cannot add the run: {exc.strerror}")


def _answer_and_close(conn: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError):
        protocol.send(conn, {"ok": False, "error": why})
    conn.close()


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise MaceError(f"no group named {name!r}") from None


def _claim(path: Path) -> None:
    """Make room for the socket at path: its directory (0755: containers mount it), and
    no live agent on it (a dead one's socket is removed)."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise MaceError(f"cannot create {path.parent}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise MaceError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nothing listens: a dead agent's
        return
    finally:
        probe.close()
    raise MaceError(f"another mace-agent serves {path}")
