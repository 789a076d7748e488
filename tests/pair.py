"""Two network namespaces of a test module's own, A and B on one veth (198.18.97.0/30),
where mace-ping and iputils ping run side by side: B answers, its firewall drops or
duplicates replies on demand, A resolves names from /etc/netns/A/hosts (and asks DNS
only on its own loopback, where nothing listens: no packet leaves the pair).
Names carry a per-run prefix; everything is removed afterwards, also on failure."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

NEAR, FAR, BROADCAST = "198.18.97.1", "198.18.97.2", "198.18.97.3"
HOSTS = f"{FAR} far.pair.test far\n"
REPO = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Run:
    stdout: str
    stderr: str
    returncode: int
    wall_s: float


@dataclass
class Pair:
    a: str
    b: str

    def ping(self, *args: str, tool: str = "mace", timeout: float = 30,
             prefix: tuple[str, ...] = ()) -> Run:
        """`ping ARGS` (iputils) or `mace-ping ARGS` run in A, as `ip netns exec` runs
        them (so both read /etc/netns/A/hosts as /etc/hosts); prefix: a command that runs
        it (with fewer capabilities, say)."""
        cmd = [*prefix, *(["ping"] if tool == "iputils" else
                          [sys.executable, "-m", "mace_tools.cli.ping"]), *args]
        start = time.monotonic()
        proc = subprocess.run(["ip", "netns", "exec", self.a, *cmd], capture_output=True,
                              text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C"})
        return Run(proc.stdout, proc.stderr, proc.returncode, time.monotonic() - start)

    def both(self, *args: str) -> tuple[Run, Run]:
        return self.ping(*args, tool="iputils"), self.ping(*args)

    @contextmanager
    def rule(self, *rule: str, table: str = "filter") -> Iterator[None]:
        """An iptables rule in B for the with-block (its counters start afresh)."""
        _run("ip", "netns", "exec", self.b, "iptables", "-t", table, "-A", *rule)
        try:
            yield
        finally:
            _run("ip", "netns", "exec", self.b, "iptables", "-t", table, "-D", *rule)

    def drop_replies(self, every: int = 1, packet: int = 0) -> AbstractContextManager[None]:
        """B drops its echo replies: all, or one in `every` (the packet-th)."""
        nth = ["-m", "statistic", "--mode", "nth", "--every", str(every), "--packet",
               str(packet)] if every > 1 else []
        return self.rule("OUTPUT", "-p", "icmp", "--icmp-type", "echo-reply", *nth, "-j",
                         "DROP")

    def duplicate_replies(self, first_seqs: int = 2) -> AbstractContextManager[None]:
        """B sends its replies to seq 1..first_seqs twice (TEE), before any later reply
        is due: every tool sees the same duplicates."""
        return self.rule("POSTROUTING", "-p", "icmp", "--icmp-type", "echo-reply", "-m",
                         "u32", "--u32", f"0>>22&0x3C@4&0xFFFF=1:{first_seqs}", "-j", "TEE",
                         "--gateway", NEAR, table="mangle")


def make_pair(tag: str) -> Iterator[Pair]:
    """The pair (module docstring); skips without root or iproute2/iptables/ping."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    for tool in ("ip", "iptables", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    prefix = f"{tag}{os.getpid() % 100000}"
    pair = Pair(f"{prefix}-a", f"{prefix}-b")
    etc = Path("/etc/netns") / pair.a
    made_parent = not etc.parent.exists()
    try:
        for ns in (pair.a, pair.b):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", "va", "netns", pair.a, "type", "veth", "peer", "name", "vb",
             "netns", pair.b)
        _run("ip", "-n", pair.a, "addr", "add", f"{NEAR}/30", "dev", "va")
        _run("ip", "-n", pair.b, "addr", "add", f"{FAR}/30", "dev", "vb")
        _run("ip", "-n", pair.a, "link", "set", "va", "up")
        _run("ip", "-n", pair.b, "link", "set", "vb", "up")
        _run("ip", "netns", "exec", pair.b, "sysctl", "-qw",
             "net.ipv4.icmp_echo_ignore_broadcasts=0")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(HOSTS)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield pair
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if made_parent:  # (only if empty: another run may have made its own there since)
            with contextlib.suppress(OSError):
                etc.parent.rmdir()
        for ns in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def counts(text: str) -> str:
    """The counts line without its time."""
    found = re.search(r"^(\d+ packets transmitted, .*), time \d+ms$", text, re.MULTILINE)
    if found is None:
        found = re.search(r"^(\d+ packets transmitted, .*)$", text, re.MULTILINE)
    assert found, text
    return found.group(1)


def untimed(line: str) -> str:
    """A reply line up to its time (what iputils and mace-ping print alike)."""
    return line.split(" time=")[0]
