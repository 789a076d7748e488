"""Containers by name: ask the runtime's API for a container's init PID (its netns).

Docker's Engine API and Podman's Docker-compatible API answer the same requests
(`GET /containers/{id}/json`, `GET /containers/json`) over a unix socket; we speak HTTP/1.1
on it with the standard library (no docker SDK on the start path).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mace_tools.errors import MaceError

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

    @property
    def netns_path(self) -> Path:
        return Path(f"/proc/{self.pid}/ns/net")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=API_TIMEOUT_S)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(API_TIMEOUT_S)
        sock.connect(self.unix_path)
        self.sock = sock


def _socket_for(runtime: str) -> str | None:
    """The runtime's API socket: $DOCKER_HOST (unix://) for docker, else the usual paths."""
    host = os.environ.get("DOCKER_HOST", "") if runtime == "docker" else ""
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


def available_runtimes(runtime: str) -> list[tuple[str, str]]:
    """(runtime, socket) pairs to ask, for --runtime docker|podman|auto."""
    names = list(SOCKETS) if runtime == "auto" else [runtime]
    if runtime not in ("auto", *SOCKETS):
        raise MaceError(f"unknown runtime '{runtime}' (docker, podman or auto)")
    found = [(name, path) for name in names if (path := _socket_for(name))]
    if not found:
        wanted = "docker or podman" if runtime == "auto" else runtime
        raise MaceError(f"no {wanted} API socket found (is the daemon running?)")
    return found


def _container(runtime: str, data: dict) -> Container:
    state = data.get("State") or {}
    name = str(data.get("Name", "")).lstrip("/")
    return Container(runtime, str(data.get("Id", ""))[:12], name, int(state.get("Pid") or 0),
                     bool(state.get("Running")))


def find(name_or_id: str, runtime: str = "auto") -> Container:
    """The running container called name_or_id, or a one-line MaceError."""
    quoted = urllib.parse.quote(name_or_id, safe="")
    for rt, path in available_runtimes(runtime):
        status, data = _get(path, f"/containers/{quoted}/json")
        if status == 200 and isinstance(data, dict):
            found = _container(rt, data)
            if not found.running or found.pid <= 0:
                raise MaceError(f"container '{name_or_id}' is not running")
            return found
        if status != 404:
            raise MaceError(f"{rt} API answered {status} for container '{name_or_id}'")
    raise MaceError(f"no such container: '{name_or_id}'")


def list_running(runtime: str = "auto") -> list[Container]:
    out = []
    for rt, path in available_runtimes(runtime):
        status, data = _get(path, "/containers/json")
        if status != 200 or not isinstance(data, list):
            raise MaceError(f"{rt} API answered {status} listing containers")
        for item in data:
            _, detail = _get(path, f"/containers/{item.get('Id', '')}/json")
            if isinstance(detail, dict):
                out.append(_container(rt, detail))
    return out
