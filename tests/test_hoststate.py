"""mace_tools.lab.hoststate: what container engines change is put back exactly, each iptables
backend through its own tools, and what a dead engine left is removed by name.

Each case runs in a network namespace of its own (`ip netns exec`, which also gives it its
own /sys), doing there what Docker and netavark do in the root namespace: the root
namespace is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

SCRIPT = r'''
import json, subprocess, sys
from mace_tools.lab import hoststate as hs

def sh(*commands):
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True)

def iptables_save():
    return subprocess.run(["iptables-nft-save"], capture_output=True, text=True).stdout

DOCKER = (  # as dockerd 20.10 programs it (iptables-nft here)
    "ip link add docker0 type bridge",
    "iptables -t nat -N DOCKER",
    "iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
    "iptables -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
    "iptables -N DOCKER-USER",
    "iptables -A FORWARD -j DOCKER-USER",
    "iptables -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "iptables -P FORWARD DROP",
    "sysctl -qw net.ipv4.ip_forward=1",
)
sh("sysctl -qw net.ipv4.ip_forward=0", "iptables-nft -N KEEP", "iptables-nft -A INPUT -j KEEP")
case = sys.argv[1]
if case == "restore":
    before = hs.snapshot()
    sh(*[c.replace("iptables ", "iptables-nft ") for c in DOCKER],
       "iptables-nft -D INPUT -j KEEP",  # a rule that was there before, gone
       "iptables-legacy -N NETAVARK_FORWARD",  # the other backend
       "ip6tables-nft -N DOCKER",
       "nft add table inet netavark")  # a native nft table
    changed = before.differences(hs.snapshot())
    left = hs.restore(before, ("docker0",))
    print(json.dumps({"changed": changed, "left": left, "save": iptables_save(),
                      "again": before.differences(hs.snapshot())}))
elif case == "stale":
    # the issue's machine: docker's tables put back by `nft -f` from `nft list` output
    sh(*[c.replace("iptables ", "iptables-nft ") for c in DOCKER],
       "iptables-legacy -N DOCKER", "iptables-legacy -A FORWARD -o docker0 -j DOCKER",
       "nft list ruleset > ruleset.nft && nft flush ruleset && nft -f ruleset.nft")
    lossy = subprocess.run(["iptables-nft", "-t", "nat", "-N", "DOCKER"], capture_output=True,
                           text=True).stderr
    removed = hs.remove_stale(("DOCKER",), ("docker0",))
    save = iptables_save()
    created = subprocess.run(["iptables-nft", "-t", "nat", "-N", "DOCKER"]).returncode
    print(json.dumps({"lossy": lossy, "removed": removed, "save": save,
                      "legacy": subprocess.run(["iptables-legacy-save"], capture_output=True,
                                               text=True).stdout,
                      "links": subprocess.run(["ip", "-br", "link"], capture_output=True,
                                              text=True).stdout,
                      "created": created}))
'''


@pytest.fixture
def netns_run(tmp_path: Path) -> Iterator[Callable[[str], dict]]:
    name = f"mt{os.getpid() % 100000}-hoststate"
    subprocess.run(["ip", "netns", "add", name], check=True)
    script = tmp_path / "case.py"
    script.write_text(SCRIPT)

    def run(case: str) -> dict:
        proc = subprocess.run(["ip", "netns", "exec", name, sys.executable, str(script), case],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        yield run
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_engine_changes_are_put_back_exactly(netns_run: Callable[[str], dict]) -> None:
    out = netns_run("restore")
    changed = "\n".join(out["changed"])
    for what in ("link docker0 added", "net/ipv4/ip_forward: 0 -> 1", "iptables-nft: ",
                 "iptables-legacy: ", "ip6tables-nft: ", "nft table inet netavark added",
                 "-A INPUT -j KEEP"):
        assert what in changed, changed
    assert out["left"] == [] and out["again"] == []
    # restored through iptables-nft-restore: iptables still reads its tables (not lossy)
    assert "incompatible" not in out["save"]
    assert ":KEEP - [0:0]" in out["save"] and "-A INPUT -j KEEP" in out["save"]


def test_stale_engine_leftovers_are_removed_by_name(netns_run: Callable[[str], dict]) -> None:
    out = netns_run("stale")
    assert "Chain already exists" in out["lossy"]  # the netavark/docker failure
    assert "link docker0" in out["removed"]
    assert out["created"] == 0  # iptables can create the chain again
    assert "incompatible" not in out["save"]
    assert "DOCKER" not in out["save"] and "docker0" not in out["save"]
    assert "DOCKER" not in out["legacy"] and "docker0" not in out["legacy"]
    assert ":KEEP - [0:0]" in out["save"] and "docker0" not in out["links"]


TINY = '''
import subprocess

import pytest

from mace_tools.lab import engines

engines.remove_leftovers = lambda: None  # the machine's engines are not this netns's


@pytest.mark.root_ns
def test_changes_the_namespace():
    subprocess.run(["ip", "link", "add", "leftover0", "type", "bridge"], check=True)
    subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
'''


def test_a_session_that_changes_the_root_namespace_fails(tmp_path: Path) -> None:
    """The conftest's check, run by the real conftest in a netns of its own that the
    tiny session takes for its root namespace."""
    name = f"mt{os.getpid() % 100000}-hscheck"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_tiny.py").write_text(TINY)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=0"],
                       check=True)
        proc = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-m", "pytest", "-p", "conftest",
             "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
             str(tmp_path), str(tmp_path / "test_tiny.py")],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert proc.returncode == 1, proc.stdout
    assert "1 passed, 1 error" in proc.stdout, proc.stdout
    assert "root network namespace changed by this session: link leftover0 added; " \
           "net/ipv4/ip_forward: 0 -> 1" in proc.stdout, proc.stdout
