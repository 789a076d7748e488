"""Network namespaces by name, path or PID, and entering one just long enough to open a socket.

A socket keeps the network namespace it was created in, so the prober enters the target
netns, creates its socket there, and returns at once: the rest of the process (BPF
loading, output) stays where it started.

A PID (--pid, or a container's init named by its runtime) is pinned with a pidfd the moment
it is known: its netns and root directory are opened while the pidfd proves that process is
still alive, so a PID that is reused by another process is never measured or read from.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.model import Namespaces

NETNS_RUN_DIR = Path("/run/netns")
SELF_NETNS = Path("/proc/thread-self/ns/net")
# _IO(PIDFS_IOCTL_MAGIC 0xFF, 4) in linux/pidfd.h (kernel >= 6.11): the pidfd's netns as an fd
PIDFD_GET_NET_NAMESPACE = 0xFF04


@dataclass(frozen=True, slots=True)
class PinnedProcess:
    """A process held by a pidfd, with its netns and root directory open (all CLOEXEC, kept
    for the life of this process). The paths are /proc/self/fd links to those fds, so
    anything that opens them gets exactly what was pinned."""

    pid: int
    pidfd: int
    netns_fd: int
    root_fd: int

    @property
    def netns_path(self) -> Path:
        return Path(f"/proc/self/fd/{self.netns_fd}")

    @property
    def root_path(self) -> Path:
        return Path(f"/proc/self/fd/{self.root_fd}")


_PINNED: dict[int, PinnedProcess] = {}  # one pin per PID per run: netns and root stay paired
_HOLDERS: dict[int, int] = {}  # pins handed out per PID (pin() adds one, release() drops one)
_LOCK = threading.Lock()  # a long-lived caller (mace-agent's probes) pins from many threads


def pin(pid: int) -> PinnedProcess:
    """Pin the process with this PID now (its netns and root with it); a one-line MaceError if
    there is none, or it exits while being pinned. Pinning the same PID again returns the
    first pin, after checking it is still alive. Each pin() is matched by a release()
    when the caller is long-lived: the fds close with the last one."""
    with _LOCK:
        if (pinned := _PINNED.get(pid)) is not None:
            require_alive(pinned)
            _HOLDERS[pid] += 1
            return pinned
    fresh = _pin_new(pid)
    with _LOCK:
        if (pinned := _PINNED.get(pid)) is not None:  # another thread pinned it meanwhile
            _close(fresh)
            _HOLDERS[pid] += 1
            return pinned
        _PINNED[pid], _HOLDERS[pid] = fresh, 1
        return fresh


def _pin_new(pid: int) -> PinnedProcess:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise MaceError(f"no process with pid {pid}") from None
    except OSError as exc:
        raise MaceError(f"cannot pin pid {pid}: {exc.strerror}") from exc
    fds = [pidfd]
    try:
        fds.append(_open_netns(pidfd, pid))
        fds.append(_open_proc(pid, "root", os.O_PATH | os.O_DIRECTORY))
        pinned = PinnedProcess(pid, *fds)
        require_alive(pinned)  # both opened while that very process was alive
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return pinned


def release(pinned: PinnedProcess) -> None:
    """Drop one holder of a pin; the last one closes its fds and forgets it (a one-shot
    CLI never needs to; a long-lived caller does, or a later process given the same PID
    would be refused as 'exited'). Another holder's pin is never closed under it."""
    with _LOCK:
        if _PINNED.get(pinned.pid) is not pinned:
            return  # already closed by its last holder
        _HOLDERS[pinned.pid] -= 1
        if _HOLDERS[pinned.pid] > 0:
            return
        del _PINNED[pinned.pid], _HOLDERS[pinned.pid]
    _close(pinned)


def _close(pinned: PinnedProcess) -> None:
    for fd in (pinned.root_fd, pinned.netns_fd, pinned.pidfd):
        os.close(fd)


def require_alive(pinned: PinnedProcess) -> None:
    """MaceError unless the pinned process still runs (its PID cannot have been reused)."""
    try:
        signal.pidfd_send_signal(pinned.pidfd, 0)
    except PermissionError:
        pass  # the process exists; we may only not signal it (no CAP_KILL)
    except OSError:
        raise MaceError(f"process {pinned.pid} exited") from None


def _open_netns(pidfd: int, pid: int) -> int:
    """The netns of the pidfd's process, straight from the pidfd where the kernel can (>= 6.11),
    else from /proc (the caller re-checks the pidfd afterwards)."""
    try:
        return fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise MaceError(f"process {pid} exited") from None
        if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):  # not: no ioctl
            raise MaceError(f"cannot open network namespace of pid {pid}: "
                            f"{exc.strerror}") from exc
    return _open_proc(pid, "ns/net", os.O_RDONLY)


def _open_proc(pid: int, what: str, flags: int) -> int:
    try:
        return os.open(f"/proc/{pid}/{what}", flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MaceError(f"process {pid} exited") from None
    except OSError as exc:
        raise MaceError(f"cannot open /proc/{pid}/{what}: {exc.strerror}") from exc


def resolve(netns: str | None = None, pid: int | None = None) -> Path | None:
    """Path of the namespace asked for: an `ip netns` name, a path, or a PID's; None for ours."""
    if netns is not None and pid is not None:
        raise MaceError("--netns and --pid are mutually exclusive")
    if pid is not None:
        return pin(pid).netns_path
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


def of_run(path: Path | None) -> Namespaces:
    """A run's namespaces: the prober's (path's, or ours), and the container host's, which
    is ours when we enter another netns to probe (not when path is ours: `--pid 1` from
    inside a container); otherwise correlate.py infers it."""
    own = inode()
    prober = own if path is None else inode(path)
    return Namespaces(prober, None if prober == own else own)


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
    from mace_tools.kernel.native import setns  # ctypes: only for runs that enter a netns

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
