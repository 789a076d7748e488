"""A real containerd for tests, set up offline and undone, as engines.py does for Docker.

A containerd already answering on its default socket is used as it is. Otherwise one is
started with its own --root, --state and --address in a directory of this run
(/tmp/mace-ctd-PID-*), without the CRI plugin (no CNI, no netns of its own) and without the
opt plugin (which would create /opt/containerd). Containers run from a rootfs of Debian's
static busybox (`ctr run --rootfs`, no image, no registry), with runc's state in the same
directory and no cgroup of their own beyond runc's per-container one, and join a netns the
caller made (`--with-ns network:PATH`): the root network namespace is never touched.

What it changes outside its directory: containerd 1.6's shims put their sockets in
/run/containerd/s whatever --state says, so that directory (and /run/containerd) is removed
again if this run created it and nothing else uses it. A run killed before its clean-up is
cleaned up by the next one: its directory names its PID and what it created, its daemon
and shims name its directory or its container IDs (mt<RUN>-ctd-*), and runc, whose state
is in its directory, kills its containers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from mace_tools.lab.engines import (
    _alive,
    _kill_and_wait,
    _remove,
    _run_alive,
    _stop,
    _unmount_under,
    _wait_until_up,
)
from mace_tools.lab.topology import LabError

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
SHIM_DIR = Path("/run/containerd/s")
MADE = "made"  # in a run's directory: the directories of SHIM_DIR's path the run created
NAMESPACES = ("k8s.io", "default")  # where mace looks (probe/containers.py)
DIR_PREFIX = "mace-ctd-"
ID_PATTERN = re.compile(r"mt(\d+)-ctd-")  # the IDs of test containers: mt<RUN>-ctd-...
# Plugins a private daemon does without: CRI (CNI networking, its own netns), opt (writes
# /opt/containerd), tracing (exporters).
CONFIG = """version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
                    "io.containerd.internal.v1.tracing",
                    "io.containerd.tracing.processor.v1.otlp"]
