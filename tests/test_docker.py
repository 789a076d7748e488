"""Real Docker containers, measured from the host with --container.

Set-up (all undone afterwards): a dockerd is started on a private socket if none runs
(docker.io is installed by `make test`); an image is imported offline from Debian's
busybox-static (nothing is pulled); a target netns is linked to the root namespace, the
Docker host, by one veth pair with 198.18.2.0/30 on both ends: that veth is the host's
outer device for the measurement. Docker itself creates docker0 and its NAT rules.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_dns import FakeDns

from mace_tools.lab.capture import Capture
from mace_tools.lab.demo import PingRun, compare, parse_ndjson

pytestmark = pytest.mark.lab

TARGET, HOST_SIDE = "198.18.2.2", "198.18.2.1"
IMAGE = "mace-test-busybox:1"
TOLERANCE_US = 10.0
RUN = os.getpid() % 100000
OUTER = f"md{RUN}"  # the veth's root-namespace end
TARGET_NS = f"mt{RUN}-dtarget"
REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / "build" / "image"
# Debian bookworm's Docker (20.10) predates CAP_BPF/CAP_PERFMON: CAP_SYS_ADMIN stands in
# for both; test_least_privilege shows that BPF+PERFMON+NET_RAW suffice where known.
IN_CONTAINER_CAPS = ["--cap-drop", "ALL", "--cap-add", "NET_RAW", "--cap-add", "SYS_ADMIN"]


def docker(host: str, *args: str, check: bool = True, stdin: bytes | None = None,
           ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["docker", "-H", host, *args], input=stdin, capture_output=True,
                          check=check, timeout=120)


def _answers(host: str) -> bool:
    return docker(host, "version", check=False).returncode == 0


@pytest.fixture(scope="module")
def docker_host() -> Iterator[str]:
    if shutil.which("dockerd") is None or not Path("/bin/busybox").exists():
        pytest.skip("docker.io / busybox-static not installed (make test installs them)")
    for sock in ("/run/docker.sock", "/var/run/docker.sock"):
        if Path(sock).is_socket() and _answers(f"unix://{sock}"):
            yield f"unix://{sock}"
            return
    host = "unix:///run/mace-test-docker.sock"
    daemon = subprocess.Popen(
        ["dockerd", "--host", host, "--data-root", "/var/lib/mace-test-docker",
         "--exec-root", "/run/mace-test-docker", "--pidfile", "/run/mace-test-docker.pid"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _answers(host):
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip("dockerd did not start on this machine")
            time.sleep(0.5)
        yield host
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def image(docker_host: str) -> Iterator[str]:
    """A busybox image from Debian's static binary: docker import, nothing pulled."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "sleep", "ping"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    docker(docker_host, "import", "-", IMAGE, stdin=buf.getvalue())
    yield IMAGE
    docker(docker_host, "rmi", "-f", IMAGE, check=False)


@pytest.fixture(scope="module")
def mace_image(docker_host: str) -> Iterator[str]:
    """The repo's Dockerfile built offline on the debootstrap base (make image-inputs)."""
    base_tar = IMAGE_DIR / "base-bookworm.tar"
    if not base_tar.exists() or not list((IMAGE_DIR / "wheels").glob("mace_tools-*.whl")):
        pytest.skip("image inputs not built (make image-inputs; make test builds them)")
    base, tagged = f"mt{RUN}-base:bookworm", f"mt{RUN}-mace:test"
    try:
        docker(docker_host, "import", str(base_tar), base)
        docker(docker_host, "build", "-q", "--build-arg", f"BASE={base}", "-t", tagged,
               str(REPO))
        yield tagged
    finally:
        docker(docker_host, "rmi", "-f", tagged, base, check=False)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """The target netns behind one veth from the root namespace (the Docker host)."""
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
def container(docker_host: str, image: str, target: str) -> Iterator[str]:
    name = f"mt{RUN}-ct"
    # its names: one in its own hosts file, others from "its" DNS server on 127.0.0.11
    docker(docker_host, "run", "-d", "--rm", "--name", name, "--dns", "127.0.0.11",
           "--add-host", f"mace-hosts.test:{target}", image, "sleep", "600")
    try:
        # first packet pays ARP on docker0: warm up, as the other tests do
        docker(docker_host, "exec", name, "ping", "-c", "1", "-W", "2", target, check=False)
        yield name
    finally:
        docker(docker_host, "rm", "-f", name, check=False)


def mace(docker_host: str, *args: str, tool: str = "ping") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"mace_tools.cli.{tool}", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOCKER_HOST": docker_host})


