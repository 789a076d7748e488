"""`mace-lab`: build, inspect and remove the namespace lab, and run the demo."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mace_tools.cli.typer_app import run_app
from mace_tools.lab.topology import Lab, LabError

PROG = "mace-lab"
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  no_args_is_help=True, help="Docker-like namespace lab for mace-tools.")

Prefix = Annotated[str, typer.Option("--prefix", help="namespace name prefix")]
Ipv6 = Annotated[bool, typer.Option("--ipv6", help="dual-stack, from 2001:2::/48, with NAT66")]


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("must run as root (network namespaces)")


@app.command()
def up(prefix: Prefix = "mace",
       containers: Annotated[int, typer.Option("--containers", min=1, max=200)] = 1,
       routers: Annotated[int, typer.Option("--routers", min=0, max=8,
                                            help="routers between host and target")] = 0,
       ipv6: Ipv6 = False) -> None:
    """Build the lab and leave it up."""
    _need_root()
    lab = Lab(prefix, containers, routers, ipv6)
    lab.up()
    print(f"lab up: {lab.host_ns}, {lab.target_ns} ({lab.target_addr}"
          f"{', ' + lab.target_addr6 if ipv6 else ''}), "
          f"{containers} container(s) {lab.container_ns(0)}..")
    # from the lab's host netns, as on a container host: from the root netns no probe
    # crosses the outer device, and every reply would say corrected=none
    on_host = f"ip netns exec {lab.host_ns}"
    print(f"try: {on_host} mace-ping --netns {lab.container_ns(0)} -c 5 {lab.target_addr}")
    if ipv6:
        print(f"     {on_host} mace-ping --netns {lab.container_ns(0)} -c 5 "
              f"{lab.target_addr6}")
    if routers:
        print(f"     {on_host} mace-traceroute --netns {lab.container_ns(0)} "
              f"{lab.target_addr}")


@app.command()
def down(prefix: Prefix = "mace") -> None:
    """Remove every namespace of the lab (and what runs in them)."""
    _need_root()
    Lab(prefix).down()


@app.command()
def status(prefix: Prefix = "mace") -> None:
    """List the lab's namespaces and addresses."""
    state = Lab(prefix).status()
    if not state:
        print(f"no lab with prefix {prefix!r}")
        raise typer.Exit(1)
    for ns, addrs in state.items():
        print(f"{ns:20} {', '.join(addrs) or '-'}")


@app.command()
def demo(prefix: Prefix = "mace",
         count: Annotated[int, typer.Option("--count", "-c", min=1, max=100000)] = 20,
         interval: Annotated[float, typer.Option("--interval", "-i", min=0.0)] = 0.01,
         load: Annotated[int, typer.Option("--load", min=0, max=16,
                                           help="flood-ping neighbours")] = 0,
         ipv6: Annotated[bool, typer.Option("--ipv6", help="measure over IPv6 through "
                                            "NAT66")] = False) -> None:
    """Lab up, mace-ping from a container vs truth v2 on the host's outer link, lab down."""
    _need_root()
    from rich.console import Console
    from rich.table import Table

    from mace_tools.lab.demo import measure
    from mace_tools.lab.load import Load
    from mace_tools.stats import rtt_stats

    console = Console()
    with Lab(prefix, containers=load + 1, ipv6=ipv6) as lab:
        source = lab.container_addr6(0) if ipv6 else lab.container_addr(0)
        target = lab.target_addr6 if ipv6 else lab.target_addr
        console.print(f"[bold]lab[/]: {lab.container_ns(0)} ({source}) -> "
                      f"veth -> br0 + NAT{'66' if ipv6 else ''} in {lab.host_ns} -> "
                      f"{lab.outer_dev} -> {lab.target_ns} ({target}); "
                      f"{load} flood neighbour(s)")
        with Load(lab, load, duration_s=count * interval + 30, target=target) if load \
                else _nothing():
            run, rows = measure(lab, 0, count, "-i", str(interval), target=target)
    link = lab.outer_link
    table = Table(title=f"mace-ping -c {count} from a lab container (truth: reply in on "
                        f"{link.near_dev} minus request in on {link.far_dev})")
    for col in ("seq", "raw ms", "corrected ms", "truth ms", "corrected-truth µs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.seq), f"{r.raw_ms:.3f}",
                      "none" if r.corrected_ms is None else f"{r.corrected_ms:.3f}",
                      "-" if r.capture_ms is None else f"{r.capture_ms:.3f}",
                      "-" if r.error_us is None else f"{r.error_us:+.2f}")
    console.print(table)
    errors = [r.error_us for r in rows if r.error_us is not None]
    raw = rtt_stats([r.raw_ms for r in rows])
    corrected = rtt_stats([r.corrected_ms for r in rows if r.corrected_ms is not None])
    mace = run.summary["mace"]
    if raw and corrected:
        console.print(f"raw avg {raw.avg:.3f} ms, corrected avg {corrected.avg:.3f} ms: "
                      f"container networking added {raw.avg - corrected.avg:.3f} ms")
    if errors:
        err, size = rtt_stats(errors), rtt_stats([abs(e) for e in errors])
        console.print(f"corrected - truth: mean {err.avg:+.2f} µs, p99 of |error| "
                      f"{size.p99:.2f} µs, max |error| {size.max:.2f} µs over {len(errors)} "
                      f"replies")
    transit = rtt_stats([r.transit_us for r in rows if r.transit_us is not None])
    if transit:
        console.print(f"the truth's residual, the request's transit of the {link.near_dev} "
                      f"link (mace's events): mean {transit.avg:.2f} µs")
    console.print(f"kernel data coverage {mace['coverage'] * 100:.1f}%, "
                  f"{mace['kernel_events_lost']} events lost; lab removed")
    console.print(f"note: the truth stamps arrivals only (tcpdump -Q in at both ends of "
                  f"{link.near_dev}'s link), so the capture never delays a departure; it is "
                  f"shorter than {link.near_dev}'s departure-to-arrival time by the request's "
                  f"transit of the link: its residual, shown above")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    return run_app(app, PROG, argv, errors=(LabError,))


if __name__ == "__main__":
    sys.exit(main())
