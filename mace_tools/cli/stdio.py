"""The commands' standard streams and their exit, as ping has them: a closed stdout or
stderr goes nowhere, a reader that goes ends the command by SIGPIPE, and a console
script exits without the interpreter's teardown. Imports nothing heavy: cli.launch uses
it before it starts anything."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn


def closed_stdio_to_devnull() -> None:
    """Where stdout or stderr was closed (`mace-ping ... >&-`), /dev/null takes its fd
    first, so no socket or BPF fd opened later becomes fd 1 or 2 and gets our output;
    then Python's stream, which it left None. As ping's writes to a closed fd, the output
    goes nowhere."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115  (for good)


def end_as_ping_on_broken_pipe() -> NoReturn:
    """The reader of stdout (or stderr) has gone (`mace-ping ... | head -1`): end
    silently, killed by SIGPIPE, as ping is (the shell's 141). Python ignores SIGPIPE, so
    the write raised BrokenPipeError instead, and the run's cleanup ran on its way here."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # (not reached: the signal ends the process)


def exit_now(prog: str, status: int) -> NoReturn:
    """Exit without the interpreter's teardown, which frees every module one by one
    (~8 ms of a `mace-ping -c 1`): a run has closed what it opened by the time its command
    returns, and the kernel frees the rest. Buffered output is written first; if stdout
    cannot take it, iputils' `write error` and exit 1."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BrokenPipeError:
        end_as_ping_on_broken_pipe()
    except OSError as exc:
        os.write(2, f"{prog}: write error: {exc.strerror or exc}\n".encode())
        os._exit(1)
    os._exit(status)
