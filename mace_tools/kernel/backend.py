"""The eBPF backend: load bpf/mace.bpf.o for one run, attach it, hand out its events.

Each run loads its own copy of the programs with its own nonce in .rodata, so two
mace-ping processes never see each other's probes (and the kernel drops foreign packets
before anything is written). Load + attach takes ~20 ms here (CO-RE relocation against
/sys/kernel/btf/vmlinux); nothing is compiled at run time.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.kernel import native
from mace_tools.kernel.events import decoder
from mace_tools.kernel.ringbuf import RingBuffer
from mace_tools.model import KernelEvent

PROGRAMS = {
    "mace_xmit": "net:net_dev_start_xmit",
    "mace_rx": "net:netif_rx",
    "mace_receive": "net:netif_receive_skb",
}
CONFIG = struct.Struct("=QBBB5x")  # struct mace_config (bpf/mace.h)
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


def _load_error(err: int) -> MaceError:
    if err in (errno.EPERM, errno.EACCES):
        return MaceError(
            "permission denied loading BPF programs: run as root "
            "(or with CAP_BPF, CAP_PERFMON and CAP_NET_RAW)"
        )
    return MaceError(
        f"cannot load BPF programs: {os.strerror(err)} (MACE_DEBUG=1 shows libbpf's log)"
    )


class Backend:
    """Attached programs plus their ring buffer; use as a context manager."""

    def __init__(self, nonce: bytes, obj_path: Path | None = None, *, udp: bool = False,
                 tcp: bool = False, errors: bool = False) -> None:
        """udp/tcp/errors switch on traceroute's matching (UDP and TCP probes, ICMP errors
        quoting a probe); off, the verifier prunes those branches from mace-ping's copy."""
        if len(nonce) != 8 or not any(nonce):
            raise ValueError("nonce must be 8 bytes, not all zero")
        self._nonce = int.from_bytes(nonce, "little")  # as the BPF side reads it (x86/arm64)
        self._switches = (int(udp), int(tcp), int(errors))
        self._path = obj_path or object_path()
        self._obj: int | None = None
        self._links: list[int] = []
        self._prog_fds: dict[str, int] = {}
        self._ring: RingBuffer | None = None
        self._lost_map: mmap.mmap | None = None
        self._lost: memoryview | None = None

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
        lib = native.libbpf()
        obj = lib.bpf_object__open_file(str(self._path).encode(), None)
        if not obj:
            raise MaceError(f"cannot open BPF object {self._path}: "
                            f"{os.strerror(native.last_errno())}")
        self._obj = obj
        rodata = lib.bpf_object__find_map_by_name(obj, b".rodata")
        if not rodata:
            raise MaceError(f"BPF object {self._path} has no .rodata: rebuild it")
        view = native.map_initial_value(rodata)
        if len(view) < CONFIG.size:
            raise MaceError(f"BPF object {self._path} is older than this mace-tools: rebuild it")
        view[: CONFIG.size] = CONFIG.pack(self._nonce, *self._switches)
        err = lib.bpf_object__load(obj)
        if err:
            raise _load_error(-err)
        for prog_name, tracepoint in PROGRAMS.items():
            prog = lib.bpf_object__find_program_by_name(obj, prog_name.encode())
            link = lib.bpf_program__attach(prog) if prog else None
            if not link:
                raise MaceError(f"cannot attach to tracepoint {tracepoint}: "
                                f"{os.strerror(native.last_errno() or errno.ENOENT)}")
            self._links.append(link)
            self._prog_fds[prog_name] = lib.bpf_program__fd(prog)
        events = lib.bpf_object__find_map_by_name(obj, b"events")
        self._ring = RingBuffer(lib.bpf_map__fd(events), lib.bpf_map__max_entries(events))
        lost_fd = lib.bpf_map__fd(lib.bpf_object__find_map_by_name(obj, b"lost"))
        # BPF_F_MMAPABLE: read with a memory load, no syscall (and no privilege) per reply
        self._lost_map = mmap.mmap(lost_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        self._lost = memoryview(self._lost_map)[:8].cast("Q")

    @property
    def fd(self) -> int:
        """A pollable fd: readable when events are waiting."""
        assert self._ring is not None
        return self._ring.fd

    def drain(self, sink: Callable[[KernelEvent], None]) -> int:
        """Decode every waiting event into sink; return how many."""
        assert self._ring is not None
        return self._ring.consume(decoder(sink))

    def lost(self) -> int:
        """Events the kernel side could not record (ring buffer full), plus the times the
        reader gave up on a record still being written. A probe in flight while this
        changed may miss events: it gets no correction (Pinger, Tracer)."""
        assert self._lost is not None and self._ring is not None
        return self._lost[0] + self._ring.stalls

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """Per program (run_time_ns, run_cnt); zeros unless kernel.bpf_stats_enabled=1."""
        return {name: native.prog_run_stats(fd) for name, fd in self._prog_fds.items()}

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._lost_map is not None:
            assert self._lost is not None
            self._lost.release()
            self._lost_map.close()
            self._lost_map = self._lost = None
        lib = native.libbpf() if (self._links or self._obj) else None
        for link in self._links:
            lib.bpf_link__destroy(link)
        self._links.clear()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = None
