"""`mace-traceroute`: Linux traceroute's options in, per-hop raw and corrected RTTs out.

Exit codes as traceroute: 2 on bad arguments, 1 on runtime errors, 0 otherwise. The
arguments are read and refused as traceroute reads them (traceopts.py). The method is
the last of -I, -T, -U, -M and -P given, as in traceroute (click hands the options over
in the order they were first given).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from mace_tools.cli import traceopts as opt
from mace_tools.cli.common import (
    INT_MAX,
    ProbeSite,
    check_corrections,
    drop_privileges,
    ip_family,
    output_mode,
    parse_nonce,
    probe_site,
    required_host,
    resolve_address,
)
from mace_tools.cli.typer_app import (
    AgentOption,
    ContainerOption,
    CorrectionsOption,
    ListContainersOption,
    RuntimeOption,
    run_app,
)
from mace_tools.errors import MaceError

if TYPE_CHECKING:
    from mace_tools.tracer import TraceOptions

PROG = "mace-traceroute"
DEFAULT_PACKETLEN = {4: 60, 6: 80}  # traceroute's, by family

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})

_NOT_SUPPORTED = {
    "-A": "AS path lookups ask a routing registry's whois server on the Internet "
          "(whois.radb.net), outside the path measured",
    "-g": "IP source routing (LSRR): the kernel programs read only probes without IP "
          "options, and routers drop source-routed packets (RFC 7126)",
    "-UL": "UDP-Lite probes: the kernel programs match only ICMP, UDP and TCP probes",
    "-D": "DCCP probes: the kernel programs match only ICMP, UDP and TCP probes",
    "-l": "IPv6 flow labels: a label the kernel sends needs a lease from its flow label "
          "manager (IPV6_FLOWLABEL_MGR), not built",
}


def _method(name: str) -> Callable[[typer.Context, bool], bool]:
    """A -I/-T/-U callback: the method, if given, in command-line order (the last wins)."""
    def choose(ctx: typer.Context, given: bool) -> bool:
        if given:
            ctx.meta.setdefault("mace_methods", []).append(name)
        return given
    return choose


def _named_method(ctx: typer.Context, name: str | None) -> str | None:
    if name is not None:
        ctx.meta.setdefault("mace_methods", []).append(name)
    return name


def _raw_method(ctx: typer.Context, protocol: str | None) -> str | None:
    if protocol is not None:
        ctx.meta.setdefault("mace_methods", []).append(f"raw={protocol}")
    return protocol


class _Method(NamedTuple):
    method: str  # probe/trace.py's UDP, TCP, ICMP or RAW
    module: str  # traceroute's name of it: default, udp, tcp, icmp or raw
    protocol: int | None  # -P, or -O protocol=


def _chosen_method(ctx: typer.Context) -> _Method:
    """The last of -I -T -U -M -P given (default: the default method)."""
    choice = (ctx.meta.get("mace_methods") or ["default"])[-1]
    if choice.startswith("raw="):
        return _Method(opt.RAW, "raw", opt.protocol_option(choice[4:]))
    method = opt.method_of(choice)
    return _Method(method, choice.lower(), None)


@app.command(help="Trace the route to HOST from a container's network namespace; print "
                  "raw and container-corrected RTTs per probe.")
def traceroute(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Argument(metavar="HOST", show_default=False)] = None,
    packetlen: Annotated[str | None, typer.Argument(
        metavar="[PACKETLEN]", help="IP packet size (default 60)")] = None,
    icmp: Annotated[bool, typer.Option("-I", "--icmp", help="ICMP echo probes",
                                       callback=_method("icmp"))] = False,
    tcp: Annotated[bool, typer.Option("-T", "--tcp", help="TCP SYN probes",
                                      callback=_method("tcp"))] = False,
    udp: Annotated[bool, typer.Option(
        "-U", "--udp", help="UDP probes to one port (default 53)",
        callback=_method("udp"))] = False,
    module: Annotated[str | None, typer.Option(
        "-M", "--module", metavar="name", help="default, udp, icmp, tcp or raw",
        callback=_named_method)] = None,
    protocol: Annotated[str | None, typer.Option(
        "-P", "--protocol", metavar="prot", help="raw IP probes of this protocol",
        callback=_raw_method)] = None,
    method_words: Annotated[list[str] | None, typer.Option(
        "-O", "--options", metavar="OPTS", help="method options (-O help lists them)")]
    = None,
    # Numbers are taken as text and checked (below) as traceroute checks them.
    first_ttl: Annotated[str, typer.Option("-f", "--first", metavar="first_ttl")] = "1",
    max_ttl: Annotated[str, typer.Option("-m", "--max-hops", metavar="max_ttl")] = "30",
    nqueries: Annotated[str, typer.Option("-q", "--queries", metavar="nqueries")] = "3",
    wait: Annotated[str | None, typer.Option(
        "-w", "--wait", metavar="MAX,HERE,NEAR",
        help="wait MAX s for a probe, or HERE x the RTT of its hop's answer, or NEAR x a "
             "later hop's (default 5,3,10)")] = None,
    squeries: Annotated[str, typer.Option("-N", "--sim-queries", metavar="squeries")] = "16",
    port: Annotated[str | None, typer.Option("-p", "--port", metavar="port")] = None,
    sport: Annotated[str | None, typer.Option(
        "--sport", metavar="num", help="source port (implies -N 1)")] = None,
    numeric: Annotated[bool, typer.Option("-n", help="do not resolve hop names")] = False,
    ipv4: Annotated[bool, typer.Option("-4", help="IPv4 only")] = False,
    ipv6: Annotated[bool, typer.Option("-6", help="IPv6 only")] = False,
    sendwait: Annotated[str, typer.Option(
        "-z", "--sendwait", metavar="sendwait",
        help="seconds between probes (over 10: milliseconds)")] = "0",
    interface: Annotated[str | None, typer.Option(
        "-i", "--interface", metavar="device", help="send from this interface")] = None,
    source: Annotated[str | None, typer.Option(
        "-s", "--source", metavar="src_addr", help="source address")] = None,
    dont_fragment: Annotated[bool, typer.Option(
        "-F", "--dont-fragment", help="do not fragment probes")] = False,
    tos: Annotated[str | None, typer.Option("-t", "--tos", metavar="tos")] = None,
    extensions: Annotated[bool, typer.Option(
        "-e", "--extensions", help="show ICMP extensions (MPLS)")] = False,
    mtu: Annotated[bool, typer.Option(
        "--mtu", help="discover the path MTU (implies -F -N 1)")] = False,
    back: Annotated[bool, typer.Option(
        "--back", help="show backward hop counts that differ")] = False,
    debug: Annotated[bool, typer.Option("-d", "--debug", help="SO_DEBUG")] = False,
    dontroute: Annotated[bool, typer.Option(
        "-r", help="bypass the routing table (SO_DONTROUTE)")] = False,
    fwmark: Annotated[str | None, typer.Option("--fwmark", metavar="num")] = None,
    as_lookups: Annotated[bool, typer.Option("-A", "--as-path-lookups", hidden=True)]
    = False,
    gateway: Annotated[list[str] | None, typer.Option("-g", "--gateway", hidden=True)]
    = None,
    udplite: Annotated[bool, typer.Option("-UL", hidden=True)] = False,
    dccp: Annotated[bool, typer.Option("-D", "--dccp", hidden=True)] = False,
    flowlabel: Annotated[str | None, typer.Option("-l", "--flowlabel", hidden=True)] = None,
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
    corrections: CorrectionsOption = "auto",
    version: Annotated[bool, typer.Option("-V", "--version")] = False,
) -> None:
    if version or list_containers:
        required_host(PROG, version, list_containers, runtime, host)
    check_corrections(agent, corrections,
                      any(x is not None for x in (netns, pid, container)),
                      nonce is not None)
    for flag, given in (("-A", as_lookups), ("-g", bool(gateway)), ("-UL", udplite),
                        ("-D", dccp), ("-l", flowlabel is not None)):
        if given:
            raise opt.not_supported(flag, _NOT_SUPPORTED[flag])
    chosen = _chosen_method(ctx)
    try:
        method_options = opt.method_options(chosen.method, chosen.module, method_words or [])
    except opt.MethodHelp as help_text:
        print(help_text.text, file=sys.stderr)
        raise typer.Exit(0) from None
    if host is None:
        raise MaceError('Specify "host" missing argument.')
    mode = output_mode(json_out, ndjson)
    hops = opt.hops_options(first_ttl, max_ttl, nqueries)
    wait_spec = opt.wait_option(wait)
    size = opt.packetlen_argument(packetlen)
    sendwait_s = opt.sendwait_option(sendwait)
    simultaneous = max(1, opt.uint_option(("-N", "--sim-queries"), squeries))
    port_n = None if port is None else opt.port_option(("-p", "--port"), port)
    sport_n = None if sport is None else opt.port_option(("--sport",), sport) & 0xFFFF
    site = probe_site(netns, pid, container, runtime)
    addr = resolve_address(host, site, ip_family(ipv4, ipv6))
    from mace_tools.probe.tracesockets import SocketOptions
    from mace_tools.session import family_of
    from mace_tools.tracer import TraceOptions

    family = family_of(addr)  # (a name: the family of the address it took)
    source_addr = None if source is None else resolve_address(source, site, family)

    sockets = SocketOptions(
        device=interface, source=source_addr,
        tos=_signed(opt.uint_option(("-t", "--tos"), tos)) if tos is not None else 0,
        dontfrag=dont_fragment or mtu, debug=debug, dontroute=dontroute,
        fwmark=opt.uint_option(("--fwmark",), fwmark) if fwmark is not None else 0)
    opts = TraceOptions(
        dst_addr=addr, method=chosen.method, first_ttl=hops.first, max_ttl=hops.max,
        nqueries=hops.queries, wait_s=wait_spec.max_s, here=wait_spec.here,
        near=wait_spec.near, simultaneous=simultaneous, sendwait_s=sendwait_s,
        size=size if size is not None else opt.MAX_PACKET_LEN if mtu
        else DEFAULT_PACKETLEN[family],
        paris=paris, fixed_port=chosen.module == "udp", sockets=sockets, mtu=mtu,
        extensions=extensions, netns_path=site.netns_path,
        icmp_socket=next((k for k in ("raw", "dgram") if k in method_options), ""))
    _set_ports(opts, port_n, sport_n, chosen.protocol, method_options)
    _one_at_a_time(opts)
    _run(opts, mode, host, addr, nonce, agent, corrections, site, numeric, back)


def _signed(value: int) -> int:
    """An unsigned int option as the C int setsockopt() takes (traceroute's cast)."""
    return value - 2**32 if value >= 2**31 else value


def _set_ports(opts: TraceOptions, port: int | None, sport: int | None,
               protocol: int | None, method_options: dict[str, str]) -> None:
    """-p as each method takes it (0: the method's default): the first ICMP seq (-I), the
    IP protocol (-P, over -O protocol=), else the destination port; all 16 bits but the
    protocol. --sport: the source port of UDP and TCP probes."""
    if "protocol" in method_options:
        protocol = opt.protocol_option(method_options["protocol"])
    if opts.method == opt.RAW and port:
        protocol = opt.protocol_option(str(port))
    if protocol is not None:
        opts.protocol = protocol
    if port and opts.method in (opt.UDP, opt.TCP):
        opts.port = port & 0xFFFF
    if port and opts.method == opt.ICMP:
        opts.first_seq = port & 0xFFFF
    if opts.method in (opt.UDP, opt.TCP):
        opts.sport = sport


def _one_at_a_time(opts: TraceOptions) -> None:
    """traceroute's implications: --sport (one source port) and -P (one raw socket, its
    answers told apart by their order) send one probe at a time and wait MAX for each;
    --mtu sends one at a time (each may change the size of the next)."""
    if opts.sport is not None or opts.method == opt.RAW:
        opts.simultaneous, opts.here, opts.near = 1, 0.0, 0.0
    if opts.mtu:
        opts.simultaneous = 1


def _run(opts: TraceOptions, mode: str, host: str, addr: str, nonce: str | None,
         agent: str | None, corrections: str, site: ProbeSite, numeric: bool,
         back: bool) -> None:
    """Run the trace, its output as asked (text: hop names unless -n; --back)."""
    from mace_tools.output.traceroute import TraceOutput
    from mace_tools.probe.hopnames import open_names
    from mace_tools.probe.trace import packet_len
    from mace_tools.sources import event_sources
    from mace_tools.tracer import Tracer

    # names are only printed in text; their lookups are opened now, while the run may
    # still enter the probing netns
    names = open_names(site.vantage) if mode == "text" and not numeric else None
    output = TraceOutput(mode, dst_name=host, dst_addr=addr, method=opts.method,
                         max_ttl=opts.max_ttl,
                         size=packet_len(opts.method, opts.size, opts.family),
                         paris=opts.paris, name_of=names, back=back)
    try:
        sources = event_sources(PROG, agent, site.netns_path, nonce is not None,
                                corrections)
        result = Tracer(opts, output, nonce=parse_nonce(nonce), after_setup=drop_privileges,
                        backend_factory=sources).run()
    except MaceError as exc:  # past the arguments, failures are runtime errors: exit 1
        raise MaceError(str(exc), exit_code=1) from exc
    finally:
        if names is not None:
            names.close()
    output.finish(result)


def main(argv: list[str] | None = None) -> int:
    words = argv if argv is not None else sys.argv[1:]
    opt.set_argv(words)
    return run_app(app, PROG, words,
                   usage=lambda exc: opt.usage_error(exc, typer.main.get_command(app)))


if __name__ == "__main__":
    sys.exit(main())
