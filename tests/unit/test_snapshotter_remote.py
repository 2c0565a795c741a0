"""Remote snapshots: the real snapshotter (its entry point, over gRPC) with a real apulld (file
backend, FUSE) and a real registry, given the Prepares containerd's unpacker sends for a
converted image pulled through CRI. Layers are mounted as EROFS, not downloaded."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from remote_support import (
    TWO_LAYER_REPO,
    Snapshotter,
    overlay_options,
    push_two_layer_image,
    unpack_requests,
)
from serving_support import MULTI_REPO, Apulld, Layer, Proxy

from apull.lab import test_image
from apull.registry.client import RegistryClient
from apull.testing.host_containerd import unmount_all
from apull_node.image import format as fmt
from apull_node.service import mount_syscalls
from apull_node.snapshotter.api import snapshots_pb2 as pb
from apull_node.snapshotter.read_ahead import read_ahead_kb
from apull_node.snapshotter.remote_layer import BLOB_ID_LABEL, blob_id_of

BLOB_LABEL = "containerd.io/snapshot/apull.blob-digest"


class Node:
    """Registry proxy (counts blob bytes), apulld and the snapshotter, in one short dir."""

    def __init__(self, base: Path, registry: RegistryClient) -> None:
        self.base = base
        self.proxy = Proxy(registry.address)
        self.apulld = Apulld(base / "apulld")
        self.apulld.root.mkdir()
        self.apulld.start()
        self.snap = Snapshotter(base / "snap", self.apulld.address)
        self.snap.base.mkdir()
        self.start_took = self.snap.start()

    def image_ref(self, repo: str) -> str:
        """What CRI labels the layers with: the normalised reference, via the proxy."""
        return f"{self.proxy.address}/{repo}:apull"

    def requests(self, repo: str, parent_chain: str = "") -> list:
        return unpack_requests(self.proxy.address, self.image_ref(repo), repo,
                               parent_chain=parent_chain)  # fmt: skip

    def blob_ids(self) -> set[str]:
        status, body = self.apulld.request("GET", "/v1.0/apulld/blob_config")
        assert status == 200, body
        return {b["blob_id"] for b in body["blobs"]}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.snap.stop()
        unmount_all(self.base / "mnt")
        unmount_all(self.snap.root)
        self.apulld.close()
        self.proxy.down()


@pytest.fixture
def node(registry: RegistryClient, images: dict[str, Layer]) -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(prefix="apull-rs-", dir="/tmp"))
    node = Node(base, registry)
    try:
        yield node
    finally:
        node.close()
        leftover = unmount_all(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"still mounted: {leftover}"


def mount_overlay(mounts: list, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (mount,) = mounts
    mount_syscalls.mount(mount.source, str(target), mount.type, 0, ",".join(mount.options))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- Prepare ------------------------------------------------------------------------------------


def test_an_apull_layer_is_mounted_not_downloaded(node: Node, images: dict[str, Layer]):
    layer = images["multi"]
    (request,) = node.requests(MULTI_REPO)
    assert request.labels[BLOB_LABEL] == layer.digest
    started = time.monotonic()
    err = node.snap.unpack(request)
    prepare_ms = (time.monotonic() - started) * 1000
    # ALREADY_EXISTS: containerd's unpacker then finds the target and fetches nothing.
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
    info = node.snap.stat(request.chain_id)
    assert info.kind == 3  # COMMITTED
    assert info.parent == ""
    assert info.labels[BLOB_ID_LABEL] == blob_id_of(layer.digest)
    assert info.labels["containerd.io/snapshot/cri.image-ref"] == node.image_ref(MULTI_REPO)
    # How containerd's metadata store looks the target up after ALREADY_EXISTS.
    query = f'labels."containerd.io/snapshot.ref"=={request.chain_id},parent==""'
    assert node.snap.names(query) == [request.chain_id]
    # The active key is gone (committed under the target's name).
    with pytest.raises(grpc.RpcError):
        node.snap.stat(request.key)
    # The layer is an EROFS mount of apulld's file for the blob.
    (mountpoint, source) = next(iter(node.snap.erofs_mounts().items()))
    assert Path(mountpoint).name == "fs"
    assert source == str(node.apulld.mountpoint / blob_id_of(layer.digest))
    assert blob_id_of(layer.digest) in node.blob_ids()
    # With the default layer_read_ahead_kb (the kernel's would be 128 KiB).
    assert read_ahead_kb(Path(mountpoint)) == 1024
    # Usage is the blob's size (measuring the mount would fetch the whole tree).
    assert node.snap.usage(request.chain_id).size == layer.size
    assert node.proxy.bytes_of(layer.digest) < layer.size // 10
    print(f"\nremote Prepare: {prepare_ms:.0f} ms, start {node.start_took * 1000:.0f} ms")


def test_a_container_on_a_remote_layer_reads_the_image_files_lazily(
    node: Node, images: dict[str, Layer]
):
    layer = images["multi"]
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    (erofs,) = node.snap.erofs_mounts()
    # A container's rootfs, as CRI / ctr run prepare it: active on top of the image's top layer.
    mounts = node.snap.prepare("k8s.io/77/container-1", request.chain_id)
    options = overlay_options(mounts)
    assert options["lowerdir"] == erofs  # the EROFS mount is the lower layer itself
    rootfs = node.base / "mnt" / "rootfs"
    mount_overlay(mounts, rootfs)
    try:
        small = ["etc/hostname", "deep/a/b/c/leaf", "data/text"]
        for name in small:
            assert sha((rootfs / name).read_bytes()) == sha(layer.files[name]), name
        fetched = node.proxy.bytes_of(layer.digest)
        print(f"\nsmall files: fetched {fetched} of {layer.size} blob bytes")
        assert 0 < fetched < layer.size // 4  # only what was read, not the 4 MiB file
        (rootfs / "written").write_bytes(b"upper")  # the container writes its own layer
        assert Path(options["upperdir"], "written").read_bytes() == b"upper"
        for name, data in layer.files.items():
            assert sha((rootfs / name).read_bytes()) == sha(data), name
        assert node.proxy.bytes_of(layer.digest) <= layer.size
    finally:
        mount_syscalls.unmount(str(rootfs))
    node.snap.remove("k8s.io/77/container-1")


def test_layers_stack_and_a_second_image_shares_the_blob(node: Node, images: dict[str, Layer]):
    """busybox's layer, then the multi layer on it (a two-layer image); and the multi layer
    alone (another image): two snapshots of one blob, registered once, forgotten last."""
    (bottom,) = node.requests(test_image.REPO)
    (upper,) = node.requests(MULTI_REPO, parent_chain=bottom.chain_id)
    (alone,) = node.requests(MULTI_REPO)
    for request in (bottom, upper, alone):
        assert node.snap.unpack(request).code() == grpc.StatusCode.ALREADY_EXISTS
    assert node.snap.stat(upper.chain_id).parent == bottom.chain_id
    assert len(node.snap.erofs_mounts()) == 3
    multi_id = blob_id_of(images["multi"].digest)
    assert node.blob_ids() == {blob_id_of(images["busybox"].digest), multi_id}

    mounts = node.snap.prepare("k8s.io/78/container-2", upper.chain_id)
    lowers = overlay_options(mounts)["lowerdir"].split(":")
    assert len(lowers) == 2 and all(p in node.snap.erofs_mounts() for p in lowers)
    rootfs = node.base / "mnt" / "stacked"
    mount_overlay(mounts, rootfs)
    try:
        assert (rootfs / "bin" / "busybox").read_bytes()[:4] == b"\x7fELF"
        assert (rootfs / "etc" / "hostname").read_bytes() == b"apull\n"
    finally:
        mount_syscalls.unmount(str(rootfs))
    node.snap.remove("k8s.io/78/container-2")

    # The same layer again in another namespace: the committed target is simply there.
    again = node.requests(MULTI_REPO)[0]
    assert node.snap.unpack(again).code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(node.snap.erofs_mounts()) == 3

    # One superblock for the blob: the second snapshot's mount is a bind of the first
    # (EROFS over fscache refuses a second mount of one fsid with EBUSY).
    devices = [os.stat(p).st_dev for p in node.snap.erofs_mounts()]
    assert len(devices) == 3 and len(set(devices)) == 2

    node.snap.remove(upper.chain_id)
    assert len(node.snap.erofs_mounts()) == 2
    assert multi_id in node.blob_ids()  # `alone` still uses it
    # the bind outlives the mount it was made from
    [kept] = [Path(p) for p in node.snap.erofs_mounts() if (Path(p) / "etc/hostname").exists()]
    assert (kept / "etc" / "hostname").read_bytes() == b"apull\n"
    node.snap.remove(alone.chain_id)
    node.snap.remove(bottom.chain_id)
    assert node.snap.erofs_mounts() == {}
    assert node.blob_ids() == set()
    assert os.listdir(node.snap.root / "snapshots") == []
    assert f"blob {multi_id} unregistered" in node.snap.log_text()


def test_an_ordinary_layer_still_gets_an_ordinary_snapshot(node: Node):
    labels = {"containerd.io/snapshot.ref": "sha256:" + "ab" * 32}
    (mount,) = node.snap.prepare("k8s.io/1/extract-1 sha256:ab", "", labels)
    assert mount.type == "bind" and Path(mount.source).name == "fs"
    assert node.snap.stat("k8s.io/1/extract-1 sha256:ab").kind == 2  # ACTIVE
    assert node.snap.erofs_mounts() == {}
    assert node.blob_ids() == set()


def test_layers_below_the_top_are_mounted_in_the_background_and_the_top_waits(
    node: Node, registry: RegistryClient
):
    """A lower layer's Prepare commits and answers without waiting for its mount (the next
    layer's Prepare overlaps it); the top layer's waits for the whole chain, so a lower
    layer that cannot be mounted fails the pull there, by name."""
    push_two_layer_image(registry, TWO_LAYER_REPO)
    lower, top = node.requests(TWO_LAYER_REPO)
    assert top.labels["containerd.io/snapshot/cri.image-layers"] == top.blob_digest
    # A chunk table apulld cannot fetch: the lower layer's mount can only fail.
    lower.labels[fmt.LAYER_CHUNK_TABLE] = "sha256:" + "0" * 64
    err = node.snap.unpack(lower)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
    assert node.snap.stat(lower.chain_id).kind == 3  # COMMITTED, its mount not awaited
    err = node.snap.unpack(top)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert f"remote snapshot {lower.chain_id} (an image layer) is not mounted" in err.details()
    # The top layer itself mounted fine: kept; the lower one stays committed, unmounted.
    (source,) = node.snap.erofs_mounts().values()
    assert Path(source).name == blob_id_of(top.blob_digest)
    assert sorted(node.snap.committed()) == sorted([lower.chain_id, top.chain_id])
    assert f"remote snapshot {lower.chain_id} not mounted" in node.snap.log_text()
    # Without the fault, the same two Prepares: both mounted by the time the top answers.
    node.snap.remove(top.chain_id)
    node.snap.remove(lower.chain_id)
    lower, top = node.requests(TWO_LAYER_REPO)
    assert node.snap.unpack(lower).code() == grpc.StatusCode.ALREADY_EXISTS
    assert node.snap.unpack(top).code() == grpc.StatusCode.ALREADY_EXISTS
    assert sorted(Path(s).name for s in node.snap.erofs_mounts().values()) == sorted(
        blob_id_of(r.blob_digest) for r in (lower, top)
    )


# -- failing clearly ----------------------------------------------------------------------------


def test_without_the_cri_image_ref_the_prepare_fails_and_says_why(node: Node):
    (request,) = node.requests(MULTI_REPO)
    del request.labels["containerd.io/snapshot/cri.image-ref"]  # what `ctr images pull` sends
    err = node.snap.unpack(request)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = err.details()
    assert request.labels[BLOB_LABEL] in message
    assert "containerd.io/snapshot/cri.image-ref" in message
    assert node.apulld.address in message
    assert "crictl pull" in message and "ctr images pull" in message
    assert node.snap.names() == []
    assert node.blob_ids() == set()


def test_with_apulld_down_the_prepare_fails_and_leaves_nothing(node: Node):
    (request,) = node.requests(MULTI_REPO)
    node.apulld.stop()
    err = node.snap.unpack(request)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = err.details()
    assert request.labels[BLOB_LABEL] in message
    assert node.apulld.address in message
    assert "systemctl status apulld" in message and "apulld_address" in message
    assert node.snap.names() == []
    assert os.listdir(node.snap.root / "snapshots") == []


def test_when_apulld_refuses_the_blob_the_prepare_fails_with_its_answer(node: Node):
    (request,) = node.requests(MULTI_REPO)
    # A repository name apulld's blob_config refuses (upper case is not a repository).
    request.labels["containerd.io/snapshot/cri.image-ref"] = "127.0.0.1:1/A_/b:apull"
    err = node.snap.unpack(request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "cri.image-ref" in err.details()
    # A chunk table apulld cannot fetch: the mount's first read fails, nothing is left.
    (request,) = node.requests(MULTI_REPO)
    request.labels[fmt.LAYER_CHUNK_TABLE] = "sha256:" + "0" * 64
    err = node.snap.unpack(request)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "cannot mount" in err.details() and request.labels[BLOB_LABEL] in err.details()
    assert node.snap.names() == []
    assert node.snap.erofs_mounts() == {}
    assert node.blob_ids() == set()


# -- restarts, removal, cleanup -----------------------------------------------------------------


def test_a_restart_keeps_the_mounts_and_a_reboot_mounts_them_again(
    node: Node, images: dict[str, Layer]
):
    layer = images["multi"]
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    before = node.snap.erofs_mounts()
    node.snap.stop()
    took = node.snap.start()
    assert node.snap.erofs_mounts() == before  # same mount, not mounted twice
    # A reboot: mounts gone, apulld starts with its blobs file and an empty FUSE directory.
    (fs,) = before
    mount_syscalls.unmount(fs)
    node.snap.stop()
    node.apulld.stop()
    node.apulld.start(fdstore=False)
    took = node.snap.start()
    assert node.snap.erofs_mounts() == before
    assert "mounted again on" in node.snap.log_text()
    assert (Path(fs) / "etc" / "hostname").read_bytes() == b"apull\n"
    assert node.snap.stat(request.chain_id).labels[BLOB_ID_LABEL] == blob_id_of(layer.digest)
    print(f"\nstart with one remount: {took * 1000:.0f} ms")


def test_a_start_with_apulld_down_logs_and_the_next_use_mounts_again(
    node: Node, images: dict[str, Layer]
):
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    (fs,) = node.snap.erofs_mounts()
    node.snap.stop()
    mount_syscalls.unmount(fs)
    node.apulld.stop()
    node.snap.start()  # ready all the same
    assert node.snap.erofs_mounts() == {}
    log = node.snap.log_text()
    assert f"remote snapshot {request.chain_id} not mounted" in log
    assert "1 failed" in log
    # A container on it now is refused (not handed an empty lower layer) ...
    with pytest.raises(grpc.RpcError) as caught:
        node.snap.prepare("k8s.io/80/container-4", request.chain_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"remote snapshot {request.chain_id}" in caught.value.details()
    assert "cannot be mounted again" in caught.value.details()
    assert node.snap.names() == [request.chain_id]
    # ... and once apulld is back, the next use mounts it.
    node.apulld.start(fdstore=False)
    mounts = node.snap.prepare("k8s.io/80/container-4", request.chain_id)
    assert overlay_options(mounts)["lowerdir"] == fs
    assert node.snap.erofs_mounts() == {fs: str(node.apulld.mountpoint / blob_id_of(
        images["multi"].digest))}  # fmt: skip
    assert (Path(fs) / "etc" / "hostname").read_bytes() == b"apull\n"
    # Mounts of an existing container snapshot check its parents the same way.
    mount_syscalls.unmount(fs)
    assert node.snap.erofs_mounts() == {}
    assert node.snap.stub is not None
    again = node.snap.stub.Mounts(
        pb.MountsRequest(snapshotter="apull", key="k8s.io/80/container-4")
    )
    assert overlay_options(list(again.mounts))["lowerdir"] == fs
    assert fs in node.snap.erofs_mounts()
    assert "was not mounted: layer" in node.snap.log_text()
    node.snap.remove("k8s.io/80/container-4")
    node.snap.remove(request.chain_id)  # containerd can still remove it
    assert node.snap.names() == []


def test_remove_of_a_layer_under_a_live_overlay(node: Node, images: dict[str, Layer]):
    """A container's overlay still mounted when its snapshot and the layer go: the layer is
    unmounted (overlayfs keeps its own reference: the container keeps reading) and apulld
    keeps the blob while its file is open; the next start forgets it."""
    layer = images["multi"]
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    mounts = node.snap.prepare("k8s.io/79/container-3", request.chain_id)
    rootfs = node.base / "mnt" / "busy"
    mount_overlay(mounts, rootfs)
    try:
        node.snap.remove("k8s.io/79/container-3")
        node.snap.remove(request.chain_id)
        assert node.snap.erofs_mounts() == {}
        assert os.listdir(node.snap.root / "snapshots") == []
        log = node.snap.log_text()
        assert "unmounted " in log
        assert "apulld keeps blob" in log and "409" in log
        assert (rootfs / "data" / "text").read_bytes() == layer.files["data/text"]
    finally:
        mount_syscalls.unmount(str(rootfs))
    assert blob_id_of(layer.digest) in node.blob_ids()
    node.snap.stop()
    node.snap.start()
    assert node.blob_ids() == set()
    assert f"blob {blob_id_of(layer.digest)} used by no snapshot: unregistered" in (
        node.snap.log_text()
    )


def test_remove_of_a_busy_layer_detaches_it(node: Node, images: dict[str, Layer]):
    """A process holds a file of the layer mount itself open: umount is EBUSY, so detach."""
    layer = images["multi"]
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    (fs,) = node.snap.erofs_mounts()
    with open(Path(fs) / "data" / "text", "rb") as held:
        node.snap.remove(request.chain_id)
        assert node.snap.erofs_mounts() == {}
        assert os.listdir(node.snap.root / "snapshots") == []
        assert f"detached busy mount {fs}" in node.snap.log_text()
        assert held.read() == layer.files["data/text"]


def test_cleanup_unmounts_before_deleting_an_orphan(node: Node, images: dict[str, Layer]):
    """A directory without a record but with a layer mounted in it (a crash mid-Prepare)."""
    path = node.apulld.put(images["multi"], node.proxy.address)
    orphan = node.snap.root / "snapshots" / "999" / "fs"
    orphan.mkdir(parents=True)
    mount_syscalls.mount(path, str(orphan), "erofs", mount_syscalls.MS_RDONLY)
    assert node.snap.erofs_mounts() == {str(orphan): path}
    node.snap.cleanup()
    assert node.snap.erofs_mounts() == {}
    assert os.listdir(node.snap.root / "snapshots") == []
    # Unmounted, not walked: only the superblock and root were read.
    assert node.proxy.bytes_of(images["multi"].digest) < images["multi"].size // 10


def test_a_hung_apulld_delays_the_start_by_seconds_only(node: Node):
    """apulld's socket accepts but nothing answers: the start gives up after one short wait."""
    (request,) = node.requests(MULTI_REPO)
    node.snap.unpack(request)
    (fs,) = node.snap.erofs_mounts()
    node.snap.stop()
    mount_syscalls.unmount(fs)
    node.apulld.stop()
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node.apulld.address)
    hung.bind(node.apulld.address)
    hung.listen(16)  # never accepted, never answered
    try:
        took = node.snap.start()
    finally:
        hung.close()
    assert 4 < took < 15, took
    assert f"remote snapshot {request.chain_id} not mounted" in node.snap.log_text()
    assert "timed out" in node.snap.log_text()
