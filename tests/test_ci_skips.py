"""With CI=true a lab test that skips is a failure; elsewhere it stays a skip.

Each case runs pytest in a subprocess on a tiny test file with this directory's real
conftest loaded as a plugin (`-p conftest`), so what is checked is the hook the suite uses.
A skip in the test body becomes a failure, a skip in set-up (a marker, a fixture) an error:
either fails the run, with the skip's reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TINY = '''
import pytest


@pytest.mark.lab
def test_lab_runs():
    pass

@pytest.mark.lab
def test_lab_skips():
    pytest.skip("engine did not start")

@pytest.fixture
def no_engine():
    pytest.skip("no engine in fixture")

@pytest.mark.lab
def test_lab_fixture_skips(no_engine):
    pass

def test_plain_skip():
    pytest.skip("not a lab test")

@pytest.mark.lab
@pytest.mark.xfail(reason="known", strict=True)
def test_lab_xfail():
    assert False
'''


def run_tiny(tmp_path: Path, **env: str) -> tuple[dict[str, int], str]:
    """Outcome counts (and "exit") and output of pytest on TINY with the given environment changes
    (an empty value removes the variable)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lab: needs the lab\n")
    (tmp_path / "test_tiny.py").write_text(TINY)
    full = {**os.environ, "PYTHONPATH": str(TESTS)}
    for key, value in env.items():
        if value:
            full[key] = value
        else:
            full.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rfEs",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
         str(tmp_path / "test_tiny.py")],
        capture_output=True, text=True, timeout=120, env=full, cwd=tmp_path)
    summary = proc.stdout.strip().splitlines()[-1]
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    return {**counts, "exit": proc.returncode}, proc.stdout


def test_lab_skips_fail_under_ci(tmp_path: Path) -> None:
    counts, out = run_tiny(tmp_path, CI="true", MACE_BPF_OBJECT="")
    assert counts == {"failed": 1, "error": 1, "passed": 1, "skipped": 1, "xfailed": 1,
                      "exit": 1}, out
    assert re.search(r"FAILED .*::test_lab_skips - .*engine did not start", out), out
    assert re.search(r"ERROR .*::test_lab_fixture_skips - .*no engine in fixture", out), out
    assert re.search(r"SKIPPED .*not a lab test", out), out


def test_lab_skips_stay_skips_outside_ci(tmp_path: Path) -> None:
    counts, out = run_tiny(tmp_path, CI="", MACE_BPF_OBJECT="")
    assert counts == {"passed": 1, "skipped": 3, "xfailed": 1, "exit": 0}, out


def test_missing_bpf_object_fails_every_lab_test_under_ci(tmp_path: Path) -> None:
    """The conftest's own reason: the lab is unavailable, so every lab test would skip."""
    missing = str(tmp_path / "absent" / "mace.bpf.o")
    counts, out = run_tiny(tmp_path, CI="true", MACE_BPF_OBJECT=missing)
    assert counts == {"error": 4, "skipped": 1, "exit": 1}, out
    assert re.search(r"ERROR .*::test_lab_runs - .*BPF object not built", out), out
    counts, out = run_tiny(tmp_path, CI="", MACE_BPF_OBJECT=missing)
    assert counts == {"skipped": 5, "exit": 0}, out
