"""Containers by name: ask the runtime for a container's init PID (its netns).

Docker's Engine API and Podman's Docker-compatible API answer the same requests
(`GET /containers/{id}/json`, `GET /containers/json`) over a unix socket; we speak HTTP/1.1
on it with the standard library (no docker SDK on the start path). containerd is asked
through its own client, ctr (its gRPC API would need grpcio and its protobufs), in the
namespaces Kubernetes (k8s.io) and ctr/nerdctl (default) use. CRI runtimes (CRI-O, or
containerd again) are asked through crictl, which knows their endpoint.

The init PID a runtime gives is pinned (pidfd) at once and the runtime asked again: only a
PID it still names while the pinned process lives is the container's, so a container that
exits and a PID the kernel hands to someone else in between are never measured.
"""

from __future__ import annotations

import http.client
import json
import os
import re
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


class _CtrNotFound(MaceError):
    """ctr said the container it was asked about is not there (any more)."""


CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
# Kubernetes (CRI) keeps its containers in k8s.io, ctr and nerdctl in default. Docker runs
# its own in "moby", which is left out: they are found (once) through Docker's API.
CONTAINERD_NAMESPACES = ("k8s.io", "default")
K8S_NAMESPACE = "k8s.io"
# The labels kubelet gives a container (and its pod's sandbox), and containerd's CRI kind.
POD_LABEL, NAME_LABEL = "io.kubernetes.pod.name", "io.kubernetes.container.name"
POD_UID_LABEL, KIND_LABEL = "io.kubernetes.pod.uid", "io.cri-containerd.kind"
# The characters of containerd's identifiers and Kubernetes' names (and of their prefixes):
# nothing else names a container, and nothing else is put into a ctr filter.
_NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TASK_HEADER = ["TASK", "PID", "STATUS"]  # `ctr tasks list`: a table, no JSON in ctr 1.6
_LIVE_TASK = ("RUNNING", "PAUSED")  # a paused container's netns is there, as Docker's


def _containerd_address() -> str:
    """$CONTAINERD_ADDRESS (as ctr reads it), else the default socket. ctr 1.6 takes a
    path only, so a unix:// scheme is dropped."""
    address = os.environ.get("CONTAINERD_ADDRESS") or CONTAINERD_SOCKET
    return address.removeprefix("unix://")


class _CtrRuntime:
    """containerd through ctr, in CONTAINERD_NAMESPACES. A container is named by its ID (or
    a unique prefix of >= 6), and in k8s.io also by its Kubernetes names: the container's
    (`web`, or `POD/web`), or the pod's, which names the pod's sandbox. The containers of
    one pod share the sandbox's netns, so matches within one pod are one match."""

    name = "containerd"

    def __init__(self, ctr: str, address: str) -> None:
        self.ctr, self.address = ctr, address

    def _ctr(self, namespace: str, *args: str) -> str:
        command = [self.ctr, "--address", self.address, "--connect-timeout", "2s",
                   "--timeout", f"{API_TIMEOUT_S:g}s", "--namespace", namespace, *args]
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=API_TIMEOUT_S + 1)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MaceError(f"ctr did not answer: {exc}") from exc
        if proc.returncode == 0:
            return proc.stdout
        lines = proc.stderr.strip().splitlines()
        reason = lines[-1].removeprefix("ctr: ") if lines else f"exit status {proc.returncode}"
        if reason.startswith("failed to dial"):  # gRPC's long words end in the cause
            cause = reason.rsplit(": ", 1)[-1].strip('"')
            raise MaceError(f"containerd at {self.address} did not answer: {cause}")
        failed = _CtrNotFound if reason.endswith(": not found") else MaceError
        raise failed(f"ctr {' '.join(args[:2])} failed: {reason}")

    def _ids(self, namespace: str, *filters: str) -> list[str]:
        """IDs of the namespace's containers (matching any of the filters: ctr ORs them)."""
        return self._ctr(namespace, "containers", "list", "--quiet", *filters).split()

    def _labels(self, namespace: str, cid: str) -> dict[str, str] | None:
        """A container's labels, from `ctr containers info` (JSON); None if it is gone."""
        try:
            out = self._ctr(namespace, "containers", "info", cid)
        except _CtrNotFound:  # removed since it was listed
            return None
        try:
            labels = json.loads(out).get("Labels") or {}
        except (ValueError, AttributeError) as exc:
            raise MaceError("ctr containers info sent no JSON object") from exc
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    def _tasks(self, namespace: str) -> dict[str, tuple[int, str]]:
        """Every task of the namespace: container ID -> (init PID, status)."""
        out = self._ctr(namespace, "tasks", "list")
        rows = [line.split() for line in out.splitlines() if line.strip()]
        if not rows or rows[0] != _TASK_HEADER or \
                any(len(r) != 3 or not r[1].isdigit() for r in rows[1:]):
            raise MaceError("ctr tasks list printed a table this mace does not know")
        return {cid: (int(pid), status) for cid, pid, status in rows[1:]}

    def _matches(self, namespace: str, query: str) -> list[str]:
        """IDs in namespace that query names (see the class)."""
        pod, _, name = query.rpartition("/")
        if not all(_NAME_CHARS.fullmatch(part) for part in ((pod, name) if pod else (name,))):
            return []
        ids: list[str] = []
        if not pod:
            listed = self._ids(namespace)
            ids = [i for i in listed if i == query] or \
                [i for i in listed if len(query) >= 6 and i.startswith(query)]
        if namespace == K8S_NAMESPACE:
            if pod:
                filters = [_label_filter({POD_LABEL: pod, NAME_LABEL: name})]
            else:
                filters = [_label_filter({NAME_LABEL: name}),
                           _label_filter({POD_LABEL: name, KIND_LABEL: "sandbox"})]
            ids += self._ids(namespace, *filters)
        return list(dict.fromkeys(ids))

    def find(self, name_or_id: str) -> Container | None:
        pods: dict[tuple[str, str], list[tuple[str, str, dict[str, str]]]] = {}
        for namespace in CONTAINERD_NAMESPACES:
            for cid in self._matches(namespace, name_or_id):
                # labels matter in k8s.io only (pods); elsewhere a container is its own
                labels = self._labels(namespace, cid) if namespace == K8S_NAMESPACE else {}
                if labels is not None:
                    pods.setdefault(_netns_key(namespace, cid, labels), []).append(
                        (namespace, cid, labels))
        if len(pods) > 1:
            raise MaceError(f"container '{name_or_id}' is ambiguous in containerd "
                            f"({len(pods)} match)")
        if not pods:
            return None
        members = next(iter(pods.values()))
        tasks = {namespace: self._tasks(namespace) for namespace, _, _ in members}
        # one pod: its running sandbox (whose netns the pod's containers join), else a
        # running container of it; the same choice each time it is asked (_pinned asks twice)
        found = {cid: self._container(cid, labels, tasks[ns].get(cid))
                 for ns, cid, labels in members}
        sandbox = {cid for _, cid, labels in members if labels.get(KIND_LABEL) == "sandbox"}
        return found[min(found, key=lambda cid: (not found[cid].running, cid not in sandbox,
                                                  cid))]

    def running(self) -> list[Container]:
        out = []
        for namespace in CONTAINERD_NAMESPACES:
            for cid, task in self._tasks(namespace).items():
                if task[1] not in _LIVE_TASK:
                    continue
                labels = self._labels(namespace, cid) if namespace == K8S_NAMESPACE else {}
                if labels is not None:
                    out.append(self._container(cid, labels, task))
        return out

    def _container(self, cid: str, labels: dict[str, str],
                   task: tuple[int, str] | None) -> Container:
        pid, status = task or (0, "")
        return Container(self.name, cid[:12], _kubernetes_name(labels) or cid, pid,
                         status in _LIVE_TASK and pid > 0)


