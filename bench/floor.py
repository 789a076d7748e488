"""Empty programs on mace's tracepoints (bench/bpf/floor.bpf.c), compiled with the same
clang flags as mace's object and attached for as long as a measurement needs them: the
floor that ns per program run is read against."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.kernel import native

SOURCE = Path(__file__).with_name("bpf") / "floor.bpf.c"
MACE_HEADERS = Path(__file__).resolve().parents[1] / "bpf"
PROGRAMS = ("floor_xmit", "floor_rx", "floor_receive")


@functools.cache
def compiled() -> bytes:
    """The object, compiled once per process (the perturbation rows attach it per block)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "floor.bpf.o"
        subprocess.run(["clang", "-g", "-O2", "-Wall", "-target", "bpf", f"-I{MACE_HEADERS}",
                        "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True)
        return obj.read_bytes()


@contextlib.contextmanager
def attached() -> Iterator[dict[str, int]]:
    """The three empty programs, attached; their fds by name (native.prog_run_stats)."""
    lib = native.libbpf()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "floor.bpf.o"
        path.write_bytes(compiled())
        obj = lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise MaceError(f"cannot open the floor object: {os.strerror(native.last_errno())}")
    links = []
    try:
        if lib.bpf_object__load(obj):
            raise MaceError(f"cannot load the floor programs: "
                            f"{os.strerror(native.last_errno())}")
        fds = {}
        for name in PROGRAMS:
            prog = lib.bpf_object__find_program_by_name(obj, name.encode())
            link = lib.bpf_program__attach(prog) if prog else None
            if not link:
                raise MaceError(f"cannot attach {name}: {os.strerror(native.last_errno())}")
            links.append(link)
            fds[name] = lib.bpf_program__fd(prog)
        yield fds
    finally:
        for link in links:
            lib.bpf_link__destroy(link)
        lib.bpf_object__close(obj)


def stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per floor program, as mace_program_stats gives mace's."""
    return {name: native.prog_run_stats(fd) for name, fd in fds.items()}
