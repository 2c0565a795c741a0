"""Node-to-node chunk sharing on this host's file backend: one apulld serves the verified
chunks it holds (peer_address, peer_allow), another asks it first (peers) and the registry
(behind the counting proxy) sees one node's bytes; a peer that sends corrupted chunks is
refused, the chunk fetched from the registry, and nothing wrong is ever read; an address off
the allow-list is refused; a peer that lacks a chunk costs nothing but its 404."""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from serving_support import Apulld, Layer, Proxy, free_port

from apull_node.daemon.backend import NodePaths, probe_file

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]


def read_all(apulld: Apulld, layer: Layer, registry: str) -> bytes:
    with open(apulld.put(layer, registry), "rb") as stream:
        return stream.read()


def sharing(root: Path, port: int, allow: list[str]) -> Apulld:
    daemon = Apulld(root, {"peer_address": f"127.0.0.1:{port}", "peer_allow": allow})
    root.mkdir()
    daemon.start()
    return daemon


def asking(root: Path, peers: list[str], **settings: Any) -> Apulld:
    daemon = Apulld(root, {"peers": peers, **settings})
    root.mkdir()
    daemon.start()
    return daemon


def scrape(address: str) -> dict[str, float]:
    """The samples of apulld's GET /metrics (name with labels: value)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_a_second_node_reads_from_the_first_and_the_registry_serves_one(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    port = free_port()
    first = sharing(tmp_path / "first", port, ["127.0.0.1", "localhost"])
    metrics_address = f"127.0.0.1:{free_port()}"
    second = asking(
        tmp_path / "second", [f"http://127.0.0.1:{port}"], metrics_address=metrics_address
    )
    try:
        data = read_all(first, multi, proxy.address)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == multi.digest
        from_registry = proxy.bytes_of(multi.digest)
        assert from_registry == multi.size
        again = read_all(second, multi, proxy.address)
        assert again == data
        assert proxy.bytes_of(multi.digest) == from_registry  # not one byte more
        assert second.stats()["bytes_from_peers"] == multi.size
        assert first.stats().get("bytes_fetched", 0) == multi.size
        # The peer's bytes are counted as a peer's, not as a registry's.
        samples = scrape(metrics_address)
        assert samples["apull_peer_fetched_bytes_total"] == multi.size
        assert samples.get('apull_registry_fetched_bytes_total{kind="layer"}', 0) == 0
    finally:
        second.close()
        first.close()


def test_a_peer_off_the_allow_list_is_refused(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path
) -> None:
    busybox = images["busybox"]
    port = free_port()
    first = sharing(tmp_path / "first", port, ["192.0.2.1"])
    second = asking(tmp_path / "second", [f"http://127.0.0.1:{port}"])
    try:
        read_all(first, busybox, proxy.address)
        before = proxy.bytes_of(busybox.digest)
        assert read_all(second, busybox, proxy.address)
        assert proxy.bytes_of(busybox.digest) == before + busybox.size
        assert second.stats().get("bytes_from_peers", 0) == 0
        # The peer closed the connection unanswered: it rests, named in the log.
        assert f"peer 127.0.0.1:{port} failed" in second.log()
        assert "reads go to the next mirror or the origin" in second.log()
    finally:
        second.close()
        first.close()


class _Corrupting(BaseHTTPRequestHandler):
    """A peer that answers every range with the right length of wrong bytes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        wanted = self.headers.get("Range", "")
        if not wanted.startswith("bytes="):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, last = (int(n) for n in wanted[6:].split("-"))
        body = b"\xee" * (last - start + 1)
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.served += len(body)  # type: ignore[attr-defined]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{last}/*")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_peer_that_sends_corrupted_chunks_is_refused_and_nothing_wrong_is_read(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    bad = ThreadingHTTPServer(("127.0.0.1", 0), _Corrupting)
    bad.lock = threading.Lock()  # type: ignore[attr-defined]
    bad.served = 0  # type: ignore[attr-defined]
    threading.Thread(target=bad.serve_forever, args=(0.05,), daemon=True).start()
    second = asking(tmp_path / "second", [f"http://127.0.0.1:{bad.server_address[1]}"])
    try:
        data = read_all(second, multi, proxy.address)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == multi.digest
        assert bad.served > 0  # it was asked, and answered wrongly  # type: ignore[attr-defined]
        stats = second.stats()
        assert stats["verify_failures"] >= 1
        # What it sent was refused: every byte of the layer came from the registry, and the
        # peer was asked no more once it had sent bad data (it rests).
        assert proxy.bytes_of(multi.digest) == multi.size
        assert bad.served == stats["bytes_from_peers"] < multi.size  # type: ignore[attr-defined]
        assert f"peer 127.0.0.1:{bad.server_address[1]} failed (sent bad data)" in second.log()
    finally:
        second.close()
        bad.shutdown()
        bad.server_close()


def test_a_peer_that_lacks_the_chunks_sends_the_read_to_the_registry(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path
) -> None:
    multi = images["multi"]
    port = free_port()
    first = sharing(tmp_path / "first", port, ["127.0.0.1"])
    second = asking(tmp_path / "second", [f"http://127.0.0.1:{port}"])
    try:
        data = read_all(second, multi, proxy.address)  # the first holds nothing
        assert "sha256:" + hashlib.sha256(data).hexdigest() == multi.digest
        assert proxy.bytes_of(multi.digest) == multi.size
        # A 404 is "not here", not a failure: the peer was not rested.
        assert "reads go to the next mirror or the origin" not in second.log()
    finally:
        second.close()
        first.close()


class _Recording(BaseHTTPRequestHandler):
    """A peer that holds nothing (404) and notes what it was asked."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.asked.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_peer_is_asked_for_chunk_ranges_only(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path
) -> None:
    """A peer serves chunk ranges and nothing else: chunk tables and manifests are not asked
    of it (each would cost a 404 round trip)."""
    multi = images["multi"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.asked = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    second = asking(tmp_path / "second", [f"http://127.0.0.1:{server.server_port}"])
    try:
        data = read_all(second, multi, proxy.address)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == multi.digest
        asked = list(server.asked)  # type: ignore[attr-defined]
        assert asked, "the peer was never asked"
        assert all(wanted and wanted.startswith("bytes=") for _, wanted in asked), asked
        assert all(f"/blobs/{multi.digest}" in path for path, _ in asked), asked
    finally:
        second.close()
        server.shutdown()
        server.server_close()
