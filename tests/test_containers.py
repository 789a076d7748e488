"""Real Docker and Podman containers: measured from the host with --container, and
mace-ping run inside a container built from the repo's Dockerfile.

Set-up (all undone afterwards), per engine: its daemon/API service is started on a private
socket (and private storage) if none runs; images are imported offline (Debian's
busybox-static; the debootstrap base of `make image-inputs`), nothing is pulled; a target
netns is linked to the root namespace, the container host, by one veth pair with
198.18.2.0/30 on both ends: that veth is the host's outer device for the measurement.
The engine itself creates its bridge (docker0, podman0) and NAT rules, as it does for users;
tests that start an engine restore the firewall, ip_forward and bridges afterwards.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_dns import FakeDns
from host_state import restored_afterwards

from mace_tools.lab.capture import Capture
from mace_tools.lab.demo import PingRun, compare, parse_ndjson

pytestmark = pytest.mark.lab

TARGET, HOST_SIDE = "198.18.2.2", "198.18.2.1"
TOLERANCE_US = 10.0
RUN = os.getpid() % 100000
OUTER = f"md{RUN}"  # the veth's root-namespace end
TARGET_NS = f"mt{RUN}-dtarget"
REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / "build" / "image"
BUSYBOX, BASE, MACE = (f"localhost/mt{RUN}-{n}" for n in ("busybox:1", "base:bookworm",
                                                          "mace:test"))
# Debian bookworm's Docker (20.10) does not know CAP_BPF/CAP_PERFMON, and Podman 4.3's
# default seccomp profile allows bpf() only with CAP_SYS_ADMIN: so SYS_ADMIN stands in for
# both here. test_bad_input shows that BPF + PERFMON + NET_RAW suffice where allowed.
IN_CONTAINER_CAPS = ["--cap-drop", "ALL", "--cap-add", "NET_RAW", "--cap-add", "SYS_ADMIN"]


@dataclass
class Engine:
    runtime: str  # as --runtime names it
    cli: list[str]  # command prefix reaching our daemon and storage
    env: dict[str, str]  # how mace finds the same API socket
    bridge: str  # the engine's default bridge device
    run_opts: list[str] = field(default_factory=list)

    def __call__(self, *args: str, check: bool = True, stdin: bytes | None = None,
                 ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.cli, *args], input=stdin, capture_output=True,
                              check=check, timeout=180)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self("run", *self.run_opts, *args, check=check)

    def remove(self, name: str) -> None:
        self("rm", "-f", *(["-t", "0"] if self.runtime == "podman" else []), name,
             check=False)

    def gateway(self) -> str:
        """The bridge's address: a container's first hop."""
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", self.bridge],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[3].split("/")[0]


def _wait_until_up(answers: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while not answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.skip(f"{what} did not start on this machine")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(cli: list[str]) -> bool:
    return subprocess.run([*cli, "version"], capture_output=True, timeout=30).returncode == 0


@contextmanager
def _docker() -> Iterator[Engine]:
    if shutil.which("dockerd") is None:
        pytest.skip("docker.io not installed (make test installs it)")
    for sock in ("/run/docker.sock", "/var/run/docker.sock"):
        cli = ["docker", "-H", f"unix://{sock}"]
        if Path(sock).is_socket() and _answers(cli):
            yield Engine("docker", cli, {"DOCKER_HOST": f"unix://{sock}"}, "docker0")
            return
    host = "unix:///run/mace-test-docker.sock"
    cli = ["docker", "-H", host]
    with restored_afterwards(("docker0",)):
        daemon = subprocess.Popen(
        ["dockerd", "--host", host, "--data-root", "/var/lib/mace-test-docker",
         "--exec-root", "/run/mace-test-docker", "--pidfile", "/run/mace-test-docker.pid"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(lambda: _answers(cli), daemon, "dockerd")
            yield Engine("docker", cli, {"DOCKER_HOST": host}, "docker0")
        finally:
            _stop(daemon)
            for state in ("/var/lib/mace-test-docker", "/run/mace-test-docker"):
                shutil.rmtree(state, ignore_errors=True)


@contextmanager
def _podman() -> Iterator[Engine]:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (apt-get install podman)")
    # This machine's root lacks CAP_SYS_RESOURCE, so a container may not raise its limits
    # above conmon's (podman's defaults would): ask for small ones.
    run_opts = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    if Path("/run/podman/podman.sock").is_socket() and _answers(["podman"]):
        yield Engine("podman", ["podman"], {}, "podman0", run_opts)
        return
    sock, root, runroot = ("/run/mace-test-podman.sock", "/var/lib/mace-test-podman",
                           "/run/mace-test-podman")
    cli = ["podman", "--root", root, "--runroot", runroot]
    with restored_afterwards(("podman0",)):
        service = subprocess.Popen([*cli, "system", "service", "--time=0", f"unix://{sock}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(lambda: Path(sock).is_socket(), service, "podman system service")
            yield Engine("podman", cli, {"CONTAINER_HOST": f"unix://{sock}"}, "podman0",
                         run_opts)
        finally:
            _stop(service)
            subprocess.run([*cli, "system", "reset", "--force"], capture_output=True,
                           timeout=120)
            for state in (root, runroot):
                shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module", params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    with (_docker() if request.param == "docker" else _podman()) as found:
        yield found


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    """A busybox image from Debian's static binary: imported, nothing pulled."""
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static not installed (make test installs it)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "sleep", "ping"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    engine("import", "-", BUSYBOX, stdin=buf.getvalue())
    yield BUSYBOX
    engine("rmi", "-f", BUSYBOX, check=False)


