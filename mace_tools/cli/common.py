"""What every mace command shares around its options: the numbers read and worded as
iputils reads them, the checks of the corrections options, their help, and the steps
before and after a run. No typer or click here: mace-ping starts without them
(gnu_options.py); the typer commands add theirs in typer_app.py."""

from __future__ import annotations

import math
import re
import sys

from mace_tools.errors import Finished, MaceError
from mace_tools.probe.site import (  # noqa: F401  (the commands import them from here)
    ProbeSite,
    host_name_bytes,
    pick_address,
    probe_site,
    resolve_address,
)

LONG_MAX = 2**63 - 1  # C long on Linux x86-64/arm64: iputils' bounds
INT_MAX = 2**31 - 1  # also pid_t's bound (--pid)
UINT_MAX = 2**32 - 1
# What C's strtol/strtod take in base 10 (glibc, "C" locale); Python's int()/float() also
# take "1_000" and non-ASCII digits, which ping does not.
_C_LONG = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_C_DOUBLE = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                       r"|inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?)", re.IGNORECASE)

# The help of the options every mace command has (typer_app.py, cli/ping.py).
CONTAINER_HELP = "probe from a Docker, Podman, containerd or CRI container (name or id)"
RUNTIME_HELP = "docker, podman, containerd (via ctr), crio (via crictl) or auto"
LIST_CONTAINERS_HELP = "list the containers that can be measured, and exit"
CORRECTIONS = ("auto", "agent", "local", "none")
CORRECTIONS_HELP = ("where corrections come from: auto (the agent if its socket exists, "
                    "else programs this process loads, else none), agent, local (this "
                    "process's programs) or none (every reply raw: nothing is loaded or "
                    "asked)")
AGENT_HELP = ("the mace-agent socket to get corrections from (default: $MACE_AGENT, else "
              "/run/mace/agent.sock if it exists)")


def check_corrections(agent: str | None, corrections: str, entering: bool,
                      nonce: bool) -> None:
    """--corrections against the options it cannot go with, before anything runs: --agent
    names an agent (not for local or none); the agent serves runs from the client's own
    netns (not entering another: --netns, --pid, --container) and chooses the nonces."""
    if agent is not None and corrections in ("local", "none"):
        raise MaceError(f"--agent cannot go with --corrections {corrections}")
    if corrections == "agent" and entering:
        raise MaceError("--corrections agent: the agent serves runs from this process's own "
                        "netns, not with --netns, --pid or --container")
    if corrections == "agent" and nonce:
        raise MaceError("--corrections agent: the agent chooses the nonces, not with --nonce")


def drop_privileges() -> None:
    """Once the run's sockets and event source are open, give up every capability for
    good, as iputils does (kernel/native.py). A process that holds none (an unprivileged
    client of mace-agent) has nothing to give up, and does not bind ctypes to learn it."""
    from mace_tools.sources import effective_capabilities

    if effective_capabilities() == 0:
        return
    from mace_tools.kernel.native import drop_privileges as drop

    drop()


def c_long(text: str) -> int | None:
    """text as C's strtol would read all of it in base 10 (unbounded); None if it cannot."""
    return int(text) if _C_LONG.fullmatch(text) else None


def c_double(text: str) -> float | None:
    """text as C's strtod would read all of it (nan and inf included, as ping's strtod);
    None if it cannot."""
    if not _C_DOUBLE.fullmatch(text):
        return None
    return math.nan if "nan" in text.lower() else float(text)


def strtol_or_err(text: str, lo: int, hi: int, what: str = "invalid argument") -> int:
    """iputils' strtol_or_err: a base-10 integer in lo..hi, failing in its words."""
    value = c_long(text)
    if value is None:
        raise MaceError(f"{what}: '{text}'")
    if not -LONG_MAX - 1 <= value <= LONG_MAX:  # strtol's ERANGE
        raise MaceError(f"{what}: '{text}': Numerical result out of range")
    if not lo <= value <= hi:
        raise MaceError(f"{what}: '{text}': out of range: {lo} <= value <= {hi}")
    return value


def ping_strtod(text: str, lo: float, hi: float, what: str) -> float:
    """iputils' ping_strtod plus its caller's range check (-i, -W): a finite number in
    lo..hi. nan, inf and overflow (1e999) are ERANGE to iputils, as are subnormals."""
    value = c_double(text)
    if value is None:
        raise MaceError(f"{what}: {text}")
    if not math.isfinite(value) or 0 < abs(value) < sys.float_info.min:
        raise MaceError(f"{what}: {text}: Numerical result out of range")
    if not lo <= value <= hi:
        raise MaceError(f"{what}: {text}")
    return value


def seconds_or_err(text: str, hi: int, what: str = "invalid argument") -> float:
    """A finite count of seconds in 0..hi (ping -w), worded as iputils' strtol_or_err,
    whose bounds it keeps; fractions are taken (mace-ping always did)."""
    value = c_double(text)
    if value is None or not math.isfinite(value):
        raise MaceError(f"{what}: '{text}'")
    if not 0 <= value <= hi:
        raise MaceError(f"{what}: '{text}': out of range: 0 <= value <= {hi}")
    return value


def ip_family(ipv4: bool, ipv6: bool) -> int | None:
    """-4 / -6 (one at most, as iputils): the family to resolve and probe, None: any."""
    if ipv4 and ipv6:
        raise MaceError("only one -4 or -6 option may be specified")
    return 4 if ipv4 else 6 if ipv6 else None


def parse_nonce(value: str | None) -> bytes | None:
    """--nonce: 16 hex digits, not all zero (None: the run picks a random one)."""
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 8 or not any(raw):
        raise MaceError(f"invalid nonce '{value}': need 16 hex digits, not all zero")
    return raw


def required_host(prog: str, version: bool, list_containers: bool, runtime: str,
                  host: str | None) -> str:
    """-V and --list-containers answer and exit; anything else needs HOST."""
    if version:
        from mace_tools import __version__

        print(f"{prog} {__version__}")
        raise Finished(0)
    if list_containers:
        print_containers(runtime)
        raise Finished(0)
    if host is None:
        raise MaceError("missing HOST (see --help)")
    return host


def output_mode(json_out: bool, ndjson: bool) -> str:
    """text, json or ndjson, from --json / --ndjson (not both)."""
    if json_out and ndjson:
        raise MaceError("--json and --ndjson are mutually exclusive")
    return "json" if json_out else "ndjson" if ndjson else "text"


def print_containers(runtime: str) -> None:
    """--list-containers: the running containers mace can measure, with their netns."""
    from mace_tools.probe import netns as netns_mod
    from mace_tools.probe.containers import list_running

    rows = list_running(runtime)
    print(f"{'NAME':24} {'ID':12} {'RUNTIME':10} {'PID':>8}  NETNS")
    for c in rows:
        print(f"{c.name:24} {c.id:12} {c.runtime:10} {c.pid:>8}  "
              f"net:[{netns_mod.inode(c.netns_path)}]")
