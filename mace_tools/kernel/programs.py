"""One program set for every run on the host: found by id, joined, left.

The programs of bpf/mace.bpf.c serve any number of runs (bpf/mace.h): a run is an entry
in the `mace_runs` map, keyed by its nonce, and has a ring buffer and a lost-records
counter of its own: maps the run creates and puts into mace_rings and mace_lost under the
same nonce, so only it holds the fd that reads them. Every entry goes in only if its key
is new (BPF_NOEXIST): two runs can never share one, whatever lock each held. So N
concurrent mace-ping runs cost every packet on the host one program set, not N (the
bench's scaling rows).

No file names the set. A run finds it by walking the kernel's BPF links (ids are global:
no bpffs, no mount namespace in the way, as there would be for `ip netns exec`, which
gives its command a fresh /sys), keeps an fd of each of its three links for as long as
it runs, and closes them when it leaves: the kernel detaches the set when the last run
closes its links, or dies. So nothing outlives the runs, whatever way they end. (An idle
mace-agent lets go of its links but keeps its set loaded, to attach it again for its next
run, reattach(): a run that starts meanwhile finds no set and loads its own, and while both
have runs every packet pays for two sets.) The set
of the first run that finds none is loaded by it; joining and leaving hold an flock on
LOCK, so two runs starting together (in one mount namespace: a container has its own
/run) do not load two sets. A run that died leaves its entry in the map (its fds closed,
the set lives on in the others): its token, a map only it held, is gone with it, which
any run sees whatever its pid namespace; the next run to join or leave clears it. A set
is joined only by runs of the same build (switches.build: the object's digest). Walking
link ids needs CAP_SYS_ADMIN: without it a run loads a set of its own (not shared).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mace_tools.errors import MaceError, NoPrivilege
from mace_tools.kernel import native
from mace_tools.kernel.events import PROBE_STATE, probe_record_from_state
from mace_tools.model import ProbeRecord

# /run, not /run/lock (not on every system) or /tmp (`ip netns exec` keeps /run; a
# world-writable directory would let anyone hold the lock).
LOCK = Path("/run/mace-bpf.lock")
MAX_RUNS = 512  # MACE_MAX_RUNS (bpf/mace.h)
RING_BYTES = 1 << 20  # MACE_RING_BYTES
REATTACH_LOCK_S = 2.0  # how long reattach() waits for LOCK (a load under it takes ~0.1 s)

# enum mace_run_flags
RUN_RECORDS, RUN_PATH, RUN_UDP, RUN_TCP, RUN_ERRORS, RUN_HIDE_HOST = 1, 2, 4, 8, 16, 32
# a run's switches by the names runs ask for them (session.kernel_events, the agent)
SWITCH_BITS = {"records": RUN_RECORDS, "path": RUN_PATH, "udp": RUN_UDP, "tcp": RUN_TCP,
               "errors": RUN_ERRORS}

PROGRAMS = {
    "mace_xmit": "net:net_dev_start_xmit",
    "mace_rx": "net:netif_rx",
    "mace_receive": "net:netif_receive_skb",
}
# role -> (name libbpf finds it by, name the kernel reports: 15 characters at most)
MAPS = {
    "runs": ("mace_runs", "mace_runs"),
    "rings": ("mace_rings", "mace_rings"),
    "lost": ("mace_lost", "mace_lost"),
    "probes": ("mace_probes", "mace_probes"),
    "switches": (".bss", "mace.bss"),  # libbpf names it after the object file
}
RUN = struct.Struct("=IIIIIIQ")  # struct mace_run
NONCE_BITS = 4096  # MACE_NONCE_BITS
# struct mace_switches: runs, udp, tcp, errors, build, nonce_bits
SWITCHES = struct.Struct(f"=IIIIQ{NONCE_BITS // 8}s")
ZERO = struct.pack("=I", 0)  # the key of a one-entry array


@dataclass(frozen=True, slots=True)
class RunEntry:
    """A run as the runs map holds it (struct mace_run)."""

    flags: int
    prober_netns: int
    host_netns: int  # 0: inferred per probe by the kernel
    token_id: int  # a map only the run holds: alive while it exists
    owner_pid: int  # as the run's own pid namespace sees it (for people, not for liveness)
    probe_gap_ns: int = 0  # the agent's limit on a client's run (probe_gap); 0: none

    def pack(self) -> bytes:
        # (the limit's clock starts at 0: the kernel keeps it)
        return RUN.pack(self.flags, self.prober_netns, self.host_netns, self.token_id,
                        self.owner_pid, self.probe_gap_ns, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> RunEntry:
        flags, prober, host, token, pid, gap, _ = RUN.unpack(raw)
        return cls(flags, prober, host, token, pid, gap)


def probe_gap(probes_per_s: int) -> int:
    """struct mace_run.probe_gap_ns for a limit of probes_per_s new probes a second (the
    kernel admits a second's worth at once, then one per gap); 0 (no limit) for 0."""
    return max(1, round(1_000_000_000 / probes_per_s)) if probes_per_s else 0


def alive(entry: RunEntry) -> bool:
    """The run's token map still exists (it dies with the run's last fd of it). Unknown
    (no privilege to look) counts as alive: an entry is never cleared on a guess."""
    try:
        fd = native.map_fd(entry.token_id)
    except OSError:
        return True
    if fd is None:
        return False
    os.close(fd)
    return True


def nonce_bits(nonces: Iterable[bytes]) -> bytes:
    """switches.nonce_bits for these nonces: bit (first u32, little-endian) % NONCE_BITS,
    as u64 words in the machine's order (the BPF side reads them so)."""
    words = [0] * (NONCE_BITS // 64)
    for nonce in nonces:
        bit = int.from_bytes(nonce[:4], "little") % NONCE_BITS
        words[bit // 64] |= 1 << (bit % 64)
    return struct.pack(f"={len(words)}Q", *words)


def entries_of(runs_fd: int) -> dict[bytes, RunEntry]:
    """Every entry of a runs map, by nonce (a snapshot)."""
    out = {}
    for key in native.map_keys(runs_fd, 8):
        raw = native.map_lookup(runs_fd, key, RUN.size)
        if raw is not None:
            out[key] = RunEntry.unpack(raw)
    return out


def build_of(path: Path) -> int:
    """The build id of an object file: the first 8 bytes of its SHA-256, never 0."""
    return int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little") or 1


class ProgramSet:
    """fds of one attached program set: its links (holding them keeps it attached), its
    programs and its maps by role."""

    def __init__(self, links: list[int], prog_fds: dict[str, int], maps: dict[str, int],
                 build: int) -> None:
        self.links = links
        self.prog_fds = prog_fds
        self.fds = maps
        self.build = build

    def run_entries(self) -> dict[bytes, RunEntry]:
        return entries_of(self.fds["runs"])

    def switches_of(self, entries: dict[bytes, RunEntry]) -> bytes:
        """An entry with no switches (an agent's reservation) is no run: not counted."""
        runs = {nonce: e for nonce, e in entries.items() if e.flags}
        flags = [e.flags for e in runs.values()]
        return SWITCHES.pack(len(flags), sum(1 for f in flags if f & RUN_UDP),
                             sum(1 for f in flags if f & RUN_TCP),
                             sum(1 for f in flags if f & RUN_ERRORS), self.build,
                             nonce_bits(runs))

    def update_switches(self) -> None:
        """Write the switches the live entries call for, and read the entries again until
        they did not change meanwhile: a run joining from another mount namespace (its own
        lock file) may write its switches between our read and our write, and it must
        never be left out (its echoes would be dropped on their nonce bit)."""
        for _ in range(100):
            value = self.switches_of(_clear_dead(self))
            native.map_update(self.fds["switches"], ZERO, value)
            if self.switches_of(self.run_entries()) == value:
                return
        raise MaceError("the BPF program set's runs keep changing: cannot update its switches")

    @property
    def attached(self) -> bool:
        """Whether we hold the set's links (detach() lets go of them)."""
        return bool(self.links)

    def detach(self) -> None:
        """Let go of our links, keep the programs and maps: once no run holds a link of
        the set either, its programs detach and cost packets nothing (reattach())."""
        for fd in self.links:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links = []

    def close(self) -> None:
        """Close every fd: the last holder's close detaches the programs."""
        for fd in (*self.fds.values(), *self.prog_fds.values(), *self.links):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links, self.prog_fds, self.fds = [], {}, {}


def load(path: Path, build: int,
         meanwhile: Callable[[ProgramSet], object] | None = None) -> ProgramSet:
    """Open, load and attach the object; the set's fds are ours, libbpf's object is not
    kept (its maps, programs and links live on through them).

    The maps a run goes into (runs, rings, lost) are made here first and the object
    reuses them, so meanwhile(set), if given, runs on a thread of its own while the
    verifier works (~80 ms): the set then has those three maps and nothing else. (A run
    prepared there waits for RCU grace periods, not for the CPU: kernel.early.)"""
    lib = native.libbpf()
    obj = lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise MaceError(f"cannot open BPF object {path}: {os.strerror(native.last_errno())}")
    links: list[int] = []
    pset = ProgramSet([], {}, {}, build)
    try:
        bss = lib.bpf_object__find_map_by_name(obj, b".bss")
        if not bss:
            raise MaceError(f"BPF object {path} has no .bss: rebuild it ('make build')")
        initial = native.map_initial_value(bss)
        initial[:SWITCHES.size] = SWITCHES.pack(0, 0, 0, 0, build, bytes(NONCE_BITS // 8))
        _reuse_run_maps(obj, path, pset)
        for exc in _concurrently([lambda: meanwhile and meanwhile(pset),
                                  lambda: _load_object(obj)]):
            if exc is not None:
                raise exc
        for role, (name, _) in MAPS.items():
            if role in pset.fds:
                continue
            m = lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m:
                raise MaceError(f"BPF object {path} has no map {name}: rebuild it "
                                "('make build')")
            pset.fds[role] = os.dup(lib.bpf_map__fd(m))
        for prog_name, tracepoint in PROGRAMS.items():
            prog, link = attach(obj, prog_name, tracepoint)
            links.append(link)
            pset.prog_fds[prog_name] = os.dup(lib.bpf_program__fd(prog))
            pset.links.append(os.dup(lib.bpf_link__fd(link)))
    except BaseException:
        pset.close()
        raise
    finally:
        for link in links:
            lib.bpf_link__destroy(link)  # closes libbpf's fd; ours keeps it attached
        lib.bpf_object__close(obj)
    return pset


def attach(obj: int, prog_name: str, tracepoint: str) -> tuple[int, int]:
    """libbpf's program `prog_name` of a loaded object and its link, attached where its
    section says (`tracepoint` names it in the error); the caller destroys the link."""
    lib = native.libbpf()
    prog = lib.bpf_object__find_program_by_name(obj, prog_name.encode())
    link = lib.bpf_program__attach(prog) if prog else None
    if not link:
        raise MaceError(f"cannot attach to tracepoint {tracepoint}: "
                        f"{os.strerror(native.last_errno() or errno.ENOENT)}")
    return prog, link


# The maps a run goes into, as bpf/mace.bpf.c declares them: (type, key size, value size,
# max entries, flags), and the template of a map of maps' maps. load() makes them itself
# and checks the object's declarations first: libbpf 1.1 reuses a map without comparing.
MapSpec = tuple[int, int, int, int, int]
RUN_MAPS: dict[str, tuple[MapSpec, MapSpec | None]] = {
    "runs": ((native.BPF_MAP_TYPE_HASH, 8, RUN.size, MAX_RUNS, 0), None),
    "rings": ((native.BPF_MAP_TYPE_HASH_OF_MAPS, 8, 4, MAX_RUNS, 0),
              (native.BPF_MAP_TYPE_RINGBUF, 0, 0, RING_BYTES, 0)),
    "lost": ((native.BPF_MAP_TYPE_HASH_OF_MAPS, 8, 4, MAX_RUNS, 0),
             (native.BPF_MAP_TYPE_ARRAY, 4, 8, 1, native.BPF_F_MMAPABLE)),
}


def _reuse_run_maps(obj: int, path: Path, pset: ProgramSet) -> None:
    """Make the set's runs, rings and lost maps (RUN_MAPS) and have the object use them,
    if it declares them so (else: rebuild the object)."""
    lib = native.libbpf()
    ring, lost = _ring_and_counter()  # the templates of the maps of maps' maps
    templates = {"runs": 0, "rings": ring, "lost": lost}
    try:
        for role, (spec, inner_spec) in RUN_MAPS.items():
            m = lib.bpf_object__find_map_by_name(obj, MAPS[role][0].encode())
            inner = lib.bpf_map__inner_map(m) if m else None
            if not m or native.map_declared(m) != spec or \
                    (native.map_declared(inner) if inner else None) != inner_spec:
                raise MaceError(f"BPF object {path} does not declare map {MAPS[role][0]} "
                                "as this mace_tools makes it: rebuild it ('make build')")
            map_type, *sizes, flags = spec
            pset.fds[role] = native.map_create(map_type, MAPS[role][1].encode(), *sizes,
                                               flags, inner_map_fd=templates[role])
            if lib.bpf_map__reuse_fd(m, pset.fds[role]):
                raise MaceError(f"cannot give BPF object {path} its map {MAPS[role][0]}: "
                                f"{os.strerror(native.last_errno())}")
    finally:
        os.close(ring)
        os.close(lost)


def _load_object(obj: int) -> None:
    err = native.libbpf().bpf_object__load(obj)
    if err:
        raise load_error(-err)


def load_error(err: int) -> MaceError:
    if err in (errno.EPERM, errno.EACCES):
        return NoPrivilege(
            "permission denied loading BPF programs: run as root "
            "(or with CAP_BPF, CAP_PERFMON and CAP_NET_RAW)"
        )
    return MaceError(
        f"cannot load BPF programs: {os.strerror(err)} (MACE_DEBUG=1 shows libbpf's log)"
    )


def _attached_links() -> Iterator[tuple[int, str, int, list[int]]]:
    """(link fd, program name, program id, the program's map ids) of every attached link
    whose program is one of ours by name; the caller closes the fds it keeps (the
    others are closed here)."""
    for link_id in native.link_ids():
        link = native.link_fd(link_id)
        if link is None:
            continue
        keep = False
        try:
            prog_id = native.link_prog_id(link)
            prog = native.prog_fd(prog_id) if prog_id else None
            if prog is None:
                continue
            try:
                name, map_ids = native.prog_name_and_maps(prog)
            finally:
                os.close(prog)
            if name in PROGRAMS:
                keep = True
                yield link, name, prog_id, map_ids
        finally:
            if not keep:
                os.close(link)


def find(build: int) -> ProgramSet | None:
    """The attached set of this build, with fds of all three links, or None (also when
    this process may not walk the host's links: no CAP_SYS_ADMIN). A set's programs share
    its maps and no two sets share any: that is how links are grouped."""
    try:
        links = list(_attached_links())
    except PermissionError:
        return None
    try:
        for xmit in (link for link in links if link[1] == "mace_xmit"):
            group = {name: (fd, prog_id, map_ids) for fd, name, prog_id, map_ids in links
                     if name != "mace_xmit" and set(map_ids) & set(xmit[3])}
            group["mace_xmit"] = (xmit[0], xmit[2], xmit[3])
            if set(group) != set(PROGRAMS):
                continue
            pset = _open_set(group, build)
            if pset is not None:
                links = [link for link in links if link[0] not in pset.links]
                return pset
        return None
    finally:
        for fd, *_ in links:
            os.close(fd)


def _open_set(progs: dict[str, tuple[int, int, list[int]]], build: int) -> ProgramSet | None:
    """A ProgramSet of these three links if their maps are a set of this build."""
    _, _, map_ids = progs["mace_xmit"]
    by_name = {kernel_name: role for role, (_, kernel_name) in MAPS.items()}
    maps: dict[str, int] = {}
    prog_fds: dict[str, int] = {}
    try:
        for map_id in map_ids:
            fd = native.map_fd(map_id)
            if fd is None:
                return None
            role = by_name.get(native.map_name(fd))
            if role is None or role in maps:
                os.close(fd)
                continue
            maps[role] = fd
        if set(maps) != set(MAPS):
            return None
        if native.map_sizes(maps["switches"]) != (4, SWITCHES.size):
            return None  # another build's (a different .bss): not even read
        raw = native.map_lookup(maps["switches"], ZERO, SWITCHES.size)
        if raw is None or SWITCHES.unpack(raw)[4] != build:
            return None
        for name, (_, prog_id, _) in progs.items():
            fd = native.prog_fd(prog_id)
            if fd is None:
                return None
            prog_fds[name] = fd
        pset = ProgramSet([link for link, _, _ in progs.values()], prog_fds, maps, build)
        maps, prog_fds = {}, {}  # the set's now
        return pset
    finally:
        for fd in (*maps.values(), *prog_fds.values()):
            os.close(fd)


def reattach(pset: ProgramSet) -> None:
    """Hold the links of a detached set again: a program's link that a run still holds is
    taken, never made a second time (kernels before 6.10 refuse it, EEXIST; later ones
    would run the program twice a packet); the others are made anew from the loaded
    programs, with no verifier run. Under the lock (waiting REATTACH_LOCK_S at most: an
    agent's clients wait meanwhile), so two holders of one set do not both make links.
    Needs to walk the host's links (CAP_SYS_ADMIN): PermissionError."""
    if pset.attached:
        return
    ours = {native.prog_id(fd): name for name, fd in pset.prog_fds.items()}
    held: dict[str, int] = {}
    links: list[int] = []
    try:
        with _locked(REATTACH_LOCK_S):
            for link, name, prog_id, _ in _attached_links():
                if ours.get(prog_id) == name and name not in held:
                    held[name] = link
                else:
                    os.close(link)
            for name in PROGRAMS:
                links.append(held.pop(name) if name in held
                             else native.raw_tp_attach(pset.prog_fds[name]))
    except BaseException:
        for fd in (*links, *held.values()):
            os.close(fd)
        raise
    pset.links = links


@contextlib.contextmanager
def _locked(wait_s: float | None = None) -> Iterator[None]:
    """An exclusive flock on LOCK, so only one run at a time finds, loads or changes the
    set (root's file, mode 0600: no one else can hold it). wait_s: give up after that
    long (MaceError), else wait as long as it takes."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise MaceError(f"{LOCK} held by another mace run for "
                                        f"{wait_s:g} s") from None
                    time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear_dead(pset: ProgramSet) -> dict[bytes, RunEntry]:
    """Remove the entries of runs that are gone; the live ones."""
    live = {}
    for key, entry in pset.run_entries().items():
        if alive(entry):
            live[key] = entry
        else:
            _remove(pset, key)
    return live


def _remove(pset: ProgramSet, nonce: bytes) -> None:
    """A run's entries, all keyed by its nonce: nobody else's can go with them. The run's
    entry first: the programs write to its ring no more."""
    native.map_delete(pset.fds["runs"], nonce)
    _delete_maps(pset, nonce)


def _delete_maps(pset: ProgramSet, nonce: bytes) -> None:
    """A nonce's ring and lost counter out of the set, both tried; the first error."""
    errors = _concurrently([lambda role=role: native.map_delete(pset.fds[role], nonce)
                            for role in ("rings", "lost")])
    for exc in errors:
        if exc is not None:
            raise exc


def _concurrently(calls: list[Callable[[], object]]) -> list[BaseException | None]:
    """Run each call on a thread of its own (the last on this one) and wait for them all;
    what each raised (None: it returned). Ctrl-C is raised once they have all ended (a
    call interrupted before it started raised nothing and did nothing): the caller then
    finds out what is in the maps, never guesses.

    Putting a map into a map of maps, or taking it out, waits in the kernel for an RCU
    grace period (~12 ms here, each); waits that overlap share one (two inserts: 24 -> 12
    ms measured), and ctypes lets go of the GIL while a thread waits."""
    errors: list[BaseException | None] = [None] * len(calls)
    threads: list[threading.Thread] = []
    interrupted = False

    def call(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:  # handed to the caller
            errors[i] = exc

    try:
        for i in range(len(calls) - 1):
            threads.append(threading.Thread(target=call, args=(i,), name="mace-map-update"))
            threads[-1].start()
        if calls:
            call(len(calls) - 1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join()
                except KeyboardInterrupt:
                    interrupted = True
    if interrupted or any(isinstance(exc, KeyboardInterrupt) for exc in errors):
        raise KeyboardInterrupt
    return errors


class Membership:
    """One run's place in the program set: its entry and the fds of its own maps."""

    def __init__(self, pset: ProgramSet, nonce: bytes, entry: RunEntry,
                 own: dict[str, int], loaded: bool) -> None:
        self.pset = pset
        self.nonce = nonce
        self.entry = entry
        self.ring_fd, self.lost_fd, self.token_fd = own["ring"], own["lost"], own["token"]
        self.loaded = loaded  # this run loaded the set (no other run had)

    def leave(self) -> None:
        """Take the run out of the set and close its fds (the last run's close detaches
        the programs). Without the lock (not root any more, say) the entries still go;
        the switches are then brought up to date by the next run."""
        try:
            with _locked():
                _remove(self.pset, self.nonce)
                self.pset.update_switches()
        except (OSError, MaceError):
            with contextlib.suppress(OSError):
                _remove(self.pset, self.nonce)
        finally:
            for fd in (self.ring_fd, self.lost_fd, self.token_fd):
                os.close(fd)
            self.pset.close()


def new_token() -> int:
    """A map that only its holder keeps open: a run's entry names its id (RunEntry)."""
    return native.map_create(native.BPF_MAP_TYPE_ARRAY, b"mace_run_token", 4, 4, 1)


def _ring_and_counter(ring_bytes: int = RING_BYTES) -> tuple[int, int]:
    """A run's ring and lost counter, as the set's maps of maps take them (RUN_MAPS)."""
    ring = native.ringbuf_create(b"mace_run", ring_bytes)
    try:
        lost_type, *lost_sizes, lost_flags = RUN_MAPS["lost"][1] or ()
        lost = native.map_create(lost_type, b"mace_run_lost", *lost_sizes, lost_flags)
    except BaseException:
        os.close(ring)
        raise
    return ring, lost


@dataclass(frozen=True, slots=True)
class Reservation:
    """A nonce whose ring buffer and lost counter are in the set (mace_rings, mace_lost),
    not yet a run: the programs look a nonce up in mace_runs first, so nothing is written
    to that ring until activate() adds the entry. Putting a map into a map of maps waits
    for an RCU grace period (~10 ms each here); the agent keeps a few reservations made
    ahead, so a client does not wait for them."""

    nonce: bytes
    ring_fd: int
    lost_fd: int

    def close(self) -> None:
        for fd in (self.ring_fd, self.lost_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def reserve(pset: ProgramSet, nonce: bytes, ring_bytes: int = RING_BYTES) -> Reservation:
    """Put a new ring and counter into the set under nonce (only if no one has it:
    MaceError if someone does). The caller closes the reservation's fds. ring_bytes: a
    power of two of pages; the set takes any size (an inner ring's size is not part of
    the map-in-map's type), so a run that expects few records maps little memory."""
    ring, lost = _ring_and_counter(ring_bytes)
    ours = {"lost": lost, "rings": ring}
    # each only if the nonce is new to it; the programs look at neither until the nonce's
    # entry has switches (activate)
    try:
        errors = _concurrently([
            lambda role=role, fd=fd: native.map_update(
                pset.fds[role], nonce, struct.pack("=I", fd), native.BPF_NOEXIST)
            for role, fd in ours.items()])
        failed = next((exc for exc in errors if exc is not None), None)
    except KeyboardInterrupt as exc:
        failed = exc
    if failed is None:
        return Reservation(nonce, ring, lost)
    for role, fd in ours.items():  # what went in, and only that: never another run's
        with contextlib.suppress(OSError):
            if native.map_lookup(pset.fds[role], nonce, 4) == \
                    struct.pack("=I", native.map_id(fd)):
                native.map_delete(pset.fds[role], nonce)
    for fd in (ring, lost):
        os.close(fd)
    if isinstance(failed, OSError) and failed.errno == errno.EEXIST:
        raise MaceError("the nonce is in use by another run") from None
    raise failed


def unreserve(pset: ProgramSet, reservation: Reservation) -> None:
    """Take a reservation's maps out of the set (after deactivate, for a run) and close
    them. Its ring is never handed to anyone else: it may hold a run's records."""
    try:
        _delete_maps(pset, reservation.nonce)
    finally:
        reservation.close()


def probe_state(pset: ProgramSet, nonce: bytes, number: int) -> ProbeRecord | None:
    """A probe's kernel state, read from the set's probes map: for a reply whose delivery
    fired no tracepoint in the prober netns (macvlan), so no record came. A syscall: the
    rare path only."""
    key = nonce + (number & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4)
    raw = native.map_lookup(pset.fds["probes"], key, PROBE_STATE.size)
    return probe_record_from_state(number, raw) if raw is not None else None


def add_entry(pset: ProgramSet, nonce: bytes, entry: RunEntry) -> None:
    """An entry with no switches (flags 0: the programs ignore it) for a reservation, so
    a dead agent's reservations are cleared with its runs (_clear_dead)."""
    native.map_update(pset.fds["runs"], nonce, entry.pack(), native.BPF_NOEXIST)


def remove_entry(pset: ProgramSet, nonce: bytes) -> None:
    native.map_delete(pset.fds["runs"], nonce)


def activate(pset: ProgramSet, nonce: bytes, entry: RunEntry,
             idle: RunEntry | None = None) -> None:
    """Make a reservation a run: its entry (only if the nonce has none; or, idle given,
    in place of the reservation's idle entry), then the switches (its nonce bit, its
    counts)."""
    if idle is None:
        native.map_update(pset.fds["runs"], nonce, entry.pack(), native.BPF_NOEXIST)
    else:
        native.map_update(pset.fds["runs"], nonce, entry.pack(), native.BPF_EXIST)
    try:
        pset.update_switches()
    except BaseException:
        deactivate(pset, nonce, idle)
        raise


def deactivate(pset: ProgramSet, nonce: bytes, idle: RunEntry | None = None) -> None:
    """The run's entry goes (idle given: becomes that idle entry again), then the
    switches: nothing is written to its ring after."""
    if idle is None:
        native.map_delete(pset.fds["runs"], nonce)
    else:
        native.map_update(pset.fds["runs"], nonce, idle.pack(), native.BPF_EXIST)
    pset.update_switches()


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """A nonce made ready before its run knows its options (kernel.early): its ring and
    counter in the set, and an idle entry (flags 0: the programs ignore it) naming a token
    only this process holds, so the next run to join clears both if this one dies."""

    reservation: Reservation
    token_fd: int
    idle: RunEntry


def reserve_idle(pset: ProgramSet, nonce: bytes, idle: RunEntry,
                 ring_bytes: int = RING_BYTES) -> Reservation:
    """A reservation under an idle entry (flags 0), the entry first, then the maps: a
    process that ends at any point between leaves nothing the next run to join does not
    clear (it clears by the runs map). MaceError: the nonce is in use (nothing left in)."""
    try:
        add_entry(pset, nonce, idle)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise MaceError("the nonce is in use by another run") from None
        raise
    try:
        return reserve(pset, nonce, ring_bytes)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_entry(pset, nonce)
        raise


def prepare_run(pset: ProgramSet, nonce: bytes) -> PreparedRun:
    """A run's reservation under an idle entry naming a token of this process
    (reserve_idle)."""
    token = new_token()
    idle = RunEntry(0, 0, 0, native.map_id(token), os.getpid())
    try:
        reservation = reserve_idle(pset, nonce, idle)
    except BaseException:
        os.close(token)
        raise
    return PreparedRun(reservation, token, idle)


def discard_run(pset: ProgramSet, prepared: PreparedRun) -> None:
    """A prepared run's entry and maps out of the set, its fds closed."""
    try:
        with contextlib.suppress(OSError):
            remove_entry(pset, prepared.reservation.nonce)
        unreserve(pset, prepared.reservation)
    finally:
        os.close(prepared.token_fd)


def _activate_prepared(pset: ProgramSet, prepared: PreparedRun, flags: int,
                       prober_netns: int, host_netns: int
                       ) -> tuple[RunEntry, dict[str, int]]:
    """The run's entry in place of its prepared idle one (its slot is taken already)."""
    entry = RunEntry(flags, prober_netns, host_netns, prepared.idle.token_id, os.getpid())
    try:
        activate(pset, prepared.reservation.nonce, entry, idle=prepared.idle)
    except BaseException:
        discard_run(pset, prepared)
        raise
    return entry, {"ring": prepared.reservation.ring_fd, "lost": prepared.reservation.lost_fd,
                   "token": prepared.token_fd}


def _add_run(pset: ProgramSet, nonce: bytes, flags: int, prober_netns: int,
             host_netns: int, live: dict[bytes, RunEntry]) -> tuple[RunEntry, dict[str, int]]:
    if len(live) >= MAX_RUNS:
        raise MaceError(f"too many concurrent runs ({MAX_RUNS}) share the BPF programs")
    return _activate_prepared(pset, prepare_run(pset, nonce), flags, prober_netns, host_netns)


def attached_set(path: Path, then: Callable[[ProgramSet], object] | None = None
                 ) -> tuple[ProgramSet, bool]:
    """The host's program set of this object's build, loaded if none is attached; and
    whether it was loaded here. Held (its links' fds) until the caller closes it.
    then(set): run under the lock, once the set is found or while it loads (load's
    meanwhile)."""
    build = build_of(path)
    with _locked():
        pset = find(build)
        if pset is None:
            return load(path, build, then), True
        try:
            if then is not None:
                then(pset)
        except BaseException:
            pset.close()
            raise
        return pset, False


def join(path: Path, nonce: bytes, flags: int, prober_netns: int,
         host_netns: int | None, held: tuple[ProgramSet, bool] | None = None,
         prepared: PreparedRun | None = None) -> Membership:
    """Add a run to the host's program set of this build (loaded if there is none).
    held: the set already found or loaded for this object (kernel.early), and whether it
    was loaded then; it stays attached while its fds are open, so it is the host's set.
    prepared: a run prepared in it for this nonce (prepare_run), activated in place."""
    build = build_of(path)
    if held is not None and prepared is not None and prepared.reservation.nonce != nonce:
        discard_run(held[0], prepared)
        prepared = None
    if held is not None and held[0].build != build:  # the file changed since
        if prepared is not None:
            discard_run(held[0], prepared)
        held[0].close()
        held, prepared = None, None
    with _locked():
        if held is not None:
            pset, loaded = held
        else:
            pset = find(build)
            loaded = pset is None
            if pset is None:
                pset = load(path, build)
        try:
            live = _clear_dead(pset)
            if prepared is not None:
                entry, own = _activate_prepared(pset, prepared, flags, prober_netns,
                                                host_netns or 0)
            else:
                entry, own = _add_run(pset, nonce, flags, prober_netns, host_netns or 0,
                                      live)
        except BaseException:
            pset.close()
            raise
    return Membership(pset, nonce, entry, own, loaded)


def run_owners() -> list[int]:
    """The pids of the live runs in every attached set, of any build (for the bench)."""
    owners: list[int] = []
    with _locked():
        links = list(_attached_links())
        try:
            runs_maps = {map_id for _, name, _, map_ids in links if name == "mace_xmit"
                         for map_id in map_ids}
            for map_id in runs_maps:
                fd = native.map_fd(map_id)
                if fd is None:
                    continue
                try:
                    if native.map_name(fd) != MAPS["runs"][1] or \
                            native.map_sizes(fd) != (8, RUN.size):
                        continue  # not a runs map, or another build's
                    owners += [e.owner_pid for e in entries_of(fd).values() if alive(e)]
                finally:
                    os.close(fd)
        finally:
            for fd, *_ in links:
                os.close(fd)
    return owners
