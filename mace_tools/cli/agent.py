"""`mace-agent`: the host service that gives unprivileged containers corrected RTTs.

Runs on the host as root (or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN: loading the
programs, finding an attached set by its link ids, reading clients' network namespaces
through their pidfds), holds the program set, and serves clients on a unix socket until
SIGTERM or SIGINT (README "Many containers, one host"; protocol: agent/protocol.py).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from mace_tools.agent.protocol import DEFAULT_SOCKET
from mace_tools.cli.common import run_app

PROG = "mace-agent"

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(help="Serve corrected RTTs to mace-ping and mace-traceroute in any container "
                  "that mounts the socket's directory.")
def agent(
    socket_path: Annotated[Path, typer.Option(
        "--socket", metavar="PATH", help="the unix socket to serve on (its directory must "
        "be root's, writable by no one else)")] = DEFAULT_SOCKET,
    group: Annotated[str | None, typer.Option(
        "--group", metavar="NAME", help="only this group may connect (socket mode 0660; "
        "default: anyone, 0666)")] = None,
    reveal_path: Annotated[bool, typer.Option(
        "--reveal-path", help="give clients host-side device names and addresses")] = False,
    runs_per_client: Annotated[int, typer.Option(
        "--runs-per-client", min=1, max=128, help="concurrent runs on one connection")] = 8,
    runs_per_user: Annotated[int, typer.Option(
        "--runs-per-user", min=1, max=128, help="runs per client uid (ring buffers still "
        "open count)")] = 64,
    runs_per_netns: Annotated[int, typer.Option(
        "--runs-per-netns", min=1, max=128, help="runs per client network namespace "
        "(ring buffers still open count)")] = 16,
    max_clients: Annotated[int, typer.Option(
        "--max-clients", min=1, max=65536, help="concurrent connections")] = 512,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="a line per client and "
                                          "run on stderr")] = False,
    version: Annotated[bool, typer.Option("-V", "--version", help="print version")] = False,
) -> None:
    if version:
        from mace_tools import __version__

        print(f"{PROG} {__version__}")
        return
    from mace_tools.agent.server import Agent, AgentOptions

    options = AgentOptions(socket_path=socket_path, group=group, reveal_path=reveal_path,
                           max_clients=max_clients, runs_per_client=runs_per_client,
                           runs_per_user=runs_per_user, runs_per_netns=runs_per_netns,
                           verbose=verbose)
    with Agent(options) as service:
        service.listen()
        print(f"{PROG}: serving on {socket_path}"
              f"{' (program set loaded)' if service.loaded else ''}", file=sys.stderr)
        service.serve()
    print(f"{PROG}: stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM before the service is up (systemd stopping a slow start) unwinds like Ctrl-C,
    # so whatever was set up is released; serving, the service's own handler takes over.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