"""


@dataclass
class Containerd:
    """A containerd to run test containers on, and what this run created on it."""

    address: str
    workdir: Path  # this run's: rootfs, runc state, a private daemon's root and state
    created: list[tuple[str, str]] = field(default_factory=list)  # (namespace, ID)
    pids: list[int] = field(default_factory=list)  # their init processes

    @property
    def env(self) -> dict[str, str]:
        """How mace (and ctr) find this containerd."""
        return {"CONTAINERD_ADDRESS": self.address}

    @property
    def runc_root(self) -> Path:
        return self.workdir / "runc"

    def ctr(self, namespace: str, *args: str, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", self.address, "--namespace", namespace,
                               *args], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise LabError(f"ctr {' '.join(args[:2])}: {proc.stderr.strip()}")
        return proc

    def rootfs(self) -> Path:
        """Debian's static busybox and a sleep link: all a container here runs."""
        root = self.workdir / "rootfs"
        if not (root / "bin" / "sleep").is_symlink():
            for sub in ("bin", "proc", "dev", "sys", "tmp"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2("/bin/busybox", root / "bin" / "busybox")
            (root / "bin" / "sleep").symlink_to("busybox")
        return root

    def run(self, namespace: str, cid: str, netns_path: str,
            labels: dict[str, str] | None = None) -> int:
        """A busybox `sleep` container whose task joins netns_path; its init PID, as ctr
        wrote it to a pid file."""
        pid_file = self.workdir / f"{namespace}-{cid}.pid"
        label_args = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        self.created.append((namespace, cid))
        self.ctr(namespace, "run", "--detach", "--null-io", "--rootfs", "--cgroup", "",
                 "--runc-root", str(self.runc_root), "--pid-file", str(pid_file),
                 "--with-ns", f"network:{netns_path}", *label_args,
                 str(self.rootfs()), cid, "/bin/sleep", "600")
        self.pids.append(int(pid_file.read_text()))
        return self.pids[-1]

    def stop(self, namespace: str, cid: str) -> None:
        """Kill the container's task and wait until containerd calls it STOPPED (it stays,
        as an exited container's does until it is deleted)."""
        self.ctr(namespace, "tasks", "kill", "--signal", "KILL", cid)
        deadline = time.monotonic() + 10
        while not re.search(rf"^{re.escape(cid)}\s+\d+\s+STOPPED\s*$",
                            self.ctr(namespace, "tasks", "list").stdout, re.M):
            if time.monotonic() > deadline:
                raise LabError(f"task {cid} did not stop")
            time.sleep(0.05)

    def remove(self, namespace: str, cid: str) -> None:
        """Delete the container and its task, whatever state they are in."""
        self.ctr(namespace, "tasks", "delete", "--force", cid, check=False)
        self.ctr(namespace, "containers", "delete", cid, check=False)

    def remove_created(self) -> None:
        for namespace, cid in reversed(self.created):
            self.remove(namespace, cid)
        self.created.clear()


def _marked(marks: list[str]) -> list[int]:
    """Processes whose command line names any of marks (ours by name), not this one."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if any(m.encode() in cmdline for m in marks):
                    pids.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return pids


def _undo_dir(workdir: Path) -> None:
    """Everything a run's directory holds: its containers' processes (runc deletes them
    and their cgroups), the daemon and shims that name it, its mounts, the directory."""
    runc_root = workdir / "runc"
    for ns_root in (runc_root.iterdir() if runc_root.is_dir() else []):
        listed = subprocess.run(["runc", "--root", str(ns_root), "list", "-q"],
                                capture_output=True, text=True, timeout=30).stdout.split()
        for cid in listed:
            subprocess.run(["runc", "--root", str(ns_root), "delete", "--force", cid],
                           capture_output=True, timeout=30)
    for pid in _marked([str(workdir)]):
        _kill_and_wait(pid, grace_s=10)
    _unmount_under((workdir,))
    with suppress(OSError):  # the shims' socket directories this run created, if empty
        for made in (workdir / MADE).read_text().split():
            with suppress(OSError):  # another containerd may use them by now
                Path(made).rmdir()
    _remove(workdir)


def _remove_stale(address: str) -> None:
    """What killed runs left: their directories (with their daemon, shims and containers)
    and, on a containerd we did not start, their test containers."""
    for workdir in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        match = re.fullmatch(rf"{DIR_PREFIX}(\d+)-\w+", workdir.name)
        if match and not _alive(int(match[1])):
            _undo_dir(workdir)
    if not Path(address).is_socket():
        return
    stale = Containerd(address, Path())
    for namespace in NAMESPACES:
        listed = stale.ctr(namespace, "containers", "list", "--quiet", check=False).stdout
        for cid in listed.split():
            if (run := ID_PATTERN.match(cid)) and not _run_alive(int(run[1])):
                stale.remove(namespace, cid)


def _answers(address: str) -> bool:
    if not Path(address).is_socket():  # else ctr waits for it to appear
        return False
    return subprocess.run(["ctr", "--address", address, "--connect-timeout", "2s", "version"],
                          capture_output=True, timeout=30).returncode == 0


def _left_behind(workdir: Path, run_prefix: str, pids: list[int]) -> list[str]:
    """What should be gone after the clean-up and is not: processes naming the run's
    directory or container IDs (daemon, shims), the containers' own processes (busybox
    sleep, named by nothing), mounts under the directory, the directory."""
    left = [f"process {pid}" for pid in _marked([str(workdir), run_prefix])]
    left += [f"container process {pid}" for pid in pids
             if _alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    if any(m == str(workdir) or m.startswith(f"{workdir}/") for m in mounts):
        left.append(f"mounts under {workdir}")
    if workdir.exists():
        left.append(str(workdir))
    return left


@contextmanager
def started(run_prefix: str) -> Iterator[Containerd]:
    """A containerd for the with block (see the module). run_prefix, mt<RUN>-ctd-, starts
    the ID of every container the caller runs; they are all removed afterwards, and the
    block fails if a process, mount or directory of this run is left."""
    if not ID_PATTERN.fullmatch(run_prefix):
        raise LabError(f"container IDs must start mt<RUN>-ctd-, not {run_prefix!r}")
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not installed (make setup installs containerd)")
    _remove_stale(DEFAULT_SOCKET)
    workdir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
    (workdir / MADE).write_text("".join(f"{d}\n" for d in (SHIM_DIR, SHIM_DIR.parent)
                                        if not d.exists()))
    pids: list[int] = []
    try:
        with _daemon(workdir) as found:
            try:
                yield found
            finally:
                pids = list(found.pids)
                found.remove_created()
    finally:
        _undo_dir(workdir)
    left = _left_behind(workdir, run_prefix, pids)
    if left:
        raise LabError(f"containerd clean-up left {', '.join(left)}")


@contextmanager
def _daemon(workdir: Path) -> Iterator[Containerd]:
    """The containerd answering on the default socket, else a private one on workdir's
    socket, root and state, stopped afterwards."""
    if _answers(DEFAULT_SOCKET):
        yield Containerd(DEFAULT_SOCKET, workdir)
        return
    address = str(workdir / "containerd.sock")
    (workdir / "config.toml").write_text(CONFIG)
    with (workdir / "containerd.log").open("wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(workdir / "config.toml"), "--address", address,
             "--root", str(workdir / "root"), "--state", str(workdir / "state")],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_until_up(lambda: _answers(address), daemon, "containerd")
            except LabError as exc:
                tail = (workdir / "containerd.log").read_text(errors="replace").split("\n")
                last = next((line for line in reversed(tail) if line.strip()), "no log")
                raise LabError(f"{exc}: {last}") from None  # its log's last word
            yield Containerd(address, workdir)
        finally:
            _stop(daemon)
