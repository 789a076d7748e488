"""One exception type for every user-facing failure.

Raised anywhere below the CLI with a one-line message; the CLI prints
``<tool>: <message>`` on stderr and exits with ``exit_code`` (2, as ping does on errors).
"""

from __future__ import annotations


class MaceError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NoPrivilege(MaceError):
    """The process may not load or join the BPF programs: a run can still go on raw."""


class Finished(Exception):  # (not an error: the command has given its answer)
    """The command has answered in full (-V, --list-containers, --help) and exits with
    exit_code."""

    def __init__(self, exit_code: int = 0) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code
