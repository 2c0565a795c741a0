"""PUT /v1.0/apulld/prefetch against a real registry (behind the counting proxy): apulld
fetches the image manifest, then each apull layer's chunk table and first chunk, and small
layers whole (their tables computed from them, not fetched), before anything is registered
or read; the reads that follow are served from the cache without another registry request."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import time
from pathlib import Path

import pytest
from serving_support import MULTI_REPO, Apulld, Corruption, Layer, Proxy

from apull.lab import test_image
from apull.registry.client import OCI_MANIFEST, RegistryClient
from apull_node.daemon.backend import NodePaths, probe_file

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]
PREFETCH = "/v1.0/apulld/prefetch"
#: Layers up to this size are warmed whole: busybox's (about 1 MiB), not the 4.7 MiB one.
WHOLE_MB = 3


def manifest_of(registry: RegistryClient, repo: str) -> str:
    digest = registry.manifest_digest(repo, "apull")
    assert digest is not None
    return digest


def wait_warmed(apulld: Apulld, proxy: Proxy, repo: str, manifest: str) -> None:
    line = f"warmed {proxy.address}/{repo}@{manifest}"
    deadline = time.monotonic() + 20
    while line not in apulld.log():
        assert time.monotonic() < deadline, f"no {line!r} in the log:\n{apulld.log()}"
        time.sleep(0.05)


def warm(apulld: Apulld, proxy: Proxy, registry: RegistryClient, repo: str) -> None:
    manifest = manifest_of(registry, repo)
    body = {"registry": proxy.address, "repo": repo, "manifest": manifest}
    assert apulld.request("PUT", PREFETCH, body) == (202, {"started": True})
    # Asked again at once (the next layer's Prepare): nothing started twice.
    assert apulld.request("PUT", PREFETCH, body) == (202, {"started": False})
    wait_warmed(apulld, proxy, repo, manifest)


def read_file(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def test_small_layers_are_fetched_whole_and_large_ones_their_first_chunk(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    busybox, multi = images["busybox"], images["multi"]
    assert busybox.size <= WHOLE_MB << 20 < multi.size
    apulld = Apulld(tmp_path, {"prefetch_layer_max_mb": WHOLE_MB})
    try:
        apulld.start()
        warm(apulld, proxy, registry, test_image.REPO)
        warm(apulld, proxy, registry, MULTI_REPO)
        assert proxy.bytes_of(busybox.digest) == busybox.size
        assert proxy.bytes_of(multi.digest) == multi.chunk_size
        stats = apulld.stats()
        assert stats["warmed_images"] == 2
        assert stats["warmed_bytes"] == busybox.size + multi.chunk_size
        # The small layer's table was computed from it: one request for that layer.
        assert stats["table_bytes_fetched"] == multi.chunk_table_size
        assert proxy.bytes_of(busybox.chunk_table) == 0
        assert [r for r in proxy.state.requests if r[0] == busybox.digest] == [
            (busybox.digest, f"bytes=0-{busybox.size - 1}", 206)
        ]
        requests = len(proxy.state.requests)

        # Registered and read afterwards: no registry request, the same bytes.
        data = read_file(apulld.put(busybox, proxy.address))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == busybox.digest
        with open(apulld.put(multi, proxy.address), "rb") as stream:
            first = stream.read(multi.chunk_size)
        assert len(first) == multi.chunk_size
        assert len(proxy.state.requests) == requests
        assert apulld.stats()["bytes_fetched"] == busybox.size + multi.chunk_size
    finally:
        apulld.close()


def test_a_small_layer_that_does_not_match_its_table_is_warmed_the_usual_way(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    busybox = images["busybox"]
    bad = busybox.size // 2
    proxy.state.corrupt[busybox.digest] = Corruption(bad, times=1)
    chunk_start = bad - bad % busybox.chunk_size
    chunk_len = min(busybox.chunk_size, busybox.size - chunk_start)
    apulld = Apulld(tmp_path, {"prefetch_layer_max_mb": WHOLE_MB})
    try:
        apulld.start()
        warm(apulld, proxy, registry, test_image.REPO)
        assert "does not match its chunk table" in apulld.log()
        # The spoiled answer, then the table, and the bad chunk again (found by the table).
        assert proxy.bytes_of(busybox.digest) == busybox.size + chunk_len
        assert proxy.bytes_of(busybox.chunk_table) == busybox.chunk_table_size
        assert apulld.stats()["verify_failures"] == 1
        requests = len(proxy.state.requests)
        data = read_file(apulld.put(busybox, proxy.address))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == busybox.digest
        assert len(proxy.state.requests) == requests
    finally:
        apulld.close()


def test_a_read_while_a_layer_is_fetched_whole_waits_for_it(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    """The mount's first read comes while the warm-up's request is under way: it neither
    fetches the chunk nor the chunk table itself."""
    busybox = images["busybox"]
    proxy.state.delay = 0.5
    apulld = Apulld(tmp_path, {"prefetch_layer_max_mb": WHOLE_MB})
    try:
        apulld.start()
        body = {"registry": proxy.address, "repo": test_image.REPO,
                "manifest": manifest_of(registry, test_image.REPO)}  # fmt: skip
        assert apulld.request("PUT", PREFETCH, body) == (202, {"started": True})
        assert proxy.state.waiting.wait(10)
        data = read_file(apulld.put(busybox, proxy.address))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == busybox.digest
        assert [r[0] for r in proxy.state.requests] == [busybox.digest]
        assert proxy.bytes_of(busybox.chunk_table) == 0
    finally:
        apulld.close()


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_small_layer_read_before_any_warm_up_is_fetched_whole(
    images: dict[str, Layer], proxy: Proxy, tmp_path: Path, prefetch: bool
) -> None:
    """Its first read (a mount's superblock) fetches it whole, no chunk table fetched; with
    prefetch off, only the chunks read, checked against the fetched table."""
    busybox = images["busybox"]
    apulld = Apulld(tmp_path, {"prefetch_layer_max_mb": WHOLE_MB, "prefetch_enable": prefetch})
    try:
        apulld.start()
        path = apulld.put(busybox, proxy.address)
        with open(path, "rb") as stream:
            assert len(stream.read(4096)) == 4096
        if not prefetch:
            assert proxy.bytes_of(busybox.digest) < busybox.size
            assert proxy.bytes_of(busybox.chunk_table) == busybox.chunk_table_size
            return
        assert proxy.state.requests == [(busybox.digest, f"bytes=0-{busybox.size - 1}", 206)]
        assert apulld.stats().get("table_bytes_fetched", 0) == 0
        data = read_file(path)  # the rest: from the cache
        assert "sha256:" + hashlib.sha256(data).hexdigest() == busybox.digest
        assert len(proxy.state.requests) == 1
    finally:
        apulld.close()


def test_a_manifest_given_with_the_request_is_used_when_it_is_the_manifest(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, apulld: Apulld
) -> None:
    apulld.start()
    digest = manifest_of(registry, MULTI_REPO)
    conn = http.client.HTTPConnection(registry.address, timeout=10)
    conn.request("GET", f"/v2/{MULTI_REPO}/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
    raw = conn.getresponse().read()
    conn.close()
    body = {"registry": proxy.address, "repo": MULTI_REPO, "manifest": digest,
            "manifest_data": base64.b64encode(raw).decode()}  # fmt: skip
    assert apulld.request("PUT", PREFETCH, body) == (202, {"started": True})
    wait_warmed(apulld, proxy, MULTI_REPO, digest)
    assert apulld.stats().get("manifest_bytes_fetched", 0) == 0
    # Bytes that are not the manifest: said, and the manifest fetched.
    digest = manifest_of(registry, test_image.REPO)
    body = {**body, "repo": test_image.REPO, "manifest": digest}
    assert apulld.request("PUT", PREFETCH, body) == (202, {"started": True})
    wait_warmed(apulld, proxy, test_image.REPO, digest)
    assert "as given: " in apulld.log()
    assert apulld.stats()["manifest_bytes_fetched"] > 0
    assert proxy.bytes_of(images["multi"].digest) == images["multi"].chunk_size


def test_bad_requests_are_refused_and_unknown_manifests_only_logged(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, apulld: Apulld
) -> None:
    apulld.start()
    manifest = manifest_of(registry, MULTI_REPO)
    good = {"registry": proxy.address, "repo": MULTI_REPO, "manifest": manifest}
    for body, field in (
        ({k: v for k, v in good.items() if k != "manifest"}, "manifest: required"),
        ({**good, "registry": "http://x"}, "registry: 'http://x' is not host[:port]"),
        ({**good, "manifest": "sha256:12"}, "manifest: 'sha256:12' is not sha256:"),
        ({**good, "tag": "latest"}, "tag: unknown field"),
        ({**good, "manifest_data": "not base64!"}, "manifest_data: not base64"),
        ({**good, "manifest_data": 12}, "manifest_data: base64 of at most"),
    ):
        status, answer = apulld.request("PUT", PREFETCH, body)
        assert status == 400 and answer["error"].startswith(field), answer
    missing = "sha256:" + "0" * 64
    assert apulld.request("PUT", PREFETCH, {**good, "manifest": missing})[1] == {"started": True}
    deadline = time.monotonic() + 10
    while f"not warming {proxy.address}/{MULTI_REPO}@{missing}" not in apulld.log():
        assert time.monotonic() < deadline, apulld.log()
        time.sleep(0.05)
    assert "not found" in apulld.log()
    assert apulld.stats().get("warmed_images", 0) == 0
    assert proxy.bytes_of(images["multi"].digest) == 0


def test_prefetch_off_fetches_nothing(
    images: dict[str, Layer], registry: RegistryClient, proxy: Proxy, tmp_path: Path
) -> None:
    apulld = Apulld(tmp_path, {"prefetch_enable": False})
    try:
        apulld.start()
        body = {"registry": proxy.address, "repo": MULTI_REPO,
                "manifest": manifest_of(registry, MULTI_REPO)}  # fmt: skip
        assert apulld.request("PUT", PREFETCH, body) == (202, {"started": False})
        time.sleep(0.3)
        assert proxy.state.requests == []
    finally:
        apulld.close()
