"""/etc/netns/NAME files of the tests (ip netns exec reads them, and so does mace for
--netns NAME), removed without touching another test run's."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


def remove_netns_etc(etc: Path, created_parent: bool) -> None:
    """Remove a test's /etc/netns/NAME, and /etc/netns itself if the test made it and no
    one else (another test run on this machine) has put anything there since."""
    shutil.rmtree(etc, ignore_errors=True)
    if created_parent:
        with contextlib.suppress(OSError):
            etc.parent.rmdir()  # only if empty
