"""The snapshotter's apulld client against an apulld older than itself.

A node half-way through an upgrade can run a new snapshotter next to an apulld that knows no
`manifest_data` in PUT prefetch. The stand-in below answers PUT prefetch as apulld did
before that field existed (its 400 and message, from the same field check); everything else
about the client is tested against the real apulld elsewhere."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from apull_node.snapshotter.apulld_client import PREFETCH_PATH, ApulldClient, ApulldRefusedError

OLD_FIELDS = ("manifest", "registry", "repo")


class _OldApulld(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def do_PUT(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        status, answer = 202, {"started": True}
        for name in body:
            if name not in OLD_FIELDS:
                status = 400
                answer = {"error": f"{name}: unknown field (known: {', '.join(OLD_FIELDS)})"}
        if self.path != PREFETCH_PATH or body.get("registry") == "refused.example":
            status, answer = 400, {"error": "registry: not allowed"}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, _OldApulld)
        self.bodies: list[dict[str, Any]] = []


@pytest.fixture
def old_apulld(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(str(tmp_path / "apulld.sock"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_prefetch_asks_an_older_apulld_again_without_the_manifest(old_apulld, caplog) -> None:
    client = ApulldClient(old_apulld.server_address)
    caplog.set_level("INFO", logger="apull-snapshotter.apulld-client")
    started = client.prefetch("registry.example", "team/app", "sha256:" + "a" * 64, b"{}")
    assert started is True
    assert [sorted(b) for b in old_apulld.bodies] == [
        ["manifest", "manifest_data", "registry", "repo"],
        ["manifest", "registry", "repo"],
    ]
    assert "asking again without the manifest's bytes" in caplog.text


def test_prefetch_without_manifest_bytes_is_one_request(old_apulld) -> None:
    client = ApulldClient(old_apulld.server_address)
    assert client.prefetch("registry.example", "team/app", "sha256:" + "a" * 64) is True
    assert len(old_apulld.bodies) == 1


def test_other_refusals_are_not_retried(old_apulld) -> None:
    client = ApulldClient(old_apulld.server_address)
    with pytest.raises(ApulldRefusedError, match="registry: not allowed") as caught:
        client.prefetch("refused.example", "team/app", "sha256:" + "a" * 64, b"{}")
    assert caught.value.status == 400
    assert len(old_apulld.bodies) == 1