@pytest.fixture(scope="module")
def mace_image(engine: Engine) -> Iterator[str]:
    """The repo's Dockerfile built offline on the debootstrap base (make image-inputs)."""
    base_tar = IMAGE_DIR / "base-bookworm.tar"
    if not base_tar.exists() or not list((IMAGE_DIR / "wheels").glob("mace_tools-*.whl")):
        pytest.skip("image inputs not built (make image-inputs; make test builds them)")
    try:
        engine("import", str(base_tar), BASE)
        build_opts = engine.run_opts if engine.runtime == "podman" else []
        engine("build", "-q", *build_opts, "--build-arg", f"BASE={BASE}", "-t", MACE,
               str(REPO))
        yield MACE
    finally:
        engine("rmi", "-f", MACE, BASE, check=False)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """The target netns behind one veth from the root namespace (the container host)."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", TARGET_NS)
        ip("link", "add", OUTER, "type", "veth", "peer", "name", "tgt0", "netns", TARGET_NS)
        ip("addr", "add", f"{HOST_SIDE}/30", "dev", OUTER)
        ip("link", "set", OUTER, "up")
        ip("-n", TARGET_NS, "addr", "add", f"{TARGET}/30", "dev", "tgt0")
        ip("-n", TARGET_NS, "link", "set", "tgt0", "up")
        ip("-n", TARGET_NS, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", TARGET_NS, "sysctl", "-qw",
                        "net.ipv4.icmp_ratelimit=0"], check=True)
        yield TARGET
    finally:
        subprocess.run(["ip", "link", "del", OUTER], capture_output=True)
        subprocess.run(["ip", "netns", "del", TARGET_NS], capture_output=True)


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


def assert_corrected(stdout: str, stderr: str, returncode: int, cap: Capture) -> list[float]:
    """Coverage 100%, outer device = our veth in the host netns, >= 99% within 10 us."""
    assert returncode == 0, stderr
    records, summary = parse_ndjson(stdout)
    rows = compare(PingRun(records, summary, returncode, stderr), cap)
    assert summary["mace"]["coverage"] == 1.0 and len(rows) == 200
    host_ino = os.stat("/proc/self/ns/net").st_ino  # the tests run on the container host
    assert {r["outer_dev"] for r in records} == {f"{OUTER}@{host_ino}"}
    errors = [r.error_us for r in rows]
    assert None not in errors
    assert sum(abs(e) <= TOLERANCE_US for e in errors) / len(errors) >= 0.99
    return [r.corrected_ms for r in rows]


def test_mace_ping_container_is_corrected(engine: Engine, container: str, target: str) -> None:
    nonce = os.urandom(8)
    with Capture(None, OUTER, Capture.nonce_filter(nonce), expect_packets=400) as cap:
        proc = mace(engine, "--container", container, "--ndjson", "--nonce", nonce.hex(),
                    "-c", "200", "-i", "0.005", target)
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
    proc = mace(engine, "--container", container, "-w", "1", "-q", "2", target,
                tool="traceroute")
    assert proc.returncode == 0, proc.stderr
    hops = proc.stdout.splitlines()[1:]
    gateway = re.escape(engine.gateway())
    assert re.match(rf"^ 1  {gateway}  .* host-internal$", hops[0]), hops
    assert re.match(rf"^ 2  {re.escape(target)}  .*corrected=[\d.]+,[\d.]+$", hops[1]), hops


def test_names_resolve_as_in_the_container(engine: Engine, container: str, target: str,
                                           ) -> None:
    pid = engine("inspect", "-f", "{{.State.Pid}}", container).stdout.decode().strip()
    with FakeDns(f"/proc/{pid}/ns/net", "127.0.0.11", {"mace-dns.test": target}):
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
    with Capture(None, OUTER, Capture.nonce_filter(nonce), expect_packets=400) as cap:
        proc = engine.run("--rm", *IN_CONTAINER_CAPS, mace_image, "--ndjson",
                          "--nonce", nonce.hex(), "-c", "200", "-i", "0.005", target,
                          check=False)
    # the BPF programs see the host's devices from inside the container
    assert_corrected(proc.stdout.decode(), proc.stderr.decode(), proc.returncode, cap)


def test_inside_a_container_without_bpf_privilege(engine: Engine, mace_image: str,
                                                  target: str) -> None:
    proc = engine.run("--rm", "--cap-drop", "ALL", "--cap-add", "NET_RAW", mace_image,
                      "-c", "1", target, check=False)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().endswith(
        "mace-ping: permission denied loading BPF programs: run as root "
        "(or with CAP_BPF, CAP_PERFMON and CAP_NET_RAW)")


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
