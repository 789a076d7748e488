"""Empty programs on mace's tracepoints (bench/bpf/floor.bpf.c), compiled with the same
clang flags as mace's object and attached for as long as a measurement needs them: the
floor that ns per program run and the neighbour's slowdown are read against. And an empty
tc program (bench/bpf/floor_tc.bpf.c) attached by tcx to one device: the floor of
per-device attachment (bench/hook_floor.py).

A condition held by a child (bench/experiments.held_by_child) gets the object the bench
compiled once: every child of every condition loads a ready object, none runs clang."""

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
MACE_INCLUDES = (f"-I{MACE_HEADERS}",)
# a program on __sk_buff needs the UAPI headers, and their asm/ directory (multiarch)
UAPI_INCLUDES = (f"-I/usr/include/{sysconfig.get_config_var('MULTIARCH') or ''}",)


_objects: tempfile.TemporaryDirectory[str] | None = None  # what this process compiled


def _objects_dir() -> Path:
    """Where this process keeps what it compiled (removed when the process exits)."""
    global _objects
    if _objects is None:
        _objects = tempfile.TemporaryDirectory(prefix="mace-bench-")
    return Path(_objects.name)


@functools.cache
def object_file(source: Path = SOURCE, includes: tuple[str, ...] = MACE_INCLUDES) -> Path:
    """`source` compiled once per process; the object's path."""
    obj = _objects_dir() / source.name.replace(".c", ".o")
    proc = subprocess.run(["clang", "-g", "-O2", "-Wall", "-target", "bpf", *includes,
                           "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MaceError(f"cannot compile {source.name}: {last}")
    return obj


@contextlib.contextmanager
def loaded(path: Path, before_load: Callable[[int], None] | None = None) -> Iterator[int]:
    """The object at `path`, opened and loaded by libbpf (its pointer); before_load(obj)
    may set its .rodata first."""
    lib = native.libbpf()
    obj = lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise MaceError(f"cannot open {path.name}: {os.strerror(native.last_errno())}")
    try:
        if before_load is not None:
            before_load(obj)
        if lib.bpf_object__load(obj):
            raise MaceError(f"cannot load {path.name}: {os.strerror(native.last_errno())}")
        yield obj
    finally:
        lib.bpf_object__close(obj)


@contextlib.contextmanager
def attached(path: Path | None = None) -> Iterator[dict[str, int]]:
    """The three empty programs, attached; their fds by name (native.prog_run_stats)."""
    lib = native.libbpf()
    links = []
    with loaded(path or object_file()) as obj:
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


def stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per floor program, as mace_program_stats gives mace's."""
    return {name: native.prog_run_stats(fd) for name, fd in fds.items()}


def _until_stdin_closes() -> None:
    print("ready", flush=True)
    sys.stdin.read()


def hold_tracepoints(path: Path) -> None:
    """The empty programs on mace's tracepoints, held until stdin closes (a child of the
    bench holds them as a mace-ping run holds mace's: bench/experiments.py)."""
    with attached(path):
        _until_stdin_closes()


def hold_tcx(path: Path, device: str, attach: bool = True) -> None:
    """The empty tc program loaded and, if `attach`, attached by tcx to `device` of this
    netns, ingress and egress, until stdin closes (a tcx link names its device by
    ifindex, so it is made inside the device's netns). Not attached: the control for the
    holder's own work (the same start-up and load)."""
    lib = native.libbpf()
    with loaded(path) as obj:
        prog_fd = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, b"floor_tc"))
        links: list[int] = []
        try:
            if attach:
                ifindex = socket.if_nametoindex(device)
                for kind in (native.BPF_TCX_INGRESS, native.BPF_TCX_EGRESS):
                    links.append(native.tcx_attach(prog_fd, ifindex, kind))
            _until_stdin_closes()
        finally:
            for fd in links:
                os.close(fd)


if __name__ == "__main__":  # run by the bench, in a child: see the module docstring
    match sys.argv[1:]:
        case ["hold-tracepoints", obj]:
            hold_tracepoints(Path(obj))
        case ["hold-tcx", obj, device]:
            hold_tcx(Path(obj), device)
        case ["hold-tcx", obj, device, "--no-attach"]:
            hold_tcx(Path(obj), device, attach=False)
        case _:
            sys.exit("usage: python -m bench.floor hold-tracepoints OBJ | "
                     "hold-tcx OBJ DEVICE [--no-attach]")
