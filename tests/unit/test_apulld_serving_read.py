"""apulld --backend file end to end: converted images in our registry (behind a counting
proxy), blob configs PUT over the API, EROFS mounted from the FUSE files, every file
compared with the source tar; small reads fetch only their chunks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_support import CHUNK, check_tree

from apull_node.daemon.backend import NodePaths, probe_file

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]


def test_layers_read_back_file_for_file(images, proxy, apulld, mounts) -> None:
    apulld.start()
    for name, layer in images.items():
        path = apulld.put(layer, proxy.address)
        assert path == str(apulld.mountpoint / layer.blob_id)
        assert os.stat(path).st_size == layer.size
        check_tree(mounts.erofs(path, name), layer)
        # Everything read: each byte came from the registry once, and only once.
        assert 0 < proxy.bytes_of(layer.digest) <= layer.size
    assert sorted(os.listdir(apulld.mountpoint)) == sorted(x.blob_id for x in images.values())
    busybox = apulld.root / "mnt" / "busybox" / "bin" / "busybox"
    out = subprocess.run([str(busybox), "echo", "hi"], capture_output=True, timeout=10)
    assert out.stdout == b"hi\n"
    # (a window fetched ahead may still be on its way: apulld counts it once it has it)
    deadline = time.monotonic() + 10
    while True:
        stats = apulld.stats()
        fetched = sum(proxy.bytes_of(x.digest) for x in images.values())
        if stats["bytes_fetched"] == fetched or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["bytes_fetched"] == fetched
    assert stats.get("verify_failures", 0) == 0 and stats.get("read_errors", 0) == 0
    serving = apulld.ping()["serving"]
    assert serving["files"] == 2 and serving["fuse_connected"] and serving["fd_stored"]
    assert serving["cache_bytes"] == fetched


def test_small_file_read_fetches_only_its_chunks(images, proxy, apulld, mounts) -> None:
    layer = images["multi"]
    apulld.start()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    assert (root / "etc/hostname").read_bytes() == b"apull\n"
    small = proxy.bytes_of(layer.digest)
    print(f"\nsmall file: {small} of {layer.size} blob bytes fetched")
    # Superblock, inodes and directories plus kernel read-ahead: a handful of chunks.
    assert 0 < small <= 6 * CHUNK and small * 8 < layer.size
    assert (root / "data/medium").read_bytes() == layer.files["data/medium"]
    medium = proxy.bytes_of(layer.digest) - small
    assert len(layer.files["data/medium"]) <= medium <= len(layer.files["data/medium"]) + 4 * CHUNK
    assert (root / "data/big").read_bytes() == layer.files["data/big"]
    assert proxy.bytes_of(layer.digest) <= layer.size
    # A window fetched ahead of the reader may still be on its way to the cache (the proxy
    # counts what it sent): apulld counts it once it has it.
    deadline = time.monotonic() + 10
    while apulld.stats()["chunks_fetched"] * CHUNK < proxy.bytes_of(layer.digest):
        assert time.monotonic() < deadline, (apulld.stats(), proxy.bytes_of(layer.digest))
        time.sleep(0.05)


def test_blob_config_rules_for_served_blobs(images, proxy, apulld, mounts) -> None:
    layer = images["busybox"]
    apulld.start()
    no_table = {k: v for k, v in layer.config(proxy.address).items() if not k.startswith("chunk")}
    status, body = apulld.request("PUT", "/v1.0/apulld/blob_config", no_table)
    assert status == 400 and body["error"].startswith("chunk_table: required by the file backend")
    path = apulld.put(layer, proxy.address)
    target = mounts.erofs(path, "bb")
    delete = f"/v1.0/apulld/blob_config?blob_id={layer.blob_id}"
    status, body = apulld.request("DELETE", delete)
    assert status == 409 and f"mounted at {target}" in body["error"], body
    other = {**layer.config(proxy.address), "digest": "sha256:" + "0" * 64}
    status, body = apulld.request("PUT", "/v1.0/apulld/blob_config", other)
    assert status == 409 and "cannot be replaced" in body["error"]
    assert (target / "etc/motd").read_bytes() == layer.files["etc/motd"]
    mounts.umount(target)
    # The kernel releases the blob file (FUSE RELEASE) after umount(2) has returned: until
    # it does, the blob is still open, never mounted, and the delete is refused for that.
    deadline = time.monotonic() + 10
    status, body = apulld.request("DELETE", delete)
    while status == 409 and time.monotonic() < deadline:
        assert "open 1 time(s)" in body["error"], body
        time.sleep(0.05)
        status, body = apulld.request("DELETE", delete)
    assert status == 204, body
    assert not os.path.exists(path) and os.listdir(apulld.mountpoint) == []
    assert apulld.put(layer, proxy.address) == path and os.path.exists(path)


def test_a_bad_mirror_setting_stops_startup(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 1\n[apulld]\nregistry_mirrors = ["ftp://mirror"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "apull_node.daemon", "--config", str(config), "--backend", "file",
         "--address", str(tmp_path / "a.sock"), "--cache-dir", str(tmp_path / "cachefiles")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot start the file backend: mirror 'ftp://mirror': expected" in result.stderr
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
