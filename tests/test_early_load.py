"""Start-up: the program set loaded (and the run's nonce made ready) on a thread while the
command still imports and parses (kernel.early, cli.launch), and map-of-maps updates done
at once (programs._concurrently)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mace_tools.agent.protocol import DEFAULT_SOCKET
from mace_tools.cli import launch
from mace_tools.errors import MaceError
from mace_tools.kernel import early, native, programs
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


def _inner_id(pset: programs.ProgramSet, role: str, nonce: bytes) -> int | None:
    raw = native.map_lookup(pset.fds[role], nonce, 4)
    return struct.unpack("=I", raw)[0] if raw is not None else None


@pytest.mark.parametrize("taken", [("rings", "lost"), ("lost",), ("rings",)])
def test_a_clashing_reservation_takes_out_nothing_of_the_holder(taken: tuple[str, ...]
                                                                ) -> None:
    """The inserts go at once: the one that found the nonce taken must not delete the
    holder's map under it, and the other must not stay in."""
    pset, _ = programs.attached_set(object_path())
    nonce = os.urandom(8)
    ring, lost = programs._ring_and_counter()
    holder = {"rings": ring, "lost": lost}
    try:
        for role in taken:
            native.map_update(pset.fds[role], nonce, struct.pack("=I", holder[role]))
        with pytest.raises(MaceError, match="in use"):
            programs.reserve(pset, nonce)
        for role in ("rings", "lost"):
            want = native.map_id(holder[role]) if role in taken else None
            assert _inner_id(pset, role, nonce) == want, role
    finally:
        for role in ("rings", "lost"):
            native.map_delete(pset.fds[role], nonce)
        os.close(ring)
        os.close(lost)
        pset.close()


def test_a_run_is_prepared_entry_first_and_a_failed_one_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle entry goes in before the maps (a process ending in between leaves only
    what the next join clears); a failed reservation takes the entry out again."""
    pset, _ = programs.attached_set(object_path())
    nonce = os.urandom(8)
    entries_seen: list[bool] = []

    def failing_reserve(pset: programs.ProgramSet, nonce: bytes, *_: object) -> None:
        entries_seen.append(nonce in pset.run_entries())
        raise OSError(28, "no space")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(programs, "reserve", failing_reserve)
            with pytest.raises(OSError):
                programs.prepare_run(pset, nonce)
        assert entries_seen == [True]
        assert nonce not in pset.run_entries()
    finally:
        pset.close()


def test_an_entry_whose_maps_never_went_in_is_cleared() -> None:
    pset, _ = programs.attached_set(object_path())
    nonce = os.urandom(8)
    token = programs.new_token()
    try:
        programs.add_entry(pset, nonce, programs.RunEntry(0, 0, 0, native.map_id(token), 1))
        os.close(token)  # the process that made it is gone
        assert nonce not in programs._clear_dead(pset)
        assert nonce not in pset.run_entries()
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
        ours = {native.map_id(pset.fds[role]) for role in ("runs", "rings", "lost")}
        for fd in pset.prog_fds.values():  # the programs use the maps made here
            assert ours <= set(native.prog_name_and_maps(fd)[1])
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


# mace-ping as its installed script runs it (cli.launch), in a child: the command drops
# its privileges once set up, which must not happen to the test process. Its last stderr
# line says what it took early, what it gave back, and (once the early thread is done)
# whether anything is still pending.
LAUNCHED = """
import json, sys
from mace_tools.cli import launch
from mace_tools.kernel import early
launch.exit_now = lambda prog, status: sys.exit(status)  # (the real one skips this report)
taken, released, real_take, real_release = [], [], early.take, early.release
early.take = lambda path: taken.append(real_take(path)) or taken[-1]
def release():
    released.append(early.nonce())
    real_release()
early.release = release
sys.argv = ["mace-ping", *sys.argv[1:]]
thread = []
real_start = early.start
early.start = lambda *a: (real_start(*a), thread.append(early._pending))
try:
    rc = launch.ping()
except SystemExit as exc:
    rc = exc.code
for t in thread:
    t.join()  # its work given back, if it was
got = taken[0] if taken else None
print(json.dumps({"rc": rc, "taken": len(taken), "started": len(thread),
                  "prepared": got.prepared.reservation.nonce.hex()
                  if got is not None and got.prepared is not None else None,
                  "released": [n.hex() if n else None for n in released]}), file=sys.stderr)
"""


def _launch(*args: str) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "MACE_AGENT"}
    proc = subprocess.run([sys.executable, "-c", LAUNCHED, *args], capture_output=True,
                          text=True, timeout=60, env=env)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0, proc.stderr
    return proc.stdout, report


@pytest.mark.skipif(DEFAULT_SOCKET.exists(), reason="an agent would serve the run")
def test_the_launcher_gives_the_run_its_early_set() -> None:
    out, report = _launch("--json", "-c", "2", "-i", "0.01", "127.0.0.1")
    mace = json.loads(out)["mace"]
    assert mace["source"] == "local" and mace["replies_with_kernel_data"] == 2
    assert report["started"] == 1 and report["taken"] == 1 and report["released"] == []
    assert report["prepared"] == mace["nonce"]  # the run's nonce is the prepared one


@pytest.mark.skipif(DEFAULT_SOCKET.exists(), reason="an agent would serve the run")
def test_a_run_with_no_kernel_data_gives_the_early_set_back() -> None:
    """Probes too short for the nonce: nothing is taken, and the prepared run is out of
    the set while the run goes on (a set shared with others stays theirs)."""
    keeper, _ = programs.attached_set(object_path())
    try:
        _, report = _launch("-c", "1", "-s", "4", "127.0.0.1")
        assert report["started"] == 1 and report["taken"] == 0
        assert len(report["released"]) == 1 and report["released"][0] is not None
        assert bytes.fromhex(report["released"][0]) not in keeper.run_entries()
    finally:
        keeper.close()


def test_the_agent_or_no_corrections_starts_nothing() -> None:
    _, report = _launch("--corrections", "none", "-c", "1", "127.0.0.1")
    assert report["started"] == 0 and report["taken"] == 0


@pytest.mark.skipif(DEFAULT_SOCKET.exists(), reason="an agent would serve the run")
def test_the_console_script_runs_corrected() -> None:
    script = Path(sys.executable).with_name("mace-ping")
    env = {k: v for k, v in os.environ.items() if k != "MACE_AGENT"}
    proc = subprocess.run([str(script), "--json", "-c", "2", "-i", "0.01", "127.0.0.1"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    mace = json.loads(proc.stdout)["mace"]
    assert mace["source"] == "local" and mace["replies_with_kernel_data"] == 2
