"""Real Docker and Podman containers: measured from the host with --container, and
mace-ping run inside a container built from the repo's Dockerfile.

Set-up and clean-up: mace_tools.lab.engines (engines started privately if none runs, host
state restored afterwards; images imported offline; a target netns behind one veth from the
root namespace, 198.18.2.0/30, whose host end is the outer device for the measurement).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from accuracy import PROBES, assert_accurate_errors, assert_covered
from fake_dns import FakeDns
from waiting import eventually

from mace_tools.lab.agent import AgentProcess
from mace_tools.lab.capture import Capture, TruthCapture
from mace_tools.lab.demo import PingRun, compare, parse_ndjson
from mace_tools.lab.engines import IN_CONTAINER_CAPS, Engine, started, uplinked_target
from mace_tools.lab.prometheus import PrometheusServer, free_port
from mace_tools.lab.topology import LabError, OuterLink

pytestmark = [pytest.mark.lab, pytest.mark.root_ns]  # conftest: the root netns is checked

TARGET, HOST_SIDE = "198.18.2.2", "198.18.2.1"
RUN = os.getpid() % 100000
OUTER = f"md{RUN}"  # the veth's root-namespace end
TARGET_NS = f"mt{RUN}-dtarget"
BUSYBOX, BASE, MACE = (f"localhost/mt{RUN}-{n}" for n in ("busybox:1", "base:bookworm",
                                                          "mace:test"))


@pytest.fixture(scope="module", params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    with ExitStack() as stack:
        try:
            found = stack.enter_context(started(request.param))
        except LabError as exc:  # only a start that failed skips; a failed clean-up errs
            pytest.skip(str(exc))
        yield found


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static not installed (make test installs it)")
    yield engine.import_busybox(BUSYBOX)
    engine("rmi", "-f", BUSYBOX, check=False)


@pytest.fixture(scope="module")
def mace_image(engine: Engine) -> Iterator[str]:
    """The repo's Dockerfile built offline on the debootstrap base (make image-inputs)."""
    try:
        yield engine.build_mace_image(BASE, MACE)
    except LabError as exc:
        pytest.skip(str(exc))
    finally:
        engine("rmi", "-f", MACE, BASE, check=False)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with uplinked_target(TARGET_NS, OUTER, HOST_SIDE, TARGET) as addr:
        yield addr


@pytest.fixture(scope="module")
def container(engine: Engine, image: str, target: str) -> Iterator[str]:
    name = f"mt{RUN}-ct"
    # its names: one in its own hosts file, others from "its" DNS server on 127.0.0.11;
    # NET_RAW for its own ping (Podman's default set lacks it)
    engine.run("-d", "--rm", "--name", name, "--cap-add", "NET_RAW", "--dns", "127.0.0.11",
               "--add-host", f"mace-hosts.test:{target}", image, "sleep", "600")
    try:
        # first packet pays ARP on the bridge: warm up, as the other tests do
        engine("exec", name, "ping", "-c", "1", "-W", "2", target, check=False)
        yield name
    finally:
        engine.remove(name)


def mace(engine: Engine, *args: str, tool: str = "ping") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"mace_tools.cli.{tool}",
                           "--runtime", engine.runtime, *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **engine.env})


def truth(nonce: bytes) -> TruthCapture:
    """Truth v2 on the container host's outer link: our veth and its end in the target."""
    return TruthCapture(OuterLink(None, OUTER, TARGET_NS, "tgt0"), Capture.nonce_filter(nonce),
                        expect_requests=PROBES)


def assert_corrected(stdout: str, stderr: str, returncode: int, cap: TruthCapture,
                     outer_name: str = OUTER) -> list[float]:
    """Coverage 100%, outer device = our veth in the host netns on every reply (named
    outer_name: "" when an agent withholds it), and the accuracy criterion
    (tests/accuracy.py) against truth v2."""
    assert returncode == 0, stderr
    records, summary = parse_ndjson(stdout)
    rows = compare(PingRun(records, summary, returncode, stderr), cap)
    assert_covered(summary["mace"], PROBES)
    assert len(rows) == PROBES and all(r.capture_ms is not None for r in rows)
    rows = [r for r in rows if r.corrected_ms is not None]
    host_ino = os.stat("/proc/self/ns/net").st_ino  # the tests run on the container host
    assert {r.outer_dev for r in rows} == {f"{outer_name}@{host_ino}"}
    errors = [r.error_us for r in rows]
    assert_accurate_errors(errors)
    return [r.corrected_ms for r in rows]


