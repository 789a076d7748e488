"""Resolve a host name the way a container would: its /etc/hosts, then the DNS servers of its
/etc/resolv.conf, queried from inside its network namespace.

The caller's getaddrinfo would read the host's files and ask the host's servers, which can
differ from the container's (Docker's user-defined networks answer DNS on 127.0.0.11, an
address that exists only inside the container's netns). This is a small stub resolver for
IPv4 A records, following glibc's rules for search lists, ndots, timeout and attempts.
Replies are parsed defensively: a malformed or foreign answer is ignored, never trusted.

The measured party's files are hostile input too (we run as root, they are theirs): they
are opened with openat2(RESOLVE_IN_ROOT) below its root, so an absolute or `..` symlink
stays inside it, no /proc magic link leads out, only a regular file is read (opened O_PATH
first: a FIFO cannot block us and a device node is never opened), and at most
MAX_FILE_BYTES of it. A file over that bound, or not regular, is refused with one line
rather than read in part: a cut hosts line could map a name to the wrong address. No
openat2 (Linux < 5.6) fails closed: such files are then never read unconfined. The host's
own files (`--netns NAME`: /etc or /etc/netns/NAME) are root's, not a measured party's:
they are read whole, as getaddrinfo and `ip netns exec` would.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_tools.errors import MaceError
from mace_tools.kernel import native
from mace_tools.probe import netns as netns_mod

DNS_PORT = 53
TYPE_A, CLASS_IN = 1, 1
RCODE_NXDOMAIN = 3
MAX_UDP_ANSWER = 4096
# glibc's defaults (resolv.conf(5))
DEFAULT_NDOTS, DEFAULT_TIMEOUT_S, DEFAULT_ATTEMPTS = 1, 5, 2
MAX_NAMESERVERS = 3
# glibc reads a hosts file whole; this bounds what a measured party (a PID's root, such as
# a container's) can make us read and parse. Container engines write a few lines there, far
# below this; the host's own files (block lists run to tens of MB) are not bounded (Vantage).
MAX_FILE_BYTES = 1 << 20
_CONFINED = native.RESOLVE_IN_ROOT | native.RESOLVE_NO_MAGICLINKS
_RESOLVE_RETRIES = 3  # RESOLVE_IN_ROOT answers EAGAIN when a rename races a ".." walk


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ("127.0.0.1",)
    search: tuple[str, ...] = ()
    ndots: int = DEFAULT_NDOTS
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS


@dataclass(frozen=True, slots=True)
class Vantage:
    """Where a name is resolved from: the files under `root` (read as if it were "/") and
    the netns at `netns_path`; `label` names whose files they are in error messages.
    `max_file_bytes` bounds what is read of them: None for the host's own files only."""
    root: Path
    netns_path: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # per-file overrides (ip netns)
    label: str = ""
    max_file_bytes: int | None = MAX_FILE_BYTES

    def file(self, name: str) -> str:
        """The file's path below root (relative: it is resolved inside root)."""
        return self.files.get(name) or f"etc/{name}"


def parse_resolv_conf(text: str) -> ResolvConf:
    servers: list[str] = []
    search: tuple[str, ...] = ()
    ndots, timeout_s, attempts = DEFAULT_NDOTS, float(DEFAULT_TIMEOUT_S), DEFAULT_ATTEMPTS
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        key, values = words[0], words[1:]
        if key == "nameserver" and len(servers) < MAX_NAMESERVERS and _is_ip(values[0]):
            servers.append(values[0])
        elif key in ("search", "domain"):  # the last of them wins, as in glibc
            search = tuple(v.rstrip(".") for v in values)
        elif key == "options":
            for opt in values:
                name, _, value = opt.partition(":")
                if value.isdigit():
                    if name == "ndots":
                        ndots = min(int(value), 15)
                    elif name == "timeout":
                        timeout_s = float(max(1, min(int(value), 30)))
                    elif name == "attempts":
                        attempts = max(1, min(int(value), 5))
    return ResolvConf(tuple(servers) or ("127.0.0.1",), search, ndots, timeout_s, attempts)


