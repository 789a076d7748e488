"""mace-agent's own probes: a continuous ping per `--probe`, exported as metrics.

Each probe is a thread running the ping run (pinger.py) from its source's netns, with an
event source that is a run of the agent's own program set (OwnRun: a reservation the
agent activates for it, with a small ring, as it reads one record per reply), and a sink
that turns replies into metrics (MetricsSink). A reply without complete kernel data
counts as a response and its raw RTT is observed; it never gets a corrected RTT.

Sources come and go. A probe's run ends, and the probe looks its source up again, when:
the pinned process of a `pid:` or `container:` source exits (its pidfd turns readable:
a container restarted by name is found again, with its new netns); an `netns:` name
names another netns; the target's name resolves to another address (looked up again
every RECHECK_S). Meanwhile, and while a source cannot be found, mace_probe_up is 0 and
the probe retries, backing off to RETRY_MAX_S; what went wrong is logged once per change.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mace_tools.agent.metrics import Registry
from mace_tools.agent.probeconfig import ProbeSpec
from mace_tools.errors import MaceError
from mace_tools.kernel import programs
from mace_tools.kernel.run_records import Reader, RunRecords
from mace_tools.model import KernelEvent, Measurement, Namespaces, ProbeRecord
from mace_tools.probe import netns

if TYPE_CHECKING:
    from mace_tools.probe.resolver import Vantage

# a record per reply, drained every turn: 16 KB holds ~250 (a page at least: arm64 64K)
OWN_RING_BYTES = max(1 << 14, mmap.PAGESIZE)
RECHECK_S = 30.0  # how often a running probe checks its netns name and target address
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
RESTART_S = 0.5  # after a change: a restarted container's new init, a name's new address
SETTLED_S = 60.0  # a run that lasted this long resets the retry backoff
WINDOW_MIN_S = 10.0  # a probe unanswered this long (or 3 intervals) is lost


class RunSlots(Protocol):
    """What a probe needs of the agent: a run of its program set, and its end. Agent
    implements it (server.py); thread-safe."""

    def start_own_run(self, flags: int, prober_netns: int, ring_bytes: int) \
            -> programs.Reservation: ...

    def end_own_run(self, reservation: programs.Reservation) -> None: ...

    def own_probe_state(self, nonce: bytes, number: int) -> ProbeRecord | None: ...


class OwnRun:
    """session.EventSource for a run of the agent's own set, read in the agent."""

    kind = "agent"
    probe_rate = 0  # the agent's own runs are not limited

    def __init__(self, slots: RunSlots, reservation: programs.Reservation) -> None:
        self.nonce = reservation.nonce
        self._slots = slots
        self._reservation: programs.Reservation | None = reservation
        self._records = RunRecords(reservation.ring_fd, reservation.lost_fd, OWN_RING_BYTES)
        self._final_lost: int | None = None  # once closed: the count it ended with

    @property
    def fd(self) -> int:
        return self._records.fd

    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int:
        return self._records.drain(on_event, on_record)

    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) -> Reader:
        return self._records.reader(on_event, on_record)[0], self.lost  # (lost: after close)

    def lost(self) -> int:
        """The run's lost records; after close(), the count it ended with (the sink
        takes its last delta once the run is over)."""
        if self._final_lost is not None:
            return self._final_lost
        return self._records.lost()

    def probe_state(self, number: int) -> ProbeRecord | None:
        return self._slots.own_probe_state(self.nonce, number)

    def close(self) -> None:
        if self._reservation is not None:
            reservation, self._reservation = self._reservation, None
            self._final_lost = self._records.lost()
            self._records.close()
            self._slots.end_own_run(reservation)


class PingMetrics:
    """The probes' metric families (README, "Fleet")."""

    LABELS = ("source", "target")

    def __init__(self, registry: Registry) -> None:
        self.rtt = registry.histogram(
            "mace_ping_rtt_seconds", "Round-trip time of the agent's pings: raw as ping "
            "measures it, corrected without the container's own networking",
            (*self.LABELS, "kind"))
        self.stage = registry.histogram(
            "mace_ping_stage_seconds", "Time a ping spent in the container host's own "
            "networking: egress (socket to outer device), ingress (outer device to socket)",
            (*self.LABELS, "stage"))
        self.requests = registry.counter("mace_ping_requests_total",
                                         "Echo requests sent", self.LABELS)
        self.responses = registry.counter("mace_ping_responses_total",
                                          "Echo replies received (not duplicates)",
                                          self.LABELS)
        self.with_kernel = registry.counter(
            "mace_ping_responses_with_kernel_data_total",
            "Echo replies with complete kernel timestamps (corrected)", self.LABELS)
        self.late = registry.counter(
            "mace_ping_responses_late_kernel_stamp_total",
            "Echo replies left uncorrected: their return was stamped after their receive "
            "stamp (the program ran late)", self.LABELS)
        self.lost = registry.counter(
            "mace_kernel_events_lost_total",
            "Kernel records the probe's run lost (its replies then go uncorrected)",
            self.LABELS)
        self.up = registry.gauge("mace_probe_up", "1 while the probe's source was found "
                                 "and its run is on, else 0", self.LABELS)


