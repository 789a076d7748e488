"""Who is at the other end of an agent connection, from the kernel, never from the client.

SO_PEERCRED gives the pid, uid and gid the client had when it connected (pid as the
agent's pid namespace sees it; 0 when the client's process is not visible there).
SO_PEERPIDFD (Linux 6.5) gives a pidfd of that very process: it can never come to name a
reused pid. The client's network namespace is read through the pidfd
(PIDFD_GET_NET_NAMESPACE, Linux 6.11) when a run starts, so a run always probes from the
netns its process is in. On older kernels: pidfd_open(pid) at accept and /proc/PID/ns/net,
then the pidfd is checked to still name a live process, which proves /proc was read of the
process the pidfd names. It is weaker than SO_PEERPIDFD: the pidfd is opened at accept,
not at connect, and if the client exited in between (waiting in the backlog) and its pid
was reused, the agent would name the new process. Kernels from 6.5 do not have this gap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
from dataclasses import dataclass

from mace_tools.errors import MaceError

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # asm-generic/socket.h
PIDFD_GET_NET_NAMESPACE = 0xFF04  # _IO(PIDFS_IOCTL_MAGIC 0xFF, 4): linux/pidfd.h
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected client, as the kernel names it. The agent owns pidfd (close())."""

    pid: int
    uid: int
    gid: int
    pidfd: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def identify(conn: socket.socket) -> Peer:
    """The process that connected conn (MaceError if it cannot be named)."""
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise MaceError(f"cannot identify the client: {exc.strerror}") from None
        pidfd = _pidfd_of(pid)
    return Peer(pid, uid, gid, pidfd)


def _pidfd_of(pid: int) -> int:
    """A kernel without SO_PEERPIDFD: a pidfd of the pid SO_PEERCRED gave. It may be a
    reused pid only if the client is gone, and netns_of() checks that it is not."""
    if pid <= 0:
        raise MaceError("cannot identify the client: its process is not visible to the "
                        "agent (run the agent in the host's pid namespace)")
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        raise MaceError(f"cannot identify the client: {exc.strerror}") from None


def netns_of(peer: Peer) -> int:
    """The inode of the network namespace the peer's process is in now."""
    try:
        nsfd = fcntl.ioctl(peer.pidfd, PIDFD_GET_NET_NAMESPACE)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise MaceError("the client's process has exited") from None
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            raise MaceError(f"cannot read the client's network namespace: {exc.strerror}") \
                from None
        return _netns_from_proc(peer)
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


def _netns_from_proc(peer: Peer) -> int:
    """Before Linux 6.11: /proc/PID/ns/net, trusted only if the pidfd (opened earlier)
    still names a live process afterwards: then PID was not reused in between."""
    try:
        inode = os.stat(f"/proc/{peer.pid}/ns/net").st_ino
        signal.pidfd_send_signal(peer.pidfd, 0)
    except ProcessLookupError:
        raise MaceError("the client's process has exited") from None
    except OSError as exc:
        raise MaceError(f"cannot read the client's network namespace: {exc.strerror}") \
            from None
    return inode
