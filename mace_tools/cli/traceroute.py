"""`mace-traceroute`: Linux traceroute's options in, per-hop raw and corrected RTTs out.

Exit codes as traceroute: 2 on bad arguments, 1 on runtime errors, 0 otherwise.
"""

from __future__ import annotations

import sys
from typing import Annotated, NamedTuple

import typer

from mace_tools.cli.common import (
    INT_MAX,
    AgentOption,
    ContainerOption,
    ListContainersOption,
    RuntimeOption,
    c_double,
    c_long,
    drop_privileges,
    output_mode,
    parse_nonce,
    probe_site,
    required_host,
    resolve_ipv4,
    run_app,
)
from mace_tools.errors import MaceError

PROG = "mace-traceroute"
DEFAULT_PACKETLEN, MIN_PACKETLEN, MAX_PACKETLEN = 60, 40, 65000

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})


# Bad arguments are worded as Linux traceroute words them (traceroute.c and its option
# parser): "Cannot handle `-q' option with arg `x'", "first hop out of range", ...
MAX_HOPS = 255
MAX_PROBES = 10
MAX_SECONDS = INT_MAX / 1000  # -w and -z: as ping's -i bound; keeps every wait in epoll's range


def _option_int(option: str, text: str) -> int:
    value = c_long(text)
    if value is None:
        raise MaceError(f"Cannot handle `{option}' option with arg `{text}'")
    return value


def _in_range(option: str, text: str, lo: int, hi: int) -> int:
    value = _option_int(option, text)
    if not lo <= value <= hi:
        raise MaceError(f"Cannot handle `{option}' option with arg `{text}'")
    return value


def _finite_seconds(text: str) -> float | None:
    value = c_double(text)
    return value if value is not None and 0 <= value <= MAX_SECONDS else None  # nan fails


def _wait(value: str) -> float:
    """-w MAX[,HERE,NEAR]: all must be numbers >= 0 (finite); only MAX (seconds to wait
    for a probe) is used."""
    parts = value.split(",")
    seconds = [_finite_seconds(p) for p in parts]
    if len(parts) > 3 or any(s is None for s in seconds):
        raise MaceError(f"bad wait specifications `{value}' used")
    assert seconds[0] is not None
    return seconds[0]


def _sendwait(value: str) -> float:
    seconds = _finite_seconds(value)
    if seconds is None:
        raise MaceError(f"bad sendtime `{value}' specified")
    return seconds


def _packetlen(text: str | None) -> int:
    if text is None:
        return DEFAULT_PACKETLEN
    value = c_long(text)
    if value is None or value < MIN_PACKETLEN:
        raise MaceError(f'Cannot handle "packetlen" cmdline arg `{text}\' on position 2')
    if value > MAX_PACKETLEN:
        raise MaceError(f"too big packetlen {value} specified")
    return value


class _Hops(NamedTuple):
    first: int
    max: int
    queries: int


def _hops(first: str, max_hops: str, queries: str) -> _Hops:
    first_ttl = _option_int("-f", first)
    max_ttl = _option_int("-m", max_hops)
    nqueries = _option_int("-q", queries)
    if max_ttl > MAX_HOPS:
        raise MaceError(f"max hops cannot be more than {MAX_HOPS}")
    if not 1 <= first_ttl <= max_ttl:
        raise MaceError(f"first hop out of range (-f {first_ttl} > -m {max_ttl})"
                        if first_ttl > max_ttl >= 1 else "first hop out of range")
    if not 1 <= nqueries <= MAX_PROBES:
        raise MaceError(f"no more than {MAX_PROBES} probes per hop")
    return _Hops(first_ttl, max_ttl, nqueries)


@app.command(help="Trace the route to HOST from a container's network namespace; print "
                  "raw and container-corrected RTTs per probe.")
