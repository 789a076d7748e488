"""Waiting for a condition in tests: polled until true or until the time is up."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], timeout_s: float, every_s: float) -> bool:
    """Whether check() turned true within timeout_s, asked every every_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    return False
