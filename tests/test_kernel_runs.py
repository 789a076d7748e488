"""One program set for every run (kernel/programs.py) and correlation in the kernel.

Probes are sent here by hand from lab container c0 (a raw socket in its netns), so what
is tested is the kernel side and its Backend alone: the map of runs, each run's own ring,
the in-kernel record against the userspace correlation of the same probe's events, and
the clean-up of a run that died.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import eventually

from mace_tools.correlate import correlate, measured
from mace_tools.errors import MaceError
from mace_tools.kernel import native, programs
from mace_tools.kernel.backend import Backend, object_path
from mace_tools.lab.topology import BRIDGE_ADDR, Lab
from mace_tools.model import Hook, KernelEvent, Namespaces, Probe, ProbeRecord, Reply
from mace_tools.probe import netns
from mace_tools.probe.icmp import checksum

pytestmark = pytest.mark.lab


def echo(ident: int, number: int, nonce: bytes, size: int = 56) -> bytes:
    """An echo request with payload layout v2: nonce, u32 number, fill."""
    payload = (nonce + struct.pack("!I", number) + bytes(range(12, 256)) * 2)[:size]
    head = struct.pack("!BBHHH", 8, 0, 0, ident, number & 0xFFFF)
    csum = checksum(head + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, number & 0xFFFF) + payload


def prog_ids(backend: Backend) -> set[int]:
    """The kernel ids of the programs a run's set is made of."""
    return {native.prog_id(fd) for fd in backend._member.pset.prog_fds.values()}


def attached_links_of(progs: set[int]) -> set[int]:
    """The ids of the attached links of these programs."""
    found = set()
    for link_id in native.link_ids():
        fd = native.link_fd(link_id)
        if fd is None:
            continue
        try:
            if native.link_prog_id(fd) in progs:
                found.add(link_id)
        finally:
            os.close(fd)
    return found


def inode_of(name: str) -> int:
    return os.stat(Lab.netns_path(name)).st_ino


class Run:
    """A hand-driven run: a Backend and the probes it sent, their records and events."""

    def __init__(self, lab: Lab, backend: Backend, nonce: bytes) -> None:
        self.lab, self.backend, self.nonce = lab, backend, nonce
        self.records: dict[int, ProbeRecord] = {}
        self.events: dict[int, list[KernelEvent]] = {}
        self.sent: dict[int, Probe] = {}
        self.crossed = 0  # records and events read from the ring

    def on_record(self, r: ProbeRecord) -> None:
        self.records[r.number] = r
        self.crossed += 1

    def on_event(self, ev: KernelEvent) -> None:
        self.events.setdefault(ev.seq, []).append(ev)
        self.crossed += 1

    def drain(self) -> None:
        self.backend.drain(self.on_event, self.on_record)


def open_run(lab: Lab, *, path: bool = True, host_known: bool = True) -> Run:
    """A run probing from c0; host_known False: its host netns is left to the kernel to
    infer (as for a run started inside the container)."""
    nonce = os.urandom(8)
    backend = Backend(nonce, records=True, path=path,
                      prober_netns=inode_of(lab.container_ns(0)),
                      host_netns=inode_of(lab.host_ns) if host_known else None)
    backend.open()
    return Run(lab, backend, nonce)