def traceroute(
    host: Annotated[str | None, typer.Argument(metavar="HOST", show_default=False)] = None,
    packetlen: Annotated[str | None, typer.Argument(metavar="[PACKETLEN]",
                                                    help="IP packet size (default 60)")]
    = None,
    icmp: Annotated[bool, typer.Option("-I", "--icmp", help="ICMP echo probes")] = False,
    tcp: Annotated[bool, typer.Option("-T", "--tcp", help="TCP SYN probes")] = False,
    udp: Annotated[bool, typer.Option("-U", "--udp", help="UDP probes (default)")] = False,
    # Numbers are taken as text and checked (below) as traceroute checks them.
    first_ttl: Annotated[str, typer.Option("-f", "--first", metavar="FIRST_TTL")] = "1",
    max_ttl: Annotated[str, typer.Option("-m", "--max-hops", metavar="MAX_TTL")] = "30",
    nqueries: Annotated[str, typer.Option("-q", "--queries", metavar="NQUERIES")] = "3",
    wait: Annotated[str, typer.Option("-w", "--wait", help="MAX[,HERE,NEAR] seconds")] = "5",
    squeries: Annotated[str, typer.Option("-N", "--sim-queries", metavar="SQUERIES")] = "16",
    port: Annotated[str | None, typer.Option("-p", "--port", metavar="PORT")] = None,
    numeric: Annotated[bool, typer.Option("-n", help="numeric (always: no reverse DNS)")]
    = False,
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 (the default)")] = False,
    sendwait: Annotated[str, typer.Option("-z", "--sendwait", metavar="SECONDS",
                                          help="seconds between probes")] = "0",
    paris: Annotated[bool, typer.Option(
        "--paris", help="constant flow id: UDP ports fixed (checksum identifies the probe), "
        "ICMP checksum fixed; TCP is always one flow")] = False,
    netns: Annotated[str | None, typer.Option("--netns", help="probe from this netns")] = None,
    pid: Annotated[int | None, typer.Option("--pid", min=1, max=INT_MAX)] = None,
    container: ContainerOption = None,
    runtime: RuntimeOption = "auto",
    list_containers: ListContainersOption = False,
    json_out: Annotated[bool, typer.Option("--json", help="RIPE Atlas traceroute JSON")]
    = False,
    ndjson: Annotated[bool, typer.Option("--ndjson", help="one JSON record per hop")] = False,
    nonce: Annotated[str | None, typer.Option("--nonce", help="16 hex digits")] = None,
    agent: AgentOption = None,
    version: Annotated[bool, typer.Option("-V", "--version")] = False,
) -> None:
    host = required_host(PROG, version, list_containers, runtime, host)
    from mace_tools.output.traceroute import TraceOutput
    from mace_tools.probe.trace import ICMP, TCP, UDP
    from mace_tools.sources import event_sources
    from mace_tools.tracer import TraceOptions, Tracer

    if sum((icmp, tcp, udp)) > 1:
        raise MaceError("-I, -T and -U are mutually exclusive")
    mode = output_mode(json_out, ndjson)
    hops = _hops(first_ttl, max_ttl, nqueries)
    size = _packetlen(packetlen)
    method = ICMP if icmp else TCP if tcp else UDP
    wait_s, sendwait_s = _wait(wait), _sendwait(sendwait)
    simultaneous = _in_range("-N", squeries, 1, 1000)
    port_n = None if port is None else _in_range("-p", port, 1, 65535)
    site = probe_site(netns, pid, container, runtime)
    addr = resolve_ipv4(host, site)
    opts = TraceOptions(dst_addr=addr, method=method, first_ttl=hops.first, max_ttl=hops.max,
                        nqueries=hops.queries, wait_s=wait_s, simultaneous=simultaneous,
                        port=port_n, sendwait_s=sendwait_s, size=size, paris=paris,
                        netns_path=site.netns_path)
    output = TraceOutput(mode, dst_name=host, dst_addr=addr, method=method, max_ttl=hops.max,
                         size=size, paris=paris)
    try:
        sources = event_sources(PROG, agent, site.netns_path, nonce is not None)
        result = Tracer(opts, output, nonce=parse_nonce(nonce), after_setup=drop_privileges,
                        backend_factory=sources).run()
    except MaceError as exc:  # past the arguments, failures are runtime errors: exit 1
        raise MaceError(str(exc), exit_code=1) from exc
    output.finish(result)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
