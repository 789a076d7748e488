"""Network namespaces by name, path or PID, and entering one just long enough to open a socket.

A socket keeps the network namespace it was created in, so the prober enters the target
netns, creates its socket there, and returns at once: the rest of the process (BPF
loading, output) stays where it started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.kernel.native import setns

NETNS_RUN_DIR = Path("/run/netns")
SELF_NETNS = Path("/proc/thread-self/ns/net")


def resolve(netns: str | None = None, pid: int | None = None) -> Path | None:
    """Path of the namespace asked for: an `ip netns` name, a path, or a PID's; None for ours."""
    if netns is not None and pid is not None:
        raise MaceError("--netns and --pid are mutually exclusive")
    if pid is not None:
        path = Path(f"/proc/{pid}/ns/net")
        if not path.exists():
            raise MaceError(f"no process with pid {pid}")
        return path
    if netns is None:
        return None
    path = Path(netns) if "/" in netns else NETNS_RUN_DIR / netns
    if not path.exists():
        raise MaceError(f"network namespace '{netns}' not found")
    return path


def inode(path: Path | None = None) -> int:
    """The namespace's inode: what the kernel side reports as netns for a device."""
    try:
        return os.stat(path or SELF_NETNS).st_ino
    except OSError as exc:
        raise MaceError(f"cannot read network namespace {path}: {exc.strerror}") from exc


@contextmanager
def entered(path: Path | None) -> Iterator[None]:
    """Run the body inside the namespace at path (no-op for None), then come back."""
    if path is None:
        yield
        return
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MaceError(f"cannot open network namespace {path}: {exc.strerror}") from exc
    home = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)
