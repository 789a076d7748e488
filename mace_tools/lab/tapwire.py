"""A NIC-like wire for the lab: two tap devices, each in its own netns, joined by this process.

A frame one side transmits is read from that tap's file descriptor and written into the
other tap, so it *arrives* there as a NIC's frame does: through NAPI and GRO (IFF_NAPI),
and with IFF_NAPI_FRAGS through napi_gro_frags with the whole frame in page fragments (the
first iovec segment of a write is the skb's linear part: this wire makes it empty, as a NIC
driver that receives into pages does). iproute2 cannot set these flags; TUNSETIFF can.

Run as `python -m mace_tools.lab.tapwire NS_A DEV_A NS_B DEV_B --seconds S [--frags]`
(namespaces as paths). It prints "ready" once both taps exist, and exits after S seconds,
on SIGTERM/SIGINT, or when stdin closes (its parent went away): a lab never leaves it behind.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import struct
import sys
import time
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.probe.netns import entered

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_NO_PI = 0x1000
MAX_FRAME = 65536


def tap_flags(frags: bool) -> int:
    """TUNSETIFF flags of a NIC-like tap (IFF_NAPI_FRAGS needs IFF_NAPI)."""
    return IFF_TAP | IFF_NO_PI | IFF_NAPI | (IFF_NAPI_FRAGS if frags else 0)


def open_tap(netns: Path, name: str, flags: int) -> int:
    """Create tap `name` in `netns` (a tap lives in the netns of the process that opens
    /dev/net/tun) and return its fd; the device goes away when the fd is closed."""
    with entered(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except OSError:
            os.close(fd)
            raise
    return fd


def deliver(fd: int, frame: bytes, frags: bool) -> None:
    """Write one frame into a tap. With IFF_NAPI_FRAGS the first segment of a write becomes
    the skb's linear part: an empty one leaves every header in a page fragment (GRO then
    pulls the IP header of an ICMP packet, no more)."""
    try:
        if frags:
            os.writev(fd, [b"", frame])
        else:
            os.write(fd, frame)
    except OSError:
        pass  # a frame the other side does not take (device going down): a lossy wire


def relay(fds: tuple[int, int], frags: bool, deadline: float, stop_fd: int) -> None:
    """Copy frames between the two taps until the deadline or until stop_fd is readable."""
    other = {fds[0]: fds[1], fds[1]: fds[0]}
    poller = select.poll()
    for fd in (*fds, stop_fd):
        poller.register(fd, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        for fd, event in poller.poll(left * 1000):
            if fd == stop_fd or not event & select.POLLIN:
                return  # told to stop, or a tap went away
            deliver(other[fd], os.read(fd, MAX_FRAME), frags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tapwire")
    parser.add_argument("ns_a", type=Path)
    parser.add_argument("dev_a")
    parser.add_argument("ns_b", type=Path)
    parser.add_argument("dev_b")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--frags", action="store_true")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    flags = tap_flags(args.frags)
    try:
        fds = (open_tap(args.ns_a, args.dev_a, flags), open_tap(args.ns_b, args.dev_b, flags))
    except OSError as exc:
        print(f"tapwire: cannot create tap: {exc.strerror}", file=sys.stderr, flush=True)
        return 2
    except MaceError as exc:  # the netns could not be entered
        print(f"tapwire: {exc}", file=sys.stderr, flush=True)
        return 2
    print("ready", flush=True)
    relay(fds, args.frags, time.monotonic() + args.seconds, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
