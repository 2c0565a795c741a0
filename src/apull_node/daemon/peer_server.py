"""Serving the verified chunks this node holds to its peers (``[apulld] peer_address``).

Another node's apulld asks for a byte range of a blob as it asks a registry mirror:
``GET /v2/<repository>/blobs/<digest>`` with ``Range: bytes=A-B``. The answer is 206 with
those bytes when every chunk of the range is in this node's chunk cache and was checked
against its chunk table by this process; else 404, which the asking node takes as "not
here" (it goes on to the next peer, a mirror or the origin) and not as a failure. The asking
node checks every chunk against its own table as it does a registry's, so a peer cannot
inject data; one that sends bad data rests like a mirror.

- Read-only: GET and HEAD, that path alone; nothing is fetched for a peer, nothing listed.
- Only peers on the allow-list (``peer_allow``: addresses, resolved at start) are answered:
  a connection from any other address is closed before a thread is started for it (the
  refusal is counted, nothing is read). The allow-list is the only authentication: any
  process at an allowed address (a host-network pod there, say) can read any blob this
  node holds by its digest.
- At most MAX_ACTIVE connections are served at once, each request of at most MAX_RANGE
  bytes, an idle connection closed after 10 s.
- The repository and ``?ns=`` are not looked at: a blob is its digest.
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from apull_node.daemon import apulld_metrics as metrics

log = logging.getLogger("apulld.peers")
_BLOB_PATH = re.compile(r"/v2/(?:[a-z0-9._/-]+)/blobs/(sha256:[0-9a-f]{64})")
_RANGE = re.compile(r"bytes=(\d{1,15})-(\d{1,15})")
#: Largest range one request may ask (apulld's own runs are at most a few MiB).
MAX_RANGE = 16 << 20
#: Connections served at once; more wait for a free slot (queued by the kernel).
MAX_ACTIVE = 16


class HeldChunks(Protocol):
    def held_range(self, digest: str, offset: int, end: int) -> bytes | None:
        """Bytes [offset, end) of the blob when every chunk of it is held and checked."""


def resolve_allowed(names: Iterable[str]) -> frozenset[str]:
    """The addresses of the allow-list's names (IP addresses stay as they are); a name
    that does not resolve is logged and left out."""
    found: set[str] = set()
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except OSError as err:
            log.warning("peer %s left out of the allow-list: %s", name, err)
            continue
        found.update(str(info[4][0]) for info in infos)
    return frozenset(found)


class PeerServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], allowed: frozenset[str], held: HeldChunks) -> None:
        self.allowed = allowed
        self.held = held
        self.slots = threading.BoundedSemaphore(MAX_ACTIVE)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _PeerHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for this host's name (getfqdn); not needed here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Off the allow-list: closed at once, before any thread or read."""
        peer = str(client_address[0])
        if peer.startswith("::ffff:"):
            peer = peer[7:]
        if peer in self.allowed:
            return True
        metrics.PEER_REQUESTS.labels("refused").inc()
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()
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

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(0.2,), name="peers")
        thread.daemon = True
        thread.start()
        log.info("serving verified chunks to %d peer address(es) on %s:%d",
                 len(self.allowed), *self.server_address[:2])  # fmt: skip
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _PeerHandler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    timeout = 10

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        match = _BLOB_PATH.fullmatch(self.path.split("?", 1)[0])
        wanted = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match is None or wanted is None or head:
            metrics.PEER_REQUESTS.labels("missing").inc()
            self._send(HTTPStatus.NOT_FOUND, b"", head)
            return
        start, last = int(wanted.group(1)), int(wanted.group(2))
        data = None
        if start <= last and last - start < MAX_RANGE:
            data = self.server.held.held_range(match.group(1), start, last + 1)
        if data is None:
            metrics.PEER_REQUESTS.labels("missing").inc()
            self._send(HTTPStatus.NOT_FOUND, b"", head)
            return
        metrics.PEER_REQUESTS.labels("served").inc()
        metrics.PEER_SERVED_BYTES.inc(len(data))
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Range", f"bytes {start}-{last}/*")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(data)

    def _send(self, status: HTTPStatus, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)
