"""`mace-ping`: iputils ping options in, raw and corrected RTTs out.

Parsing and wiring only: options -> PingOptions -> Pinger -> an output sink. Start-up
matters (cron jobs run `mace-ping -c 1` by the thousand): nothing heavy is imported here;
libbpf is bound when the run starts, scapy and rich are never imported on this path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

from mace_tools.cli import ping_options
from mace_tools.cli.common import (
    AGENT_HELP,
    CONTAINER_HELP,
    CORRECTIONS,
    CORRECTIONS_HELP,
    INT_MAX,
    LIST_CONTAINERS_HELP,
    LONG_MAX,
    RUNTIME_HELP,
    UINT_MAX,
    ProbeSite,
    check_corrections,
    drop_privileges,
    host_name_bytes,
    ip_family,
    output_mode,
    parse_nonce,
    pick_address,
    ping_strtod,
    probe_site,
    required_host,
    resolve_address,
    seconds_or_err,
    strtol_or_err,
)
from mace_tools.cli.gnu_options import Option, OptionTable
from mace_tools.cli.ping_options import strtoul_or_err
from mace_tools.cli.stdio import closed_stdio_to_devnull, end_as_ping_on_broken_pipe
from mace_tools.errors import Finished, MaceError
from mace_tools.probe.sockopts import PMTUDISC, SocketOptions

PROG = "mace-ping"
MAX_PAYLOAD = 65507  # 65535 - 20 (IPv4) - 8 (ICMP), as iputils
MAX_PAYLOAD6 = 65527  # 65535 - 8 (ICMPv6): iputils' ICMPV6_MAX_DATALEN
IDENTIFIER_MAX = 0xFFFF
MIN_USER_INTERVAL_MS = 2

# Each option sets the parameter of ping() its dest names. Numbers are taken as text and
# checked as iputils checks them (cli/common.py), so nan, inf, 1e999 or a count past
# LONG_MAX get ping's one-line errors.
OPTIONS = OptionTable(
    "[OPTIONS] HOST",
    "Ping HOST from a container's network namespace; print raw and container-corrected "
    "RTTs from per-packet eBPF kernel timestamps. Options as iputils ping (README: "
    "mace-ping options); -R and -T are not supported: IP options would keep every reply "
    "from being corrected.",
    [
        Option(("-c",), "count", "COUNT", "stop after COUNT replies"),
        Option(("-i",), "interval", "SECONDS", "seconds between probes (default 1; 0 with -f)"),
        Option(("-s",), "size", "SIZE", "payload bytes (default 56)"),
        Option(("-t",), "ttl", "TTL", "IP time to live"),
        Option(("-W",), "linger", "SECONDS", "seconds to wait for a reply (default 10)"),
        Option(("-w",), "deadline", "SECONDS", "stop after SECONDS"),
        Option(("-q",), "quiet", help="only the summary"),
        Option(("-n",), "numeric", help="no reverse DNS name resolution"),
        Option(("-H",), "force_lookup", help="force reverse DNS name resolution (also for "
               "address targets, -f)"),
        Option(("-D",), "timestamps", help="print unix time before each line"),
        Option(("-O",), "outstanding", help="report unanswered probes"),
        Option(("-I",), "interface", "INTERFACE", "interface name or source address"),
        Option(("-f",), "flood", help="flood ping"),
        Option(("-a",), "audible", help="audible ping (a bell per reply)"),
        Option(("-A",), "adaptive", help="adaptive ping: interval follows the round trip"),
        Option(("-b",), "broadcast", help="allow pinging broadcast"),
        Option(("-B",), "strict_source", help="sticky source address"),
        Option(("-C",), "connect", help="connect() the socket"),
        Option(("-d",), "so_debug", help="SO_DEBUG socket option"),
        Option(("-e",), "ident", "ID", "ICMP identifier (0 needs a raw socket)"),
        Option(("-F",), "flowlabel", "FLOW", "IPv6 flow label (IPv4 probes have none)"),
        Option(("-l",), "preload", "PRELOAD", "send PRELOAD probes at once, then keep that "
               "many in flight (-f, -i 0)"),
        Option(("-L",), "noloop", help="no loopback of multicast probes"),
        Option(("-m",), "mark", "MARK", "SO_MARK of the probes"),
        Option(("-M",), "pmtudisc", "HINT", "path MTU discovery: do, dont, want or probe"),
        Option(("-p",), "pattern", "PATTERN", "fill the payload with these hex bytes"),
        Option(("-Q",), "tos", "TOS", "IP TOS / QoS bits (decimal or 0x hex)"),
        Option(("-r",), "dontroute", help="bypass the routing table (SO_DONTROUTE)"),
        Option(("-R",), "record_route", help="record route: not supported"),
        Option(("-S",), "sndbuf", "BYTES", "SO_SNDBUF"),
        Option(("-T",), "ip_timestamp", "TYPE", "IP timestamp option: not supported"),
        Option(("-U",), "user_latency", help="user-to-user latency (the raw time ends when "
               "the reply is read)"),
        Option(("-v",), "verbose", help="verbose output (ident in replies)"),
        Option(("-3",), "precise", help="times with 3 decimals, unrounded"),
        Option(("-j",), "json_lines", help="iputils' JSON lines, with the mace fields"),
        Option(("-4",), "ipv4", help="IPv4 only"),
        Option(("-6",), "ipv6", help="IPv6 only"),
        Option(("--netns",), "netns", "NETNS", "probe from this network namespace: `ip "
               "netns` name or path"),
        Option(("--pid",), "pid", "PID", "probe from PID's network namespace"),
        Option(("--container",), "container", "NAME", CONTAINER_HELP),
        Option(("--runtime",), "runtime", "RUNTIME", RUNTIME_HELP + " (default auto)"),
        Option(("--list-containers",), "list_containers", help=LIST_CONTAINERS_HELP),
        Option(("--json",), "json_out", help="one RIPE Atlas style JSON document at the end"),
        Option(("--ndjson",), "ndjson", help="one JSON record per probe, then a summary"),
        Option(("--nonce",), "nonce", "HEX", "the run's 8-byte probe nonce as 16 hex digits "
               "(default: random); lets a capture filter on it (icmp[8:4], icmp[12:4]); "
               "must differ between concurrent runs"),
        Option(("--agent",), "agent", "PATH", AGENT_HELP),
        Option(("--corrections",), "corrections", "SOURCE", CORRECTIONS_HELP + " (default "
               "auto)", CORRECTIONS),
        Option(("-V", "--version"), "version", help="print version"),
    ])


def ping(
    host: str | None = None,
    count: str | None = None,
    interval: str | None = None,
    size: str = "56",
    ttl: str | None = None,
    linger: str = "10",
    deadline: str | None = None,
    quiet: bool = False,
    numeric: bool = False,
    force_lookup: bool = False,
    timestamps: bool = False,
    outstanding: bool = False,
    interface: str | None = None,
    flood: bool = False,
    audible: bool = False,
    adaptive: bool = False,
    broadcast: bool = False,
    strict_source: bool = False,
    connect: bool = False,
    so_debug: bool = False,
    ident: str | None = None,
    flowlabel: str | None = None,
    preload: str | None = None,
    noloop: bool = False,
    mark: str | None = None,
    pmtudisc: str | None = None,
    pattern: str | None = None,
    tos: str | None = None,
    dontroute: bool = False,
    record_route: bool = False,
    sndbuf: str | None = None,
    ip_timestamp: str | None = None,
    user_latency: bool = False,
    verbose: bool = False,
    precise: bool = False,
    json_lines: bool = False,
    ipv4: bool = False,
    ipv6: bool = False,
    netns: str | None = None,
    pid: str | None = None,
    container: str | None = None,
    runtime: str = "auto",
    list_containers: bool = False,
    json_out: bool = False,
    ndjson: bool = False,
    nonce: str | None = None,
    agent: str | None = None,
    corrections: str = "auto",
    version: bool = False,
) -> int:
    """One mace-ping run from its options (OPTIONS); its exit status."""
    if version and json_lines:
        from mace_tools import __version__

        print(json.dumps({"version": __version__}))
        return 0
    # parsed as iputils parses them, before it asks for a destination
    numbers = _numbers(count, interval, size, ttl, linger, deadline,
                       _max_payload(ipv4, ipv6, host))
    extra = _Extra(
        ident=None if ident is None else strtoul_or_err(ident, 0, IDENTIFIER_MAX),
        preload=1 if preload is None else ping_options.parse_preload(preload),
        pattern=None if pattern is None else ping_options.parse_pattern(pattern),
        sockopts=SocketOptions(
            tos=0 if tos is None else ping_options.parse_tos(tos),
            mark=None if mark is None else strtoul_or_err(mark, 0, UINT_MAX),
            pmtudisc=None if pmtudisc is None else ping_options.parse_pmtudisc(pmtudisc),
            sndbuf=None if sndbuf is None else strtol_or_err(sndbuf, 1, INT_MAX),
            debug=so_debug, dontroute=dontroute, broadcast=broadcast, noloop=noloop))
    flow = None if flowlabel is None else ping_options.parse_flowlabel(flowlabel)
    pid_n = None if pid is None else strtol_or_err(pid, 1, INT_MAX, "invalid --pid value")
    ping_options.check_ip_options(record_route, ip_timestamp)
    if host is None and not (version or list_containers):
        raise MaceError("usage error: Destination address required")
    host = required_host(PROG, version, list_containers, runtime, host)
    check_corrections(agent, corrections,
                      any(x is not None for x in (netns, pid, container)),
                      nonce is not None)
    from mace_tools.output.live import make_sink
    from mace_tools.pinger import Pinger, PingOptions
    from mace_tools.sources import event_sources

    if json_lines and (json_out or ndjson):
        raise MaceError("-j, --json and --ndjson are mutually exclusive")
    mode = "jsonlines" if json_lines else output_mode(json_out, ndjson)
    interval_s = (0.0 if flood else 1.0) if numbers.interval_s is None else numbers.interval_s
    _check_user_interval(interval_s)
    site = probe_site(netns, pid_n, container, runtime)
    target = _target(host, site, ip_family(ipv4, ipv6))
    flow = flow if ":" in target.addr else None  # (as iputils: IPv4 probes have none)
    multicast = broadcast or _is_multicast(target.addr)
    sockopts = _multicast_sockopts(extra.sockopts, multicast, interval_s)
    device, source = _split_interface(interface)
    opts = PingOptions(
        dst_addr=target.addr,
        count=numbers.count,
        interval_s=interval_s,
        size=numbers.size,
        ttl=numbers.ttl,
        linger_s=numbers.linger_s,
        deadline_s=numbers.deadline_s,
        flood=flood,
        device=device,
        source=source,
        netns_path=site.netns_path,
        report_outstanding=outstanding,
        path=mode in ("json", "ndjson"),  # the JSON outputs show each reply's path
        preload=extra.preload,
        adaptive=adaptive,
        pattern=extra.pattern,
        ident=extra.ident,
        user_latency=user_latency,
        strict_source=strict_source,
        connect=connect,
        multicast=multicast,
        socket_options=sockopts,
        flowlabel=flow or None,
    )
    lookup = (force_lookup and not numeric) or not (
        numeric or flood or target.literal or _lookups_disabled(quiet))
    with _namer(site, lookup) as name_of:
        sink = make_sink(mode, dst_name=target.name, dst_addr=target.addr, size=numbers.size,
                         quiet=quiet, timestamps=timestamps, flood=flood, device=device,
                         bound=source is not None or strict_source, name_of=name_of,
                         audible=audible, verbose=verbose, precise=precise,
                         show_dup=not multicast, pattern=extra.pattern,
                         flowlabel=flow or None)
        sources = event_sources(PROG, agent, site.netns_path, nonce is not None,
                                corrections)
        result = Pinger(opts, sink, nonce=parse_nonce(nonce), backend_factory=sources,
                        after_setup=drop_privileges).run()
        sink.finish(result)
    received = result.tally.received
    wanted = numbers.count
    if received == 0 or (wanted is not None and numbers.deadline_s and received < wanted):
        return 1
    return 0


class _Extra(NamedTuple):
    """The options iputils added to BSD ping's, parsed."""

    ident: int | None
    preload: int
    pattern: bytes | None
    sockopts: SocketOptions


