"""apulld's file backend when things go wrong: corrupt ranges are fetched again (or the read
fails with EIO, never wrong bytes), a registry that is down gives a clear error and comes
back, mirrors go first and fall back to the origin, token auth from the auth file."""

from __future__ import annotations

import base64
import errno
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import Apulld, Corruption, Proxy

from apull_node.daemon.backend import NodePaths, probe_file
from apull_node.daemon.chunk_cache import FAILURE_MEMORY_SECONDS

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]


@pytest.fixture(scope="module")
def big_offset(registry, images) -> int:
    """Where the middle of data/big lies in the multi layer's blob."""
    layer = images["multi"]
    url = f"http://{registry.address}/v2/{layer.repo}/blobs/{layer.digest}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        blob = resp.read()
    middle = layer.files["data/big"][2 << 20 : (2 << 20) + 64]
    offset = blob.find(middle)
    assert offset > 0
    return offset


@pytest.fixture
def make_apulld(tmp_path: Path) -> Iterator:
    started: list[Apulld] = []

    def make(**settings) -> Apulld:
        daemon = Apulld(tmp_path, settings)
        started.append(daemon)
        daemon.start()
        return daemon

    yield make
    for daemon in started:
        daemon.close()


def test_a_range_corrupted_once_is_fetched_again(images, big_offset, proxy, make_apulld,
                                                 mounts) -> None:  # fmt: skip
    layer = images["multi"]
    proxy.state.corrupt[layer.digest] = Corruption(big_offset, times=1)
    apulld = make_apulld()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    assert (root / "data/big").read_bytes() == layer.files["data/big"]
    assert proxy.state.corrupt[layer.digest].times == 0  # it did happen
    stats = apulld.stats()
    assert stats["verify_failures"] == 1 and stats.get("read_errors", 0) == 0
    assert "does not match its digest; fetching it again (2 of 3)" in apulld.log()


def test_a_range_that_stays_corrupt_is_an_io_error(images, big_offset, proxy, make_apulld,
                                                   mounts) -> None:  # fmt: skip
    layer = images["multi"]
    proxy.state.corrupt[layer.digest] = Corruption(big_offset, times=-1)
    apulld = make_apulld()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    assert (root / "etc/hostname").read_bytes() == b"apull\n"
    with pytest.raises(OSError) as caught:
        (root / "data/big").read_bytes()
    assert caught.value.errno == errno.EIO
    # Everything before the bad chunk reads fine; nothing wrong was ever handed out.
    with open(root / "data/big", "rb") as stream:
        assert stream.read(1 << 20) == layer.files["data/big"][: 1 << 20]
    stats = apulld.stats()
    assert stats["verify_giveups"] >= 1 and stats["read_errors"] >= 1
    assert f"of {layer.digest} did not match its digest in 3 fetches" in apulld.log()
    # Once the registry sends good data again (and the failure is forgotten), it works.
    proxy.state.corrupt.clear()
    time.sleep(FAILURE_MEMORY_SECONDS)
    assert (root / "data/big").read_bytes() == layer.files["data/big"]


def test_registry_down_is_a_clear_error_and_apulld_stays_up(images, proxy, make_apulld,
                                                            mounts) -> None:  # fmt: skip
    layer = images["multi"]
    apulld = make_apulld()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    proxy.down()
    with pytest.raises(OSError) as caught:
        (root / "data/medium").read_bytes()
    assert caught.value.errno == errno.EIO
    log = apulld.log()
    assert f"{proxy.address}/{layer.repo}@{layer.digest} bytes " in log
    assert "failed 3 times; last: " in log and "Connection refused" in log
    assert apulld.ping()["status"] == "ok"
    assert apulld.stats()["fetch_errors"] >= 1
    proxy.up()
    time.sleep(FAILURE_MEMORY_SECONDS)
    assert (root / "data/medium").read_bytes() == layer.files["data/medium"]


def test_mirror_first_then_the_origin(images, registry, proxy, make_apulld, mounts) -> None:
    layer = images["multi"]
    mirror = Proxy(registry.address)
    try:
        apulld = make_apulld(registry_mirrors=[f"http://{mirror.address}"])
        root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
        assert (root / "data/medium").read_bytes() == layer.files["data/medium"]
        assert mirror.bytes_of(layer.digest) > 0 and proxy.bytes_of(layer.digest) == 0
        assert mirror.bytes_of(layer.chunk_table) == layer.chunk_table_size
        mirror.down()
        assert (root / "data/big").read_bytes() == layer.files["data/big"]
        assert proxy.bytes_of(layer.digest) > 0
        stats = apulld.stats()
        assert stats["bytes_from_mirrors"] == mirror.bytes_of(layer.digest)
    finally:
        mirror.down()


def test_a_corrupting_mirror_is_passed_over(images, big_offset, registry, proxy, make_apulld,
                                            mounts) -> None:  # fmt: skip
    layer = images["multi"]
    mirror = Proxy(registry.address)
    mirror.state.corrupt[layer.digest] = Corruption(big_offset, times=-1)
    try:
        apulld = make_apulld(registry_mirrors=[f"{proxy.address}=http://{mirror.address}"])
        root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
        assert (root / "data/big").read_bytes() == layer.files["data/big"]
        assert apulld.stats()["verify_failures"] >= 1
        assert proxy.bytes_of(layer.digest) > 0
    finally:
        mirror.down()


def _auth_file(path: Path, host: str, user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return str(path)


def test_token_auth_with_the_auth_file(images, proxy, make_apulld, mounts, tmp_path) -> None:
    layer = images["busybox"]
    proxy.state.credentials = ("alice", "secret")
    auth = _auth_file(tmp_path / "auth.json", proxy.address, "alice", "secret")
    apulld = make_apulld(registry_auth_file=auth)
    root = mounts.erofs(apulld.put(layer, proxy.address), "bb")
    assert (root / "bin/busybox").read_bytes() == layer.files["bin/busybox"]


def test_refused_credentials_are_named_in_the_log(images, proxy, make_apulld, tmp_path) -> None:
    layer = images["busybox"]
    proxy.state.credentials = ("alice", "secret")
    auth = _auth_file(tmp_path / "auth.json", proxy.address, "alice", "wrong")
    apulld = make_apulld(registry_auth_file=auth)
    path = apulld.put(layer, proxy.address)
    with pytest.raises(OSError) as caught, open(path, "rb") as stream:
        stream.read(4096)
    assert caught.value.errno == errno.EIO
    assert f"token for repository:{layer.repo}:pull refused as alice" in apulld.log()
