"""mace-agent: the protocol on its own, then the agent in the namespace lab's host netns
serving clients that run inside the lab's containers without privilege.

The agent runs as a real process (python -m mace_tools.cli.agent) on a socket in a
directory of its own; clients are real mace-ping processes (or this test process, for the
protocol's edge cases) and are measured against truth v2 on the lab's outer link.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from accuracy import PROBES, assert_accurate_errors, assert_covered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waiting import eventually

from mace_tools.agent import client, protocol, server
from mace_tools.agent.protocol import ProtocolError
from mace_tools.errors import MaceError
from mace_tools.kernel import native, programs
from mace_tools.lab.agent import AgentProcess, ping_sockets_open, with_capabilities
from mace_tools.lab.capture import TruthCapture
from mace_tools.lab.demo import PingRun, compare, parse_ndjson
from mace_tools.lab.topology import Lab

# --- the protocol on its own (no privilege) ---------------------------------------------


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[1]", b"1", b'"run"', b'{"op":"run"}', b'{"v":1,"op":"run"}',
    b'{"v":2,"op":"run","records":NaN}', b'{"v":2, "x": Infinity}', b"\xff\xfe",
    b"[" * 3000 + b"]" * 3000,
])
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(data)


def test_fields_are_checked_strictly() -> None:
    message = protocol.decode(b'{"v":2,"op":"run","records":true,"run":3,"n":1.0,"b":true}')
    assert protocol.boolean(message, "records") is True
    assert protocol.boolean(message, "path") is False  # absent: off
    assert protocol.integer(message, "run", 1, 10) == 3
    for key, lo, hi in (("n", 0, 10), ("b", 0, 10), ("run", 4, 10), ("missing", 0, 1)):
        with pytest.raises(ProtocolError):
            protocol.integer(message, key, lo, hi)
    with pytest.raises(ProtocolError):
        protocol.boolean({"records": 1}, "records")


def test_messages_round_trip_with_their_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        protocol.send(a, {"ok": True, "run": 1}, (r, w))
        message, fds = protocol.receive(b)
        assert message == {"v": 2, "ok": True, "run": 1} and len(fds) == 2
        protocol.close_all(fds)
        a.sendmsg([b"x" * (protocol.MAX_MESSAGE + 1)])
        with pytest.raises(ProtocolError, match="longer than"):
            protocol.receive(b)
        a.close()
        assert protocol.receive(b) == (None, [])  # the peer closed
    finally:
        for fd in (r, w):
            os.close(fd)
        b.close()


def test_an_unreachable_agent_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MaceError, match=r"cannot reach mace-agent at .*No such file"):
        client.open_run(tmp_path / "agent.sock", None, records=True)


# --- the agent in the lab -----------------------------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def running_agent(lab: Lab, *args: str) -> AgentProcess:
    """A mace-agent process in the lab's host netns, on a socket of its own, started."""
    return AgentProcess("-v", *args, prefix=lab.on_host(), env=_env()).start()


@pytest.fixture(scope="module")
def ping_sockets(lab: Lab) -> Iterator[None]:
    """Containers 0 and 1 let every group open ICMP ping sockets, as Docker's do."""
    with ping_sockets_open(lab.container_ns(i) for i in (0, 1)):
        yield


@pytest.fixture(scope="module")
def agent(lab: Lab, ping_sockets: None) -> Iterator[AgentProcess]:
    running = running_agent(lab)
    try:
        yield running
    finally:
        log = running.log_text()
        status = running.stop()
        assert status == 0, log
        assert not running.socket_left, "a stopped agent removes its socket file"


def client_command(lab: Lab, container: int, agent: AgentProcess, *args: str,
                   capabilities: tuple[str, ...] = ()) -> list[str]:
    """mace-ping inside a lab container, through the agent, with no capability at all (it
    probes through a ping socket: fixture ping_sockets)."""
    return ["ip", "netns", "exec", lab.container_ns(container),
            *with_capabilities(*capabilities), sys.executable, "-m", "mace_tools.cli.ping",
            "--agent", str(agent.socket), *args, lab.target_addr]


