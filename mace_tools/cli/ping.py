"""`mace-ping`: iputils ping options in, raw and corrected RTTs out.

Parsing and wiring only: options -> PingOptions -> Pinger -> an output sink. Start-up
matters (cron jobs run `mace-ping -c 1` by the thousand): nothing heavy is imported here;
libbpf is bound when the run starts, scapy and rich are never imported on this path.
"""

from __future__ import annotations

import socket
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
    count: Annotated[int | None, typer.Option("-c", help="stop after COUNT replies sent",
                                              min=1)] = None,
    interval: Annotated[float | None, typer.Option(
        "-i", help="seconds between probes (default 1; 0 with -f)", min=0.0)] = None,
    size: Annotated[int, typer.Option("-s", help="payload bytes", min=0,
                                      max=MAX_PAYLOAD)] = 56,
    ttl: Annotated[int | None, typer.Option("-t", help="IP time to live", min=1,
                                            max=255)] = None,
    linger: Annotated[float, typer.Option("-W", help="seconds to wait for a reply",
                                          min=0.0)] = 10.0,
    deadline: Annotated[float | None, typer.Option("-w", help="stop after SECONDS",
                                                   min=0.0)] = None,
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
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 only (the default)")] = False,
    netns: Annotated[str | None, typer.Option(
        "--netns", help="probe from this network namespace: `ip netns` name or path")] = None,
    pid: Annotated[int | None, typer.Option("--pid", help="probe from PID's network namespace",
                                            min=1)] = None,
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
    version: Annotated[bool, typer.Option("-V", "--version", help="print version")] = False,
) -> None:
    host = required_host(PROG, version, list_containers, runtime, host)
    from mace_tools.output.live import make_sink
    from mace_tools.pinger import Pinger, PingOptions

    mode = output_mode(json_out, ndjson)
    site = probe_site(netns, pid, container, runtime)
    addr = resolve_ipv4(host, site)
    device, source = _split_interface(interface)
    opts = PingOptions(
        dst_addr=addr,
        count=count,
        interval_s=(0.0 if flood else 1.0) if interval is None else interval,
        size=size,
        ttl=ttl,
        linger_s=linger,
        deadline_s=deadline,
        flood=flood,
        device=device,
        source=source,
        netns_path=site.netns_path,
        report_outstanding=outstanding,
    )
    sink = make_sink(mode, dst_name=host, dst_addr=addr, size=size, quiet=quiet,
                     timestamps=timestamps, flood=flood, interface=interface)
    result = Pinger(opts, sink, nonce=parse_nonce(nonce)).run()
    sink.finish(result)
    received = result.tally.received
    if received == 0 or (count is not None and deadline is not None and received < count):
        raise typer.Exit(1)


def _split_interface(value: str | None) -> tuple[str | None, str | None]:
    """-I takes an interface name or a source address, as iputils."""
    if value is None:
        return None, None
    try:
        socket.inet_aton(value)
    except OSError:
        return value, None
    return None, value


def main(argv: list[str] | None = None) -> int:
    return run_app(app, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
