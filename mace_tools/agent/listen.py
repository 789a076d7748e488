"""The agent's listening socket: where it may be, who may connect, and no fds from clients.

The socket's directory must be root's and writable by no one else: containers mount it
(read-only, README), and whoever could write it could put a socket of their own (a fake
agent) or a symlink in the agent's place. The socket's mode is set by the umask at bind
(no chmod after, which a symlink swapped in could redirect); its group, if any, with
lchown. A socket left by a dead agent is replaced; a live agent's is not.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from pathlib import Path

from mace_tools.errors import MaceError

SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)  # Linux 6.16: refuse SCM_RIGHTS
BACKLOG = 128


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise MaceError(f"no group named {name!r}") from None


def _check_directory(directory: Path) -> None:
    """Create it (0755: containers mount it), or check that only root can write it."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        raise MaceError(f"cannot create {directory}: {exc.strerror}") from None
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MaceError(f"{directory} must belong to root and be writable by no one else "
                        "(anyone who can write it can take the agent's place)")


def _replace_stale(path: Path) -> None:
    """Remove a dead agent's socket at path; refuse anything else there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise MaceError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # nothing listens: a dead agent's
        return
    except OSError as exc:  # a live agent with a full backlog, say: never taken over
        raise MaceError(f"{path}: {exc.strerror or exc}: is another mace-agent there?") \
            from None
    finally:
        probe.close()
    raise MaceError(f"another mace-agent serves {path}")


def bind(path: Path, group: str | None) -> tuple[socket.socket, bool]:
    """The listening socket at path (mode 0666, or 0660 for group), non-blocking; and
    whether the kernel refuses fds sent to it (SO_PASSRIGHTS, which accepted sockets
    inherit: an fd a client sends cannot then make the agent's thread wait in close())."""
    gid = group_id(group) if group is not None else None
    _check_directory(path.parent)
    _replace_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o111 if gid is None else 0o117)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        try:
            listener.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
            no_fds = True
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
            no_fds = False
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise MaceError(f"cannot listen on {path}: {exc.strerror}") from None
    return listener, no_fds


def remove_if_ours(path: Path, listener_inode: int | None) -> None:
    """Remove the socket file at path only if it is still the one we bound."""
    try:
        if listener_inode is not None and os.lstat(path).st_ino == listener_inode:
            os.unlink(path)
    except OSError:
        pass
