"""How ping names hosts, from the netns and files the probes are sent from.

- The target: ping prints the name getaddrinfo gives as canonical (AI_CANONNAME), in its
  header and statistics; the name as typed when it has none, and an address as typed.
- Senders of replies and ICMP errors: "NAME (ADDR)" by a reverse lookup (getnameinfo),
  or the address alone when the lookup gives no name. ping does the lookup unless -n, -f
  or an address was given as the target (-H forces it); the CLI never builds a Namer
  then, so those runs pay nothing for it.

From the process's own netns this is glibc's getaddrinfo/getnameinfo (the files and DNS
servers of the host it runs on). From another vantage (--netns, --pid, --container) it is
resolver.ReverseResolver, as for traceroute's hop names: the vantage's /etc/hosts (its
first name for an address, as glibc's "files" gives), then a PTR query to the servers of
its resolv.conf, asked from inside its netns, set up while the run may still enter it.
Either way a name no host could have (a hostile server's terminal escapes) is not shown.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from mace_tools.probe.hopnames import shown_name

if TYPE_CHECKING:  # (resolver is imported only for a vantage: start-up stays light)
    from mace_tools.probe.resolver import ReverseResolver, Vantage


def canonical_name(host: str, addr: str, vantage: Vantage | None) -> str:
    """The name ping prints for a name target (module docstring) once resolved from a
    vantage: the hosts file's canonical name, else the name as typed (a DNS answer's
    CNAME chain is not followed here)."""
    if vantage is None:
        return host
    from mace_tools.probe import resolver

    # (a container's hosts file is its own: a name no host could have is not printed)
    return shown_name(hosts_canonical(resolver._read(vantage, "hosts"), host, addr)) or host


def hosts_canonical(text: str, name: str, addr: str) -> str | None:
    """The canonical (first) name of the hosts line that gave name its address."""
    wanted = name.rstrip(".").lower()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == addr and wanted in (w.lower() for w in words[1:]):
            return words[1]
    return None


def own_reverse(addr: str) -> str | None:
    """A reverse lookup from our own netns and files: glibc's getnameinfo."""
    try:
        return shown_name(socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)[0])
    except (OSError, UnicodeError):  # (a hosts file's name that is not UTF-8)
        return None


class Namer:
    """A sender as ping prints it, "NAME (ADDR)" or "ADDR"; one lookup per address.
    Made before the run drops its privileges (module docstring); close() when done."""

    def __init__(self, vantage: Vantage | None) -> None:
        self._lookups: ReverseResolver | None = None
        if vantage is not None:
            from mace_tools.probe.resolver import ReverseResolver

            self._lookups = ReverseResolver(vantage)
        self._known: dict[str, str] = {}

    def __call__(self, addr: str) -> str:
        shown = self._known.get(addr)
        if shown is None:
            name = own_reverse(addr) if self._lookups is None else self._lookups(addr)
            shown = f"{name} ({addr})" if name and name != addr else addr
            self._known[addr] = shown
        return shown

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.close()
