"""apulld's file backend across restarts: cached chunks are reused, the FUSE connection is
handed over through the (stand-in) systemd fd store so mounted EROFS keeps working, reads in
flight when apulld dies are answered by the next one, and without a store the dead mount is
cleaned up and the EROFS mounts that lost their data are named."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import pytest
from serving_support import Apulld, check_tree

from apull_node.daemon import fuse_mount
from apull_node.daemon.backend import NodePaths, probe_file

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]


def fuse_mounted(apulld: Apulld) -> bool:
    return fuse_mount.mount_at(str(apulld.mountpoint)) is not None


def test_restart_reuses_cached_chunks(images, proxy, apulld, mounts) -> None:
    apulld.start(fdstore=False)
    for name, layer in images.items():
        check_tree(mounts.erofs(apulld.put(layer, proxy.address), name), layer)
    for target in list(mounts.active):
        mounts.umount(Path(target))
    assert apulld.stop() == 0
    assert not fuse_mounted(apulld)  # nobody keeps the connection: unmounted on the way out
    proxy.reset()

    apulld.start(fdstore=False)
    for name, layer in images.items():  # the blob configs came back from blobs.json
        check_tree(mounts.erofs(str(apulld.mountpoint / layer.blob_id), name), layer)
        assert proxy.bytes_of(layer.digest) == 0 and proxy.bytes_of(layer.chunk_table) == 0
    stats = apulld.stats()
    assert stats.get("bytes_fetched", 0) == 0 and stats["chunks_from_cache"] > 0
    assert apulld.ping()["serving"]["cache_bytes"] == sum(x.size for x in images.values())


def test_fd_store_keeps_mounts_alive_across_a_restart(images, proxy, apulld, mounts) -> None:
    layer = images["multi"]
    apulld.start()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    assert (root / "etc/hostname").read_bytes() == b"apull\n"
    assert apulld.stored_fd is not None
    assert apulld.stop() == 0
    assert "service manager keeps its FUSE connection" in apulld.log()
    assert fuse_mounted(apulld)

    apulld.start(resume=True)
    serving = apulld.ping()["serving"]
    assert serving["resumed"] and serving["fuse_connected"]
    assert (root / "data/big").read_bytes() == layer.files["data/big"]  # never read before
    check_tree(root, layer)


def test_reads_in_flight_are_answered_after_a_crash(images, proxy, apulld, mounts) -> None:
    layer = images["multi"]
    apulld.start()
    root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
    assert (root / "etc/hostname").read_bytes() == b"apull\n"
    proxy.state.delay = 1.0
    result: dict[str, object] = {}

    def reader() -> None:
        try:
            result["data"] = (root / "data/big").read_bytes()
        except OSError as err:
            result["error"] = err

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert proxy.state.waiting.wait(10)
    assert apulld.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-fetch
    proxy.state.delay = 0.0
    apulld.start(resume=True)
    thread.join(30)
    assert not thread.is_alive(), "the reader is still blocked"
    assert result.get("data") == layer.files["data/big"], result.get("error")


def test_without_a_store_the_dead_mount_is_cleaned_and_orphans_named(images, proxy, apulld,
                                                                     mounts) -> None:  # fmt: skip
    layer = images["multi"]
    apulld.start(fdstore=False)
    path = apulld.put(layer, proxy.address)
    root = mounts.erofs(path, "multi")
    assert (root / "etc/hostname").read_bytes() == b"apull\n"
    apulld.stop(signal.SIGKILL)
    with pytest.raises(OSError) as caught:
        (root / "data/big").read_bytes()
    assert caught.value.errno in (errno.EIO, errno.ENOTCONN)

    apulld.start(fdstore=False)
    assert f"must be remounted: {root} ({path})" in apulld.log()
    mounts.umount(root)
    check_tree(mounts.erofs(path, "again"), layer)


def test_the_cache_stays_under_its_limit(images, proxy, tmp_path, mounts) -> None:
    layer = images["multi"]
    apulld = Apulld(tmp_path, {"cache_size_limit_mb": 1})
    try:
        apulld.start()
        root = mounts.erofs(apulld.put(layer, proxy.address), "multi")
        check_tree(root, layer)
        serving = apulld.ping()["serving"]
        assert 0 < serving["cache_bytes"] <= 1 << 20
        assert serving["stats"]["evicted_chunks"] > 0
        data = next((apulld.cache_dir / "chunks").iterdir()) / "data"
        assert os.stat(data).st_blocks * 512 <= (1 << 20) + (64 << 10)  # holes punched
    finally:
        mounts.close()
        apulld.close()
