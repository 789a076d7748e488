"""A real Prometheus server (Debian's `prometheus`) for the tests and the bench: started on
loopback in a netns of the lab (or ours), with private storage, scraping the agent, and
asked through its HTTP API. Stopped and its files removed afterwards.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from mace_tools.lab.topology import LabError
from mace_tools.probe import netns

BINARY = "prometheus"
START_TIMEOUT_S = 30.0


def _netns_path(name: str | None) -> Path | None:
    return None if name is None else netns.NETNS_RUN_DIR / name


def http_get(port: int, path: str, netns_name: str | None = None,
             timeout: float = 5.0) -> tuple[int, bytes, float]:
    """GET http://127.0.0.1:port/path from inside netns_name (None: ours): the status,
    the body and the seconds from sending the request to the last byte."""
    with netns.entered(_netns_path(netns_name)):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.sock = sock
    try:
        began = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, time.perf_counter() - began
    finally:
        conn.close()


def free_port(netns_name: str | None = None) -> int:
    """A TCP port free on 127.0.0.1 in that netns now."""
    with netns.entered(_netns_path(netns_name)):
        s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class PrometheusServer:
    """Prometheus scraping targets (host:port) every scrape_s; a context manager."""

    def __init__(self, targets: list[str], netns_name: str | None = None,
                 scrape_s: float = 1.0) -> None:
        if shutil.which(BINARY) is None:
            raise LabError("prometheus not installed (make test installs Debian's)")
        self.netns_name = netns_name
        self.dir = Path(tempfile.mkdtemp(prefix="mace-prometheus-"))
        self.port = free_port(netns_name)
        interval = f"{int(scrape_s * 1000)}ms"
        config = {"global": {"scrape_interval": interval, "scrape_timeout": interval},
                  "scrape_configs": [{"job_name": "mace-agent",
                                      "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        prefix = [] if netns_name is None else ["ip", "netns", "exec", netns_name]
        self._log = open(self.dir / "log", "w+b")  # noqa: SIM115 (closed in stop())
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [*prefix, BINARY, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> PrometheusServer:
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise LabError(f"prometheus exited: {self.log_text()[-500:]}")
            try:
                status, _, _ = http_get(self.port, "/-/ready", self.netns_name)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise LabError("prometheus did not get ready in time")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a LabError if Prometheus refuses it)."""
        status, body, _ = http_get(
            self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
            self.netns_name)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise LabError(f"prometheus refused {expr!r}: {answer.get('error')}")
        return answer["data"]["result"]

    def values(self, expr: str, label: str) -> dict[str, float]:
        """An instant query's samples as {the value of label: the sample's value}."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def log_text(self) -> str:
        self._log.flush()
        return (self.dir / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
