"""`mace-ping`: iputils ping options in, raw and corrected RTTs out.

Parsing and wiring only: options -> PingOptions -> Pinger -> an output sink. Start-up
matters (cron jobs run `mace-ping -c 1` by the thousand): nothing heavy is imported here;
libbpf is bound when the run starts, scapy and rich are never imported on this path.
"""

from __future__ import annotations

import signal
import socket
import sys
from typing import Annotated, NamedTuple

import typer

from mace_tools.cli.common import (
    INT_MAX,
    LONG_MAX,
    UINT_MAX,
    AgentOption,
    ContainerOption,
    ListContainersOption,
    RuntimeOption,
    drop_privileges,
    ip_family,
    output_mode,
    parse_nonce,
    ping_strtod,
    probe_site,
    required_host,
    resolve_address,
    run_app,
    seconds_or_err,
    strtol_or_err,
)
from mace_tools.errors import MaceError

PROG = "mace-ping"
MAX_PAYLOAD = 65507  # 65535 - 20 (IPv4) - 8 (ICMP), as iputils

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(help="Ping HOST from a container's network namespace; print raw and "
                  "container-corrected RTTs from per-packet eBPF kernel timestamps.")
def ping(
    host: Annotated[str | None, typer.Argument(metavar="HOST", show_default=False)] = None,
    # Numbers are taken as text and checked as iputils checks them (cli/common.py), so
    # nan, inf, 1e999 or a count past LONG_MAX get ping's one-line errors.
    count: Annotated[str | None, typer.Option("-c", metavar="COUNT",
                                              help="stop after COUNT replies sent")] = None,
    interval: Annotated[str | None, typer.Option(
        "-i", metavar="SECONDS", help="seconds between probes (default 1; 0 with -f)")] = None,
    size: Annotated[str, typer.Option("-s", metavar="SIZE", help="payload bytes")] = "56",
    ttl: Annotated[str | None, typer.Option("-t", metavar="TTL", help="IP time to live")]
    = None,
    linger: Annotated[str, typer.Option("-W", metavar="SECONDS",
                                        help="seconds to wait for a reply")] = "10",
    deadline: Annotated[str | None, typer.Option("-w", metavar="SECONDS",
                                                 help="stop after SECONDS")] = None,
    quiet: Annotated[bool, typer.Option("-q", help="only the summary")] = False,
    numeric: Annotated[bool, typer.Option(
        "-n", help="numeric output (replies are always shown by address: no reverse DNS)")]
    = False,
    timestamps: Annotated[bool, typer.Option("-D", help="print unix time before each line")]
    = False,
    outstanding: Annotated[bool, typer.Option("-O", help="report unanswered probes")] = False,
    interface: Annotated[str | None, typer.Option("-I", help="interface name or source "
                                                  "address")] = None,
    flood: Annotated[bool, typer.Option("-f", help="flood ping")] = False,
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 only")] = False,
    ipv6: Annotated[bool, typer.Option("-6", help="IPv6 only")] = False,
    netns: Annotated[str | None, typer.Option(
        "--netns", help="probe from this network namespace: `ip netns` name or path")] = None,
    pid: Annotated[int | None, typer.Option("--pid", help="probe from PID's network namespace",
                                            min=1, max=INT_MAX)] = None,
    container: ContainerOption = None,
    runtime: RuntimeOption = "auto",
    list_containers: ListContainersOption = False,
    json_out: Annotated[bool, typer.Option("--json", help="one RIPE Atlas style JSON document "
                                           "at the end")] = False,
    ndjson: Annotated[bool, typer.Option("--ndjson", help="one JSON record per probe, then a "
                                         "summary")] = False,
    nonce: Annotated[str | None, typer.Option(
        "--nonce", help="the run's 8-byte probe nonce as 16 hex digits (default: random); "
        "lets a capture filter on it (icmp[8:4], icmp[12:4]); must differ between "
        "concurrent runs")] = None,
    agent: AgentOption = None,
    version: Annotated[bool, typer.Option("-V", "--version", help="print version")] = False,
) -> None:
    host = required_host(PROG, version, list_containers, runtime, host)
    from mace_tools.output.live import make_sink
    from mace_tools.pinger import Pinger, PingOptions
    from mace_tools.sources import event_sources

    numbers = _numbers(count, interval, size, ttl, linger, deadline)
    mode = output_mode(json_out, ndjson)
    site = probe_site(netns, pid, container, runtime)
    addr = resolve_address(host, site, ip_family(ipv4, ipv6))
    device, source = _split_interface(interface)
    opts = PingOptions(
        dst_addr=addr,
        count=numbers.count,
        interval_s=(0.0 if flood else 1.0) if numbers.interval_s is None
        else numbers.interval_s,
        size=numbers.size,
        ttl=numbers.ttl,
        linger_s=numbers.linger_s,
        deadline_s=numbers.deadline_s,
        flood=flood,
        device=device,
        source=source,
        netns_path=site.netns_path,
        report_outstanding=outstanding,
        path=mode != "text",  # the JSON outputs show each reply's path
    )
    sink = make_sink(mode, dst_name=host, dst_addr=addr, size=numbers.size, quiet=quiet,
                     timestamps=timestamps, flood=flood, interface=interface)
    sources = event_sources(PROG, agent, site.netns_path, nonce is not None)
    result = Pinger(opts, sink, nonce=parse_nonce(nonce), backend_factory=sources,
                    after_setup=drop_privileges).run()
    sink.finish(result)
    received = result.tally.received
    wanted = numbers.count
    if received == 0 or (wanted is not None and numbers.deadline_s and received < wanted):
        raise typer.Exit(1)


class _Numbers(NamedTuple):
    count: int | None
    interval_s: float | None
    size: int
    ttl: int | None
    linger_s: float
    deadline_s: float | None


def _numbers(count: str | None, interval: str | None, size: str, ttl: str | None,
             linger: str, deadline: str | None) -> _Numbers:
    """The numeric options, checked and worded as iputils' ping.c (its bounds: -i up to
    INT_MAX ms, -W up to UINT_MAX µs; -t from 1, as the kernel refuses a TTL of 0)."""
    payload = strtol_or_err(size, 0, INT_MAX)
    if payload > MAX_PAYLOAD:
        raise MaceError(f"invalid -s value: '{payload}': out of range: "
                        f"0 <= value <= {MAX_PAYLOAD}")
    return _Numbers(
        count=None if count is None else strtol_or_err(count, 1, LONG_MAX),
        interval_s=None if interval is None else
        ping_strtod(interval, 0.0, INT_MAX / 1000, "bad timing interval"),
        size=payload,
        ttl=None if ttl is None else strtol_or_err(ttl, 1, 255),
        linger_s=ping_strtod(linger, 0.0, UINT_MAX / 1_000_000, "bad linger time"),
        deadline_s=None if deadline is None else seconds_or_err(deadline, INT_MAX),
    )


def _split_interface(value: str | None) -> tuple[str | None, str | None]:
    """-I takes an interface name or a source address, as iputils."""
    if value is None:
        return None, None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
        except OSError:
            continue
        return None, value
    return value, None


def main(argv: list[str] | None = None) -> int:
    # As iputils: Ctrl-C (SIGINT) ends the run with its summary even where mace-ping was
    # started with SIGINT ignored (a script's background job, nohup), which Python keeps.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
