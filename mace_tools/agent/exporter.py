"""`--metrics [ADDR:]PORT`: the agent's metrics over HTTP, for Prometheus to scrape.

A small threaded HTTP server (the standard library's) on its own threads: GET /metrics
renders the registry (agent/metrics.py); a client that stalls holds only its own thread,
for at most REQUEST_TIMEOUT_S.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mace_tools.agent.metrics import CONTENT_TYPE, Registry
from mace_tools.errors import MaceError

REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16  # scrapers are few: more at once are closed, not given threads
INDEX = (b"<html><head><title>mace-agent</title></head><body><h1>mace-agent</h1>"
         b'<p><a href="/metrics">Metrics</a></p></body></html>\n')


def parse_listen(text: str) -> tuple[str, int]:
    """[ADDR:]PORT -> (address, port): an IPv6 address in brackets; no address: every
    IPv4 address (0.0.0.0), as exporters do."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "0.0.0.0", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise MaceError(f"--metrics {text!r}: put an IPv6 address in brackets: [ADDR]:PORT")
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise MaceError(f"--metrics {text!r}: bad port {port_text!r}")
    if host in ("", "*"):
        host = "0.0.0.0"
    elif host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise MaceError(f"--metrics {text!r}: bad address {host!r}") from None
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: Registry
    log: Callable[[str], None]
    slots: threading.BoundedSemaphore  # connections served at once

    def server_bind(self) -> None:
        # HTTPServer's would look the address up in DNS (getfqdn): a start that waits
        # on a resolver, for a name nothing here uses
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # busy: this one is turned away
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a scraper that went away mid-answer: one line, never a traceback
        self.log(f"metrics: {client_address[0]}: {sys.exc_info()[1]!s}")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "mace-agent"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE, self.server.registry.render())
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", INDEX)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a line per scrape is noise in the agent's log


class MetricsServer:
    """Serves registry on (host, port) from a thread of its own; close() stops it."""

    def __init__(self, host: str, port: int, registry: Registry,
                 log: Callable[[str], None] = lambda line: None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise MaceError(f"cannot serve metrics on {where}: "
                            f"{exc.strerror or exc}") from None
        self._server.registry = registry
        self._server.log = log
        self._server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5}, daemon=True,
                                        name="mace-metrics")
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
