"""containerd's containers found by ID and by Kubernetes names through ctr, on Debian's real
containerd, and measured from the host with --container.

Set-up and clean-up: mace_tools.lab.containerd (the machine's containerd if one answers,
else a private one; busybox containers from a rootfs, no image, no registry). Each
container's task joins a netns of the session's lab (c0, c1: behind the lab's bridge and NAT,
the target at 198.18.0.2), so nothing touches the root network namespace. A containerd
that cannot start fails these tests: they never skip for it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mace_tools.errors import MaceError
from mace_tools.lab import containerd
from mace_tools.lab.topology import BRIDGE_ADDR, Lab
from mace_tools.probe import containers, netns

pytestmark = pytest.mark.lab

RUN = os.getpid() % 100000
PREFIX = f"mt{RUN}-ctd-"  # every container ID here; the lab module removes them all
NAME = f"{PREFIX}web"  # the Kubernetes container name of both pods' web containers
KIND, POD, CNAME, UID = (containers.KIND_LABEL, containers.POD_LABEL, containers.NAME_LABEL,
                         containers.POD_UID_LABEL)


@dataclass(frozen=True)
class Pod:
    name: str
    sandbox_pid: int
    web_pid: int
    netns: str


@dataclass(frozen=True)
class Setup:
    ctd: containerd.Containerd
    plain_pid: int  # mt<RUN>-ctd-plain in namespace default, in lab c0
    pods: tuple[Pod, Pod]  # in k8s.io: pod a in lab c0, pod b in lab c1


@pytest.fixture(scope="module")
def ctd() -> Iterator[containerd.Containerd]:
    with containerd.started(PREFIX) as found:
        yield found


def run_pod(ctd: containerd.Containerd, lab: Lab, letter: str, container: int) -> Pod:
    """A pod as containerd's CRI plugin keeps it: a sandbox, a running `web` container and
    an exited earlier attempt of it (a restart), all labelled as kubelet labels them."""
    name, uid, ns = f"{PREFIX}pod-{letter}", f"{PREFIX}uid-{letter}", lab.container_ns(container)
    path = lab.netns_path(ns)
    pod = {POD: name, UID: uid}
    sandbox = ctd.run("k8s.io", f"{PREFIX}sandbox-{letter}", path, {**pod, KIND: "sandbox"})
    web = {**pod, KIND: "container", CNAME: NAME}
    ctd.run("k8s.io", f"{PREFIX}web-{letter}-0", path, web)
    ctd.stop("k8s.io", f"{PREFIX}web-{letter}-0")
    return Pod(name, sandbox, ctd.run("k8s.io", f"{PREFIX}web-{letter}-1", path, web), ns)


@pytest.fixture(scope="module")
def live(ctd: containerd.Containerd, lab: Lab) -> Setup:
    plain = ctd.run("default", f"{PREFIX}plain", lab.netns_path(lab.container_ns(0)))
    return Setup(ctd, plain, (run_pod(ctd, lab, "a", 0), run_pod(ctd, lab, "b", 1)))


@pytest.fixture
def address(live: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """mace asks this containerd."""
    monkeypatch.setenv("CONTAINERD_ADDRESS", live.ctd.address)


def found(name_or_id: str, runtime: str = "containerd") -> containers.Container:
    """find()'s answer, its pin let go again."""
    container = containers.find(name_or_id, runtime)
    assert container.pinned is not None
    netns.release(container.pinned)
    return container


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_found_by_id_and_prefix(live: Setup, lab: Lab, address: None) -> None:
    by_id = found(f"{PREFIX}plain")
    assert (by_id.runtime, by_id.name, by_id.id, by_id.pid, by_id.running) == \
        ("containerd", f"{PREFIX}plain", f"{PREFIX}plain"[:12], live.plain_pid, True)
    assert netns_inode(f"/proc/{by_id.pid}/ns/net") == \
        netns_inode(lab.netns_path(lab.container_ns(0)))
    assert found(f"{PREFIX}pla") == by_id  # a unique prefix of >= 6
    assert found(f"{PREFIX}plain", "auto") == by_id  # auto asks containerd too
    short = PREFIX[:5]  # a prefix of every container here, but under six characters
    with pytest.raises(MaceError, match=rf"^no such container: '{short}'$"):
        containers.find(short, "containerd")


def test_found_by_kubernetes_names(live: Setup, lab: Lab, address: None) -> None:
    pod_a, pod_b = live.pods
    web = found(f"{pod_a.name}/{NAME}")  # the running attempt, not the exited one
    assert (web.name, web.pid, web.running) == (f"{pod_a.name}/{NAME}", pod_a.web_pid, True)
    sandbox = found(pod_b.name)  # a pod's name: its sandbox, whose netns the pod shares
    assert (sandbox.name, sandbox.pid) == (pod_b.name, pod_b.sandbox_pid)
    assert netns_inode(f"/proc/{sandbox.pid}/ns/net") == netns_inode(lab.netns_path(pod_b.netns))
    assert found(f"{PREFIX}web-b-1").pid == pod_b.web_pid  # a CRI container by its ID


