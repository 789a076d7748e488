"""Containers by name: ask the runtime for a container's init PID (its netns).

Docker's Engine API and Podman's Docker-compatible API answer the same requests
(`GET /containers/{id}/json`, `GET /containers/json`) over a unix socket; we speak HTTP/1.1
on it with the standard library (no docker SDK on the start path). CRI runtimes
(containerd, CRI-O) are asked through crictl, which knows their endpoint.

The init PID a runtime gives is pinned (pidfd) at once and the runtime asked again: only a
PID it still names while the pinned process lives is the container's, so a container that
exits and a PID the kernel hands to someone else in between are never measured.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path

from mace_tools.errors import MaceError
from mace_tools.probe import netns

SOCKETS = {
    "docker": ["/run/docker.sock", "/var/run/docker.sock"],
    "podman": ["/run/podman/podman.sock", "/var/run/podman/podman.sock"],
}
API_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Container:
    runtime: str
    id: str
    name: str
    pid: int  # init process; 0 when not running
    running: bool
    pinned: netns.PinnedProcess | None = field(default=None, compare=False)

    @property
    def netns_path(self) -> Path:
        """The pinned netns once find() has pinned the init; /proc's for listings."""
        return self.pinned.netns_path if self.pinned else Path(f"/proc/{self.pid}/ns/net")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=API_TIMEOUT_S)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(API_TIMEOUT_S)
        sock.connect(self.unix_path)
        self.sock = sock


HOST_VARIABLES = {"docker": "DOCKER_HOST", "podman": "CONTAINER_HOST"}


def _socket_for(runtime: str) -> str | None:
    """The runtime's API socket: $DOCKER_HOST or $CONTAINER_HOST (unix://), else the usual
    paths."""
    host = os.environ.get(HOST_VARIABLES[runtime], "")
    candidates = [host[len("unix://"):]] if host.startswith("unix://") else []
    candidates += SOCKETS[runtime]
    return next((p for p in candidates if Path(p).is_socket()), None)


def _get(path: str, endpoint: str) -> tuple[int, object]:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", endpoint)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        raise MaceError(f"container runtime at {path} did not answer: {exc}") from exc
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body or b"null")
    except ValueError as exc:
        raise MaceError(f"container runtime at {path} sent no JSON") from exc


