"""Where a run probes from, and the target's address as seen from there.

The probing netns (--netns, --pid, --container; a probe's source in mace-agent) and the
files that resolve names there (the container's own /etc/hosts and resolv.conf, read
below its root: probe/resolver.py), and the address iputils would take for a host.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mace_tools.errors import MaceError

if TYPE_CHECKING:
    from mace_tools.probe.resolver import Vantage


@dataclass(frozen=True, slots=True)
class ProbeSite:
    """Where probes leave from (netns_path; None: ours) and whose files resolve names."""
    netns_path: Path | None = None
    vantage: Vantage | None = None


def host_name_bytes(host: str) -> bytes:
    """host as getaddrinfo gets it: ASCII as is (glibc then judges it, as it does ping's),
    anything else IDNA-encoded. Python's str path would raise UnicodeError on a label over
    63 characters; glibc says "Name or service not known", and we say what ping says."""
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        pass
    try:
        return host.encode("idna")
    except UnicodeError:  # also lone surrogates from undecodable argv bytes
        raise MaceError(f"{host}: Parameter string not correctly encoded") from None


def resolve_address(host: str, site: ProbeSite, family: int | None) -> str:
    """The address of host that ping takes, as the probing netns would resolve it: as
    iputils, getaddrinfo for any family, then the first address of the family -4 or -6
    want (none: "Address family for hostname not supported"), failing as ping does. An
    IPv6 address of a scope keeps its %interface."""
    name = host_name_bytes(host)
    if site.vantage is not None:
        from mace_tools.probe.resolver import resolve

        try:
            return resolve(host, site.vantage, family)
        except (ValueError, UnicodeError):  # a name no resolver could carry
            raise MaceError(f"{host}: Name or service not known") from None
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_RAW)
    except socket.gaierror as exc:
        raise MaceError(f"{host}: {exc.strerror}") from exc
    return pick_address(host, infos, family)


def pick_address(host: str, infos: list, family: int | None) -> str:
    """The address iputils takes of getaddrinfo's answer for host: the first of the
    family -4/-6 want (any: None), an IPv6 one of a scope with its %interface."""
    wanted = None if family is None else {4: socket.AF_INET, 6: socket.AF_INET6}[family]
    for info_family, *_, sockaddr in infos:
        if wanted is None or info_family == wanted:
            address, *scope = sockaddr
            if scope and scope[-1]:  # a link-local address: its interface, as ping keeps it
                return f"{address}%{_interface_name(scope[-1])}"
            return address
    raise MaceError(f"{host}: Address family for hostname not supported")


def _interface_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def probe_site(netns: str | None, pid: int | None, container: str | None,
               runtime: str) -> ProbeSite:
    """Where probes are sent from: --netns, --pid or --container (one at most)."""
    if netns is None and pid is None and container is None:
        return ProbeSite()  # the fast path: nothing to import
    from mace_tools.probe import netns as netns_mod
    from mace_tools.probe.resolver import vantage_of

    if container is not None:
        if netns is not None or pid is not None:
            raise MaceError("--container, --netns and --pid are mutually exclusive")
        from mace_tools.probe.containers import find

        found = find(container, runtime)
        return ProbeSite(found.netns_path, vantage_of(None, found.pid, found.netns_path))
    path = netns_mod.resolve(netns, pid)
    return ProbeSite(path, vantage_of(netns, pid, path))
