"""mace-agent and its unprivileged clients in the lab: for the tests and the bench.

AgentProcess runs the real command (python -m mace_tools.cli.agent), in a netns when
given a prefix (`lab.on_host(...)`: where a container host runs it) or on the host, on a
socket in a temporary 0755 directory of its own (clients with no capability must reach
it), and counts as started once it says it serves (the socket file exists from bind(),
before listen()). It is stopped by SIGTERM, as systemd stops it (killed if it does not
go), and its directory removed, also on failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from mace_tools.lab.topology import LabError, ns_exec

PING_GROUP_RANGE = "net.ipv4.ping_group_range"
ALL_GROUPS = "0 2147483647"


def with_capabilities(*caps: str) -> list[str]:
    """A command prefix: run as root with only these capabilities (none: nothing at all).
    Staying uid 0 keeps the checkout readable wherever it was cloned; the bounding set
    decides what execve grants."""
    bounding = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]


class AgentProcess:
    """mace-agent as a process; a context manager (see the module doc)."""

    def __init__(self, *args: str, prefix: Iterable[str] = (),
                 env: dict[str, str] | None = None, start_s: float = 20.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mt-agent-"))
        self.dir.chmod(0o755)
        self.socket = self.dir / "agent.sock"
        self.socket_left = False  # whether stop() found the socket file still there
        self._log: IO[bytes] = open(self.dir / "agent.log", "w+b")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None
        self._command = [*prefix, sys.executable, "-m", "mace_tools.cli.agent", "--socket",
                         str(self.socket), *args]
        self._env, self._start_s = env, start_s

    def __enter__(self) -> AgentProcess:
        return self.start()

    def start(self) -> AgentProcess:
        """Start it and wait until it serves (LabError if it does not); stop() ends it."""
        try:
            self.proc = subprocess.Popen(self._command, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=self._env)
            deadline = time.monotonic() + self._start_s
            while "serving on" not in self.log_text():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"mace-agent did not start: {self.log_text().strip()}")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        self._log.flush()
        return (self.dir / "agent.log").read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM; its exit status (None if it had to be killed, or never started)."""
        status: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    status = self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                status = self.proc.returncode
        if not self._log.closed:
            self._log.close()
        self.socket_left = self.socket.exists()  # an agent that ended well removed it
        shutil.rmtree(self.dir, ignore_errors=True)
        return status


@contextmanager
def ping_sockets_open(namespaces: Iterable[str]) -> Iterator[None]:
    """net.ipv4.ping_group_range opened to every group in these netns, as Docker opens it
    in its containers (a per-netns sysctl: only netns the lab made); each put back."""
    before: dict[str, str] = {}
    try:
        for ns in namespaces:
            before[ns] = " ".join(ns_exec(ns, "sysctl", "-n", PING_GROUP_RANGE).stdout.split())
            ns_exec(ns, "sysctl", "-q", "-w", f"{PING_GROUP_RANGE}={ALL_GROUPS}")
        yield
    finally:
        for ns, value in before.items():
            ns_exec(ns, "sysctl", "-q", "-w", f"{PING_GROUP_RANGE}={value}", check=False)