def test_a_name_in_two_pods_is_ambiguous(live: Setup, address: None) -> None:
    # two pods: four containers, but a pod and its exited attempt are one netns
    with pytest.raises(MaceError, match=rf"^container '{NAME}' is ambiguous in containerd "
                                        r"\(2 match\)$"):
        containers.find(NAME, "containerd")
    with pytest.raises(MaceError, match=r"is ambiguous in containerd \(2 match\)$"):
        containers.find(f"{PREFIX}web-", "containerd")  # an ID prefix of several


def test_stopped_and_removed_containers(live: Setup, lab: Lab, address: None) -> None:
    cid = f"{PREFIX}gone"
    live.ctd.run("default", cid, lab.netns_path(lab.container_ns(0)))
    live.ctd.stop("default", cid)
    with pytest.raises(MaceError, match=rf"^container '{cid}' is not running$"):
        containers.find(cid, "containerd")
    live.ctd.remove("default", cid)
    with pytest.raises(MaceError, match=rf"^no such container: '{cid}'$"):
        containers.find(cid, "containerd")
    with pytest.raises(MaceError, match=rf"^container '{PREFIX}web-a-0' is not running$"):
        containers.find(f"{PREFIX}web-a-0", "containerd")  # a pod's exited attempt, by ID


def mace(live: Setup, lab: Lab, *args: str, tool: str = "ping",
         ) -> subprocess.CompletedProcess[str]:
    """A mace tool in the lab's host netns (the container host), on this containerd."""
    return subprocess.run(lab.on_host(sys.executable, "-m", f"mace_tools.cli.{tool}",
                                      "--runtime", "containerd", *args),
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **live.ctd.env})


def test_mace_ping_container_is_corrected(live: Setup, lab: Lab) -> None:
    proc = mace(live, lab, "--container", live.pods[0].name, "-c", "3", "-i", "0.2",
                lab.target_addr)
    assert proc.returncode == 0, proc.stderr
    replies = re.findall(rf"^64 bytes from {re.escape(lab.target_addr)}: icmp_seq=\d ttl=63 "
                         r"time=([\d.]+) ms corrected=([\d.]+) ms", proc.stdout, re.M)
    assert len(replies) == 3, proc.stdout
    # the correction removed the container's bridge and NAT from every reply
    assert all(float(corrected) < float(raw) for raw, corrected in replies)
    assert "kernel data 3/3 replies (100%)" in proc.stdout


def test_traceroute_container(live: Setup, lab: Lab) -> None:
    proc = mace(live, lab, "--container", f"{live.pods[1].name}/{NAME}", "-n", "-q", "1",
                "-w", "1", lab.target_addr, tool="traceroute")
    assert proc.returncode == 0, proc.stderr
    hops = proc.stdout.splitlines()[1:]
    assert re.match(rf"^ 1  {re.escape(BRIDGE_ADDR)}  .* host-internal$", hops[0]), hops
    assert re.match(rf"^ 2  {re.escape(lab.target_addr)}  .*corrected=", hops[1]), hops


def test_list_containers(live: Setup, lab: Lab) -> None:
    proc = mace(live, lab, "--list-containers")
    assert proc.returncode == 0, proc.stderr
    rows = {m[0]: (m[1], int(m[2]), int(m[3])) for m in re.findall(
        r"^(\S+)\s+(\S{1,12})\s+containerd\s+(\d+)\s+net:\[(\d+)\]$", proc.stdout, re.M)}
    c0, c1 = (netns_inode(lab.netns_path(lab.container_ns(i))) for i in (0, 1))
    pod_a, pod_b = live.pods
    assert rows[f"{PREFIX}plain"] == (f"{PREFIX}plain"[:12], live.plain_pid, c0)
    assert rows[pod_a.name][1:] == (pod_a.sandbox_pid, c0)
    assert rows[f"{pod_b.name}/{NAME}"][1:] == (pod_b.web_pid, c1)
    assert not any(name.startswith(f"{PREFIX}web-a-0") for name in rows)  # exited


def test_cli_errors_are_one_line(live: Setup, lab: Lab) -> None:
    proc = mace(live, lab, "--container", NAME, "-c", "1", lab.target_addr)
    assert (proc.returncode, proc.stderr) == \
        (2, f"mace-ping: container '{NAME}' is ambiguous in containerd (2 match)\n")
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.ping", "--runtime",
                           "containerd", "--container", NAME, "-c", "1", lab.target_addr],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CONTAINERD_ADDRESS": "/nonexistent.sock"})
    assert (proc.returncode, proc.stderr) == \
        (2, "mace-ping: no containerd socket found at /nonexistent.sock "
            "(is the daemon running?)\n")
    dead = live.ctd.workdir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as unanswered:  # bound, never listening
        unanswered.bind(str(dead))
        proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.ping", "--container", NAME,
                               "-c", "1", lab.target_addr], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "CONTAINERD_ADDRESS": str(dead)})
    assert (proc.returncode, proc.stderr) == \
        (2, f"mace-ping: containerd at {dead} did not answer: connection refused\n")