def test_mace_ping_container_is_corrected(engine: Engine, container: str, target: str) -> None:
    nonce = os.urandom(8)
    with truth(nonce) as cap:
        proc = mace(engine, "--container", container, "--ndjson", "--nonce", nonce.hex(),
                    "-c", str(PROBES), "-i", "0.005", target)
    corrected_ms = assert_corrected(proc.stdout, proc.stderr, proc.returncode, cap)
    # the container's own ping shows the raw bias that the correction removes
    own = engine("exec", container, "ping", "-c", "20", target).stdout.decode()
    own_ms = [float(t) for t in re.findall(r"time=([\d.]+) ms", own)]
    assert len(own_ms) == 20
    assert sum(own_ms) / 20 > sum(corrected_ms) / len(corrected_ms) + 0.005


def test_list_containers(engine: Engine, container: str) -> None:
    proc = mace(engine, "--list-containers")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^{container}\s+\w{{12}}\s+{engine.runtime}\s+\d+\s+net:\[\d+\]$",
                     proc.stdout, re.M)


def test_traceroute_container(engine: Engine, container: str, target: str) -> None:
    # -n: hop names would be asked of the container's resolver, the machine's DNS here
    proc = mace(engine, "--container", container, "-n", "-w", "1", "-q", "2", target,
                tool="traceroute")
    assert proc.returncode == 0, proc.stderr
    hops = proc.stdout.splitlines()[1:]
    gateway = re.escape(engine.gateway())
    assert re.match(rf"^ 1  {gateway}  .* host-internal$", hops[0]), hops
    assert re.match(rf"^ 2  {re.escape(target)}  .*corrected=[\d.]+,[\d.]+$", hops[1]), hops


def test_names_resolve_as_in_the_container(engine: Engine, container: str, target: str,
                                           ) -> None:
    with FakeDns(f"/proc/{engine.pid(container)}/ns/net", "127.0.0.11", {"mace-dns.test": target}):
        for name in ("mace-hosts.test", "mace-dns.test"):
            proc = mace(engine, "--container", container, "-c", "1", name)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(f"PING {name} ({target}) ")
        proc = mace(engine, "--container", container, "-c", "1", "mace-nx.test")
    assert (proc.returncode, proc.stderr) == (2, "mace-ping: mace-nx.test: "
                                                 "Name or service not known\n")


def test_mace_ping_inside_a_container_corrects(engine: Engine, mace_image: str,
                                               target: str) -> None:
    nonce = os.urandom(8)
    with truth(nonce) as cap:
        proc = engine.run("--rm", *IN_CONTAINER_CAPS, mace_image, "--ndjson",
                          "--nonce", nonce.hex(), "-c", str(PROBES), "-i", "0.005", target,
                          check=False)
    # the BPF programs see the host's devices from inside the container
    assert_corrected(proc.stdout.decode(), proc.stderr.decode(), proc.returncode, cap)


@pytest.fixture(scope="module")
def host_agent() -> Iterator[Path]:
    """mace-agent on the container host (its root netns, as the systemd unit runs it), on
    a socket in a directory of its own: the directory containers mount at /run/mace."""
    running = AgentProcess().start()
    try:
        yield running.dir
    finally:
        log = running.log_text()
        status = running.stop()
    assert status == 0, log


