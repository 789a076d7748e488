"""How ping names hosts, from the netns and files the probes are sent from.

- The target: ping prints the name getaddrinfo gives as canonical (AI_CANONNAME), in its
  header and statistics; the name as typed when it has none, and an address as typed.
- Senders of replies and ICMP errors: "NAME (ADDR)" by a reverse lookup (getnameinfo),
  or the address alone when the lookup gives no name. ping does the lookup unless -n, -f
  or an address was given as the target (-H forces it); the CLI never builds a Namer
  then, so those runs pay nothing for it.

From the process's own netns this is glibc's getaddrinfo/getnameinfo (the files and DNS
servers of the host it runs on). From another vantage (--netns, --pid, --container) it is
the vantage's /etc/hosts (its first name for an address, as glibc's "files" gives), then a
PTR query to the servers of its resolv.conf, asked from inside its netns (probe/resolver.py
reads those files and opens those sockets, confined as for forward lookups).
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (resolver is imported only for a vantage: start-up stays light)
    from mace_tools.probe.resolver import Vantage

TYPE_PTR = 12
CLASS_IN = 1
MAX_NAME_POINTERS = 64  # a compressed name may not loop forever


def canonical_name(host: str, addr: str, vantage: Vantage | None) -> str:
    """The name ping prints for a name target (module docstring) once resolved from a
    vantage: the hosts file's canonical name, else the name as typed (a DNS answer's
    CNAME chain is not followed here)."""
    if vantage is None:
        return host
    from mace_tools.probe import resolver

    return hosts_canonical(resolver._read(vantage, "hosts"), host, addr) or host


def hosts_canonical(text: str, name: str, addr: str) -> str | None:
    """The canonical (first) name of the hosts line that gave name its address."""
    wanted = name.rstrip(".").lower()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == addr and wanted in (w.lower() for w in words[1:]):
            return words[1]
    return None


def hosts_reverse(text: str, addr: str) -> str | None:
    """The first name of the first hosts line for addr (glibc's files backend)."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == addr:
            return words[1]
    return None


def ptr_query(query_id: int, addr: str) -> bytes:
    """A recursive PTR query for addr's in-addr.arpa name."""
    labels = [*reversed(addr.split(".")), "in-addr", "arpa"]
    qname = b"".join(bytes([len(lb)]) + lb.encode() for lb in labels) + b"\0"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + \
        struct.pack("!HH", TYPE_PTR, CLASS_IN)


def read_name(msg: bytes, pos: int) -> str:
    """The (possibly compressed) domain name at pos; ValueError if malformed."""
    labels: list[str] = []
    for _ in range(MAX_NAME_POINTERS):
        if pos >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[pos]
        if length == 0:
            return ".".join(labels)
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(msg):
                raise ValueError("truncated name pointer")
            pos = int.from_bytes(msg[pos:pos + 2], "big") & 0x3FFF
            continue
        if length & 0xC0:
            raise ValueError("bad label type")
        label = msg[pos + 1:pos + 1 + length]
        if len(label) != length:
            raise ValueError("truncated label")
        labels.append(label.decode("ascii", errors="replace"))
        pos += 1 + length
    raise ValueError("name pointers loop")


def parse_ptr_answer(msg: bytes, query_id: int) -> tuple[int, str | None] | None:
    """(rcode, the first PTR name) of a reply to query_id; None if it is not one."""
    from mace_tools.probe.resolver import _skip_name

    if len(msg) < 12:
        return None
    rid, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    if rid != query_id or not flags & 0x8000:
        return None
    try:
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(msg, pos) + 4
        for _ in range(ancount):
            pos = _skip_name(msg, pos)
            if pos + 10 > len(msg):
                raise ValueError("truncated record")
            rtype, rclass, _ttl, rdlength = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            if rtype == TYPE_PTR and rclass == CLASS_IN:
                return flags & 0x000F, read_name(msg, pos)
            pos += rdlength
    except ValueError:
        return None
    return flags & 0x000F, None


class VantageLookups:
    """Reverse lookups from a vantage, set up while the run still holds its privileges:
    its hosts file read and its DNS servers' sockets opened inside its netns now, since
    once the run has dropped them (after setup, as ping does) it can neither enter that
    netns nor read a container's files."""

    def __init__(self, vantage: Vantage) -> None:
        from mace_tools.probe import resolver

        self._hosts = resolver._read(vantage, "hosts")
        self._conf = resolver.parse_resolv_conf(resolver._read(vantage, "resolv.conf"))
        self._socks = resolver._open_sockets(vantage, self._conf.nameservers)

    def reverse(self, addr: str) -> str | None:
        """The hosts file's name for addr, else a PTR answer's; None without one."""
        from mace_tools.probe import resolver

        name = hosts_reverse(self._hosts, addr)
        if name is not None:
            return name
        answer = resolver._ask(self._socks, addr, self._conf, ptr_query, parse_ptr_answer)
        return None if answer is None else answer[1]  # (no such name: an answer too)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


def own_reverse(addr: str) -> str | None:
    """A reverse lookup from our own netns and files: glibc's getnameinfo."""
    try:
        return socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)[0]
    except OSError:
        return None


class Namer:
    """A sender as ping prints it, "NAME (ADDR)" or "ADDR"; one lookup per address.
    Made before the run (module docstring of VantageLookups); close() when it is over."""

    def __init__(self, vantage: Vantage | None) -> None:
        self._lookups = None if vantage is None else VantageLookups(vantage)
        self._known: dict[str, str] = {}

    def __call__(self, addr: str) -> str:
        shown = self._known.get(addr)
        if shown is None:
            name = own_reverse(addr) if self._lookups is None else self._lookups.reverse(addr)
            shown = f"{name} ({addr})" if name and name != addr else addr
            self._known[addr] = shown
        return shown

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.close()