def client_ping(lab: Lab, container: int, agent: AgentProcess, *args: str) -> PingRun:
    proc = subprocess.run(client_command(lab, container, agent, "--ndjson", *args),
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode != 2, proc.stderr
    records, summary = parse_ndjson(proc.stdout)
    return PingRun(records, summary, proc.returncode, proc.stderr)


def host_ino(lab: Lab) -> int:
    return os.stat(lab.netns_path(lab.host_ns)).st_ino


@pytest.mark.lab
def test_unprivileged_client_is_corrected_against_truth(lab: Lab, agent: AgentProcess) -> None:
    with TruthCapture(lab.outer_link, "icmp", expect_requests=PROBES) as cap:
        run = client_ping(lab, 0, agent, "-c", str(PROBES), "-i", "0.005")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    mace = run.summary["mace"]
    assert mace["source"] == "agent"
    assert_covered(mace, PROBES)
    assert mace["kernel_events_lost"] == 0
    rows = compare(run, cap)
    assert len(rows) == PROBES
    assert all(r.capture_ms is not None for r in rows), "capture missed probes"
    rows = [r for r in rows if r.corrected_ms is not None]
    # taken at the host's outer device, whose name the agent withholds (no --reveal-path)
    assert {r.outer_dev for r in rows} == {f"@{host_ino(lab)}"}
    errors = [r.error_us for r in rows]
    assert_accurate_errors(errors)
    assert all(r.corrected_ms < r.raw_ms for r in rows)


def _inside(lab: Lab, *args: str, capabilities: tuple[str, ...] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """mace-ping in container 0, as root (capabilities None) or with only those."""
    caps = () if capabilities is None else with_capabilities(*capabilities)
    return subprocess.run(["ip", "netns", "exec", lab.container_ns(0), *caps, sys.executable,
                           "-m", "mace_tools.cli.ping", *args, lab.target_addr],
                          capture_output=True, text=True, timeout=120, env=env or _env())


@pytest.mark.lab
def test_corrections_picks_where_the_kernel_data_comes_from(lab: Lab, agent: AgentProcess) -> None:
    """--corrections: auto takes the agent, local this process's programs, none nothing (no
    line on stderr, every reply raw); agent and local fail where auto would fall back."""
    env = {**_env(), "MACE_AGENT": str(agent.socket)}
    for asked, got in (("auto", "agent"), ("local", "local"), ("none", "none")):
        proc = _inside(lab, "--corrections", asked, "--ndjson", "-c", "3", "-i", "0.01", env=env)
        assert proc.returncode == 0 and proc.stderr == "", (asked, proc.stderr)
        records, summary = parse_ndjson(proc.stdout)
        assert summary["mace"]["source"] == got and len(records) == 3, (asked, summary)
        corrected = [r["rtt_corrected"] for r in records]
        assert all(c is None for c in corrected) if got == "none" else \
            all(c is not None for c in corrected), (asked, corrected)
    refused = [
        (("--corrections", "agent"), None, {**_env(), "MACE_AGENT": "/nonexistent/agent.sock"},
         "/nonexistent/agent.sock"),
        (("--corrections", "local"), (), env,  # no capability: no programs of its own
         "--corrections local: no BPF privilege"),
        (("--corrections", "none", "--agent", str(agent.socket)), None, env,
         "--agent cannot go with --corrections none"),
        (("--corrections", "somewhere"), None, env, "'somewhere' is not one of")]
    for args, caps, run_env, words in refused:
        proc = _inside(lab, *args, "-c", "1", capabilities=caps, env=run_env)
        assert proc.returncode == 2 and proc.stdout == "" \
            and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("mace-ping: ") and words in proc.stderr, proc.stderr


@pytest.mark.lab
def test_host_details_are_withheld_from_the_path(lab: Lab, agent: AgentProcess) -> None:
    run = client_ping(lab, 0, agent, "-c", "2", "-i", "0.01")
    container_ino = os.stat(lab.netns_path(lab.container_ns(0))).st_ino
    stages = [s for r in run.records for s in r["path"]]
    outside = [s for s in stages if s["netns"] != container_ino]
    inside = [s for s in stages if s["netns"] == container_ino]
    assert outside and inside
    assert all(s["dev"] == "" and s["src"] == "0.0.0.0" for s in outside), outside
    assert all(s["dev"] == "eth0" for s in inside), inside


@pytest.mark.lab
def test_two_clients_at_once_get_their_own_runs(lab: Lab, agent: AgentProcess) -> None:
    procs = [subprocess.Popen(client_command(lab, i, agent, "--ndjson", "-c", "40", "-i",
                                             "0.01"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in (0, 1)]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        runs.append(parse_ndjson(out))
    nonces = {summary["mace"]["nonce"] for _, summary in runs}
    assert len(nonces) == 2
    for records, summary in runs:
        assert summary["mace"]["source"] == "agent"
        assert_covered(summary["mace"], 40)
        assert len(records) == 40
        assert summary["mace"]["kernel_events_lost"] == 0, summary["mace"]
    # each read its own ring: the same path from c0 and c1, so as many records and events
    # (one record per answer, an event per device crossed); the other's would add theirs
    assert runs[0][1]["mace"]["kernel_records"] == runs[1][1]["mace"]["kernel_records"], \
        [summary["mace"] for _, summary in runs]


@pytest.mark.lab
@pytest.mark.parametrize("reveal", [[], ["--reveal-path"]])
def test_a_client_run_past_its_probe_rate_loses_only_its_own_kernel_data(
        lab: Lab, ping_sockets: None, reveal: list[str]) -> None:
    """--probe-rate 20: a client run sending 100 probes a second has kernel data for
    a second's worth of probes at once, then for 20 a second; its other replies are
    measured raw, and its records counted lost. A run within the limit beside it, on the
    same agent, has kernel data on every reply."""
    limited = running_agent(lab, "--probe-rate", "20", *reveal)
    try:
        start = time.monotonic()
        fast = subprocess.Popen(client_command(lab, 0, limited, "--ndjson", "-c", "150",
                                               "-i", "0.01"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        try:
            within = client_ping(lab, 1, limited, "-c", "8", "-i", "0.1")
            out, err = fast.communicate(timeout=60)
        finally:
            if fast.poll() is None:
                fast.kill()
                fast.wait()
        elapsed_s = time.monotonic() - start
    finally:
        assert limited.stop() == 0, limited.log_text()
    assert within.summary["mace"]["replies_with_kernel_data"] == 8, within.summary["mace"]
    assert "probes a second" not in within.stderr  # 10 a second: within the limit
    assert fast.returncode == 0, err
    assert err.splitlines() == ["mace-ping: mace-agent gives kernel data to 20 probes a "
                                "second of a run: past that, replies are measured raw"], err
    records, summary = parse_ndjson(out)
    assert len(records) == 150  # every reply is shown, raw or corrected
    mace = summary["mace"]
    assert mace["source"] == "agent" and mace["kernel_events_lost"] > 0, mace
    # a second's worth at once, then 20 a second (+1: the first; +2: CPUs racing)
    assert 20 <= mace["replies_with_kernel_data"] <= 20 + 20 * elapsed_s + 3, \
        (mace, elapsed_s)
    # and not the burst alone: the second half of the run (past the ~26 of the burst)
    late = [r for r in records if r["seq"] > 75 and r.get("rtt_corrected") is not None]
    assert 5 <= len(late) < 75, len(late)


# A client holding a run (records, and the path if argv[3] is "path"): prints its nonce,
# then on each line of stdin drains its ring and prints how many records and events it
# has read, and "probe" sends 3 probes of its own first.
_HOLDER = """
import sys, time, socket
from pathlib import Path
from mace_tools.agent import client
from mace_tools.probe.icmp import EchoTemplate
ev = client.open_run(Path(sys.argv[1]), None, records=True, path=sys.argv[3] == "path")
print(ev.nonce.hex(), flush=True)
records = []
for line in sys.stdin:
    if line.strip() == "probe":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        t = EchoTemplate(4242, ev.nonce, 56)
        for n in (1, 2, 3):
            s.sendto(t.message(n), (sys.argv[2], 0))
            time.sleep(0.05)
    ev.drain(records.append, records.append)
    print(len(records), flush=True)
"""


@pytest.mark.lab
@pytest.mark.parametrize("what", ["records", "path"])
def test_probes_from_another_netns_get_nothing(lab: Lab, agent: AgentProcess,
                                               what: str) -> None:
    """A run is for the netns its client is in: probes carrying its nonce sent from any
    other netns produce no record and no path event for it; its own do."""
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.container_ns(0), *with_capabilities("net_raw"),
         sys.executable, "-c", _HOLDER, str(agent.socket), lab.target_addr, what],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env())
    try:
        assert holder.stdout is not None and holder.stdin is not None
        nonce = bytes.fromhex(holder.stdout.readline().strip())
        from mace_tools.probe import netns
        from mace_tools.probe.icmp import EchoTemplate

        with netns.entered(Path(lab.netns_path(lab.container_ns(1)))):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            template = EchoTemplate(4242, nonce, 56)
            for n in (1, 2, 3):
                raw.sendto(template.message(n), (lab.target_addr, 0))
                time.sleep(0.05)
        finally:
            raw.close()
        time.sleep(0.2)
        holder.stdin.write("drain\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "0"
        holder.stdin.write("probe\n")
        holder.stdin.flush()
        got = int(holder.stdout.readline())
        # 3 records; with the path also an event per device crossed (2 netns, 4+ devices)
        assert got == 3 if what == "records" else got > 3 * 8
    finally:
        holder.kill()
        holder.communicate()


def _owners_include(pid: int) -> bool:
    return pid in programs.run_owners()


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    return eventually(condition, timeout_s, every_s=0.05)


@pytest.mark.lab
def test_a_killed_client_has_its_runs_freed(lab: Lab, agent: AgentProcess) -> None:
    proc = subprocess.Popen(client_command(lab, 0, agent, "-c", "1000", "-i", "0.05"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        assert _wait_for(lambda: _owners_include(proc.pid)), "the client's run never showed"
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: not _owners_include(proc.pid)), "the run outlived its client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.lab
def test_a_killed_agent_leaves_its_clients_raw_with_one_line(lab: Lab,
                                                              ping_sockets: None) -> None:
    doomed = running_agent(lab)
    try:
        proc = subprocess.Popen(client_command(lab, 0, doomed, "--ndjson", "-c", "12", "-i",
                                               "0.1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        assert _wait_for(lambda: _owners_include(proc.pid))
        time.sleep(0.3)
        doomed.proc.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        doomed.stop()
    assert proc.returncode == 0, err
    assert err.strip().splitlines() == [
        "mace-ping: mace-agent went away: the rest of this run is measured raw"]
    records, _ = parse_ndjson(out)
    assert len(records) == 12
    corrected = [r["rtt_corrected"] is not None for r in records]
    assert corrected[0] and not corrected[-1]
    assert corrected == sorted(corrected, reverse=True)  # corrected until it went, then raw


def _raw_exchange(path: Path, data: bytes, fds: list[int] | None = None,
                  keep_open: bool = True) -> list[dict | None]:
    """Send one datagram as a client; every answer until the agent closes (keep_open
    False: only the first answer; then this side closes, ending any run it was given)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(str(path))
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", fds))] if fds else []
        conn.sendmsg([data], ancillary)
        answers: list[dict | None] = []
        while True:
            raw, ancdata, _, _ = conn.recvmsg(protocol.MAX_MESSAGE, socket.CMSG_SPACE(64))
            for level, kind, value in ancdata:  # a run's fds, if it got one
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    protocol.close_all(list(array.array("i", value[:len(value) // 4 * 4])))
            if not raw:
                return answers
            answers.append(json.loads(raw))
            if not keep_open:
                return answers
    finally:
        conn.close()


@pytest.mark.lab
def test_malformed_clients_are_answered_once_and_the_agent_serves_on(
        lab: Lab, agent: AgentProcess) -> None:
    for data in (b"not json", b"[1]", b'{"v":1,"op":"run"}', b'{"v":2,"op":"nope"}',
                 b'{"v":2,"op":"run","records":"yes"}', b'{"v":2,"op":"run","x":NaN}',
                 b"x" * (protocol.MAX_MESSAGE + 10), b"[" * 4000, os.urandom(300)):
        answers = _raw_exchange(agent.socket, data)
        assert len(answers) == 1 and answers[0] is not None, data[:40]
        assert answers[0]["ok"] is False and answers[0]["error"]
    # fds sent to the agent: refused by the kernel (SO_PASSRIGHTS, Linux 6.16), so none
    # can make the agent wait in close(); on older kernels answered once and dropped
    r, w = os.pipe()
    try:
        try:
            answers = _raw_exchange(agent.socket, b'{"v":2,"op":"end","run":1}', [r, w])
        except PermissionError:
            release = tuple(int(x) for x in os.uname().release.split(".")[:2])
            assert release >= (6, 16)
        else:
            assert answers[0]["ok"] is False and "file descriptors" in answers[0]["error"]
    finally:
        os.close(r)
        os.close(w)
    # a run ended twice, a state of a run that is not this connection's: refused, served on
    ev = client.open_run(agent.socket, None, records=True)
    try:
        answer, _ = client.request(ev._conn, {"op": "end", "run": ev._run})
        assert answer["ok"]
        with pytest.raises(MaceError, match="no run"):
            client.request(ev._conn, {"op": "state", "run": ev._run, "number": 1})
    finally:
        ev.close()
    # a silent client and one that never reads its answers hold up no one
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(str(agent.socket))
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deaf.connect(str(agent.socket))
    deaf.setblocking(False)
    try:
        for _ in range(2000):
            try:
                deaf.send(b'{"v":2,"op":"state","run":7,"number":1}')
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        run = client_ping(lab, 0, agent, "-c", "3", "-i", "0.01")
        assert run.returncode == 0
        assert_covered(run.summary["mace"], 3)
    finally:
        silent.close()
        deaf.close()
    assert agent.proc.poll() is None


@pytest.mark.lab
def test_a_hundred_concurrent_clients(lab: Lab) -> None:
    """(From this one process and netns: the per-netns and per-user limits raised.)"""
    busy = running_agent(lab, "--runs-per-netns", "128", "--runs-per-user", "128")
    runs = []
    try:
        for _ in range(100):
            runs.append(client.open_run(busy.socket, None, records=True))
        assert len({ev.nonce for ev in runs}) == 100
        assert programs.run_owners().count(os.getpid()) == 100
    finally:
        for ev in runs:
            ev.close()
        assert busy.stop() == 0
    assert _wait_for(lambda: os.getpid() not in programs.run_owners())


@pytest.mark.lab
def test_a_netns_cannot_take_more_than_its_share(agent: AgentProcess) -> None:
    """16 runs per netns (default), ended ones counted while their rings are still open:
    a client that keeps its ring fds after its runs ended cannot pile up kernel memory."""
    runs = []
    try:
        for _ in range(16):
            runs.append(client.open_run(agent.socket, None, records=True))
        with pytest.raises(MaceError, match=r"too many runs for netns \d+ \(16;"):
            client.open_run(agent.socket, None, records=True)
        kept = os.dup(runs[0].fd)  # the ring outlives its run
        runs.pop(0).close()
        try:
            with pytest.raises(MaceError, match="too many runs for netns"):
                client.open_run(agent.socket, None, records=True)
        finally:
            os.close(kept)

        def one_more() -> bool:  # once the agent took the ended run's maps out, and the
            try:                 # kernel freed its ring (both deferred: RCU)
                runs.append(client.open_run(agent.socket, None, records=True))
            except MaceError:
                return False
            return True

        assert _wait_for(one_more)
    finally:
        for ev in runs:
            ev.close()


def _mace_links() -> int:
    """Attached links of mace's programs, any set's."""
    count = 0
    for link_id in native.link_ids():
        fd = native.link_fd(link_id)
        if fd is None:
            continue
        try:
            prog = native.prog_fd(native.link_prog_id(fd))
            if prog is not None:
                count += native.prog_name_and_maps(prog)[0] in programs.PROGRAMS
                os.close(prog)
        finally:
            os.close(fd)
    return count


@pytest.mark.lab
def test_an_idle_agent_detaches_its_programs_and_a_run_attaches_them(
        lab: Lab, ping_sockets: None) -> None:
    """--idle-detach: with no run on, the agent lets go of its links; a client's run takes
    them again before it starts (every reply corrected, with no other set attached to
    lend it links), and they go again after it."""
    idle = running_agent(lab, "--idle-detach", "0.2")
    try:
        assert _wait_for(lambda: idle.log_text().count("idle: programs detached") == 1)
        # (the module's agent, if up, detaches within its default 5 s too)
        assert _wait_for(lambda: _mace_links() == 0, 15.0), \
            "mace programs stayed attached with every agent idle"
        run = client_ping(lab, 0, idle, "-c", "5", "-i", "0.02")
        assert run.returncode == 0 and run.stderr == "", run.stderr
        assert run.summary["mace"]["source"] == "agent"
        assert run.summary["mace"]["replies_with_kernel_data"] == 5
        assert "programs attached" in idle.log_text()
        assert _wait_for(lambda: idle.log_text().count("idle: programs detached") == 2)
        assert _wait_for(lambda: _mace_links() == 0, 5.0)
    finally:
        assert idle.stop() == 0, idle.log_text()


@pytest.mark.lab
def test_the_programs_stay_attached_until_the_last_run_ends(lab: Lab,
                                                             ping_sockets: None) -> None:
    """--idle-detach 0: a run that ends while another is on leaves the programs attached:
    the long run has kernel data on every reply."""
    idle = running_agent(lab, "--idle-detach", "0")
    try:
        assert _wait_for(lambda: _mace_links() == 0, 15.0), "no set may lend its links"
        long = subprocess.Popen(client_command(lab, 0, idle, "--ndjson", "-c", "40", "-i",
                                               "0.05"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        try:
            assert _wait_for(lambda: _owners_include(long.pid)), "the long run never showed"
            short = client_ping(lab, 1, idle, "-c", "2", "-i", "0.02")
            assert short.summary["mace"]["replies_with_kernel_data"] == 2
            out, err = long.communicate(timeout=60)
        finally:
            if long.poll() is None:
                long.kill()
                long.wait()
        assert long.returncode == 0 and err == "", err
        summary = parse_ndjson(out)[1]
        assert summary["mace"]["replies_with_kernel_data"] == 40, summary["mace"]
    finally:
        assert idle.stop() == 0, idle.log_text()


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    """The shipped unit, pointed at this checkout's command, passes systemd's checks."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = (Path(server.__file__).with_name("mace-agent.service")).read_text()
    command = Path(sys.executable).with_name("mace-agent")
    assert "ExecStart=/usr/local/bin/mace-agent " in unit
    (tmp_path / "mace-agent.service").write_text(
        unit.replace("/usr/local/bin/mace-agent", str(command)))
    proc = subprocess.run([analyze, "verify", str(tmp_path / "mace-agent.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.lab
@pytest.mark.parametrize(("flags", "capabilities"), [(["-I"], ()), (["-U"], ()),
                                                     (["-T"], ("net_raw",))])
def test_traceroute_through_the_agent(lab: Lab, agent: AgentProcess, flags: list[str],
                                      capabilities: tuple[str, ...]) -> None:
    """No capability for -I and -U (a ping socket, a UDP socket); TCP SYN needs NET_RAW."""
    proc = subprocess.run(
        ["ip", "netns", "exec", lab.container_ns(0), *with_capabilities(*capabilities),
         sys.executable, "-m", "mace_tools.cli.traceroute", "--agent", str(agent.socket),
         "--json", "-q", "3", "-w", "1", *flags, lab.target_addr],
        capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["mace"]["source"] == "agent", doc["mace"]
    assert_covered(doc["mace"], doc["mace"]["replies"])
    assert doc["result"][-1]["result"][0]["from"] == lab.target_addr


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_MESSAGES = st.one_of(
    st.binary(max_size=protocol.MAX_MESSAGE + 64),
    st.fixed_dictionaries({"v": st.sampled_from([2, 2, 1, "2", None]),
                           "op": st.sampled_from(["run", "state", "end", "x", 1])},
                          optional={"run": _JSON_VALUES, "number": _JSON_VALUES,
                                    "records": _JSON_VALUES, "path": _JSON_VALUES,
                                    "udp": _JSON_VALUES}).map(
        lambda m: json.dumps(m).encode()))


@pytest.mark.lab
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_MESSAGES)
def test_fuzzed_messages_never_stop_the_agent(agent: AgentProcess, data: bytes) -> None:
    """Whatever a client sends, it gets answers (ok or one error) and the agent lives on."""
    answers = _raw_exchange(agent.socket, data, keep_open=False)
    assert all(isinstance(a, dict) and isinstance(a.get("ok"), bool) for a in answers)
    assert agent.proc.poll() is None
