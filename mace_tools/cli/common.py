"""What every mace command does around its typer app: one line on stderr and ping's
exit codes for any failure, never a traceback."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from click.exceptions import ClickException

from mace_tools.errors import MaceError

if TYPE_CHECKING:
    from mace_tools.probe.resolver import Vantage

# The container options, the same in every mace command.
ContainerOption = Annotated[str | None, typer.Option(
    "--container", help="probe from a Docker, Podman or CRI container (name or id)")]
RuntimeOption = Annotated[str, typer.Option(
    "--runtime", help="docker, podman, crio (via crictl) or auto")]
ListContainersOption = Annotated[bool, typer.Option(
    "--list-containers", help="list the containers that can be measured, and exit")]


def run_app(app: typer.Typer, prog: str, argv: list[str] | None = None,
            errors: tuple[type[Exception], ...] = ()) -> int:
    """Run app; MaceError and `errors` print `prog: message` and exit 2 (or their code)."""
    command = typer.main.get_command(app)
    try:
        # Without standalone mode click returns (not raises) the code of typer.Exit.
        status = command.main(args=argv if argv is not None else sys.argv[1:], prog_name=prog,
                              standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (MaceError, *errors) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ClickException as exc:  # bad option or value: one line, as ping's usage errors
        print(f"{prog}: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


@dataclass(frozen=True, slots=True)
class ProbeSite:
    """Where probes leave from (netns_path; None: ours) and whose files resolve names."""
    netns_path: Path | None = None
    vantage: Vantage | None = None


def resolve_ipv4(host: str, site: ProbeSite) -> str:
    """IPv4 address of host (IPv6 comes later) as the probing netns would resolve it,
    failing as ping and traceroute do."""
    if site.vantage is not None:
        from mace_tools.probe.resolver import resolve_ipv4 as resolve_from

        return resolve_from(host, site.vantage)
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_RAW)
    except socket.gaierror as exc:
        raise MaceError(f"{host}: {exc.strerror}") from exc
    return infos[0][4][0]


def parse_nonce(value: str | None) -> bytes | None:
    """--nonce: 16 hex digits, not all zero (None: the run picks a random one)."""
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 8 or not any(raw):
        raise MaceError(f"invalid nonce '{value}': need 16 hex digits, not all zero")
    return raw


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


def required_host(prog: str, version: bool, list_containers: bool, runtime: str,
                  host: str | None) -> str:
    """-V and --list-containers answer and exit; anything else needs HOST."""
    if version:
        from mace_tools import __version__

        print(f"{prog} {__version__}")
        raise typer.Exit(0)
    if list_containers:
        print_containers(runtime)
        raise typer.Exit(0)
    if host is None:
        raise MaceError("missing HOST (see --help)")
    return host


def output_mode(json_out: bool, ndjson: bool) -> str:
    """text, json or ndjson, from --json / --ndjson (not both)."""
    if json_out and ndjson:
        raise MaceError("--json and --ndjson are mutually exclusive")
    return "json" if json_out else "ndjson" if ndjson else "text"


def print_containers(runtime: str) -> None:
    """--list-containers: the running containers mace can measure, with their netns."""
    from mace_tools.probe import netns as netns_mod
    from mace_tools.probe.containers import list_running

    rows = list_running(runtime)
    print(f"{'NAME':24} {'ID':12} {'RUNTIME':8} {'PID':>8}  NETNS")
    for c in rows:
        print(f"{c.name:24} {c.id:12} {c.runtime:8} {c.pid:>8}  "
              f"net:[{netns_mod.inode(c.netns_path)}]")
