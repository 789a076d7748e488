"""Finding containers through each runtime's interface, without a runtime: a stand-in
crictl that answers like the real one (`crictl ps/inspect -o json`), and missing sockets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mace_tools.errors import MaceError
from mace_tools.probe import containers

RUNNING = {"id": "4f1c2d3e4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0",
           "metadata": {"name": "web"}, "state": "CONTAINER_RUNNING"}
EXITED = {"id": "9a8b7c6d5e4f30211203f4e5d6c7b8a9aabbccddeeff00112233445566778899",
          "metadata": {"name": "job"}, "state": "CONTAINER_EXITED"}
PIDS = {RUNNING["id"]: 4242, EXITED["id"]: 0}


@pytest.fixture
def crictl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A crictl on PATH that knows two containers; `fail` in its dir makes it fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "state.json").write_text(json.dumps({"containers": [RUNNING, EXITED],
                                                     "pids": PIDS}))
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
    print(json.dumps({{"status": c, "info": {{"pid": state["pids"][c["id"]]}}}}))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def test_crictl_finds_by_name_and_id_prefix(crictl: Path) -> None:
    by_name = containers.find("web", "crio")
    assert (by_name.runtime, by_name.name, by_name.pid, by_name.id) == \
        ("crio", "web", 4242, RUNNING["id"][:12])
    assert containers.find(RUNNING["id"][:8], "crio") == by_name
    assert [c.name for c in containers.list_running("crio")] == ["web"]


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
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MaceError, match=r"^no docker API socket found \(is the daemon"):
        containers.find("x", "docker")
    with pytest.raises(MaceError, match=r"^crictl not found"):
        containers.find("x", "crio")
    with pytest.raises(MaceError, match=r"^no docker, podman or crictl found"):
        containers.find("x", "auto")
    with pytest.raises(MaceError, match=r"^unknown runtime 'lxc' \(docker, podman, crio"):
        containers.find("x", "lxc")


def test_cli_runtime_error_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "mace_tools.cli.ping", "--runtime", "lxc",
                           "--container", "x", "127.0.0.1"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == ("mace-ping: unknown runtime 'lxc' "
                           "(docker, podman, crio or auto)\n")