class _ApiRuntime:
    """Docker's Engine API, or Podman's compatible one, over a unix socket."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path

    def find(self, name_or_id: str) -> Container | None:
        quoted = urllib.parse.quote(name_or_id, safe="")
        status, data = _get(self.path, f"/containers/{quoted}/json")
        if status == 200 and isinstance(data, dict):
            return self._container(data)
        if status != 404:
            raise MaceError(f"{self.name} API answered {status} for container '{name_or_id}'")
        return None

    def running(self) -> list[Container]:
        status, data = _get(self.path, "/containers/json")
        if status != 200 or not isinstance(data, list):
            raise MaceError(f"{self.name} API answered {status} listing containers")
        out = []
        for item in data:
            _, detail = _get(self.path, f"/containers/{item.get('Id', '')}/json")
            if isinstance(detail, dict):
                out.append(self._container(detail))
        return out

    def _container(self, data: dict) -> Container:
        state = data.get("State") or {}
        name = str(data.get("Name", "")).lstrip("/")
        return Container(self.name, str(data.get("Id", ""))[:12], name,
                         int(state.get("Pid") or 0), bool(state.get("Running")))


class _CrictlRuntime:
    """CRI runtimes (containerd, CRI-O) through crictl, which knows their endpoint."""

    name = "crio"

    def __init__(self, crictl: str) -> None:
        self.crictl = crictl

    def _json(self, *args: str) -> dict:
        try:
            proc = subprocess.run([self.crictl, *args, "-o", "json"], capture_output=True,
                                  text=True, timeout=API_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MaceError(f"crictl did not answer: {exc}") from exc
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise _CrictlFailed(lines[-1] if lines else f"exit status {proc.returncode}")
        try:
            data = json.loads(proc.stdout)
        except ValueError as exc:
            raise MaceError("crictl sent no JSON") from exc
        return data if isinstance(data, dict) else {}

    def _ids(self, name_or_id: str) -> list[str]:
        try:
            listed = self._json("ps", "-a")
        except _CrictlFailed as exc:
            raise MaceError(f"crictl ps failed: {exc}") from None
        out = []
        for c in listed.get("containers") or []:
            cid, name = str(c.get("id", "")), str((c.get("metadata") or {}).get("name", ""))
            if name == name_or_id or (len(name_or_id) >= 6 and cid.startswith(name_or_id)):
                out.append(cid)
        return out

    def find(self, name_or_id: str) -> Container | None:
        ids = self._ids(name_or_id)
        if len(ids) > 1:
            raise MaceError(f"container '{name_or_id}' is ambiguous in crictl ({len(ids)} match)")
        return self._inspect(ids[0]) if ids else None

    def running(self) -> list[Container]:
        try:
            listed = self._json("ps", "--state", "running")
        except _CrictlFailed as exc:
            raise MaceError(f"crictl ps failed: {exc}") from None
        return [c for item in listed.get("containers") or []
                if (c := self._inspect(str(item.get("id", ""))))]

    def _inspect(self, cid: str) -> Container:
        try:
            data = self._json("inspect", cid)
        except _CrictlFailed as exc:
            raise MaceError(f"crictl inspect {cid[:12]} failed: {exc}") from None
        status, info = data.get("status") or {}, data.get("info") or {}
        name = str((status.get("metadata") or {}).get("name", ""))
        running = status.get("state") == "CONTAINER_RUNNING"
        return Container(self.name, cid[:12], name, int(info.get("pid") or 0), running)


class _CrictlFailed(Exception):
    """crictl exited non-zero; the message is its last line of stderr."""


RUNTIMES = ("docker", "podman", "crio")


def available_runtimes(runtime: str) -> list[_ApiRuntime | _CrictlRuntime]:
    """The runtimes to ask, for --runtime docker|podman|crio|auto."""
    if runtime not in ("auto", *RUNTIMES):
        raise MaceError(f"unknown runtime '{runtime}' (docker, podman, crio or auto)")
    names = RUNTIMES if runtime == "auto" else (runtime,)
    found: list[_ApiRuntime | _CrictlRuntime] = []
    for name in names:
        if name == "crio":
            if crictl := shutil.which("crictl"):
                found.append(_CrictlRuntime(crictl))
        elif path := _socket_for(name):
            found.append(_ApiRuntime(name, path))
    if not found:
        if runtime == "crio":
            raise MaceError("crictl not found (needed for CRI runtimes: containerd, CRI-O)")
        wanted = "docker, podman or crictl" if runtime == "auto" else f"{runtime} API socket"
        raise MaceError(f"no {wanted} found (is the daemon running?)")
    return found


def find(name_or_id: str, runtime: str = "auto") -> Container:
    """The running container called name_or_id with its init pinned, or a one-line
    MaceError."""
    for source in available_runtimes(runtime):
        found = source.find(name_or_id)
        if found is not None:
            if not found.running or found.pid <= 0:
                raise MaceError(f"container '{name_or_id}' is not running")
            return _pinned(source, found, name_or_id)
    raise MaceError(f"no such container: '{name_or_id}'")


def _pinned(source: _ApiRuntime | _CrictlRuntime, found: Container,
            name_or_id: str) -> Container:
    """found with its init pinned. The runtime is asked again after the pin: if it still
    names the same PID while the pinned process is alive, that process is its init (a PID
    reused before the pin would show as a stopped container or another PID)."""
    where = f"container '{name_or_id}'"
    try:
        pinned = netns.pin(found.pid)
    except MaceError as exc:
        raise MaceError(f"{where}: {exc}") from None
    try:
        again = source.find(name_or_id)
        if again is None or not again.running or (again.id, again.pid) != (found.id, found.pid):
            raise MaceError(f"{where} stopped or restarted while being looked up")
        try:
            netns.require_alive(pinned)
        except MaceError as exc:
            raise MaceError(f"{where}: {exc}") from None
    except BaseException:
        netns.release(pinned)
        raise
    return replace(found, pinned=pinned)


def list_running(runtime: str = "auto") -> list[Container]:
    return [c for source in available_runtimes(runtime) for c in source.running()]
