"""Background load for the lab: flood pings or UDP blasts from neighbour containers.

Every process is bounded in time by its own arguments and is stopped and reaped when the
context exits, whatever happens inside it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from mace_tools.lab.topology import TARGET_ADDR, Lab, LabError

# A UDP blast that stops by itself: datagrams to the target's discard port for `duration`.
_UDP_BLAST = (
    "import socket,sys,time\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);end=time.monotonic()+float(sys.argv[2])\n"
    "b=bytes(1200)\n"
    "while time.monotonic()<end:\n"
    "    try: s.sendto(b,(sys.argv[1],9))\n"
    "    except OSError: pass\n"
)


class Load:
    """`neighbours` containers (c1..cN) loading the bridge and NAT for `duration_s`."""

    def __init__(self, lab: Lab, neighbours: int, duration_s: float, kind: str = "flood",
                 target: str = TARGET_ADDR) -> None:
        if neighbours > lab.containers - 1:
            raise LabError(f"{neighbours} neighbours need a lab with {neighbours + 1} containers")
        if kind not in ("flood", "udp"):
            raise LabError(f"unknown load kind {kind!r}")
        self.lab, self.neighbours, self.duration_s = lab, neighbours, duration_s
        self.kind, self.target = kind, target
        self.procs: list[subprocess.Popen[bytes]] = []

    def _command(self, i: int) -> list[str]:
        ns = ["ip", "netns", "exec", self.lab.container_ns(i)]
        seconds = str(max(1, int(self.duration_s + 0.999)))
        if self.kind == "flood":
            return [*ns, "ping", "-f", "-q", "-w", seconds, self.target]
        return [*ns, sys.executable, "-c", _UDP_BLAST, self.target, seconds]

    def __enter__(self) -> Load:
        try:
            for i in range(1, self.neighbours + 1):
                self.procs.append(subprocess.Popen(self._command(i), stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
            time.sleep(0.2)  # let them reach full rate
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise LabError(f"load process exited at start: {' '.join(dead[0])}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
