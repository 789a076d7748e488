"""Hop names for mace-traceroute's text: traceroute resolves every hop's address unless -n
(getnameinfo), and prints `NAME (ADDR)`, or `ADDR (ADDR)` where there is no name.

From the caller's own netns the system's resolver is the probing netns' (its files, its
servers): glibc's getnameinfo, as traceroute. From another netns (--netns, --pid,
--container) the resolver module asks as that netns would (resolver.ReverseResolver).
Either way a name is looked up once per run, and one that no host could have (a hostile
server's terminal escapes, say) is not shown.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mace_tools.probe.resolver import Vantage

# What a name shown to the user may hold: host name characters (RFC 952/1123, and the "_"
# some zones use).
_SHOWN_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


class HopNames(Protocol):
    def __call__(self, addr: str) -> str | None: ...
    def close(self) -> None: ...


def shown_name(name: str | None) -> str | None:
    """name without the root's dot, if it is one a host could have; else None."""
    name = name.rstrip(".") if name else None
    return name if name and _SHOWN_NAME.fullmatch(name) else None


class SystemNames:
    """getnameinfo in the caller's netns, as traceroute asks it (NI_NAMEREQD: a missing
    name is None, not the address)."""

    def __init__(self) -> None:
        self._names: dict[str, str | None] = {}

    def __call__(self, addr: str) -> str | None:
        if addr not in self._names:
            try:
                name = socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)[0]
            except (socket.gaierror, OSError, UnicodeError):
                name = None
            self._names[addr] = shown_name(name)
        return self._names[addr]

    def close(self) -> None:
        pass


def open_names(vantage: Vantage | None) -> HopNames:
    """The run's hop names, from where it probes (vantage None: the caller's netns). Opens
    what the lookups need now, while the run may still enter that netns."""
    if vantage is None:
        return SystemNames()
    from mace_tools.probe.resolver import ReverseResolver

    return ReverseResolver(vantage)
