"""mace-lab's command line: the hint `mace-lab up` prints measures what it says."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mace_tools.cli.lab", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.lab
def test_the_up_hint_gets_corrected_replies() -> None:
    prefix = f"ml{os.getpid() % 100000}"
    up = _lab("up", "--prefix", prefix)
    try:
        assert up.returncode == 0, up.stderr
        hint = next(line for line in up.stdout.splitlines() if line.startswith("try: "))
        words = shlex.split(hint.removeprefix("try: "))
        at = words.index("mace-ping")  # the installed command, as this checkout's module
        cmd = [*words[:at], sys.executable, "-m", "mace_tools.cli.ping", *words[at + 1:]]
        proc = subprocess.run([*cmd[:-1], "-i", "0.01", cmd[-1]], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.count("corrected=") == 5 and "corrected=none" not in proc.stdout, \
            proc.stdout
    finally:  # (asserted after: a failure above stays the one reported)
        down = _lab("down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
