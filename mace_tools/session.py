"""One measuring run's shared machinery, under the ping run (pinger.py) and the traceroute
run (tracer.py).

A Session opens the run's sockets inside the probing netns (a socket keeps the netns it was
made in; the rest of the process stays where it started) and learns the source address
the kernel picks there; holds the run's nonce and its event source (the programs this
process joins or loads, kernel/backend.py, bound only when a run starts so mace-ping's
start-up stays light; or a run the host's mace-agent serves, agent/client.py, which
chooses the nonce; sources.py picks; a factory stands in for them in tests); runs
after_setup once all that is open (the command drops its privileges there); and runs the
loop: one thread, one epoll over the sockets. What belongs to a protocol (ping's pacing,
traceroute's hop plan and emission) stays with the run that uses the session.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from mace_tools.errors import MaceError
from mace_tools.kernel import early
from mace_tools.model import KernelEvent, Namespaces, ProbeRecord
from mace_tools.probe import netns
from mace_tools.probe.addresses import sockaddr
from mace_tools.probe.icmp import new_nonce
from mace_tools.status import StatusSignal

if TYPE_CHECKING:
    from mace_tools.kernel.run_records import Reader

MAX_WAIT_S = 60.0  # a turn's wait is cut to this: epoll takes int ms, and clocks may jump


class EventSource(Protocol):
    """Where a run's kernel records come from: kernel.backend.Backend (the programs this
    process joined or loaded), agent.client.AgentEvents (a run the host's mace-agent
    serves), or a test's fake. nonce: the run's (an agent chooses it)."""

    nonce: bytes
    kind: str  # "local" or "agent": mace.source in the JSON outputs
    probe_rate: int  # new probes a second the run gets kernel data for; 0: no limit

    @property
    def fd(self) -> int: ...
    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int: ...
    def lost(self) -> int: ...
    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) -> Reader: ...
    def probe_state(self, number: int) -> ProbeRecord | None: ...
    def close(self) -> None: ...


class RunSocket(Protocol):
    """What the session needs of a run's socket (socket.socket, probe.sockets.IcmpSocket)."""

    def fileno(self) -> int: ...
    def close(self) -> None: ...


# (the nonce asked for or None, the run's namespaces, switches) -> an open source, or None:
# no kernel data for this run (it is measured raw); see kernel_events for the switches.
EventSourceFactory = Callable[..., "EventSource | None"]
S = TypeVar("S", bound=RunSocket)




def family_of(address: str) -> int:
    """4 or 6: the IP version of an address in text (an IPv6 one may carry a %scope)."""
    return 6 if ":" in address else 4


BROADCAST_QUESTION = ("Do you want to ping broadcast? Then -b. If not, check your local "
                      "firewall rules")


def source_address(dst: str, device: str | None, source: str | None,
                   broadcast: bool | None = None, warnings: list[str] | None = None) -> str:
    """Source address the kernel picks for dst in the current netns; fails as ping does
    when there is no route. broadcast (ping's -b, None for other tools): a broadcast
    dst is refused with ping's question unless True, then taken with ping's warning."""
    if source is not None:
        return source
    family = socket.AF_INET6 if family_of(dst) == 6 else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if device is not None:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        try:
            udp.connect(sockaddr(dst, 1025))
        except PermissionError:  # EACCES: a broadcast address without SO_BROADCAST
            if broadcast is None:
                raise
            if not broadcast:
                raise MaceError(BROADCAST_QUESTION) from None
            if warnings is not None:
                warnings.append("WARNING: pinging broadcast address")
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            udp.connect(sockaddr(dst, 1025))
        return udp.getsockname()[0]
    except OSError as exc:
        raise MaceError(f"connect: {exc.strerror}") from exc
    finally:
        udp.close()


def kernel_events(nonce: bytes | None, ns: Namespaces, **switches: bool) -> EventSource:
    """This run's place in the host's eBPF program set (libbpf is bound only now).
    nonce None: a new one. switches: records (ping's in-kernel correlation), path (an
    event per device), udp/tcp/errors (traceroute's matching): kernel.backend.Backend."""
    from mace_tools.kernel.backend import Backend

    backend = Backend(nonce or early.nonce() or new_nonce(), prober_netns=ns.prober,
                      host_netns=ns.host, **switches)
    try:
        backend.open()
    except BaseException:
        backend.close()
        raise
    return backend


def _none_lost() -> int:
    return 0  # (no event source, or not any more)


