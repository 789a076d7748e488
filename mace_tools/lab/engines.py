"""Real container engines (Docker, Podman) for tests and bench, set up offline and undone.

An engine already running is used as it is. Otherwise one is started on a private socket and
private storage, and everything it changes in the root namespace (its bridge, NAT and filter
rules, ip_forward) is restored from a snapshot when it stops. Images are imported, never
pulled. The engine's containers reach a target netns linked to the root namespace (the
container host) by one veth pair: that veth is the host's outer device for a measurement.
"""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mace_tools.lab.topology import LabError

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "build" / "image"  # `make image-inputs`: wheels and the debootstrap base
BASE_TAR = IMAGE_DIR / "base-bookworm.tar"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
START_TIMEOUT_S = 60
# Debian bookworm's Docker (20.10) does not know CAP_BPF/CAP_PERFMON, and Podman 4.3's
# default seccomp profile allows bpf() only with CAP_SYS_ADMIN: there SYS_ADMIN stands in
# for both (README, "Measuring a container").
IN_CONTAINER_CAPS = ("--cap-drop", "ALL", "--cap-add", "NET_RAW", "--cap-add", "SYS_ADMIN")


@dataclass
class Engine:
    runtime: str  # as --runtime names it
    cli: list[str]  # command prefix reaching this daemon and storage
    env: dict[str, str]  # how mace finds the same API socket
    bridge: str  # the engine's default bridge device
    run_opts: list[str] = field(default_factory=list)  # for `run` and `build`

    def __call__(self, *args: str, check: bool = True, stdin: bytes | None = None,
                 timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.cli, *args], input=stdin, capture_output=True,
                              check=check, timeout=timeout)

    def run(self, *args: str, check: bool = True, timeout: float = 180,
            ) -> subprocess.CompletedProcess[bytes]:
        return self("run", *self.run_opts, *args, check=check, timeout=timeout)

    def remove(self, *names: str) -> None:
        now = ["-t", "0"] if self.runtime == "podman" else []  # busybox sleep ignores TERM
        self("rm", "-f", *now, *names, check=False)

    def pid(self, container: str) -> int:
        return int(self("inspect", "-f", "{{.State.Pid}}", container).stdout)

    def gateway(self) -> str:
        """The bridge's address: a container's first hop."""
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", self.bridge],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[3].split("/")[0]

    def import_busybox(self, tag: str, applets: tuple[str, ...] = ("sh", "sleep", "ping"),
                       ) -> str:
        """An image of Debian's static busybox and a few applet links."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add("/bin/busybox", arcname="bin/busybox")
            for applet in applets:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        self("import", "-", tag, stdin=buf.getvalue())
        return tag

    def build_mace_image(self, base_tag: str, tag: str) -> str:
        """The repo's Dockerfile on the debootstrap base: no registry involved."""
        if not BASE_TAR.exists() or not list((IMAGE_DIR / "wheels").glob("mace_tools-*.whl")):
            raise LabError("image inputs not built (make image-inputs)")
        self("import", str(BASE_TAR), base_tag)
        build_opts = self.run_opts if self.runtime == "podman" else []
        self("build", "-q", *build_opts, "--build-arg", f"BASE={base_tag}", "-t", tag,
             str(REPO))
        return tag


def _answers(cli: list[str]) -> bool:
    return subprocess.run([*cli, "version"], capture_output=True, timeout=30).returncode == 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until_up(ready: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"{what} did not start on this machine")
        time.sleep(0.5)


def _nft_ruleset() -> str | None:
    """The whole ruleset (iptables-nft rules included), or None where nft is missing."""
    if shutil.which("nft") is None:
        return None
    proc = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@contextmanager
def host_state_restored(bridges: tuple[str, ...]) -> Iterator[None]:
    """Snapshot the root namespace's firewall and ip_forward; restore them afterwards and
    delete the named bridges if they were not there before."""
    ruleset = _nft_ruleset()
    legacy = "" if ruleset is not None else subprocess.run(
        ["iptables-save"], capture_output=True, text=True).stdout
    forward = IP_FORWARD.read_text()
    absent = [b for b in bridges if not Path(f"/sys/class/net/{b}").exists()]
    try:
        yield
    finally:
        for bridge in absent:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        if ruleset is not None:
            subprocess.run(["nft", "-f", "-"], input=f"flush ruleset\n{ruleset}", text=True,
                           capture_output=True)
        else:
            subprocess.run(["iptables-restore"], input=legacy, text=True, capture_output=True)
        IP_FORWARD.write_text(forward)


@contextmanager
def _docker() -> Iterator[Engine]:
    if shutil.which("dockerd") is None:
        raise LabError("docker.io not installed (make test installs it)")
    for sock in ("/run/docker.sock", "/var/run/docker.sock"):
        cli = ["docker", "-H", f"unix://{sock}"]
        if Path(sock).is_socket() and _answers(cli):
            yield Engine("docker", cli, {"DOCKER_HOST": f"unix://{sock}"}, "docker0")
            return
    host, data, state = ("unix:///run/mace-test-docker.sock", "/var/lib/mace-test-docker",
                         "/run/mace-test-docker")
    cli = ["docker", "-H", host]
    with host_state_restored(("docker0",)):
        daemon = subprocess.Popen(
            ["dockerd", "--host", host, "--data-root", data, "--exec-root", state,
             "--pidfile", f"{state}.pid"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(lambda: _answers(cli), daemon, "dockerd")
            yield Engine("docker", cli, {"DOCKER_HOST": host}, "docker0")
        finally:
            _stop(daemon)
            for path in (data, state):
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _podman() -> Iterator[Engine]:
    if shutil.which("podman") is None:
        raise LabError("podman not installed (apt-get install podman)")
    # Root here may lack CAP_SYS_RESOURCE, and then a container may not raise its limits
    # above conmon's (podman's defaults would): ask for small ones.
    run_opts = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    if Path("/run/podman/podman.sock").is_socket() and _answers(["podman"]):
        yield Engine("podman", ["podman"], {}, "podman0", run_opts)
        return
    sock, root, runroot = ("/run/mace-test-podman.sock", "/var/lib/mace-test-podman",
                           "/run/mace-test-podman")
    cli = ["podman", "--root", root, "--runroot", runroot]
    with host_state_restored(("podman0",)):
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
            for path in (root, runroot):
                shutil.rmtree(path, ignore_errors=True)


def started(runtime: str) -> AbstractContextManager[Engine]:
    """The engine for runtime ("docker" or "podman"), running for the with block."""
    if runtime not in ("docker", "podman"):
        raise LabError(f"unknown engine '{runtime}'")
    return _docker() if runtime == "docker" else _podman()


@contextmanager
def uplinked_target(name: str, outer: str, host_addr: str, target_addr: str,
                    prefix_len: int = 30) -> Iterator[str]:
    """A target netns behind one veth (outer) from the root namespace; yields its address."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", name)
        ip("link", "add", outer, "type", "veth", "peer", "name", "tgt0", "netns", name)
        ip("addr", "add", f"{host_addr}/{prefix_len}", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", name, "addr", "add", f"{target_addr}/{prefix_len}", "dev", "tgt0")
        ip("-n", name, "link", "set", "tgt0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.icmp_ratelimit=0"], check=True)
        yield target_addr
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