def _address(addr: str) -> str:
    return addr


@contextlib.contextmanager
def _namer(site: ProbeSite, lookup: bool) -> Iterator[Callable[[str], str]]:
    """How senders are shown: by address, or (lookup) as ping names them from the probing
    netns; set up now, while the run may still enter that netns (probe/names.py)."""
    if not lookup:
        yield _address
        return
    from mace_tools.probe.names import Namer

    namer = Namer(site.vantage)
    try:
        yield namer
    finally:
        namer.close()


def _lookups_disabled(quiet: bool) -> bool:
    """iputils: IPUTILS_PING_PTR_LOOKUP=0 makes -n the default (with a warning)."""
    if os.environ.get("IPUTILS_PING_PTR_LOOKUP") != "0":
        return False
    if not quiet:
        print(f"{PROG}: WARNING: reverse DNS resolution (PTR lookup) disabled, enforce "
              "with -H", file=sys.stderr)
    return True


class _Target(NamedTuple):
    addr: str
    name: str  # what ping prints for it: the canonical name, or what was typed
    literal: bool  # an address was typed: ping shows every sender numerically


def _is_literal(host: str) -> bool:
    """ping's test (inet_aton: the short forms too, 127.1), or an IPv6 address (with or
    without a %scope)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return ":" in host
    return True


def _is_multicast(addr: str) -> bool:
    """224.0.0.0/4, or ff00::/8."""
    if ":" in addr:
        return addr[:2].lower() == "ff"
    return 224 <= socket.inet_aton(addr)[0] <= 239


def _target(host: str, site: ProbeSite, family: int | None) -> _Target:
    """host's address as the probing netns resolves it (of family 4 or 6 if -4 or -6
    say), and the name ping prints for it (probe/names.py). From our own netns one
    getaddrinfo with AI_CANONNAME gives both, as ping's does; an address typed in needs
    no name."""
    if _is_literal(host):  # (nothing more to import: the fast path)
        return _Target(resolve_address(host, site, family), host, True)
    from mace_tools.probe.names import canonical_name

    if site.vantage is not None:
        addr = resolve_address(host, site, family)
        return _Target(addr, canonical_name(host, addr, site.vantage), False)
    try:
        infos = socket.getaddrinfo(host_name_bytes(host), None, socket.AF_UNSPEC,
                                   socket.SOCK_RAW, 0, socket.AI_CANONNAME)
    except socket.gaierror as exc:
        raise MaceError(f"{host}: {exc.strerror}") from exc
    canonical = infos[0][3] or host  # (glibc puts it on the first result only)
    return _Target(pick_address(host, infos, family), canonical, False)


def _check_user_interval(interval_s: float) -> None:
    """iputils: a user other than root may not send faster than every 2 ms."""
    if os.getuid() != 0 and interval_s < MIN_USER_INTERVAL_MS / 1000:
        raise MaceError("cannot flood, minimal interval for user must be >= 2 ms, use "
                        "-i 0.002 (or higher)")


def _multicast_sockopts(opts: SocketOptions, multicast: bool,
                        interval_s: float) -> SocketOptions:
    """iputils for a broadcast (-b) or multicast target: a user may send once a second at
    most and never fragments; path MTU discovery defaults to "do"."""
    if not multicast:
        return opts
    if os.getuid() != 0:
        if interval_s < 1.0:
            raise MaceError("minimal interval for broadcast ping for user must be >= 1000 "
                            "ms, use -i 1 (or higher)")
        if opts.pmtudisc is not None and opts.pmtudisc != PMTUDISC["do"]:
            raise MaceError("broadcast ping does not fragment")
    if opts.pmtudisc is None:
        return dataclasses.replace(opts, pmtudisc=PMTUDISC["do"])
    return opts


class _Numbers(NamedTuple):
    count: int | None
    interval_s: float | None
    size: int
    ttl: int | None
    linger_s: float
    deadline_s: float | None


def _max_payload(ipv4: bool, ipv6: bool, host: str | None) -> int:
    """iputils' bound on -s: by -4/-6, then by the family of an address typed in (a name:
    the larger, as it is checked before resolving)."""
    bound = MAX_PAYLOAD if ipv4 else MAX_PAYLOAD6
    for family, limit in ((socket.AF_INET, MAX_PAYLOAD), (socket.AF_INET6, MAX_PAYLOAD6)):
        try:
            socket.inet_pton(family, host or "")
        except OSError:
            continue
        return limit
    return bound


def _numbers(count: str | None, interval: str | None, size: str, ttl: str | None,
             linger: str, deadline: str | None, max_payload: int = MAX_PAYLOAD) -> _Numbers:
    """The numeric options, checked and worded as iputils' ping.c (its bounds: -i up to
    INT_MAX ms, -W up to UINT_MAX µs; -t 0 passes, and the kernel refuses it)."""
    payload = strtol_or_err(size, 0, INT_MAX)
    if payload > max_payload:
        raise MaceError(f"invalid -s value: '{payload}': out of range: "
                        f"0 <= value <= {max_payload}")
    return _Numbers(
        count=None if count is None else strtol_or_err(count, 1, LONG_MAX),
        interval_s=None if interval is None else
        ping_strtod(interval, 0.0, INT_MAX / 1000, "bad timing interval"),
        size=payload,
        ttl=None if ttl is None else strtol_or_err(ttl, 0, 255),
        linger_s=ping_strtod(linger, 0.0, UINT_MAX / 1_000_000, "bad linger time"),
        deadline_s=None if deadline is None else seconds_or_err(deadline, INT_MAX),
    )


def _split_interface(value: str | None) -> tuple[str | None, str | None]:
    """-I takes an interface name or a source address, as iputils: an address in full
    dotted form (inet_pton; "1" is a device name to ping, not 0.0.0.1)."""
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
    closed_stdio_to_devnull()
    try:
        given, operands = OPTIONS.parse(sys.argv[1:] if argv is None else argv)
        if given.pop("help", False):
            print(OPTIONS.help_text(PROG))
            return 0
        if len(operands) > 1:
            raise MaceError(f"extra operand '{operands[1]}': one HOST only (IP source "
                            "routes are not supported)")
        return ping(*operands, **given)  # type: ignore[arg-type]
    except Finished as exc:
        return exc.exit_code
    except BrokenPipeError:
        end_as_ping_on_broken_pipe()
    except MaceError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
