"""The console scripts mace-ping and mace-traceroute: a guess at the run's event source
from the raw command line, then the command.

When the run will most likely load its own BPF programs (it may, and no agent and no
option says otherwise), loading starts on a thread (kernel.early) before the command
imports its modules and parses its options, so the two overlap: `mace-ping -c 1`
alone on a host reaches its first probe ~40 ms sooner (bench start-up: 180 -> 141 ms).
The guess decides nothing: the command chooses its source from its parsed options as
always (sources.py), and what was started for nothing is given back (early.release) or
goes when the process exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from mace_tools.cli.stdio import closed_stdio_to_devnull, end_as_ping_on_broken_pipe, exit_now

# Options after which the run loads no programs of its own (or does not run at all).
_NO_LOAD = ("-h", "--help", "-V", "--version", "--list-containers", "--agent")
# Options with which the agent does not serve the run: it loads its own programs.
_NOT_AGENT = ("--netns", "--pid", "--container", "--nonce")


def will_load_programs(argv: list[str], agent_socket_exists: bool) -> bool:
    """The words of the command line say this run will load (or join) its own programs:
    nothing asks for help, the agent or no corrections, and no agent would serve it."""
    words = _words(argv)
    names = _names(argv)
    if names & set(_NO_LOAD):
        return False
    corrections = _value(words, "--corrections")
    if corrections == "local":
        return True
    if corrections is not None and corrections != "auto":
        return False
    if names & set(_NOT_AGENT):
        return True
    return not (os.environ.get("MACE_AGENT") or agent_socket_exists)


def _words(argv: list[str]) -> list[str]:
    """The words before "--" (after it, only operands)."""
    return argv[:argv.index("--")] if "--" in argv else argv


def _names(argv: list[str]) -> set[str]:
    """The option names given (long ones without their "=value")."""
    return {word.split("=", 1)[0] for word in _words(argv) if word.startswith("-")}


def _value(words: list[str], name: str) -> str | None:
    """The value given to a long option (its last), or None."""
    value = None
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def _start_loading(prepare: bool) -> None:
    """Start kernel.early on the shipped object if this run will most likely need it and
    may load it (prepare: a run with a nonce of early's, unless --nonce names one). Any
    doubt (no privilege, no object, no BTF) starts nothing."""
    from mace_tools.agent.protocol import DEFAULT_SOCKET
    from mace_tools.sources import may_load_programs

    if not will_load_programs(sys.argv[1:], DEFAULT_SOCKET.exists()) or \
            not may_load_programs():
        return
    from mace_tools.kernel import backend, early

    try:
        path = backend.object_path()
    except Exception:  # the run meets it again and reports it
        return
    if path.exists() and backend.VMLINUX_BTF.exists():
        early.start(path, prepare and "--nonce" not in _names(sys.argv[1:]))


def ping() -> NoReturn:
    closed_stdio_to_devnull()
    _start_loading(prepare=True)
    from mace_tools.cli.ping import PROG, main

    _exit_with(PROG, main)


def traceroute() -> NoReturn:
    closed_stdio_to_devnull()
    _start_loading(prepare=False)  # a traceroute chooses its nonce before it asks
    from mace_tools.cli.traceroute import PROG, main

    _exit_with(PROG, main)


def _exit_with(prog: str, main: Callable[[], int]) -> NoReturn:
    """main's status, the process's exit (stdio.exit_now); a reader of stdout or stderr
    that went while main wrote its last words (an error line) ends it as ping ends."""
    try:
        status = main()
    except BrokenPipeError:
        end_as_ping_on_broken_pipe()
    exit_now(prog, status)
