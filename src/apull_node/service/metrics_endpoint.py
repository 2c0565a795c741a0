"""GET /metrics over HTTP on a TCP address, in a thread of its own: a service's Prometheus
metrics (metrics.py) for a scraper. Anything else is 404 (other methods: 501).

Off unless the service's `metrics_address` names an address (settings.py). It binds the
address given, loopback or not: the metrics name no image, blob or registry, but choose
an address only your scraper reaches.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apull_node.service.metrics import CONTENT_TYPE, Registry

PATH = "/metrics"


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer
    server_version = "apull-metrics"

    def do_GET(self) -> None:
        if self.path.partition("?")[0] != PATH:
            self._answer(404, "text/plain; charset=utf-8", b"not found: metrics are at /metrics\n")
            return
        self._answer(200, CONTENT_TYPE, self.server.registry.render().encode())

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.debug("%s: %s", self.address_string(), format % args)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: Registry, log: logging.Logger) -> None:
        self.registry = registry
        self.log = log
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class MetricsEndpoint:
    """Serves one registry's metrics on (host, port) until `stop()`; logs requests at debug
    as `<service>.metrics` (the service's logger given)."""

    def __init__(
        self, address: tuple[str, int], registry: Registry, service_log: logging.Logger
    ) -> None:
        self.requested = address
        self.registry = registry
        self.log = service_log.getChild("metrics")
        self._server: _MetricsServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (OSError when the address cannot be had) and serve in a thread."""
        server = _MetricsServer(self.requested, self.registry, self.log)
        self._server = server
        # A short poll interval only makes stop() quicker; requests are served at once.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.2,), name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (port 0 asked for: the port the kernel chose)."""
        if self._server is None:
            return self.requested
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{PATH}"

    def stop(self) -> None:
        """Stop serving and close the socket; harmless when not started or stopped already."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def serve_metrics(
    address: tuple[str, int] | None, registry: Registry, service_log: logging.Logger
) -> MetricsEndpoint | None:
    """The started endpoint for a service's metrics_address, or None: off (no address), or
    the address cannot be bound (logged as an error: the service goes on without metrics)."""
    if address is None:
        return None
    endpoint = MetricsEndpoint(address, registry, service_log)
    try:
        endpoint.start()
    except OSError as err:
        service_log.error(
            "metrics not served: cannot listen on %s port %d (metrics_address): %s",
            address[0], address[1], err,
        )  # fmt: skip
        return None
    service_log.info("metrics served at %s", endpoint.url)
    return endpoint
