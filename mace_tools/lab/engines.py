"""Real container engines (Docker, Podman) for tests and bench, set up offline and undone.

An engine already running is used as it is. Otherwise one is started on a private socket and
private storage, and everything it changes in the root namespace (its bridge, NAT and filter
rules in every iptables backend, forwarding, the shared state files it creates) is restored
from a snapshot when it stops (mace_tools.lab.hoststate). What a killed run or a daemon
started by hand and stopped left behind is removed first, by name, so engines start on a
machine that is not pristine. Images are imported, never pulled. The engine's containers
reach a target netns linked to the root namespace (the container host) by one veth pair:
that veth is the host's outer device for a measurement.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from mace_tools.lab import hoststate
from mace_tools.lab.topology import LabError

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "build" / "image"  # `make image-inputs`: wheels and the debootstrap base
BASE_TAR = IMAGE_DIR / "base-bookworm.tar"
START_TIMEOUT_S = 60
TEST_NET = ipaddress.ip_network("198.18.0.0/15")  # DESIGN: test network rules
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


def _running(comm: str) -> list[int]:
    """PIDs of live processes with this command name (not zombies: init may take its
    time to reap what a killed run's engine left)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name)) == (comm, True):
            pids.append(int(entry.name))
    return pids


def _stat(pid: int) -> tuple[str, bool] | None:
    """(command name, running) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = stat[stat.index("(") + 1:].rsplit(")", 1)
    return comm, rest.split()[0] != "Z"


@dataclass(frozen=True)
class Private:
    """An engine we start ourselves: its own socket, pidfile and directories (fixed names,
    so what a killed run left is found by name), the chains and bridge its networking
    creates, and the shared paths it creates outside its own directories."""

    daemon: str  # its command name, as /proc/PID/comm says
    cli: tuple[str, ...]  # the client, on the private storage
    sock: str
    pidfile: Path
    state_file: Path  # the root namespace as it was before the engine started
    dirs: tuple[Path, ...]
    chain_prefixes: tuple[str, ...]
    bridges: tuple[str, ...]
    shared: tuple[Path, ...]
    container_monitor: str  # a process beside each of the engine's containers
    reset: tuple[str, ...] = ()  # removes every container of the private storage

    def clean_up(self) -> None:
        """Stop a daemon of ours that is still running (an earlier run killed before its
        clean-up, or this run's after a failed stop), remove its containers, mounts and
        directories."""
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and pid in _running(self.daemon):
            _kill_and_wait(pid)
        if self.reset and self.dirs[0].exists():
            subprocess.run([*self.cli, *self.reset], capture_output=True, timeout=120)
        for pid in self._processes():  # container shims/monitors still exiting, or stuck
            _kill_and_wait(pid, grace_s=10)
        _unmount_under(self.dirs)
        for path in (*self.dirs, self.pidfile, Path(self.sock)):
            _remove(path)

    def _processes(self) -> list[int]:
        """Processes whose command line names our directories or socket: ours by name."""
        marks = [str(d).encode() for d in self.dirs] + [self.sock.encode()]
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int(entry.name) != os.getpid() and \
                        any(m in (entry / "cmdline").read_bytes() for m in marks):
                    pids.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile
        return pids

    def recover(self) -> None:
        """A run killed while its engine ran left the snapshot of the root namespace from
        before the engine: put it back (the forwarding policy and ip_forward too, which no
        name tells), unless an engine runs now and may own what changed since."""
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        if not _engines_running():
            hoststate.restore(hoststate.from_json(saved["state"]), self.bridges)
            for path in saved["created"]:
                _remove(Path(path))
        self.state_file.unlink(missing_ok=True)

    def remove_stale_network(self) -> None:
        """Chains and bridges of this engine kind that no running engine owns (a killed run,
        or a daemon started by hand and stopped): engines trip over them (netavark:
        "Chain already exists" once a lossy restore made the table unreadable to iptables)."""
        if not _running(self.daemon) and not _running(self.container_monitor):
            hoststate.remove_stale(self.chain_prefixes, self.bridges)


def _engines_running() -> bool:
    return any(_running(comm) for comm in ("dockerd", "containerd-shim", "podman", "conmon"))


def _kill_and_wait(pid: int, grace_s: float = 30) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # dockerd stops its containers on TERM
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1]


def _unmount_under(dirs: tuple[Path, ...]) -> None:
    """Detach every mount below dirs (an engine's overlays, netns and shm), deepest first,
    so removing the directories never reaches into a mounted file system."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    under = [p for p in points if any(p == str(d) or p.startswith(f"{d}/") for d in dirs)]
    for point in sorted(under, key=lambda p: p.count("/"), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_DOCKER_DIRS = (Path("/var/lib/mace-test-docker"), Path("/run/mace-test-docker"))
DOCKER = Private(
    "dockerd", ("docker", "-H", "unix:///run/mace-test-docker.sock"),
    "/run/mace-test-docker.sock", Path("/run/mace-test-docker.pid"),
    Path("/run/mace-test-docker.hoststate"), _DOCKER_DIRS,
    ("DOCKER",), ("docker0",), (Path("/run/docker"), Path("/run/containerd")),
    "containerd-shim")
_PODMAN_DIRS = (Path("/var/lib/mace-test-podman"), Path("/run/mace-test-podman"))
PODMAN = Private(
    "podman", ("podman", "--root", str(_PODMAN_DIRS[0]), "--runroot", str(_PODMAN_DIRS[1]),
               # else `system reset` would delete the machine's own podman networks
               "--network-config-dir", str(_PODMAN_DIRS[0] / "networks")),
    "/run/mace-test-podman.sock", Path("/run/mace-test-podman.pid"),
    Path("/run/mace-test-podman.hoststate"), _PODMAN_DIRS,
    ("NETAVARK",), ("podman0",),
    # netavark's IPAM is shared by every rootful podman on purpose: not relocatable
    (Path("/run/containers"), Path("/var/lib/containers"), Path("/etc/containers/networks"),
     Path("/etc/cni/net.d/cni.lock"), Path("/run/runc"), Path("/run/libpod"),
     Path.home() / ".config/containers"),
    "conmon", ("system", "reset", "--force"))


@contextmanager
def host_state_restored(engine: Private) -> Iterator[None]:
    """Snapshot the root namespace (every iptables backend, nft, links, forwarding);
    afterwards restore it, delete the engine's bridge if it was not there, and remove the
    shared paths the engine created. Fails if something could not be put back. The
    snapshot is also kept in a file until then, for the next run if this one is killed."""
    before = hoststate.snapshot()
    created = [p for p in engine.shared if not p.exists()]
    engine.state_file.write_text(json.dumps({"state": hoststate.to_json(before),
                                             "created": [str(p) for p in created]}))
    try:
        yield
    finally:
        left = hoststate.restore(before, engine.bridges)
        for path in created:
            _remove(path)
        engine.state_file.unlink(missing_ok=True)
        if left:
            raise LabError(f"root namespace not restored: {'; '.join(left)}")


@contextmanager
def _private(engine: Private, command: list[str], ready: Callable[[], bool],
             writes_pidfile: bool) -> Iterator[None]:
    """Run command as engine's daemon from a clean slate; undo everything afterwards."""
    _remove_leftovers(engine)
    with host_state_restored(engine):
        daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not writes_pidfile:  # how the next run finds it if this one is killed
                engine.pidfile.write_text(f"{daemon.pid}\n")
            _wait_until_up(ready, daemon, engine.daemon)
            yield
        finally:
            _stop(daemon)
            engine.clean_up()


@contextmanager
def _docker() -> Iterator[Engine]:
    if shutil.which("dockerd") is None:
        raise LabError("docker.io not installed (make test installs it)")
    for sock in ("/run/docker.sock", "/var/run/docker.sock"):
        cli = ["docker", "-H", f"unix://{sock}"]
        if Path(sock).is_socket() and _answers(cli):
            yield Engine("docker", cli, {"DOCKER_HOST": f"unix://{sock}"}, "docker0")
            return
    host, (data, state) = f"unix://{DOCKER.sock}", DOCKER.dirs
    # dockerd writes the pidfile itself, and refuses to start while it names a live one
    command = ["dockerd", "--host", host, "--data-root", str(data), "--exec-root", str(state),
               "--pidfile", str(DOCKER.pidfile)]
    with _private(DOCKER, command, lambda: _answers(list(DOCKER.cli)), writes_pidfile=True):
        yield Engine("docker", list(DOCKER.cli), {"DOCKER_HOST": host}, "docker0")


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
    command = [*PODMAN.cli, "system", "service", "--time=0", f"unix://{PODMAN.sock}"]
    with _private(PODMAN, command, lambda: Path(PODMAN.sock).is_socket(),
                  writes_pidfile=False):
        yield Engine("podman", list(PODMAN.cli), {"CONTAINER_HOST": f"unix://{PODMAN.sock}"},
                     "podman0", run_opts)


def started(runtime: str) -> AbstractContextManager[Engine]:
    """The engine for runtime ("docker" or "podman"), running for the with block."""
    if runtime not in ("docker", "podman"):
        raise LabError(f"unknown engine '{runtime}'")
    return _docker() if runtime == "docker" else _podman()


def _run_alive(run: int) -> bool:
    """Whether a process whose PID gives this per-run number (PID % 100000) still runs."""
    return any(p.isdigit() and int(p) % 100000 == run for p in os.listdir("/proc"))


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def remove_stale_uplinks(host_addr: str | None = None) -> list[str]:
    """Targets that killed runs left: a root-namespace veth named letters + run number
    (md12345, mb12345) holding host_addr (None: any test address, 198.18.0.0/15), whose
    run is gone. Its netns would keep answering on the target address, in place of ours.
    Returns the links removed."""
    names = {n["nsid"]: n.get("name") for n in _ip_json("netns", "list-id")}
    removed = []
    for link in _ip_json("-4", "-d", "addr", "show"):
        match = re.fullmatch(r"[a-z]+(\d+)", link.get("ifname", ""))
        holds = any(a.get("local") == host_addr if host_addr else
                    ipaddress.ip_address(a.get("local", "0.0.0.0")) in TEST_NET
                    for a in link.get("addr_info", []))
        if not holds or not match or _run_alive(int(match[1])) or \
                link.get("linkinfo", {}).get("info_kind") != "veth":
            continue
        netns = names.get(link.get("link_netnsid"))
        if netns:  # what still runs in it, then the netns (and with it the veth pair)
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", link["ifname"]], capture_output=True)
        removed.append(link["ifname"])
    return removed


@contextmanager
def uplinked_target(name: str, outer: str, host_addr: str, target_addr: str,
                    prefix_len: int = 30) -> Iterator[str]:
    """A target netns behind one veth (outer) from the root namespace; yields its address.
    A target a killed run left on the same address is removed first."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    remove_stale_uplinks(host_addr)
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


def _remove_leftovers(engine: Private) -> None:
    engine.clean_up()  # first: its daemon and containers may hold what follows
    engine.recover()
    engine.remove_stale_network()


def remove_leftovers() -> None:
    """What a killed run, or a daemon started by hand and stopped, left behind: daemons of
    ours and their directories, the root namespace as it was before them, chains and
    bridges that no running engine owns, and stale targets."""
    for engine in (DOCKER, PODMAN):
        _remove_leftovers(engine)
    remove_stale_uplinks()
