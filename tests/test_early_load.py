"""Start-up: the program set loaded (and the run's nonce made ready) on a thread while the
command still imports and parses (kernel.early, cli.launch), and map-of-maps updates done
at once (programs._concurrently)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mace_tools.agent.protocol import DEFAULT_SOCKET
from mace_tools.cli import launch
from mace_tools.errors import MaceError
from mace_tools.kernel import early, programs
from mace_tools.kernel.backend import Backend, object_path


@pytest.mark.parametrize(("argv", "socket_exists", "env", "loads"), [
    (["-c", "1", "198.18.0.2"], False, {}, True),
    (["-c", "1", "198.18.0.2"], True, {}, False),  # the agent at its default socket
    (["-c", "1", "198.18.0.2"], False, {"MACE_AGENT": "/x.sock"}, False),
    (["--netns", "c0", "198.18.0.2"], True, {}, True),  # the agent serves no other netns
    (["--nonce=00112233445566ff", "h"], True, {"MACE_AGENT": "/x"}, True),
    (["--corrections", "local", "h"], True, {}, True),
    (["--corrections=none", "h"], False, {}, False),
    (["--corrections", "agent", "h"], False, {}, False),
    (["--corrections", "auto", "h"], False, {}, True),
    (["--agent", "/x.sock", "h"], False, {}, False),
    (["--agent=/x.sock", "--netns", "c0", "h"], False, {}, False),
    (["-h"], False, {}, False),
    (["--version"], False, {}, False),
    (["--list-containers"], False, {}, False),
    (["-c", "1", "--", "-h"], False, {}, True),  # an operand, not an option
])
def test_the_launcher_guesses_from_the_raw_command_line(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], socket_exists: bool,
        env: dict[str, str], loads: bool) -> None:
    monkeypatch.delenv("MACE_AGENT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch.will_load_programs(argv, socket_exists) is loads


def test_concurrent_calls_all_run_and_each_error_is_its_own() -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def ok(i: int) -> None:
        with lock:
            ran.append(i)

    def bad(i: int) -> None:
        ok(i)
        raise OSError(i, "no")

    errors = programs._concurrently([lambda: ok(0), lambda: bad(1), lambda: ok(2),
                                     lambda: bad(3)])
    assert sorted(ran) == [0, 1, 2, 3]
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], OSError) and errors[1].errno == 1
    assert isinstance(errors[3], OSError) and errors[3].errno == 3
    assert programs._concurrently([]) == []


def test_a_clashing_reservation_takes_out_nothing_of_the_holder() -> None:
    """Two inserts at once: the one that found the nonce taken must not delete the
    other run's maps under it, nor leave its own half in."""
    pset, _ = programs.attached_set(object_path())
    nonce = os.urandom(8)
    try:
        held = programs.reserve(pset, nonce)
        try:
            with pytest.raises(MaceError, match="in use"):
                programs.reserve(pset, nonce)
            programs.unreserve(pset, held)  # both maps still there: no error
        except BaseException:
            held.close()
            raise
    finally:
        pset.close()


def test_a_load_lets_a_run_be_prepared_while_the_verifier_works() -> None:
    seen: list[tuple[set[str], int]] = []
    made: list[programs.PreparedRun] = []
    nonce = os.urandom(8)

    def meanwhile(pset: programs.ProgramSet) -> None:
        seen.append((set(pset.fds), len(pset.links)))
        made.append(programs.prepare_run(pset, nonce))

    path = object_path()
    pset = programs.load(path, programs.build_of(path), meanwhile)
    try:
        assert seen == [({"runs", "rings", "lost"}, 0)]
        entry = pset.run_entries()[nonce]
        assert entry.flags == 0 and entry.owner_pid == os.getpid()  # idle: no switches
        programs.discard_run(pset, made[0])
        assert nonce not in pset.run_entries()
    finally:
        pset.close()


def test_the_run_takes_the_early_set_and_its_prepared_nonce(
        monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[early.EarlySet | None] = []
    real_take = early.take
    monkeypatch.setattr(early, "take", lambda path: taken.append(real_take(path)) or taken[-1])
    early.start(object_path(), prepare=True)
    nonce = early.nonce()
    assert nonce is not None
    backend = Backend(nonce, records=True)
    try:
        backend.open()
        got = taken[0]
        assert got is not None and got.prepared is not None
        assert got.prepared.reservation.nonce == nonce
        member = backend._member
        assert member is not None and member.pset is got.pset
        assert member.ring_fd == got.prepared.reservation.ring_fd
        entry = member.pset.run_entries()[nonce]
        assert entry.flags & programs.RUN_RECORDS  # activated in place of the idle one
        assert entry.token_id == got.prepared.idle.token_id
    finally:
        backend.close()
    assert early.nonce() is None  # taken once


def test_an_early_set_of_another_object_is_given_back() -> None:
    keeper, _ = programs.attached_set(object_path())  # to look at the set after
    try:
        early.start(object_path(), prepare=True)
        nonce = early.nonce()
        assert early.take(Path("/nonexistent/other.bpf.o")) is None
        assert nonce not in keeper.run_entries()
    finally:
        keeper.close()


def test_a_prepared_run_never_taken_is_cleared_by_the_next_join() -> None:
    """A process that prepared a run and ended without it (the options chose the agent,
    say) leaves an idle entry whose token died with it."""
    code = ("from mace_tools.kernel import early, backend\n"
            "early.start(backend.object_path(), prepare=True)\n"
            "n = early.nonce(); early._pending.join(); print(n.hex())\n")
    keeper, _ = programs.attached_set(object_path())
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        nonce = bytes.fromhex(out.strip())
        assert nonce in keeper.run_entries()  # left behind, idle
        backend = Backend(os.urandom(8))
        try:
            backend.open()
            assert nonce not in keeper.run_entries()
        finally:
            backend.close()
    finally:
        keeper.close()


@pytest.mark.skipif(DEFAULT_SOCKET.exists(), reason="an agent would serve the run")
def test_the_console_script_runs_corrected() -> None:
    script = Path(sys.executable).with_name("mace-ping")
    env = {k: v for k, v in os.environ.items() if k != "MACE_AGENT"}
    proc = subprocess.run([str(script), "--json", "-c", "2", "-i", "0.01", "127.0.0.1"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    mace = json.loads(proc.stdout)["mace"]
    assert mace["source"] == "local" and mace["replies_with_kernel_data"] == 2