def test_mace_ping_container_is_corrected(docker_host: str, container: str, target: str,
                                          ) -> None:
    nonce = os.urandom(8)
    with Capture(None, OUTER, Capture.nonce_filter(nonce), expect_packets=400) as cap:
        proc = mace(docker_host, "--container", container, "--ndjson", "--nonce", nonce.hex(),
                    "-c", "200", "-i", "0.005", target)
    assert proc.returncode == 0, proc.stderr
    records, summary = parse_ndjson(proc.stdout)
    run = PingRun(records, summary, proc.returncode, proc.stderr)
    rows = compare(run, cap)
    assert summary["mace"]["coverage"] == 1.0 and len(rows) == 200
    host_ino = os.stat("/proc/self/ns/net").st_ino  # the tests run on the Docker host
    assert {r["outer_dev"] for r in records} == {f"{OUTER}@{host_ino}"}
    errors = [r.error_us for r in rows]
    assert None not in errors
    assert sum(abs(e) <= TOLERANCE_US for e in errors) / len(errors) >= 0.99
    # the container's own ping shows the raw bias that the correction removes
    own = docker(docker_host, "exec", container, "ping", "-c", "20", target).stdout.decode()
    own_ms = [float(t) for t in re.findall(r"time=([\d.]+) ms", own)]
    corrected_ms = [r.corrected_ms for r in rows]
    assert len(own_ms) == 20
    assert sum(own_ms) / 20 > sum(corrected_ms) / len(corrected_ms) + 0.005


def test_list_containers(docker_host: str, container: str) -> None:
    proc = mace(docker_host, "--list-containers")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^{container}\s+\w{{12}}\s+docker\s+\d+\s+net:\[\d+\]$", proc.stdout,
                     re.M)


def test_traceroute_container(docker_host: str, container: str, target: str) -> None:
    proc = mace(docker_host, "--container", container, "-w", "1", "-q", "2", target,
                tool="traceroute")
    assert proc.returncode == 0, proc.stderr
    hops = proc.stdout.splitlines()[1:]
    assert re.match(r"^ 1  172\.17\.0\.1  .* host-internal$", hops[0])  # docker0
    assert re.match(rf"^ 2  {re.escape(target)}  .*corrected=[\d.]+,[\d.]+$", hops[1])


def test_names_resolve_as_in_the_container(docker_host: str, container: str, target: str,
                                           ) -> None:
    pid = docker(docker_host, "inspect", "-f", "{{.State.Pid}}", container).stdout.decode()
    with FakeDns(f"/proc/{pid.strip()}/ns/net", "127.0.0.11", {"mace-dns.test": target}):
        for name in ("mace-hosts.test", "mace-dns.test"):
            proc = mace(docker_host, "--container", container, "-c", "1", name)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(f"PING {name} ({target}) ")
        proc = mace(docker_host, "--container", container, "-c", "1", "mace-nx.test")
    assert (proc.returncode, proc.stderr) == (2, "mace-ping: mace-nx.test: "
                                                 "Name or service not known\n")


def test_mace_ping_inside_a_container_corrects(docker_host: str, mace_image: str,
                                               target: str) -> None:
    nonce = os.urandom(8)
    with Capture(None, OUTER, Capture.nonce_filter(nonce), expect_packets=400) as cap:
        proc = docker(docker_host, "run", "--rm", *IN_CONTAINER_CAPS, mace_image, "--ndjson",
                      "--nonce", nonce.hex(), "-c", "200", "-i", "0.005", target, check=False)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    records, summary = parse_ndjson(stdout)
    rows = compare(PingRun(records, summary, proc.returncode, stderr), cap)
    assert summary["mace"]["coverage"] == 1.0 and len(rows) == 200
    # the BPF programs see the Docker host's devices from inside the container
    host_ino = os.stat("/proc/self/ns/net").st_ino
    assert {r["outer_dev"] for r in records} == {f"{OUTER}@{host_ino}"}
    errors = [r.error_us for r in rows]
    assert None not in errors
    assert sum(abs(e) <= TOLERANCE_US for e in errors) / len(errors) >= 0.99


def test_inside_a_container_without_bpf_privilege(docker_host: str, mace_image: str,
                                                  target: str) -> None:
    proc = docker(docker_host, "run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_RAW",
                  mace_image, "-c", "1", target, check=False)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().endswith(
        "mace-ping: permission denied loading BPF programs: run as root "
        "(or with CAP_BPF, CAP_PERFMON and CAP_NET_RAW)")


def test_unknown_and_stopped_containers(docker_host: str, image: str) -> None:
    proc = mace(docker_host, "--container", "mace-no-such-container", "-c", "1", TARGET)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mace-ping: no such container: 'mace-no-such-container'"
    stopped = f"mt{RUN}-stopped"
    docker(docker_host, "create", "--name", stopped, image, "sleep", "1")
    try:
        proc = mace(docker_host, "--container", stopped, "-c", "1", TARGET)
    finally:
        docker(docker_host, "rm", "-f", stopped, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mace-ping: container '{stopped}' is not running"
