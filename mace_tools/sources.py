"""Where a run's kernel data comes from: the host's mace-agent, the programs this process
loads or joins itself, or nowhere (every reply raw), in that order of preference.

- agent: when its socket exists (--agent PATH, $MACE_AGENT, or /run/mace/agent.sock). It
  serves runs probing from the client's own netns, so a run entering another netns
  (--netns, --pid, --container) or naming its own nonce (--nonce) uses its own programs.
  An agent that was asked for by name and cannot serve is an error; the default socket
  that does not answer (a dead agent's) is passed over.
- local: the process may load BPF programs (root, or CAP_BPF + CAP_PERFMON).
- none: one line on stderr says how to get corrections; the run is measured raw.

--corrections picks one instead of the first that works: `agent` and `local` fail (one line,
exit 2) where auto would fall back; `none` measures raw without asking anyone or loading
anything (the same probes and pacing, for a run that wants no kernel data).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mace_tools.errors import MaceError, NoPrivilege
from mace_tools.model import Namespaces
from mace_tools.session import EventSource, EventSourceFactory, kernel_events

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_capabilities() -> int | None:
    """The process's effective capability set (None: cannot tell). A read of
    /proc/self/status: no ctypes on the start-up path."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 16) for line in status
                        if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def may_load_programs() -> bool:
    """The effective capabilities allow loading tracing programs (root has them all):
    CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN (kernels before 5.8). Not an attempt:
    libbpf is not bound for a run that cannot."""
    caps = effective_capabilities()
    if caps is None:
        return True  # cannot tell: let the attempt say
    return bool(caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1))


def event_sources(prog: str, agent: str | None, netns_path: Path | None,
                  nonce_asked: bool, corrections: str = "auto") -> EventSourceFactory:
    """The run's event source factory (session.EventSourceFactory); corrections: the
    --corrections choice, checked against the other options by the command
    (cli.common.check_corrections)."""
    if corrections == "none":
        return lambda nonce, ns, **switches: None
    if corrections == "local":
        return _local_only()
    from mace_tools.agent import client

    path, explicit = client.socket_path(agent)
    explicit = explicit or corrections == "agent"
    if explicit and netns_path is not None:
        raise MaceError("the agent serves runs from this process's own netns: "
                        "--agent cannot go with --netns, --pid or --container")
    if explicit and nonce_asked:
        raise MaceError("the agent chooses the nonces: --agent cannot go with --nonce")

    def warn(line: str) -> None:
        print(f"{prog}: {line}", file=sys.stderr)

    def factory(nonce: bytes | None, ns: Namespaces, **switches: bool) -> EventSource | None:
        agent_said = f"no mace-agent at {path}"
        if netns_path is None and not nonce_asked and (explicit or path.exists()):
            try:
                return client.open_run(path, warn, **switches)
            except MaceError as exc:
                if explicit:
                    raise
                agent_said = str(exc)  # there, but did not serve: its words
        why = f"{agent_said} and no BPF privilege"
        if may_load_programs():
            try:
                return kernel_events(nonce, ns, **switches)
            except NoPrivilege as exc:
                why = f"{agent_said}, and {exc}"
        warn(f"{why}: replies are shown raw (corrected=none); run mace-agent on the host "
             f"and mount {path.parent}, or give CAP_BPF and CAP_PERFMON")
        return None

    return factory


def _local_only() -> EventSourceFactory:
    """--corrections local: this process's own programs, or an error."""
    def factory(nonce: bytes | None, ns: Namespaces, **switches: bool) -> EventSource | None:
        if not may_load_programs():
            raise NoPrivilege("--corrections local: no BPF privilege (CAP_BPF and CAP_PERFMON, "
                              "or root)")
        return kernel_events(nonce, ns, **switches)

    return factory
