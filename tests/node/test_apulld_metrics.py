"""apulld's metrics after real reads: the file and fscache backends read a layer from a
registry on loopback (one 503, one corrupted answer), and GET /metrics on the real endpoint
shows the bytes fetched and served, the cache hits and misses, the verification failure,
the registry error and the fetch latencies, each moved by exactly what the reads did."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from apull_node.daemon import apulld_metrics
from apull_node.daemon.blob_registry import BlobConfig, BlobRegistry
from apull_node.daemon.cachefiles_protocol import OpenRequest, ReadRequest
from apull_node.daemon.file_backend import FileBackend, FileBackendConfig, node_id
from apull_node.daemon.fscache_backend import FscacheBackend, FscacheBackendConfig
from apull_node.daemon.registry_fetch import FetchSettings
from apull_node.image.chunks import ChunkTable
from apull_node.service.metrics_endpoint import MetricsEndpoint

CHUNK = 4096
DATA = random.Random(17).randbytes(8 * CHUNK + 300)  # 9 chunks, the last one short
TABLE = ChunkTable.from_chunks([DATA[i : i + CHUNK] for i in range(0, len(DATA), CHUNK)], CHUNK)
RAW_TABLE = TABLE.to_bytes()
REPO = "test/metrics"
LAYER = "sha256:" + hashlib.sha256(DATA).hexdigest()
TABLE_DIGEST = "sha256:" + hashlib.sha256(RAW_TABLE).hexdigest()
_RANGE = re.compile(r"bytes=(\d+)-(\d+)\Z")


@dataclass
class Answers:
    blobs: dict[str, bytes]
    fail: dict[str, int] = field(default_factory=dict)  # Range -> times to answer 503
    corrupt: dict[str, int] = field(default_factory=dict)  # Range -> times to flip a byte
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Registry

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        answers = self.server.answers
        digest = self.path.rpartition("/")[2]
        blob = answers.blobs.get(digest) if self.path.startswith(f"/v2/{REPO}/blobs/") else None
        if blob is None:
            return self._send(404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        wanted = self.headers.get("Range", "")
        with answers.lock:
            if answers.fail.get(wanted, 0):
                answers.fail[wanted] -= 1
                return self._send(503, {}, b"try later")
            flip = answers.corrupt.get(wanted, 0) > 0
            if flip:
                answers.corrupt[wanted] -= 1
        match = _RANGE.fullmatch(wanted)
        if match is None:
            return self._send(200, {}, blob)
        start, last = int(match.group(1)), int(match.group(2))
        body = bytearray(blob[start : last + 1])
        if flip:
            body[0] ^= 1
        self._send(206, {"Content-Range": f"bytes {start}-{last}/{len(blob)}"}, bytes(body))

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Registry(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        super().__init__(("127.0.0.1", 0), _Handler)


@pytest.fixture
def registry() -> Iterator[tuple[str, Answers]]:
    answers = Answers({LAYER: DATA, TABLE_DIGEST: RAW_TABLE})
    server = _Registry(answers)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


@pytest.fixture
def scrape() -> Iterator[Any]:
    """Reads the real endpoint over HTTP: {sample: value} of apulld's registry."""
    endpoint = MetricsEndpoint(("127.0.0.1", 0), apulld_metrics.REGISTRY, logging.getLogger("t"))
    endpoint.start()

    def read() -> dict[str, float]:
        with urllib.request.urlopen(endpoint.url, timeout=5) as reply:
            assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if not line.startswith("#"):
                sample, _, value = line.rpartition(" ")
                samples[sample] = float(value)
        return samples

    yield read
    endpoint.stop()