@dataclass
class MetricsSink:
    """pinger.PingSink: replies to metrics. One per probe; every series is made at start,
    so a probe that never got a reply still shows its zeros."""

    metrics: PingMetrics
    spec: ProbeSpec
    lost_of: Callable[[], int] = lambda: 0  # the current run's lost count
    _lost_seen: int = 0

    def __post_init__(self) -> None:
        labels = (self.spec.source, self.spec.target)
        m = self.metrics
        self._raw = m.rtt.labels(*labels, "raw")
        self._corrected = m.rtt.labels(*labels, "corrected")
        self._egress = m.stage.labels(*labels, "egress")
        self._ingress = m.stage.labels(*labels, "ingress")
        self._requests = m.requests.labels(*labels)
        self._responses = m.responses.labels(*labels)
        self._with_kernel = m.with_kernel.labels(*labels)
        self._late = m.late.labels(*labels)
        self._lost = m.lost.labels(*labels)
        self.up = m.up.labels(*labels)

    def new_run(self, lost_of: Callable[[], int]) -> None:
        self.lost_of, self._lost_seen = lost_of, 0

    def start(self, source_addr: str, ident: int | None = None) -> None:
        self.up.set(1)  # the run's socket and kernel run are open

    def count_lost(self) -> None:
        """Add what the run's lost counter gained since last looked (at each send, and
        once more when the run ends)."""
        lost = self.lost_of()
        if lost > self._lost_seen:
            self._lost.inc(lost - self._lost_seen)
            self._lost_seen = lost

    def warning(self, text: str) -> None:
        pass  # what ping warns of at start (broadcast, a flow label) shows in no metric

    def sent(self, seq: int) -> None:
        self._requests.inc()
        self.count_lost()

    def reply(self, m: Measurement) -> None:
        if m.dup or m.corrupted:
            return  # counted by ping apart; their times measure nothing new
        self._responses.inc()
        if m.rtt_raw_ns >= 0:  # (raw is wall-clock time, as ping's: a clock step can
            self._raw.observe(m.rtt_raw_ns / 1e9)  # make it negative; corrected is not,
        if m.late_kernel_stamp:  # but a backward step refuses it: correlate.returned_late)
            self._late.inc()
        if m.rtt_corrected_ns is not None:
            self._with_kernel.inc()
            self._corrected.observe(m.rtt_corrected_ns / 1e9)
            if m.egress_ns is not None:
                self._egress.observe(m.egress_ns / 1e9)
            if m.ingress_ns is not None:
                self._ingress.observe(m.ingress_ns / 1e9)

    def icmp_error(self, seq: int, src: str, text: str) -> None:
        pass

    def icmp_notice(self, seq: int, src: str, text: str) -> None:
        pass

    def no_answer_yet(self, seq: int) -> None:
        pass

    def send_error(self, seq: int, text: str) -> None:
        self._requests.inc()  # an attempt: a route gone mid-run shows as loss, not silence

    def timeout(self, seq: int) -> None:
        pass

    def status(self, transmitted: int, tally: object) -> None:
        pass


@dataclass
class _Site:
    """A probe's source, found: where to probe from, whose files resolve names, the fd
    that turns readable when the source ends (a pidfd), and whether it still is the same
    (a netns name may come to name another netns)."""

    netns_path: Path | None
    vantage: Vantage | None
    end_fd: int | None = None
    same: Callable[[], bool] = lambda: True


@contextlib.contextmanager
def found_site(spec: ProbeSpec, runtime: str) -> Iterator[_Site]:
    """The probe's source, held for the body (a one-line MaceError if not found). A pid
    or container source's init stays pinned (netns.pin: shared by the probes of one
    process, closed with the last release)."""
    from mace_tools.probe.resolver import Vantage, vantage_of

    if spec.source_kind is None:
        yield _Site(None, None)
        return
    if spec.source_kind == "netns":
        path = netns.resolve(spec.source_name)
        assert path is not None
        fd = _open_netns(path, spec.source_name)
        try:
            held = Path(f"/proc/self/fd/{fd}")
            inode = os.fstat(fd).st_ino
            yield _Site(held, vantage_of(spec.source_name, None, held),
                        same=lambda: _inode_or_none(path) == inode)
        finally:
            os.close(fd)
        return
    if spec.source_kind == "pid":
        pinned = netns.pin(int(spec.source_name))
    else:
        from mace_tools.probe.containers import find

        found = find(spec.source_name, runtime)  # (its init pinned: held until released)
        assert found.pinned is not None
        pinned = found.pinned
    try:
        yield _Site(pinned.netns_path, Vantage(pinned.root_path, pinned.netns_path,
                                               label=f"pid {pinned.pid}"),
                    end_fd=pinned.pidfd)
    finally:
        netns.release(pinned)


