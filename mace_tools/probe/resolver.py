"""Resolve a host name the way a container would: its /etc/hosts, then the DNS servers of its
/etc/resolv.conf, queried from inside its network namespace.

The caller's getaddrinfo would read the host's files and ask the host's servers, which can
differ from the container's (Docker's user-defined networks answer DNS on 127.0.0.11, an
address that exists only inside the container's netns). This is a small stub resolver for
A and AAAA records (both asked for at once, as glibc does for iputils, which always
resolves for any family and then takes the first address of the one -4/-6 want),
following glibc's rules for search lists, ndots, timeout and attempts. The addresses are
put in glibc's RFC 6724 order, of which the rules that decide between one host's
addresses are kept: an address the netns has no route to comes last (rule 1), then IPv6
before IPv4 (rule 6, the default precedence table), else the order the answer gave.
The reverse (hop names): /etc/hosts, then PTR records of in-addr.arpa, asked the same way
(ReverseResolver). Replies are parsed defensively: a malformed or foreign answer is
ignored, never trusted, and a name with characters no host name has (a hostile server's
terminal escapes) is not shown.

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

from mace_tools.errors import MaceError
from mace_tools.kernel import native
from mace_tools.probe import netns as netns_mod
from mace_tools.probe.hopnames import shown_name

DNS_PORT = 53
TYPE_A, TYPE_PTR, TYPE_AAAA, CLASS_IN = 1, 12, 28, 1
_ADDRESS_RDATA = {TYPE_A: (socket.AF_INET, 4), TYPE_AAAA: (socket.AF_INET6, 16)}
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
_MAX_POINTERS = 128  # compression pointers followed in one name: a loop ends there


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


def lookup_hosts(text: str, name: str, family: int | None = 4) -> list[str]:
    """The addresses /etc/hosts gives for name (canonical name or alias), in file order:
    IPv4 (family 4), IPv6 (6) or both (None)."""
    wanted = name.rstrip(".").lower()
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and wanted in (w.lower() for w in words[1:]) \
                and _family(words[0]) in ((4, 6) if family is None else (family,)):
            found.append(words[0])
    return found


def lookup_hosts_name(text: str, addr: str) -> str | None:
    """The name /etc/hosts gives addr, IPv4 or IPv6 (the first line's canonical name), as
    glibc's gethostbyaddr finds it."""
    family = _family(addr)
    if family is None:
        return None
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    wanted = socket.inet_pton(af, addr)
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and _family(words[0]) == family \
                and socket.inet_pton(af, words[0]) == wanted:
            return words[1]
    return None


def ptr_name(addr: str) -> str:
    """The in-addr.arpa (IPv4) or ip6.arpa (IPv6: one label per nibble) name whose PTR
    record names addr."""
    if _family(addr) == 6:
        nibbles = socket.inet_pton(socket.AF_INET6, addr).hex()
        return ".".join(reversed(nibbles)) + ".ip6.arpa"
    return ".".join(reversed(addr.split("."))) + ".in-addr.arpa"


def candidates(name: str, conf: ResolvConf) -> list[str]:
    """Fully qualified names to ask for, in glibc's order (search list and ndots)."""
    if name.endswith("."):
        return [name.rstrip(".")]
    searched = [f"{name}.{domain}" for domain in conf.search if domain]
    if name.count(".") >= conf.ndots:
        return [name, *searched]
    return [*searched, name]


def build_query(query_id: int, name: str, qtype: int = TYPE_A) -> bytes:
    labels = name.rstrip(".").split(".")
    if any(not label or len(label) > 63 for label in labels) or len(name) > 253:
        raise ValueError(f"invalid DNS name {name!r}")
    qname = b"".join(bytes([len(lb)]) + lb.encode("idna") for lb in labels) + b"\0"
    # flags 0x0100: a standard query asking for recursion
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + \
        struct.pack("!HH", qtype, CLASS_IN)


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


def _records(msg: bytes, query_id: int, wanted: int) -> tuple[int, list[int]] | None:
    """(rcode, offsets of the rdata of every IN record of type `wanted` in the answer
    section) of a reply to query_id; None if it is not one, or malformed. rdata runs to
    the record's end, which the caller's decoding must not pass."""
    if len(msg) < 12:
        return None
    rid, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    if rid != query_id or not flags & 0x8000:
        return None
    try:
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(msg, pos) + 4
        found = []
        for _ in range(ancount):
            pos = _skip_name(msg, pos)
            if pos + 10 > len(msg):
                raise ValueError("truncated record")
            rtype, rclass, _ttl, rdlength = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            if pos + rdlength > len(msg):
                raise ValueError("truncated rdata")
            if rtype == wanted and rclass == CLASS_IN and \
                    rdlength == _ADDRESS_RDATA.get(rtype, (0, rdlength))[1]:
                found.append(pos)
            pos += rdlength
    except ValueError:
        return None
    return flags & 0x000F, found


def parse_answer(msg: bytes, query_id: int, qtype: int = TYPE_A) -> tuple[int, list[str]] | None:
    """(rcode, addresses) of a reply to query_id; None if it is not one, or malformed.

    Every record of the type asked for (A or AAAA) in the answer section is taken: a
    recursive server's answer holds the whole CNAME chain.
    """
    got = _records(msg, query_id, qtype)
    if got is None:
        return None
    family, size = _ADDRESS_RDATA[qtype]
    return got[0], [socket.inet_ntop(family, msg[pos:pos + size]) for pos in got[1]]


Parse = Callable[[bytes, int], "tuple[int, list[str]] | None"]  # a reply -> (rcode, found)


def _parse_aaaa(msg: bytes, query_id: int) -> tuple[int, list[str]] | None:
    return parse_answer(msg, query_id, TYPE_AAAA)


ADDRESS_QUESTIONS: dict[int, Parse] = {TYPE_A: parse_answer, TYPE_AAAA: _parse_aaaa}


def parse_ptr_answer(msg: bytes, query_id: int) -> tuple[int, list[str]] | None:
    """(rcode, names) of the PTR records of a reply to query_id; None if it is not one,
    or malformed. A name that cannot be read, or the root, is left out."""
    got = _records(msg, query_id, TYPE_PTR)
    if got is None:
        return None
    names = []
    for pos in got[1]:
        try:
            name = read_name(msg, pos)
        except ValueError:
            continue
        if name:  # the root names no host
            names.append(name)
    return got[0], names


def read_name(msg: bytes, pos: int) -> str:
    """The (possibly compressed) name at pos, dotted, without the root's dot; ValueError
    if malformed (a pointer loop, a label past the message, a bad label type)."""
    labels: list[str] = []
    for _ in range(_MAX_POINTERS):
        while True:
            if pos >= len(msg):
                raise ValueError("name runs past the message")
            length = msg[pos]
            if length & 0xC0 == 0xC0:
                if pos + 2 > len(msg):
                    raise ValueError("truncated name pointer")
                pos = int.from_bytes(msg[pos:pos + 2], "big") & 0x3FFF
                break
            if length & 0xC0:
                raise ValueError("bad label type")
            if length == 0:
                return ".".join(labels)
            if pos + 1 + length > len(msg):
                raise ValueError("label runs past the message")
            labels.append(msg[pos + 1:pos + 1 + length].decode("latin-1"))
            pos += 1 + length
    raise ValueError("too many pointers")


def _family(text: str) -> int | None:
    """4 or 6 for an address in text (IPv6 without a %scope), else None."""
    return 4 if _is_ipv4(text) else 6 if _is_ip(text) else None


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
         questions: dict[int, Parse]) -> dict[int, tuple[int, list[str]]]:
    """Ask each server in turn, `attempts` rounds, every question (a type, and how its
    answer is read) at once, as glibc asks for A and AAAA together, one timeout for all;
    the usable answers, by type."""
    answers: dict[int, tuple[int, list[str]]] = {}
    for _ in range(conf.attempts):
        for sock in socks:
            pending = _send_queries(sock, name, [q for q in questions if q not in answers])
            deadline = time.monotonic() + conf.timeout_s
            while pending and (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    message = sock.recv(MAX_UDP_ANSWER)
                except OSError:  # ICMP port unreachable: nobody listens there
                    break
                for query_id, qtype in list(pending.items()):
                    if (answer := questions[qtype](message, query_id)) is not None:
                        answers[qtype] = answer
                        del pending[query_id]
            if len(answers) == len(questions):
                return answers
    return answers


def _send_queries(sock: socket.socket, name: str, qtypes: list[int]) -> dict[int, int]:
    """One query per type, each with an id of its own; id -> type of those sent."""
    sent: dict[int, int] = {}
    for qtype in qtypes:
        while (query_id := random.getrandbits(16)) in sent:
            pass
        try:
            sock.send(build_query(query_id, name, qtype))
        except OSError:
            continue
        sent[query_id] = qtype
    return sent


def resolve(host: str, vantage: Vantage, family: int | None = None) -> str:
    """The address of host that ping takes (-4: family 4, -6: 6, neither: None) as seen
    from vantage: as iputils, the first of the wanted family among all host's addresses in
    getaddrinfo's order; MaceError worded as ping's resolver errors."""
    for address in resolve_all(host, vantage):
        if family is None or _family(address.partition("%")[0]) == family:
            return address
    raise MaceError(f"{host}: Address family for hostname not supported")


def resolve_all(host: str, vantage: Vantage) -> list[str]:
    """Every address of host as seen from vantage, in getaddrinfo's order (an address
    literal: itself): hosts file, then DNS asked for A and AAAA at once."""
    if (literal := numeric_address(host)) is not None:
        return [literal]
    if found := lookup_hosts(_read(vantage, "hosts"), host, None):
        return ordered(found, vantage)
    conf = parse_resolv_conf(_read(vantage, "resolv.conf"))
    try:
        names = candidates(host, conf)
        for name in names:
            build_query(0, name)  # reject names DNS cannot carry before any packet is sent
    except (ValueError, UnicodeError):
        raise MaceError(f"{host}: Name or service not known") from None
    socks = _open_sockets(vantage, conf.nameservers)
    try:
        definite = True  # every name got "no such name" (or no record), not silence
        for name in names:
            answers = _ask(socks, name, conf, ADDRESS_QUESTIONS)
            addresses = []
            for qtype in (TYPE_A, TYPE_AAAA):  # as glibc: found if either type is
                answer = answers.get(qtype)
                if answer is None or answer[0] not in (0, RCODE_NXDOMAIN):
                    definite = False  # timeout or server failure: as glibc, EAI_AGAIN
                    continue
                addresses += answer[1]
            if addresses:
                return ordered(addresses, vantage)
    finally:
        for sock in socks:
            sock.close()
    if definite:
        raise MaceError(f"{host}: Name or service not known")
    raise MaceError(f"{host}: Temporary failure in name resolution")


def numeric_address(host: str) -> str | None:
    """host if it is an address literal, as ping would use it (IPv4 in any form inet_aton
    takes; IPv6, with its %scope kept as given: an interface name or index of the probing
    netns, looked up there when the socket is made); None if it is a name. Something that
    looks like an IPv6 literal and is not one fails here: it is never asked of DNS."""
    address, percent, scope = host.partition("%")
    if ":" in address or percent:
        try:
            packed = socket.inet_pton(socket.AF_INET6, address)
        except (OSError, ValueError):
            raise MaceError(f"{host}: Name or service not known") from None
        if percent and not scope:
            raise MaceError(f"{host}: Name or service not known")
        text = socket.inet_ntop(socket.AF_INET6, packed)
        return f"{text}%{scope}" if percent else text
    try:  # IPv4: no scope, so the caller's netns reads it as any other would
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_RAW, 0,
                                   socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return infos[0][4][0]


def ordered(addresses: list[str], vantage: Vantage) -> list[str]:
    """addresses in the order getaddrinfo would list them (module docstring: RFC 6724
    rules 1 and 6): those the vantage's netns has a route to first, then IPv6 before IPv4,
    else as answered. One family only: as answered (no route check)."""
    if len({_family(a) for a in addresses}) == 1:
        return addresses
    with netns_mod.entered(vantage.netns_path):
        usable = {a for a in addresses if _routable(a)}
    return sorted(addresses, key=lambda a: (a not in usable, _family(a) != 6))


def _routable(address: str) -> bool:
    """Whether the current netns has a route (and a source address) to address."""
    family = socket.AF_INET6 if _family(address) == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect((address, 9))  # no packet leaves: a UDP connect picks a route
        except OSError:
            return False
    return True


class ReverseResolver:
    """Hop names as the vantage would find them (traceroute's getnameinfo): its hosts
    file, then a PTR query to the servers of its resolv.conf, asked from inside its netns
    (the sockets are opened here, while the run may still enter it). A name is looked
    up once per run; none found, or one no host name could be, gives None (traceroute
    prints the address then). Close it when done."""

    def __init__(self, vantage: Vantage) -> None:
        self._hosts = _read(vantage, "hosts")
        self._conf = parse_resolv_conf(_read(vantage, "resolv.conf"))
        self._socks = _open_sockets(vantage, self._conf.nameservers)
        self._names: dict[str, str | None] = {}

    def __call__(self, addr: str) -> str | None:
        if addr not in self._names:
            self._names[addr] = self._lookup(addr)
        return self._names[addr]

    def _lookup(self, addr: str) -> str | None:
        name = lookup_hosts_name(self._hosts, addr)
        if name is None and _family(addr) is not None:
            answer = _ask(self._socks, ptr_name(addr), self._conf,
                          {TYPE_PTR: parse_ptr_answer}).get(TYPE_PTR)
            name = answer[1][0] if answer is not None and answer[1] else None
        return shown_name(name)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []


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

