"""Empty programs on mace's tracepoints (bench/bpf/floor.bpf.c), compiled with the same
clang flags as mace's object and attached for as long as a measurement needs them: the
floor that ns per program run and the neighbour's slowdown are read against. And an empty
tc program (bench/bpf/floor_tc.bpf.c) attached by tcx to one device: the floor of
per-device attachment (bench/hook_floor.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.kernel import native, programs

SOURCE = Path(__file__).with_name("bpf") / "floor.bpf.c"
TC_SOURCE = Path(__file__).with_name("bpf") / "floor_tc.bpf.c"
MACE_HEADERS = Path(__file__).resolve().parents[1] / "bpf"
PROGRAMS = ("floor_xmit", "floor_rx", "floor_receive")  # in programs.PROGRAMS' order


# a program on __sk_buff needs the UAPI headers, and their asm/ directory (multiarch)
UAPI_INCLUDES = (f"-I/usr/include/{sysconfig.get_config_var('MULTIARCH') or ''}",)


@functools.cache
def compiled(source: Path = SOURCE, includes: tuple[str, ...] = (f"-I{MACE_HEADERS}",)
             ) -> bytes:
    """An object, compiled once per process (the perturbation rows attach it per block)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "floor.bpf.o"
        subprocess.run(["clang", "-g", "-O2", "-Wall", "-target", "bpf", *includes,
                        "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
        return obj.read_bytes()


@contextlib.contextmanager
def loaded(source: Path, includes: tuple[str, ...] = (f"-I{MACE_HEADERS}",),
           before_load: Callable[[int], None] | None = None) -> Iterator[int]:
    """The object of `source`, opened and loaded by libbpf (its pointer); before_load(obj)
    may set its .rodata first."""
    lib = native.libbpf()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.bpf.o"
        path.write_bytes(compiled(source, includes))
        obj = lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise MaceError(f"cannot open {source.name}: {os.strerror(native.last_errno())}")
    try:
        if before_load is not None:
            before_load(obj)
        if lib.bpf_object__load(obj):
            raise MaceError(f"cannot load {source.name}: {os.strerror(native.last_errno())}")
        yield obj
    finally:
        lib.bpf_object__close(obj)


@contextlib.contextmanager
def attached() -> Iterator[dict[str, int]]:
    """The three empty programs, attached; their fds by name (native.prog_run_stats)."""
    lib = native.libbpf()
    links = []
    with loaded(SOURCE) as obj:
        try:
            fds = {}
            for name, tracepoint in zip(PROGRAMS, programs.PROGRAMS.values(), strict=True):
                prog, link = programs.attach(obj, name, tracepoint)
                links.append(link)
                fds[name] = lib.bpf_program__fd(prog)
            yield fds
        finally:
            for link in links:
                lib.bpf_link__destroy(link)


def hold_tcx(device: str | None) -> None:
    """Attach the empty tc program to `device` of this netns, ingress and egress, say
    "ready" and hold the links until stdin closes (a tcx link names its device by ifindex,
    so it is made inside the device's netns: bench/hook_floor.py runs this there). With no
    device only the holder runs: the control for the holding process itself."""
    if device is None:
        print("ready", flush=True)
        sys.stdin.read()
        return
    lib = native.libbpf()
    with loaded(TC_SOURCE) as obj:
        prog_fd = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, b"floor_tc"))
        ifindex = socket.if_nametoindex(device)
        links = [native.tcx_attach(prog_fd, ifindex, kind)
                 for kind in (native.BPF_TCX_INGRESS, native.BPF_TCX_EGRESS)]
        try:
            print("ready", flush=True)
            sys.stdin.read()
        finally:
            for fd in links:
                os.close(fd)


def stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per floor program, as mace_program_stats gives mace's."""
    return {name: native.prog_run_stats(fd) for name, fd in fds.items()}


def hold_tracepoints() -> None:
    """The empty programs on mace's tracepoints, held until stdin closes (a child of the
    bench holds them as a mace-ping run holds mace's: bench/experiments.py)."""
    with attached():
        print("ready", flush=True)
        sys.stdin.read()


if __name__ == "__main__":  # (run by the bench) hold-tracepoints | hold-tcx [DEVICE]
    match sys.argv[1:]:
        case ["hold-tracepoints"]:
            hold_tracepoints()
        case ["hold-tcx", *device] if len(device) <= 1:
            hold_tcx(device[0] if device else None)
        case _:
            sys.exit("usage: python -m bench.floor hold-tracepoints | hold-tcx [DEVICE]")