class Session:
    """A run's sockets, event source and loop; a context manager that closes them all."""

    def __init__(self, netns_path: Path | None, nonce: bytes | None = None, *,
                 after_setup: Callable[[], None] | None = None,
                 events_factory: EventSourceFactory | None = None) -> None:
        """netns_path: the netns to probe from (None: ours). nonce: the run's, if the
        caller chose it (else the event source's choice, or a new one). after_setup runs
        at ready(), once the sockets and the event source are open (the command drops
        its privileges there, as iputils does; a long-lived caller keeps its own).
        events_factory: the event source (default: kernel_events)."""
        self.nonce = nonce
        self.netns_path = netns_path
        self.ns: Namespaces = netns.of_run(netns_path)
        self._sockets: list[RunSocket] = []
        self._after_setup = after_setup
        self._events_factory = events_factory
        self._events: EventSource | None = None
        # the source's reader (EventSource.reader), while it is open and the run wants it
        self._drain_now: Callable[[], int] | None = None
        self._lost_now: Callable[[], int] = _none_lost
        self.records_read = 0  # records and events that crossed from the kernel
        self.warnings: list[str] = []  # what setting up said that the run should show
        self.source = "none"  # where the kernel data comes from: "local", "agent", "none"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_events(self, on_event: Callable[[KernelEvent], None] | None,
                    on_record: Callable[[ProbeRecord], None] | None = None,
                    **switches: bool) -> bytes:
        """Open the event source (an agent chooses the run's nonce), its events
        going to on_event and its probe records to on_record (on_event None: the run gets
        no kernel data, as when probes are too short to carry the nonce); switches go to
        the factory. The run's nonce."""
        if on_event is not None:
            factory = self._events_factory or kernel_events
            self._events = factory(self.nonce, self.ns, **switches)
            if self._events is not None:
                self.nonce = self._events.nonce
                self.source = self._events.kind
                self._drain_now, self._lost_now = self._events.reader(on_event, on_record)
        if self.source != "local":
            early.release()  # what the command started loading for this run, if anything
        if self.nonce is None:
            self.nonce = new_nonce()
        return self.nonce

    def open_sockets(self, make: Callable[[], Sequence[S]], dst_addr: str,
                     device: str | None = None, source: str | None = None,
                     broadcast: bool | None = None) -> tuple[list[S], str]:
        """Make the run's sockets inside the probing netns (make() closes what it opened
        if it fails), and find the source address the kernel picks there for dst_addr
        (`source`, -I ADDR, if given; broadcast as source_address). The sockets are the
        session's to close."""
        with netns.entered(self.netns_path):
            sockets = list(make())
            self._sockets.extend(sockets)
            return sockets, source_address(dst_addr, device, source, broadcast,
                                           self.warnings)

    def ready(self) -> None:
        """Everything is open: after_setup. From here on the run needs no privilege."""
        if self._after_setup is not None:
            self._after_setup()

    def drain(self) -> None:
        """Hand every waiting kernel event to the run. The one place the event source is
        read: on every turn of the loop, and by a run before it correlates an answer
        (its events were committed before the answer reached the socket)."""
        if self._drain_now is not None:
            self.records_read += self._drain_now()

    def lost(self) -> int:
        """The event source's lost count (0 without one): a probe in flight while it
        changed may miss events, and gets no correction."""
        return self._lost_now()

    @property
    def probe_rate(self) -> int:
        """The event source's limit on the run's new probes a second (mace-agent
        --probe-rate); 0: none, or no source."""
        return self._events.probe_rate if self._events is not None else 0

    def probe_state(self, number: int) -> ProbeRecord | None:
        """A probe's state as the kernel holds it, for a reply that came with no record
        (its delivery fired no tracepoint in the prober netns: macvlan). A syscall."""
        return self._events.probe_state(number) if self._events is not None else None

    def loop(self, turn: Callable[[], float | None], receive: Callable[[int], None],
             status: Callable[[], None] | None = None, stop_fds: Sequence[int] = ()) -> None:
        """Run turns until turn() returns None, or Ctrl-C, or one of stop_fds is readable
        (a service ending its runs, a probed container's pidfd: its init exited): then
        the run reports what it has, as ping does. A turn: turn() does the run's timed
        work (send what is due, time out, emit) and returns how many seconds to wait for
        input; then the wait, the kernel events (drained every turn: the programs submit
        without waking anyone, bpf/mace.bpf.c, so unanswered probes' events never pile up
        in the ring), receive(fd) for each readable socket, and status() if SIGQUIT came
        (None: SIGQUIT keeps its default action)."""
        poller = select.epoll()
        # not installed (fd None, never taken) when the run has no status line
        quit_signal = StatusSignal.install() if status is not None else StatusSignal()
        try:
            for s in self._sockets:
                poller.register(s.fileno(), select.EPOLLIN)
            if quit_signal.fd is not None:
                poller.register(quit_signal.fd, select.EPOLLIN)
            for fd in stop_fds:
                poller.register(fd, select.EPOLLIN)
            while (wait_s := turn()) is not None:
                ready = [fd for fd, _ in poller.poll(min(wait_s, MAX_WAIT_S))]
                if stop_fds and any(fd in stop_fds for fd in ready):
                    return
                if quit_signal.fd in ready:
                    quit_signal.drain()
                self.drain()
                for fd in ready:
                    if fd != quit_signal.fd:
                        receive(fd)
                if quit_signal.take() and status is not None:
                    status()
        except KeyboardInterrupt:
            pass  # Ctrl-C: stop sending and waiting; the run reports what it has
        finally:
            poller.close()
            quit_signal.close()

    def close(self) -> None:
        """Close the event source, then the sockets."""
        try:
            self._drain_now, self._lost_now = None, _none_lost
            if self._events is not None:
                events, self._events = self._events, None
                events.close()
        finally:
            sockets, self._sockets = self._sockets, []
            for s in sockets:
                s.close()