def test_unprivileged_container_is_corrected_through_the_agent(
        engine: Engine, mace_image: str, target: str, host_agent: Path) -> None:
    """No capability at all (a ping socket probes; Podman's default ping_group_range is
    gid 0 only, Docker's every group), only the agent's socket directory mounted."""
    user = "1000:1000" if engine.runtime == "docker" else "0:0"
    with TruthCapture(OuterLink(None, OUTER, TARGET_NS, "tgt0"), "icmp",
                      expect_requests=PROBES) as cap:
        proc = engine.run("--rm", "--cap-drop", "ALL", "--user", user, "-v",
                          f"{host_agent}:/run/mace:ro", mace_image, "--ndjson", "-c",
                          str(PROBES), "-i", "0.005", target, check=False)
    stdout = proc.stdout.decode()
    assert '"source": "agent"' in stdout, proc.stderr.decode()
    assert_corrected(stdout, proc.stderr.decode(), proc.returncode, cap, outer_name="")


def test_inside_a_container_without_bpf_privilege(engine: Engine, mace_image: str,
                                                  target: str) -> None:
    """No agent, no BPF privilege: measured raw, and one line says how to get corrections."""
    proc = engine.run("--rm", "--cap-drop", "ALL", "--cap-add", "NET_RAW", mace_image,
                      "-c", "1", target, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().splitlines() == [
        "mace-ping: no mace-agent at /run/mace/agent.sock and no BPF privilege: replies are "
        "shown raw (corrected=none); run mace-agent on the host and mount /run/mace, or give "
        "CAP_BPF and CAP_PERFMON"]
    assert "corrected=none" in proc.stdout.decode()


def test_unknown_and_stopped_containers(engine: Engine, image: str) -> None:
    proc = mace(engine, "--container", "mace-no-such-container", "-c", "1", TARGET)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mace-ping: no such container: 'mace-no-such-container'"
    stopped = f"mt{RUN}-stopped"
    engine("create", "--name", stopped, image, "sleep", "1")
    try:
        proc = mace(engine, "--container", stopped, "-c", "1", TARGET)
    finally:
        engine.remove(stopped)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mace-ping: container '{stopped}' is not running"


def test_agent_probe_follows_a_restarted_container(engine: Engine, image: str,
                                                  target: str) -> None:
    """mace-agent on the container host probes a container by name, exported to a real
    Prometheus; the container is restarted (a new init, a new netns) and its series go
    on: up again, counting on without a reset, corrected replies after the restart."""
    name = f"mt{RUN}-probed"
    engine.run("-d", "--name", name, image, "sleep", "600")  # no --rm: it is restarted
    try:
        port = free_port()
        agent = AgentProcess("-v", "--metrics", f"127.0.0.1:{port}", "--runtime",
                             engine.runtime, "--probe-interval", "0.1",
                             "--probe", f"container:{name}={target}",
                             env={**os.environ, **engine.env,
                                  "PYTHONPATH": os.getcwd()}).start()
        try:
            with PrometheusServer([f"127.0.0.1:{port}"], scrape_s=0.5) as prom:
                _restart_while_probed(engine, name, target, prom, agent)
        finally:
            log = agent.log_text()
            assert agent.stop() == 0, log
    finally:
        engine.remove(name)


def _restart_while_probed(engine: Engine, name: str, target: str, prom: PrometheusServer,
                          agent: AgentProcess) -> None:
    labels = f'source="container:{name}",target="{target}"'

    def value(expr: str) -> float:
        got = prom.values(expr, "source")
        return got.get(f"container:{name}", 0.0)

    corrected = f"mace_ping_responses_with_kernel_data_total{{{labels}}}"
    assert _wait_until(lambda: value(corrected) >= 20), agent.log_text()
    assert value(f"mace_probe_up{{{labels}}}") == 1
    first_pid = engine.pid(name)
    engine("restart", "-t", "0", name)
    assert engine.pid(name) != first_pid
    restarted_at = value(corrected)
    assert _wait_until(lambda: value(corrected) >= restarted_at + 20), agent.log_text()
    assert value(f"mace_probe_up{{{labels}}}") == 1
    # one series throughout: counters never reset, the container was found again
    assert value(f"resets(mace_ping_requests_total{{{labels}}}[5m])") == 0
    assert "its source exited" in agent.log_text()
    assert agent.log_text().count(f"probing {target}") >= 2


def _wait_until(check: Callable[[], bool], timeout: float = 60.0) -> bool:
    return eventually(check, timeout, every_s=0.25)  # (each check asks Prometheus)
