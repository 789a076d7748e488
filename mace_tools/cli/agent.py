"""`mace-agent`: the host service that gives unprivileged containers corrected RTTs.

Runs on the host as root (or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN: loading the
programs, finding an attached set by its link ids, reading clients' network namespaces
through their pidfds), holds the program set, and serves clients on a unix socket until
SIGTERM or SIGINT (README "Many containers, one host"; protocol: agent/protocol.py).
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mace_tools.agent.protocol import DEFAULT_PROBE_RATE, DEFAULT_SOCKET
from mace_tools.cli.typer_app import run_app
from mace_tools.errors import MaceError

if TYPE_CHECKING:
    from mace_tools.agent.probes import PingMetrics
    from mace_tools.agent.server import Agent

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
    probe_rate: Annotated[int, typer.Option(
        "--probe-rate", min=0, max=1_000_000_000, metavar="N", help="probes a second each "
        "client run gets kernel data for (a second's worth at once); past it, its probes "
        "are measured raw and counted lost; 0: no limit")] = DEFAULT_PROBE_RATE,
    metrics: Annotated[str | None, typer.Option(
        "--metrics", metavar="[ADDR:]PORT", help="serve Prometheus metrics on "
        "http://ADDR:PORT/metrics (ADDR: default every IPv4 address; IPv6 in brackets)")
    ] = None,
    probe: Annotated[list[str] | None, typer.Option(
        "--probe", metavar="[FROM=]TARGET", help="ping TARGET continuously from FROM's "
        "network namespace (netns:NAME, pid:N, container:NAME; none: the host) and export "
        "it; repeatable")] = None,
    probe_interval: Annotated[float, typer.Option(
        "--probe-interval", metavar="SECONDS", help="seconds between a probe's pings")] = 1.0,
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE", help="probes from a TOML file ([[probe]] tables with "
        "source, target, interval)")] = None,
    idle_detach: Annotated[str, typer.Option(
        "--idle-detach", metavar="SECONDS|never", help="with no run on for this long, "
        "detach the programs (they cost every packet on the host while attached); the "
        "next run attaches them again")] = "5",
    runtime: Annotated[str, typer.Option(
        "--runtime", help="how container:NAME sources are found: docker, podman, "
        "containerd (via ctr), crio (via crictl) or auto")] = "auto",
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="a line per client and "
                                          "run on stderr")] = False,
    version: Annotated[bool, typer.Option("-V", "--version", help="print version")] = False,
) -> None:
    if version:
        from mace_tools import __version__

        print(f"{PROG} {__version__}")
        return
    from mace_tools.agent import probeconfig
    from mace_tools.agent.server import Agent, AgentOptions

    idle_detach_s = _idle_detach(idle_detach)
    every = probeconfig.interval(probe_interval, "--probe-interval")
    specs = [probeconfig.parse_probe(text, every) for text in probe or []]
    if config is not None:
        specs += probeconfig.load_config(config, every)
    probeconfig.checked(specs)
    if specs and metrics is None:
        raise MaceError("probes need --metrics (their results are only exported)")
    listen_on = None
    if metrics is not None:
        from mace_tools.agent.exporter import parse_listen

        listen_on = parse_listen(metrics)
    if specs:
        from mace_tools.probe.containers import available_runtimes

        if any(s.source_kind == "container" for s in specs) and runtime != "auto":
            available_runtimes(runtime)  # an unknown --runtime fails now, not per probe
    options = AgentOptions(socket_path=socket_path, group=group, reveal_path=reveal_path,
                           max_clients=max_clients, runs_per_client=runs_per_client,
                           runs_per_user=runs_per_user, runs_per_netns=runs_per_netns,
                           probe_rate=probe_rate, idle_detach_s=idle_detach_s,
                           verbose=verbose)
    with Agent(options) as service, _exporting(service, listen_on) as ping_metrics:
        service.listen()
        print(f"{PROG}: serving on {socket_path}"
              f"{' (program set loaded)' if service.loaded else ''}", file=sys.stderr)
        if ping_metrics is not None:
            service.start_probes(specs, ping_metrics, runtime)
        service.serve()
    print(f"{PROG}: stopped", file=sys.stderr)


MAX_IDLE_DETACH_S = 86400.0


def _idle_detach(text: str) -> float | None:
    """--idle-detach: seconds (finite, 0 to a day), or never (None)."""
    if text.strip().lower() == "never":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0.0 <= seconds <= MAX_IDLE_DETACH_S:
        raise MaceError(f"--idle-detach: bad value {text!r} (seconds from 0 to "
                        f"{MAX_IDLE_DETACH_S:g}, or never)")
    return seconds


@contextmanager
def _exporting(service: Agent, listen_on: tuple[str, int] | None) \
        -> Iterator[PingMetrics | None]:
    """The metrics server, when --metrics asks for one; the probes' metric families."""
    if listen_on is None:
        yield None
        return
    from mace_tools.agent.exporter import MetricsServer
    from mace_tools.agent.metrics import Registry
    from mace_tools.agent.probes import PingMetrics

    registry = Registry()
    registry.gauge_callback("mace_agent_clients", "Clients connected to the agent's socket",
                            lambda: service.clients)
    registry.gauge_callback("mace_agent_programs_attached", "1 while the agent holds the "
                            "program set attached, 0 while idle (--idle-detach)",
                            lambda: int(service.attached))
    registry.gauge_callback("mace_agent_runs", "Runs the agent serves now: its clients' "
                            "and its own probes'", lambda: service.runs)
    ping_metrics = PingMetrics(registry)
    server = MetricsServer(*listen_on, registry,
                           lambda line: print(f"{PROG}: {line}", file=sys.stderr))
    host, port = server.address
    print(f"{PROG}: metrics on http://{f'[{host}]' if ':' in host else host}:{port}/metrics",
          file=sys.stderr)
    try:
        yield ping_metrics
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    # SIGTERM before the service is up (systemd stopping a slow start) unwinds like Ctrl-C,
    # so whatever was set up is released; serving, the service's own handler takes over.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
