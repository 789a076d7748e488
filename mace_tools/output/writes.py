"""Output written as ping writes it: each piece flushed at once (a reader sees each reply
as it comes), and a stdout that cannot take it ends the run in one line."""

from __future__ import annotations

from typing import IO

from mace_tools.errors import MaceError


def write(out: IO[str], text: str) -> None:
    """text to out, flushed. A full or failing stdout (ENOSPC, EIO) is iputils' `write
    error: ...` and exit 1; a reader that has gone (BrokenPipeError) is left to the
    command, which ends as ping does (cli.stdio.end_as_ping_on_broken_pipe)."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise MaceError(f"write error: {exc.strerror or exc}", exit_code=1) from None
