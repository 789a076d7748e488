"""SIGQUIT (Ctrl-\\) asks a running mace-ping for iputils' status line, and the run goes on.

The handler only takes note; the run's loop prints. Python runs handlers between bytecodes
of the main thread, but a run sleeping in epoll would not look before its next wake-up
(up to -i or -W seconds), so the signal also wakes the epoll: signal.set_wakeup_fd writes
a byte to a pipe the loop watches.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any


class StatusSignal:
    """SIGQUIT -> `take()` is True once; `fd` (None outside the main thread, where signals
    cannot be handled) is readable after any signal and is emptied by `drain()`."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._write_fd: int | None = None
        self._pending = False
        self._old_handler: Any = signal.SIG_DFL
        self._old_wakeup = -1

    @classmethod
    def install(cls) -> StatusSignal:
        status = cls()
        if threading.current_thread() is threading.main_thread():
            status._install()
        return status

    def _install(self) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_handler = signal.signal(signal.SIGQUIT, self._note)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    def drain(self) -> None:
        if self.fd is None:
            return
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def take(self) -> bool:
        pending, self._pending = self._pending, False
        return pending

    def close(self) -> None:
        """Give SIGQUIT and the wakeup fd back as they were (SIGQUIT: core dump)."""
        if self.fd is None or self._write_fd is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        # None: a handler not set from Python; the default is what mace-ping started with
        signal.signal(signal.SIGQUIT, self._old_handler if self._old_handler is not None
                      else signal.SIG_DFL)
        os.close(self.fd)
        os.close(self._write_fd)
        self.fd = self._write_fd = None