def _open_netns(path: Path, name: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MaceError(f"network namespace '{name}': {exc.strerror}") from None


def _inode_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def target_address(target: str, site: _Site) -> str:
    """The address ping would take for target, resolved as the source would."""
    from mace_tools.probe.site import ProbeSite, resolve_address

    return resolve_address(target, ProbeSite(site.netns_path, site.vantage), None)


def target_addresses(target: str, site: _Site) -> set[str]:
    """Every address target has as the source would resolve it."""
    if site.vantage is not None:
        from mace_tools.probe.resolver import resolve_all

        return set(resolve_all(target, site.vantage))
    from mace_tools.probe.site import host_name_bytes

    try:
        infos = socket.getaddrinfo(host_name_bytes(target), None, socket.AF_UNSPEC,
                                   socket.SOCK_RAW)
    except socket.gaierror as exc:
        raise MaceError(f"{target}: {exc.strerror}") from None
    return {info[4][0] for info in infos}


class ProbeWorker:
    """One probe's thread: find the source, resolve the target, ping until something
    changes or the agent stops; again, with backoff, forever."""

    def __init__(self, spec: ProbeSpec, slots: RunSlots, metrics: PingMetrics,
                 stop_fd: int, stopping: threading.Event, runtime: str,
                 log: Callable[[str], None], ident: int) -> None:
        self.spec = spec
        # An ICMP id of its own: a raw socket's filter passes echo replies by nonce or by
        # id, so probes sharing an id (the pid's) would each wake for all their netns'
        # replies (measured: 10 deliveries per reply with 10 probes in a netns).
        self.ident = ident
        self._slots = slots
        self._stop_fd = stop_fd
        self._stopping = stopping
        self._runtime = runtime
        self._log = log
        self._said: str | None = None
        self.sink = MetricsSink(metrics, spec)
        self.sink.up.set(0)
        self._thread = threading.Thread(target=self._work, daemon=True,
                                        name=f"mace-probe {spec.source}={spec.target}")

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _say(self, text: str) -> None:
        if text != self._said:
            self._said = text
            self._log(f"probe {self.spec.target} from {self.spec.source}: {text}")

    def _work(self) -> None:
        backoff = RETRY_MIN_S
        while not self._stopping.is_set():
            began = time.monotonic()
            planned = False
            try:
                with found_site(self.spec, self._runtime) as site:
                    address = target_address(self.spec.target, site)
                    planned = self._ping(site, address)
            except MaceError as exc:
                self._say(str(exc))
            except Exception as exc:  # a bug must not end the agent: said, and retried
                self._say(f"internal error: {exc!r}")
            finally:
                self.sink.up.set(0)
            if planned or time.monotonic() - began >= SETTLED_S:
                backoff = RETRY_MIN_S  # a change, not a failure: found again at once
            if self._stopping.wait(RESTART_S if planned else backoff):
                return
            if not planned:
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _ping(self, site: _Site, address: str) -> bool:
        """Ping address from site until something changes or the agent stops; whether
        the run ended for a change (the source exited or was replaced, the target's name
        no longer gives address)."""
        from mace_tools.pinger import Pinger, PingOptions
        from mace_tools.probe.resolver import numeric_address

        spec = self.spec
        opts = PingOptions(dst_addr=address, interval_s=spec.interval_s,
                           netns_path=site.netns_path, ident=self.ident,
                           window_s=max(WINDOW_MIN_S, 3 * spec.interval_s))
        checked_at = time.monotonic()
        literal = numeric_address(spec.target) is not None
        changed = False

        def keep_going() -> bool:
            nonlocal checked_at, changed
            if self._stopping.is_set():
                return False
            now = time.monotonic()
            if now - checked_at < RECHECK_S:
                return True
            checked_at = now
            if not site.same():
                self._say("its network namespace changed")
                changed = True
                return False
            if literal:
                return True
            try:  # (a name of many addresses that rotate keeps its probe while it is one)
                changed = address not in target_addresses(spec.target, site)
            except MaceError as exc:
                self._say(f"{exc} (still probing {address})")
                return True
            if changed:
                self._say(f"{spec.target} no longer resolves to {address}")
            return not changed

        stop_fds = [self._stop_fd] + ([site.end_fd] if site.end_fd is not None else [])
        pinger = Pinger(opts, self.sink, backend_factory=self._own_run,
                        stop_fds=stop_fds, keep_going=keep_going)
        self._say(f"probing {address}")
        try:
            pinger.run()
        finally:
            self.sink.count_lost()
        if site.end_fd is not None and _readable(site.end_fd):
            self._say("its source exited")
            return True
        return changed

    def _own_run(self, nonce: bytes | None, ns: Namespaces, **switches: bool) -> OwnRun:
        flags = sum(bit for name, bit in programs.SWITCH_BITS.items() if switches.get(name))
        reservation = self._slots.start_own_run(flags, ns.prober, OWN_RING_BYTES)
        try:
            run = OwnRun(self._slots, reservation)
        except BaseException:
            self._slots.end_own_run(reservation)
            raise
        self.sink.new_run(run.lost)
        return run


def probe_idents(count: int) -> list[int]:
    """An ICMP id for each of count probes, all different and never 0 (ping -e 0 means a
    raw socket only), from a random start: another prober's ids rarely meet them."""
    start = int.from_bytes(os.urandom(2), "little")
    return [1 + (start + i) % 0xFFFF for i in range(count)]


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
