"""The one registry client's connections: kept alive and shared, replaced when the server
closed them, the scheme of an insecure registry found once per process; and no other code
in the product opens its own HTTP connections to a registry."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from apull.registry.client import RegistryClient
from apull_node.image.registry_connections import Connections
from apull_node.image.registry_session import RegistryError, RegistrySession

ROOT = Path(__file__).resolve().parents[2]


class _Counting(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; counts connections and requests. With `close_after`, the
    server drops the connection after each answer without saying so (an idle timeout)."""

    protocol_version = "HTTP/1.1"
    close_after = False
    status = 200

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.connections += 1  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.paths.append(self.path)  # type: ignore[attr-defined]
        body = b"{}"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.close_after:
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    servers: list[ThreadingHTTPServer] = []

    def start(close_after: bool = False, status: int = 200) -> ThreadingHTTPServer:
        handler = type("Handler", (_Counting,), {"close_after": close_after, "status": status})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.lock = threading.Lock()  # type: ignore[attr-defined]
        srv.connections = 0  # type: ignore[attr-defined]
        srv.paths = []  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _address(srv: ThreadingHTTPServer) -> str:
    return f"127.0.0.1:{srv.server_address[1]}"


def _get(session: RegistrySession, suffix: str) -> bytes:
    with session.request("GET", session.repo_url(suffix)) as resp:
        assert resp.status == 200
        return resp.read()


def test_requests_of_every_session_share_a_kept_connection(server) -> None:
    srv = server()
    connections = Connections(timeout=10)
    connections.schemes.learned(_address(srv), "http")
    one = RegistrySession(_address(srv), "a/b", insecure=True, connections=connections)
    two = RegistrySession(_address(srv), "c/d", insecure=True, connections=connections)
    for index in range(4):
        assert _get(one if index % 2 else two, f"blobs/sha256:{index}") == b"{}"
    assert len(srv.paths) == 4
    assert srv.connections == 1


def test_a_kept_connection_the_server_closed_is_replaced(server) -> None:
    srv = server(close_after=True)
    client = RegistryClient(_address(srv), timeout=10)
    session = client.session("a/b")
    for index in range(3):
        assert _get(session, f"blobs/sha256:{index}") == b"{}"
    assert srv.paths == [f"/v2/a/b/blobs/sha256:{index}" for index in range(3)]
    assert srv.connections == 3


def test_an_insecure_registrys_scheme_is_found_once_per_process(server) -> None:
    srv = server()
    connections = Connections(timeout=10)
    for repo in ("a/b", "c/d", "e/f"):
        session = RegistrySession(_address(srv), repo, insecure=True, connections=connections)
        assert session.base_url == f"http://{_address(srv)}"
        _get(session, "manifests/x")
    assert srv.paths.count("/v2/") == 1
    assert connections.schemes.get(_address(srv)) == "http"


def test_plain_http_that_does_not_answer_like_a_registry_is_not_learned(server) -> None:
    srv = server(status=400)  # e.g. an HTTPS-only server's answer to plain HTTP
    connections = Connections(timeout=10)
    session = RegistrySession(_address(srv), "a/b", insecure=True, connections=connections)
    with pytest.raises(RegistryError, match=r"answers GET /v2/ with HTTP 400, not like a reg"):
        session.repo_url("manifests/x")
    assert connections.schemes.get(_address(srv)) is None


def test_a_tls_timeout_is_not_taken_for_plain_http(tmp_path) -> None:
    """A server that accepts and then says nothing (a slow TLS handshake): the probe fails
    with the timeout, plain HTTP is not tried and nothing is learned."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    connections = Connections(timeout=0.5, connect_timeout=0.5)
    session = RegistrySession(address, "a/b", insecure=True, connections=connections)
    try:
        with pytest.raises(RegistryError, match=r"GET https://.*/v2/: .*timed out"):
            session.repo_url("manifests/x")
        assert connections.schemes.get(address) is None
        assert len(accepted) == 1  # HTTPS only: no plain-HTTP attempt
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_mirror_session_sends_its_path_prefix_and_namespace(server) -> None:
    from apull_node.image.registry_session import Mirror

    srv = server()
    mirror = Mirror(f"http://{_address(srv)}/cache/", "?ns=registry.example%3A5000")
    session = RegistrySession(_address(srv), "a/b", mirror=mirror)
    _get(session, "blobs/sha256:1")
    assert srv.paths == ["/cache/v2/a/b/blobs/sha256:1?ns=registry.example%3A5000"]


#: Where the product may open an HTTP connection without the registry client, and why.
OTHER_HTTP = {
    # the one registry client itself
    "src/apull_node/image/registry_connections.py",
    # apulld's API over its unix socket (not a registry)
    "src/apull_node/snapshotter/apulld_client.py",
    # the lab's Kubernetes API readiness (not a registry)
    "src/apull/lab/kube_control.py",
    # the bench's baseline: a bare GET run on the node, by design the simplest download
    "src/apull/bench/measure.py",
    # preflight's reachability check runs inside an Ansible module (standalone, no package)
    "collections/ansible_collections/apull/deploy/plugins/modules/node_facts.py",
}


def test_no_other_code_opens_registry_connections() -> None:
    opening = re.compile(r"\bHTTPS?Connection\b|\burlopen\(|\burllib\.request\.Request\(")
    found = set()
    for base in ("src", "collections"):
        for path in (ROOT / base).rglob("*.py"):
            if opening.search(path.read_text()):
                found.add(path.relative_to(ROOT).as_posix())
    assert found == OTHER_HTTP