def lookup_hosts(text: str, name: str) -> str | None:
    """The first IPv4 address that /etc/hosts gives for name (canonical name or alias)."""
    wanted = name.rstrip(".").lower()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and wanted in (w.lower() for w in words[1:]) and _is_ipv4(words[0]):
            return words[0]
    return None


def candidates(name: str, conf: ResolvConf) -> list[str]:
    """Fully qualified names to ask for, in glibc's order (search list and ndots)."""
    if name.endswith("."):
        return [name.rstrip(".")]
    searched = [f"{name}.{domain}" for domain in conf.search if domain]
    if name.count(".") >= conf.ndots:
        return [name, *searched]
    return [*searched, name]


def build_query(query_id: int, name: str) -> bytes:
    labels = name.rstrip(".").split(".")
    if any(not label or len(label) > 63 for label in labels) or len(name) > 253:
        raise ValueError(f"invalid DNS name {name!r}")
    qname = b"".join(bytes([len(lb)]) + lb.encode("idna") for lb in labels) + b"\0"
    # flags 0x0100: a standard query asking for recursion
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + \
        struct.pack("!HH", TYPE_A, CLASS_IN)


def _skip_name(msg: bytes, pos: int) -> int:
    """Offset just after the (possibly compressed) name at pos; ValueError if malformed."""
    for _ in range(128):
        if pos >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name here
            if pos + 2 > len(msg):
                raise ValueError("truncated name pointer")
            return pos + 2
        if length & 0xC0:
            raise ValueError("bad label type")
        pos += 1 + length
    raise ValueError("too many labels")


def parse_answer(msg: bytes, query_id: int) -> tuple[int, list[str]] | None:
    """(rcode, IPv4 addresses) of a reply to query_id; None if it is not one, or malformed.

    Every A record of the answer section is taken: a recursive server's answer holds the
    whole CNAME chain, and the question was for A records only.
    """
    if len(msg) < 12:
        return None
    rid, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    if rid != query_id or not flags & 0x8000:
        return None
    try:
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(msg, pos) + 4
        addrs = []
        for _ in range(ancount):
            pos = _skip_name(msg, pos)
            if pos + 10 > len(msg):
                raise ValueError("truncated record")
            rtype, rclass, _ttl, rdlength = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            if pos + rdlength > len(msg):
                raise ValueError("truncated rdata")
            if rtype == TYPE_A and rclass == CLASS_IN and rdlength == 4:
                addrs.append(socket.inet_ntoa(msg[pos:pos + 4]))
            pos += rdlength
    except ValueError:
        return None
    return flags & 0x000F, addrs


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return _is_ipv4(text)
    return True