SUM = "apull_registry_fetch_duration_seconds_sum"


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Samples whose value changed, by how much (histogram buckets and sums left out)."""
    return {
        name: after[name] - before.get(name, 0.0)
        for name in after
        if after[name] != before.get(name, 0.0) and "_bucket{" not in name and name != SUM
    }


def blob_config(registry: str) -> BlobConfig:
    return BlobConfig(
        blob_id="b-metrics", registry=registry, repo=REPO, digest=LAYER, size=len(DATA),
        fsid="img", chunk_table=TABLE_DIGEST, chunk_table_size=len(RAW_TABLE), chunk_size=CHUNK,
    )  # fmt: skip


def fetch_settings() -> FetchSettings:
    return FetchSettings(retries=2, timeout=5.0, backoff=0.01)


def test_file_backend_reads_move_the_metrics_by_what_they_did(
    tmp_path: Path, registry, scrape
) -> None:
    address, answers = registry
    config = blob_config(address)
    # Chunks 3-4 are fetched in one request, answered 503 once; chunk 6 arrives damaged once.
    answers.fail[f"bytes={3 * CHUNK}-{5 * CHUNK - 1}"] = 1
    answers.corrupt[f"bytes={6 * CHUNK}-{7 * CHUNK - 1}"] = 1
    backend = FileBackend(
        FileBackendConfig(tmp_path / "cache", tmp_path / "fuse", fetch_settings(), 1 << 30),
        BlobRegistry(tmp_path / "blobs.json", {config.blob_id: config}),
    )
    before = scrape()
    try:
        node = node_id(config)
        first = backend.read(node, 1, 3 * CHUNK + 10, 2 * CHUNK - 20)  # misses: chunks 3, 4
        again = backend.read(node, 1, 3 * CHUNK + 10, 2 * CHUNK - 20)  # hits: chunks 3, 4
        bad = backend.read(node, 1, 6 * CHUNK, 100)  # miss: chunk 6, fetched twice
    finally:
        backend.cache.close()
        backend.tables.close()
    assert bytes(first) == bytes(again) == DATA[3 * CHUNK + 10 : 5 * CHUNK - 10]
    assert bytes(bad) == DATA[6 * CHUNK : 6 * CHUNK + 100]
    assert answers.fail and not any(answers.fail.values())  # the 503 was sent
    after = scrape()
    assert moved(before, after) == {
        'apull_registry_fetched_bytes_total{kind="layer"}': 2 * CHUNK + 2 * CHUNK,
        'apull_registry_fetched_bytes_total{kind="chunk_table"}': len(RAW_TABLE),
        'apull_registry_errors_total{status="503"}': 1,
        "apull_chunk_cache_misses_total": 3,
        "apull_chunk_cache_hits_total": 2,
        'apull_chunk_verify_failures_total{source="registry"}': 1,
        'apull_served_bytes_total{backend="file"}': 2 * (2 * CHUNK - 20) + 100,
        "apull_registry_fetch_duration_seconds_count": 3,  # chunks 3-4, chunk 6 twice
    }
    latency = 'apull_registry_fetch_duration_seconds_bucket{le="+Inf"}'
    assert after[latency] - before[latency] == 3
    assert 0 < after[SUM] - before[SUM] < 15


def test_fscache_backend_reads_count_as_misses_and_served_bytes(
    tmp_path: Path, registry, scrape
) -> None:
    address, _ = registry
    config = blob_config(address)
    backend = FscacheBackend(
        FscacheBackendConfig(tmp_path / "cachefiles", tmp_path / "state", fetch_settings()),
        BlobRegistry(tmp_path / "blobs.json", {config.blob_id: config}),
    )
    cache_file = os.open(tmp_path / "object", os.O_RDWR | os.O_CREAT, 0o600)
    before = scrape()
    try:
        assert backend.open(OpenRequest(1, 7, -1, 0, "erofs,img", b"b-metrics")) == len(DATA)
        backend.read(ReadRequest(2, 7, 8 * CHUNK, 300), cache_file)  # the short last chunk
        backend.read(ReadRequest(3, 7, 0, 100), cache_file)  # chunk 0, whole
    finally:
        backend.cache.close()
        backend.tables.close()
    written = os.pread(cache_file, len(DATA), 0)
    os.close(cache_file)
    assert written[:CHUNK] == DATA[:CHUNK] and written[8 * CHUNK :][:300] == DATA[8 * CHUNK :]
    after = scrape()
    assert moved(before, after) == {
        'apull_registry_fetched_bytes_total{kind="layer"}': 300 + CHUNK,
        'apull_registry_fetched_bytes_total{kind="chunk_table"}': len(RAW_TABLE),
        "apull_chunk_cache_misses_total": 2,  # the kernel's cache file is the cache
        'apull_served_bytes_total{backend="fscache"}': 300 + CHUNK,  # without the padding
        "apull_registry_fetch_duration_seconds_count": 2,
    }
    assert 0 < after[SUM] - before[SUM] < 15
