"""`mace-traceroute`: Linux traceroute's options in, per-hop raw and corrected RTTs out.

Exit codes as traceroute: 2 on bad arguments, 1 on runtime errors, 0 otherwise.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mace_tools.cli.common import (
    ContainerOption,
    ListContainersOption,
    RuntimeOption,
    output_mode,
    parse_nonce,
    probe_site,
    required_host,
    resolve_ipv4,
    run_app,
)
from mace_tools.errors import MaceError

PROG = "mace-traceroute"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _wait(value: str) -> float:
    """-w MAX[,HERE,NEAR]: only MAX (seconds to wait for a probe) is used."""
    try:
        wait = float(value.split(",")[0])
    except ValueError:
        raise MaceError(f"invalid wait '{value}'") from None
    if wait < 0:
        raise MaceError(f"invalid wait '{value}'")
    return wait


@app.command(help="Trace the route to HOST from a container's network namespace; print "
                  "raw and container-corrected RTTs per probe.")
def traceroute(
    host: Annotated[str | None, typer.Argument(metavar="HOST", show_default=False)] = None,
    packetlen: Annotated[int, typer.Argument(metavar="[PACKETLEN]", min=40, max=65000,
                                             help="IP packet size")] = 60,
    icmp: Annotated[bool, typer.Option("-I", "--icmp", help="ICMP echo probes")] = False,
    tcp: Annotated[bool, typer.Option("-T", "--tcp", help="TCP SYN probes")] = False,
    udp: Annotated[bool, typer.Option("-U", "--udp", help="UDP probes (default)")] = False,
    first_ttl: Annotated[int, typer.Option("-f", "--first", min=1, max=255)] = 1,
    max_ttl: Annotated[int, typer.Option("-m", "--max-hops", min=1, max=255)] = 30,
    nqueries: Annotated[int, typer.Option("-q", "--queries", min=1, max=10)] = 3,
    wait: Annotated[str, typer.Option("-w", "--wait", help="MAX[,HERE,NEAR] seconds")] = "5",
    squeries: Annotated[int, typer.Option("-N", "--sim-queries", min=1, max=1000)] = 16,
    port: Annotated[int | None, typer.Option("-p", "--port", min=1, max=65535)] = None,
    numeric: Annotated[bool, typer.Option("-n", help="numeric (always: no reverse DNS)")]
    = False,
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 (the default)")] = False,
    sendwait: Annotated[float, typer.Option("-z", "--sendwait", min=0.0,
                                            help="seconds between probes")] = 0.0,
    paris: Annotated[bool, typer.Option(
        "--paris", help="constant flow id: UDP ports fixed (checksum identifies the probe), "
        "ICMP checksum fixed; TCP is always one flow")] = False,
    netns: Annotated[str | None, typer.Option("--netns", help="probe from this netns")] = None,
    pid: Annotated[int | None, typer.Option("--pid", min=1)] = None,
    container: ContainerOption = None,
    runtime: RuntimeOption = "auto",
    list_containers: ListContainersOption = False,
    json_out: Annotated[bool, typer.Option("--json", help="RIPE Atlas traceroute JSON")]
    = False,
    ndjson: Annotated[bool, typer.Option("--ndjson", help="one JSON record per hop")] = False,
    nonce: Annotated[str | None, typer.Option("--nonce", help="16 hex digits")] = None,
    version: Annotated[bool, typer.Option("-V", "--version")] = False,
) -> None:
    host = required_host(PROG, version, list_containers, runtime, host)
    from mace_tools.output.traceroute import TraceOutput
    from mace_tools.probe.trace import ICMP, TCP, UDP
    from mace_tools.tracer import TraceOptions, Tracer

    if sum((icmp, tcp, udp)) > 1:
        raise MaceError("-I, -T and -U are mutually exclusive")
    mode = output_mode(json_out, ndjson)
    if first_ttl > max_ttl:
        raise MaceError(f"first hop out of range (-f {first_ttl} > -m {max_ttl})")
    method = ICMP if icmp else TCP if tcp else UDP
    site = probe_site(netns, pid, container, runtime)
    addr = resolve_ipv4(host, site)
    opts = TraceOptions(dst_addr=addr, method=method, first_ttl=first_ttl, max_ttl=max_ttl,
                        nqueries=nqueries, wait_s=_wait(wait), simultaneous=squeries,
                        port=port, sendwait_s=sendwait, size=packetlen, paris=paris,
                        netns_path=site.netns_path)
    output = TraceOutput(mode, dst_name=host, dst_addr=addr, method=method, max_ttl=max_ttl,
                         size=packetlen, paris=paris)
    try:
        result = Tracer(opts, output, nonce=parse_nonce(nonce)).run()
    except MaceError as exc:  # past the arguments, failures are runtime errors: exit 1
        raise MaceError(str(exc), exit_code=1) from exc
    output.finish(result)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