def read_confined(root: Path, relpath: str, limit: int | None = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of root/relpath resolved as if root were "/", or None if there is no such
    file; ValueError (why) if it is refused, OSError if it cannot be read. limit None: no
    bound on its size (the host's own files)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path_fd = _open_below(root_fd, relpath)
    finally:
        os.close(root_fd)
    if path_fd is None:
        return None
    try:
        info = os.fstat(path_fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if limit is not None and info.st_size > limit:
            raise ValueError(f"larger than {limit} bytes")
        # Reopen the very inode checked above; O_NONBLOCK in case it is not what it seemed.
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        return _read_at_most(fd, limit)
    finally:
        os.close(fd)


def _open_below(root_fd: int, relpath: str) -> int | None:
    """An O_PATH fd of relpath inside root_fd (symlinks included), None if absent."""
    for _ in range(_RESOLVE_RETRIES):
        try:
            return native.openat2(root_fd, relpath, os.O_PATH | os.O_CLOEXEC, _CONFINED)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except BlockingIOError:
            continue
    raise OSError(errno.EAGAIN, "the file kept moving while it was looked up")


def _read_at_most(fd: int, limit: int | None) -> bytes:
    chunks, size = [], 0
    # one byte past the limit tells a file that grew; unbounded, read in 1 MiB chunks
    while chunk := os.read(fd, 1 << 20 if limit is None else limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size > limit:  # it grew after fstat
            raise ValueError(f"larger than {limit} bytes")
    return b"".join(chunks)


def _read(vantage: Vantage, name: str) -> str:
    """The text of one of the vantage's files ("" if it has none, as glibc treats that)."""
    relpath = vantage.file(name)
    where = f"/{relpath}" + (f" of {vantage.label}" if vantage.label else "")
    try:
        data = read_confined(vantage.root, relpath, vantage.max_file_bytes)
    except ValueError as exc:
        raise MaceError(f"refusing to read {where}: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise MaceError(f"cannot read {where} safely: the kernel has no openat2 "
                            "(Linux >= 5.6 needed)") from None
        raise MaceError(f"cannot read {where}: {exc.strerror}") from None
    return "" if data is None else data.decode(errors="replace")


def _open_sockets(vantage: Vantage, servers: tuple[str, ...]) -> list[socket.socket]:
    """One connected UDP socket per server, created inside the vantage's netns."""
    socks = []
    with netns_mod.entered(vantage.netns_path):
        for server in servers:
            family = socket.AF_INET if _is_ipv4(server) else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect((server, DNS_PORT))
            except OSError:
                sock.close()  # e.g. no route to it in there: as glibc, try the others
                continue
            socks.append(sock)
    return socks


def _ask(socks: list[socket.socket], name: str, conf: ResolvConf,
         build: Callable[[int, str], bytes] = build_query,
         parse: Callable[[bytes, int], Any] = parse_answer) -> Any:
    """Ask each server in turn, `attempts` rounds; the first usable answer, or None.
    build and parse: the query and its answer (A records; probe/names.py asks PTR)."""
    for _ in range(conf.attempts):
        for sock in socks:
            query_id = random.getrandbits(16)
            try:
                sock.send(build(query_id, name))
            except OSError:
                continue
            deadline = time.monotonic() + conf.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    answer = parse(sock.recv(MAX_UDP_ANSWER), query_id)
                except OSError:  # ICMP port unreachable: nobody listens there
                    break
                if answer is not None:
                    return answer
    return None


def resolve_ipv4(host: str, vantage: Vantage) -> str:
    """IPv4 address of host as seen from vantage; MaceError worded as ping's resolver errors."""
    if _is_ipv4(host):
        return host
    try:
        socket.inet_aton(host)  # ping also takes the short forms (127.1)
        return socket.gethostbyname(host)
    except OSError:
        pass
    if (addr := lookup_hosts(_read(vantage, "hosts"), host)) is not None:
        return addr
    conf = parse_resolv_conf(_read(vantage, "resolv.conf"))
    try:
        names = candidates(host, conf)
        for name in names:
            build_query(0, name)  # reject names DNS cannot carry before any packet is sent
    except (ValueError, UnicodeError):
        raise MaceError(f"{host}: Name or service not known") from None
    socks = _open_sockets(vantage, conf.nameservers)
    try:
        definite = True  # every name got "no such name" (or no A record), not silence
        for name in names:
            answer = _ask(socks, name, conf)
            if answer is None or answer[0] not in (0, RCODE_NXDOMAIN):
                definite = False  # timeout or server failure: as glibc, EAI_AGAIN
                continue
            if answer[1]:
                return answer[1][0]
    finally:
        for sock in socks:
            sock.close()
    if definite:
        raise MaceError(f"{host}: Name or service not known")
    raise MaceError(f"{host}: Temporary failure in name resolution")


def vantage_of(netns: str | None, pid: int | None, netns_path: Path | None) -> Vantage | None:
    """The resolver's view for the options given; None means the caller's own (getaddrinfo).

    A PID (or a container's init) brings its own root file system, taken from its pin (the
    same process as its netns); an `ip netns` name uses /etc/netns/NAME/{hosts,resolv.conf}
    where present, as `ip netns exec` would. Only a PID's files are bounded in size: the
    others are the host's own.
    """
    if pid is not None and netns_path is not None:
        pinned = netns_mod.pin(pid)
        return Vantage(pinned.root_path, pinned.netns_path, label=f"pid {pid}")
    if netns is not None and netns_path is not None:
        if "/" in netns:
            return Vantage(Path("/"), netns_path, max_file_bytes=None)
        overrides = {f: p for f in ("hosts", "resolv.conf")
                     if os.path.exists("/" + (p := f"etc/netns/{netns}/{f}"))}
        return Vantage(Path("/"), netns_path, overrides, max_file_bytes=None)
    return None