def ping(lab: Lab, runs: list[tuple[Run, range | list[int]]],
         target: str | None = None) -> dict[int, tuple[Run, Reply]]:
    """Send each run's probe numbers from c0 (interleaved) to target (default: the lab's),
    wait for the replies."""
    with netns.entered(Path(lab.netns_path(lab.container_ns(0)))):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
    replies: dict[int, tuple[Run, Reply]] = {}
    by_nonce = {run.nonce: run for run, _ in runs}
    with sock:
        for batch in zip(*[[(run, n) for n in numbers] for run, numbers in runs], strict=True):
            for run, n in batch:
                probe = Probe(n, 0, 0, run.backend.lost())
                probe.sent_real_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
                probe.sent_mono_ns = time.monotonic_ns()
                sock.sendto(echo(0x4d41, n, run.nonce), (target or lab.target_addr, 0))
                run.sent[n] = probe
            deadline = time.monotonic() + 2
            want = len(replies) + len(batch)
            while len(replies) < want and time.monotonic() < deadline:
                select.select([sock], [], [], 0.1)
                try:
                    data, anc, _, _ = sock.recvmsg(2048, 64, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                sec, nsec = struct.unpack("=qq", anc[0][2])
                ihl = (data[0] & 0x0F) * 4
                icmp = data[ihl:]
                if icmp[0] != 0 or icmp[8:16] not in by_nonce:
                    continue
                run = by_nonce[icmp[8:16]]
                number = struct.unpack("!I", icmp[16:20])[0]
                run.drain()
                replies[id(run) ^ number] = (run, Reply(number, "", data[8], len(icmp),
                                                        sec * 10**9 + nsec))
    return replies


def test_two_runs_share_one_program_set_and_see_only_their_own_probes(lab: Lab) -> None:
    a, b = open_run(lab), open_run(lab)
    try:
        assert not b.backend.loaded_here  # b found a's set (or both found another's)
        assert set(a.backend.run_stats()) == set(b.backend.run_stats())
        assert prog_ids(a.backend) == prog_ids(b.backend)
        assert a.backend._member.ring_fd != b.backend._member.ring_fd
        replies = ping(lab, [(a, range(1, 41)), (b, range(70_001, 70_041))])
        assert len(replies) == 80
        a.drain()
        b.drain()
        assert set(a.records) == set(range(1, 41))
        assert set(b.records) == set(range(70_001, 70_041))
        assert set(a.events) == set(range(1, 41)) and set(b.events) == set(range(70_001, 70_041))
    finally:
        a.backend.close()
        b.backend.close()


def test_kernel_record_matches_userspace_correlation(lab: Lab) -> None:
    """Same probe, two correlations: the kernel's record and correlate.py over the
    probe's per-device events must agree to the nanosecond (one stamp serves both)."""
    run = open_run(lab)
    try:
        replies = ping(lab, [(run, range(1, 101))])
        run.drain()
        ns = Namespaces(inode_of(lab.container_ns(0)), inode_of(lab.host_ns))
        corrected = late = 0
        for _run, reply in replies.values():
            probe = run.sent[reply.seq]
            record = run.records.get(reply.seq)
            # the return on out0, a veth, was stamped at netif_rx: it is checked
            assert record is not None and record.returned_hook == Hook.RX
            from_kernel = measured(probe, reply, record)
            from_events = correlate(probe, reply, run.events[reply.seq], ns)
            assert from_kernel.rtt_corrected_ns == from_events.rtt_corrected_ns
            assert from_kernel.egress_ns == from_events.egress_ns
            assert from_kernel.ingress_ns == from_events.ingress_ns
            assert from_kernel.late_kernel_stamp == from_events.late_kernel_stamp
            assert from_kernel.outer_dev == from_events.outer_dev
            assert from_kernel.late_kernel_stamp or \
                from_kernel.outer_dev == f"{lab.outer_dev}@{ns.host}"
            corrected += from_kernel.corrected
            late += from_kernel.late_kernel_stamp
        assert corrected + late == 100 and late <= 1  # (a late stamp: tests/accuracy.py)
    finally:
        run.backend.close()


def test_a_reused_seq_is_a_new_probe_in_the_kernel(lab: Lab) -> None:
    """Probes 7 and 65543 share ICMP seq 7; the kernel keys its state by the payload's
    number, so each gets its own record, with its own times."""
    run = open_run(lab, path=False)
    try:
        replies = ping(lab, [(run, [7, 65_543])])
        run.drain()
        assert set(run.records) == {7, 65_543}
        for _run, reply in replies.values():
            record = run.records[reply.seq]
            assert record.departed_ns >= run.sent[reply.seq].sent_mono_ns
            assert measured(run.sent[reply.seq], reply, record).corrected
        assert run.records[65_543].departed_ns > run.records[7].returned_ns
    finally:
        run.backend.close()


def test_records_alone_cross_once_per_answer(lab: Lab) -> None:
    """Without the path, the kernel sends one record per answered probe, nothing else."""
    run = open_run(lab, path=False)
    try:
        ping(lab, [(run, range(1, 51))])
        run.drain()
        assert not run.events
        assert set(run.records) == set(range(1, 51))
        assert run.crossed == 50
    finally:
        run.backend.close()


@pytest.mark.parametrize("host_known", [True, False], ids=["host-known", "host-inferred"])
def test_records_alone_take_the_outer_device_and_nothing_inside(lab: Lab,
                                                                host_known: bool) -> None:
    """Without the path the kernel leaves out the crossings a record does not use (a
    request's arrivals once its host netns is known, a reply's departures): the records
    still correct at out0, the host netns known or inferred. And a probe of the bridge's
    address, answered by the host netns itself, never leaves it: no correction, where the
    container's own eth0 would have given one (the request's arrival in the host is what
    infers the host there)."""
    run = open_run(lab, path=False, host_known=host_known)
    try:
        host = inode_of(lab.host_ns)
        outward = ping(lab, [(run, range(1, 31))])
        inward = ping(lab, [(run, range(31, 61))], target=BRIDGE_ADDR)
        run.drain()
        assert len(outward) == 30 and len(inward) == 30
        corrected = late = 0
        for _run, reply in outward.values():
            m = measured(run.sent[reply.seq], reply, run.records.get(reply.seq))
            assert m.late_kernel_stamp or m.outer_dev == f"{lab.outer_dev}@{host}"
            corrected += m.corrected
            late += m.late_kernel_stamp
        assert corrected + late == 30 and late <= 1
        for _run, reply in inward.values():
            assert not measured(run.sent[reply.seq], reply, run.records.get(reply.seq)).corrected
    finally:
        run.backend.close()


def test_a_killed_run_is_cleared_by_the_next(lab: Lab) -> None:
    """A run SIGKILLed in the middle leaves its entry in a set other runs still hold; the
    next run to join removes it. When the last holder goes, the set is detached."""
    code = ("import os, sys, time\n"
            "from mace_tools.kernel.backend import Backend\n"
            "b = Backend(bytes.fromhex(sys.argv[1])); b.open()\n"
            "print('joined', flush=True); time.sleep(60)\n")
    keeper = open_run(lab)
    nonce = os.urandom(8)
    child = subprocess.Popen([sys.executable, "-c", code, nonce.hex()], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "joined"
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert nonce in keeper.backend._member.pset.run_entries()  # left behind
        run = open_run(lab)
        try:
            assert nonce not in run.backend._member.pset.run_entries()
            assert prog_ids(run.backend) == prog_ids(keeper.backend)
        finally:
            run.backend.close()
        ids = prog_ids(keeper.backend)
    finally:
        child.kill()
        child.wait()
        keeper.backend.close()
    # Programs are freed after an RCU grace period: gone within a second, not at once.
    deadline = time.monotonic() + 5
    while ids & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ids & loaded_prog_ids(), "the set outlived its last run"


def loaded_prog_ids() -> set[int]:
    return set(native.prog_ids())


def test_a_map_is_never_read_into_a_smaller_buffer() -> None:
    """Another build's maps may have other sizes: a lookup that does not fit is refused,
    not written past its buffer."""
    fd = native.map_create(native.BPF_MAP_TYPE_ARRAY, b"mace_test", 4, 16, 1)
    try:
        assert native.map_lookup(fd, bytes(4), 16) == bytes(16)
        with pytest.raises(OSError):
            native.map_lookup(fd, bytes(4), 8)
        with pytest.raises(OSError):
            native.map_keys(fd, 8)
    finally:
        os.close(fd)


def test_another_build_is_not_joined(lab: Lab, tmp_path: Path) -> None:
    """A set of another object (an upgrade, a second install) is left alone: a run joins
    only a set of its own build, and both work."""
    other = tmp_path / "other.bpf.o"
    other.write_bytes(object_path().read_bytes() + b"\0")  # same programs, another digest
    mine = open_run(lab, path=False)
    theirs = Backend(os.urandom(8), other, records=True, path=False,
                     prober_netns=inode_of(lab.container_ns(0)),
                     host_netns=inode_of(lab.host_ns))
    theirs.open()
    try:
        assert theirs.loaded_here
        assert prog_ids(mine.backend).isdisjoint(prog_ids(theirs))
        ping(lab, [(mine, range(1, 11))])
        mine.drain()
        assert set(mine.records) == set(range(1, 11))
    finally:
        theirs.close()
        mine.backend.close()


def test_a_run_in_its_own_pid_and_mount_namespace_clears_no_one(lab: Lab) -> None:
    """A run in a container has its own pids and its own /run (so its own lock file): it
    must neither take a live run's entry for a dead one nor share its ring. Liveness is a
    map only the run holds, which any pid namespace sees the same."""
    code = ("import os, sys, time\n"
            "from mace_tools.kernel.backend import Backend\n"
            "b = Backend(bytes.fromhex(sys.argv[1]), prober_netns=1, host_netns=2); b.open()\n"
            "print('joined', os.getpid(), flush=True); time.sleep(60)\n")
    keeper = open_run(lab, path=False)
    nonce = os.urandom(8)
    child = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                              "--mount", sys.executable, "-c", code, nonce.hex()],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line[:1] == ["joined"], line
        assert line[1] == "1"  # pid 1 in its namespace, as a container's init
        entries = keeper.backend._member.pset.run_entries()
        assert keeper.nonce in entries and nonce in entries
        ping(lab, [(keeper, range(1, 6))])
        keeper.drain()
        assert set(keeper.records) == set(range(1, 6))
    finally:
        child.kill()  # and with it, its pid 1 (--kill-child)
        child.wait()
    deadline = time.monotonic() + 5  # the kernel frees a dead process's maps soon after
    while keeper.backend._member.pset.run_entries().get(nonce) is not None and \
            programs.alive(keeper.backend._member.pset.run_entries()[nonce]) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        later = open_run(lab, path=False)  # clears the dead run's entry, not the keeper's
        entries = later.backend._member.pset.run_entries()
        assert keeper.nonce in entries and nonce not in entries
        later.backend.close()
    finally:
        keeper.backend.close()


def test_a_detached_set_is_attached_again_once_per_program(lab: Lab) -> None:
    """An idle agent's detach() and reattach(): while a run still holds the set's links,
    reattaching takes those (a second link would run each program twice a packet); once
    no one does, the programs detach, and reattaching makes new links, which a run joins
    and gets its records through."""
    a = open_run(lab)
    holder, _ = programs.attached_set(object_path())  # a's set, held as the agent holds it
    b = None
    try:
        progs = prog_ids(a.backend)
        assert {native.prog_id(fd) for fd in holder.prog_fds.values()} == progs
        links = attached_links_of(progs)
        assert len(links) == 3
        holder.detach()
        assert not holder.attached and attached_links_of(progs) == links  # a holds them
        programs.reattach(holder)
        assert holder.attached and attached_links_of(progs) == links
        a.backend.close()
        holder.detach()
        assert eventually(lambda: not attached_links_of(progs), 5.0, every_s=0.05), \
            "the programs stayed attached with no holder"
        programs.reattach(holder)
        fresh = attached_links_of(progs)
        assert len(fresh) == 3 and not fresh & links
        b = open_run(lab, path=False)
        assert prog_ids(b.backend) == progs  # joined the reattached set
        replies = ping(lab, [(b, range(1, 21))])
        assert len(replies) == 20
        b.drain()
        assert set(b.records) == set(range(1, 21))
    finally:
        a.backend.close()
        if b is not None:
            b.backend.close()
        holder.close()


def test_reattach_waits_for_the_lock_a_bounded_time() -> None:
    """An agent's reattach() gives up on the host's lock (one clear error) rather than
    stall its clients behind a run that holds it."""
    fd = os.open(programs.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(MaceError, match=r"held by another mace run for 0\.2 s"), \
                programs._locked(0.2):
            pass
        assert 0.2 <= time.monotonic() - started < 2.0
    finally:
        os.close(fd)
    with programs._locked(0.2):
        pass  # free again
