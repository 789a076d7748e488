"""Finding containers through each runtime's interface, without a runtime: a stand-in
crictl that answers like the real one (`crictl ps/inspect -o json`), and missing sockets.
Its running container's init is a real process (a `sleep`), since a found container is
pinned by pidfd."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mace_tools.errors import MaceError
from mace_tools.probe import containers, netns

RUNNING = {"id": "4f1c2d3e4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0",
           "metadata": {"name": "web"}, "state": "CONTAINER_RUNNING"}
EXITED = {"id": "9a8b7c6d5e4f30211203f4e5d6c7b8a9aabbccddeeff00112233445566778899",
          "metadata": {"name": "job"}, "state": "CONTAINER_EXITED"}
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0,
                               reason="needs root (pins another process's netns)")


@pytest.fixture
def init() -> Iterator[int]:
    """The running container's init: a live process, unpinned again afterwards."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if (pinned := netns._PINNED.get(proc.pid)) is not None:
            netns.release(pinned)


@pytest.fixture
def crictl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: int) -> Path:
    """A crictl on PATH that knows two containers; `fail` in its dir makes it fail, and a
    pid in `restart` is what every inspect after the first one answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "state.json").write_text(json.dumps({
        "containers": [RUNNING, EXITED], "pids": {RUNNING["id"]: init, EXITED["id"]: 0}}))
    script = bin_dir / "crictl"
    script.write_text(f"""#!{sys.executable}
import json, sys, pathlib
here = pathlib.Path({str(tmp_path)!r})
if (here / "fail").exists():
    sys.exit("time=x level=fatal msg=\\"connect: connection refused\\"")
state = json.loads((here / "state.json").read_text())
args = sys.argv[1:]
assert args[-2:] == ["-o", "json"], args
if args[0] == "ps":
    cs = state["containers"]
    if "--state" in args:
        cs = [c for c in cs if c["state"] == "CONTAINER_RUNNING"]
    print(json.dumps({{"containers": cs}}))
elif args[0] == "inspect":
    c = next(c for c in state["containers"] if c["id"] == args[1])
    pid = state["pids"][c["id"]]
    inspected = here / "inspected"
    if (here / "restart").exists() and inspected.exists():
        pid = int((here / "restart").read_text())
    inspected.touch()
    print(json.dumps({{"status": c, "info": {{"pid": pid}}}}))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


@ROOT_ONLY
def test_crictl_finds_by_name_and_id_prefix(crictl: Path, init: int) -> None:
    by_name = containers.find("web", "crio")
    assert (by_name.runtime, by_name.name, by_name.pid, by_name.id) == \
        ("crio", "web", init, RUNNING["id"][:12])
    assert containers.find(RUNNING["id"][:8], "crio") == by_name
    assert [c.name for c in containers.list_running("crio")] == ["web"]


@ROOT_ONLY
def test_found_init_is_pinned(crictl: Path, init: int) -> None:
    found = containers.find("web", "crio")
    assert found.pinned is not None and found.pinned.pid == init
    assert found.netns_path == found.pinned.netns_path  # the pinned fd, not /proc/PID
    assert os.stat(found.netns_path).st_ino == os.stat(f"/proc/{init}/ns/net").st_ino
    listed = containers.list_running("crio")[0]  # a listing pins nothing
    assert listed.pinned is None and listed.netns_path == Path(f"/proc/{init}/ns/net")


@ROOT_ONLY
def test_init_replaced_between_lookups_is_refused(crictl: Path, init: int) -> None:
    """The runtime named one PID, then another: the pinned process is not (or no longer)
    the container's init, so it is not measured."""
    (crictl / "restart").write_text(str(os.getpid()))
    with pytest.raises(MaceError, match=r"^container 'web' stopped or restarted while being "
                                        r"looked up$"):
        containers.find("web", "crio")
    assert init not in netns._PINNED  # the pin was let go


def test_init_that_is_gone_is_refused(crictl: Path) -> None:
    state = json.loads((crictl / "state.json").read_text())
    state["pids"][RUNNING["id"]] = 999_999_999  # above any pid_max: no such process
    (crictl / "state.json").write_text(json.dumps(state))
    with pytest.raises(MaceError, match=r"^container 'web': no process with pid 999999999$"):
        containers.find("web", "crio")


def test_crictl_errors_are_one_line(crictl: Path) -> None:
    with pytest.raises(MaceError, match=r"^container 'job' is not running$"):
        containers.find("job", "crio")
    with pytest.raises(MaceError, match=r"^no such container: 'nope'$"):
        containers.find("nope", "crio")
    (crictl / "fail").touch()
    with pytest.raises(MaceError, match=r"^crictl ps failed: .*connection refused"):
        containers.find("web", "crio")


def test_missing_runtimes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(containers, "SOCKETS", {"docker": [str(tmp_path / "d.sock")],
                                                "podman": [str(tmp_path / "p.sock")]})
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    monkeypatch.setenv("CONTAINERD_ADDRESS", f"unix://{tmp_path}/c.sock")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MaceError, match=r"^no docker API socket found \(is the daemon"):
        containers.find("x", "docker")
    with pytest.raises(MaceError, match=r"^crictl not found"):
        containers.find("x", "crio")
    with pytest.raises(MaceError, match=rf"^no containerd socket found at {tmp_path}/c.sock "
                                        r"\(is the daemon running\?\)$"):
        containers.find("x", "containerd")
    with pytest.raises(MaceError, match=r"^no docker, podman, containerd or crictl found"):
        containers.find("x", "auto")
    with pytest.raises(MaceError, match=r"^unknown runtime 'lxc' \(docker, podman, "
                                        r"containerd, crio or auto\)$"):
        containers.find("x", "lxc")
    with socket.socket(socket.AF_UNIX) as listening:  # a socket, but no ctr on PATH
        listening.bind(str(tmp_path / "c.sock"))
        with pytest.raises(MaceError, match=r"^ctr not found \(containerd's client"):
            containers.find("x", "containerd")


def test_cli_runtime_error_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.ping", "--runtime", "lxc",
                           "--container", "x", "127.0.0.1"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == ("mace-ping: unknown runtime 'lxc' "
                           "(docker, podman, containerd, crio or auto)\n")
