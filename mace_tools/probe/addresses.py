"""Socket addresses of the targets and sources a run is given as text, and the text of
the addresses replies come from.

Python takes an IPv6 address of a scope (a link-local one: fe80::1%eth0) as text but drops
its %scope when it builds the sockaddr: sin6_scope_id comes from the tuple's 4th item, 0
unless given. So a scope (an interface name, or an index) is looked up here, in the netns
the caller is in when it makes the run's sockets: the probing one, whose interfaces the
scope names, not the one mace started in.
"""

from __future__ import annotations

import socket

from mace_tools.errors import MaceError

SockAddr = tuple[str, int] | tuple[str, int, int, int]

_TEXT_CACHE_LIMIT = 4096  # distinct addresses whose text is kept: bounded whatever comes in
_texts: dict[bytes, str] = {}


def address_text(raw: bytes) -> str:
    """A packet's IPv4 (4 bytes) or IPv6 (16 bytes) address as text. A flood's replies all
    come from one address: its text is made once, not per reply."""
    text = _texts.get(raw)
    if text is None:
        text = socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
        if len(_texts) < _TEXT_CACHE_LIMIT:
            _texts[raw] = text
    return text


def packed(address: str) -> bytes:
    """A numeric IPv4 or IPv6 address (an IPv6 %scope dropped) as a packet carries it;
    OSError if the text is neither."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    return socket.inet_pton(socket.AF_INET, address)


def sockaddr(address: str, port: int = 0) -> SockAddr:
    """(address, port) for IPv4; (address, port, 0, scope id) for IPv6, the %scope of the
    text looked up in the current netns (MaceError, in ping's words, if it names none)."""
    host, percent, scope = address.partition("%")
    if ":" not in host:
        return host, port
    if not percent:
        return host, port, 0, 0
    if scope.isdigit():
        return host, port, 0, int(scope)
    try:
        return host, port, 0, socket.if_nametoindex(scope)
    except OSError:
        raise MaceError(f"{address}: Name or service not known") from None
