"""The eBPF backend of one run: its place in the host's program set, its records.

All runs share one program set (kernel/programs.py): a run joins it with its nonce and
options, and reads its own ring buffer: one record per answered ping probe (correlated in
the kernel), plus one event per device crossed when it asks for the path (JSON outputs,
traceroute). Joining an attached set takes a few ms; a run that finds none loads it
(~20 ms here: CO-RE relocation against /sys/kernel/btf/vmlinux; nothing is compiled at
run time).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from mace_tools.errors import MaceError, NoPrivilege
from mace_tools.kernel import early, native, programs
from mace_tools.kernel.run_records import Reader, RunRecords
from mace_tools.model import KernelEvent, ProbeRecord

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
SHIPPED_OBJECT = Path(__file__).with_name("mace.bpf.o")  # built by `make build`


def object_path() -> Path:
    """The compiled BPF object: $MACE_BPF_OBJECT if it can be trusted, else the one shipped
    in the package (SHIPPED_OBJECT; if it is missing, loading says it is not built).

    A root process loads whatever this names into the kernel, so an environment variable
    must not make it load a file someone else could have written: the object, and every
    directory above it, must belong to root (or to our euid) and be writable by nobody
    else (a sticky directory counts as safe, since only an entry's owner may replace it).
    So nobody else can put another file there between this check and libbpf's open of the
    real path returned. A missing file is refused too: in a directory like /tmp, anyone
    could create it in that gap.
    """
    override = os.environ.get("MACE_BPF_OBJECT")
    if not override:
        return SHIPPED_OBJECT
    real = Path(os.path.realpath(override))
    try:
        why = _untrusted(real)
    except FileNotFoundError:
        raise MaceError(f"MACE_BPF_OBJECT={override}: no such file") from None
    except OSError as exc:
        why = f"cannot check it: {exc.strerror}"
    if why is not None:
        raise MaceError(f"MACE_BPF_OBJECT={override} not used: {why} (needs a regular file "
                        "owned by root or by you, in directories no one else can write)")
    return real


def _untrusted(real: Path) -> str | None:
    """Why a BPF object at this real path could have been written by someone else, or None."""
    if not stat.S_ISREG(os.stat(real).st_mode):
        return "not a regular file"
    owners = {0, os.geteuid()}
    for path in (real, *real.parents):
        info = os.stat(path)
        if info.st_uid not in owners:
            return f"{path} belongs to uid {info.st_uid}"
        sticky_dir = path != real and info.st_mode & stat.S_ISVTX
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            return f"{path} is writable by group or others"
    return None


class Backend:
    """A run's membership in the program set plus its ring buffer; a context manager."""

    kind = "local"  # session.EventSource: the programs this process joined or loaded
    probe_rate = 0  # a run of its own is not limited

    def __init__(self, nonce: bytes, obj_path: Path | None = None, *, records: bool = False,
                 path: bool = True, udp: bool = False, tcp: bool = False,
                 errors: bool = False, prober_netns: int | None = None,
                 host_netns: int | None = None) -> None:
        """records: correlate echo probes in the kernel (ping; the payload carries the
        probe number); path: also one event per device; udp/tcp/errors: traceroute's
        matching. prober_netns/host_netns: inodes (prober: the calling thread's netns
        when not given; host: None to let the kernel infer it per probe)."""
        if len(nonce) != 8 or not any(nonce):
            raise ValueError("nonce must be 8 bytes, not all zero")
        self.nonce = nonce
        self._flags = ((programs.RUN_RECORDS if records else 0)
                       | (programs.RUN_PATH if path else 0)
                       | (programs.RUN_UDP if udp else 0) | (programs.RUN_TCP if tcp else 0)
                       | (programs.RUN_ERRORS if errors else 0))
        self._prober = prober_netns
        self._host = host_netns
        self._path = obj_path or object_path()
        self._member: programs.Membership | None = None
        self._records: RunRecords | None = None

    def __enter__(self) -> Backend:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if not VMLINUX_BTF.exists():
            raise MaceError(
                "kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF is required"
            )
        if not self._path.exists():
            raise MaceError(f"BPF object {self._path} not found: build it with 'make build'")
        prober = self._prober if self._prober is not None else \
            os.stat("/proc/thread-self/ns/net").st_ino
        try:
            got = early.take(self._path)
            self._member = programs.join(
                self._path, self.nonce, self._flags, prober, self._host,
                held=(got.pset, got.loaded) if got else None,
                prepared=got.prepared if got else None)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise NoPrivilege(f"cannot set up the BPF programs: {exc.strerror}") from exc
            raise MaceError(f"cannot set up the BPF programs: {exc.strerror}") from exc
        self._records = RunRecords(self._member.ring_fd, self._member.lost_fd,
                                   programs.RING_BYTES)

    @property
    def fd(self) -> int:
        """A pollable fd: readable when records are waiting."""
        assert self._records is not None
        return self._records.fd

    @property
    def loaded_here(self) -> bool:
        """True when this run loaded the program set (no other run had it attached)."""
        return self._member is not None and self._member.loaded

    def drain(self, on_event: Callable[[KernelEvent], None],
              on_record: Callable[[ProbeRecord], None] | None = None) -> int:
        """Decode every waiting record into its sink; return how many."""
        assert self._records is not None
        return self._records.drain(on_event, on_record)

    def reader(self, on_event: Callable[[KernelEvent], None],
               on_record: Callable[[ProbeRecord], None] | None = None) -> Reader:
        assert self._records is not None
        return self._records.reader(on_event, on_record)

    def lost(self) -> int:
        """Records the kernel side could not write to this run's ring (full), plus the
        times the reader gave up on a record still being written. A probe in flight while
        this changed may miss records: it gets no correction."""
        assert self._records is not None
        return self._records.lost()

    def probe_state(self, number: int) -> ProbeRecord | None:
        """A probe's kernel state, read from the map: for a reply whose delivery fired no
        tracepoint in the prober netns (macvlan), so no record came. A syscall: the rare
        path only."""
        assert self._member is not None
        return programs.probe_state(self._member.pset, self.nonce, number)

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """Per program (run_time_ns, run_cnt) over every run of the set; zeros unless
        kernel.bpf_stats_enabled=1."""
        assert self._member is not None
        return {name: native.prog_run_stats(fd)
                for name, fd in self._member.pset.prog_fds.items()}

    def close(self) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None
        if self._member is not None:
            member, self._member = self._member, None
            member.leave()