def _label_filter(labels: dict[str, str]) -> str:
    """A ctr filter matching all these labels (values are _NAME_CHARS: nothing to escape)."""
    return ",".join(f'labels."{k}"=="{v}"' for k, v in labels.items())


def _netns_key(namespace: str, cid: str, labels: dict[str, str]) -> tuple[str, str]:
    """What a container's netns is: its Kubernetes pod's (by the pod's UID), else its own."""
    uid = labels.get(POD_UID_LABEL) if namespace == K8S_NAMESPACE else None
    return ("pod", uid) if uid else (namespace, cid)


def _kubernetes_name(labels: dict[str, str]) -> str | None:
    """The name find() takes for it: POD for a pod's sandbox, POD/NAME for a container."""
    pod, name = labels.get(POD_LABEL), labels.get(NAME_LABEL)
    if pod and labels.get(KIND_LABEL) == "sandbox":
        return pod
    return f"{pod}/{name}" if pod and name else None


def _containerd() -> _CtrRuntime | None:
    """containerd, when its socket is there and ctr is installed."""
    address, ctr = _containerd_address(), shutil.which("ctr")
    return _CtrRuntime(ctr, address) if ctr and Path(address).is_socket() else None


def _containerd_missing() -> str:
    address = _containerd_address()
    if not Path(address).is_socket():
        return f"no containerd socket found at {address} (is the daemon running?)"
    return "ctr not found (containerd's client, needed for --runtime containerd)"


RUNTIMES = ("docker", "podman", "containerd", "crio")  # also the order auto asks them in
Runtime = _ApiRuntime | _CtrRuntime | _CrictlRuntime


def available_runtimes(runtime: str) -> list[Runtime]:
    """The runtimes to ask, for --runtime docker|podman|containerd|crio|auto."""
    if runtime not in ("auto", *RUNTIMES):
        raise MaceError(f"unknown runtime '{runtime}' (docker, podman, containerd, crio or "
                        "auto)")
    names = RUNTIMES if runtime == "auto" else (runtime,)
    found: list[Runtime] = []
    for name in names:
        if name == "crio":
            if crictl := shutil.which("crictl"):
                found.append(_CrictlRuntime(crictl))
        elif name == "containerd":
            if ctr_runtime := _containerd():
                found.append(ctr_runtime)
        elif path := _socket_for(name):
            found.append(_ApiRuntime(name, path))
    if not found:
        if runtime == "crio":
            raise MaceError("crictl not found (needed for CRI runtimes: containerd, CRI-O)")
        if runtime == "containerd":
            raise MaceError(_containerd_missing())
        wanted = "docker, podman, containerd or crictl" if runtime == "auto" else \
            f"{runtime} API socket"
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


def _pinned(source: Runtime, found: Container,
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
    """Every running container, once: a container two runtimes show (crictl and ctr both
    reach a Kubernetes node's containerd) has one init, and is listed as the first shows it."""
    seen: dict[int, Container] = {}
    for source in available_runtimes(runtime):
        for c in source.running():
            seen.setdefault(c.pid, c)
    return list(seen.values())
