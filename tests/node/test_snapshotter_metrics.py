"""The snapshotter's metrics: containerd's Prepare over the real gRPC server, and a remote
layer's mount, each observed once in its histogram with its result; read back from the real
GET /metrics endpoint."""

from __future__ import annotations

import errno
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from apull_node.service.metrics_endpoint import MetricsEndpoint
from apull_node.service.mount_syscalls import MountError
from apull_node.snapshotter import snapshotter_metrics
from apull_node.snapshotter.api import snapshots_pb2 as pb
from apull_node.snapshotter.api import snapshots_pb2_grpc as pb_grpc
from apull_node.snapshotter.apulld_client import ApulldClient
from apull_node.snapshotter.errors import FailedPreconditionError
from apull_node.snapshotter.overlay import OverlaySnapshotter
from apull_node.snapshotter.remote import RemoteSnapshots
from apull_node.snapshotter.remote_layer import RemoteLayer
from apull_node.snapshotter.server import SnapshotterServer

PREPARE = "apull_snapshotter_prepare_duration_seconds"
MOUNT = "apull_snapshotter_mount_duration_seconds"


@pytest.fixture
def scrape() -> Iterator[Any]:
    registry = snapshotter_metrics.REGISTRY
    endpoint = MetricsEndpoint(("127.0.0.1", 0), registry, logging.getLogger("t"))
    endpoint.start()

    def counts() -> dict[str, float]:
        """The _count samples of the snapshotter's histograms, by labels."""
        with urllib.request.urlopen(endpoint.url, timeout=5) as reply:
            text = reply.read().decode()
        found = {}
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.startswith((f"{PREPARE}_count", f"{MOUNT}_count")):
                found[sample] = float(value)
        return found

    yield counts
    endpoint.stop()


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_prepare_is_timed_by_result(tmp_path: Path, scrape) -> None:
    snapshotter = OverlaySnapshotter(tmp_path / "root")
    server = SnapshotterServer(snapshotter, str(tmp_path / "snap.sock"))
    server.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'snap.sock'}")
    stub = pb_grpc.SnapshotsStub(channel)
    before = scrape()
    try:
        assert stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts
        with pytest.raises(grpc.RpcError) as again:
            stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
        with pytest.raises(grpc.RpcError) as orphan:
            stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="missing"))
    finally:
        channel.close()
        server.stop(grace=1)
        snapshotter.close()
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert orphan.value.code() == grpc.StatusCode.NOT_FOUND
    assert moved(before, scrape()) == {
        f'{PREPARE}_count{{result="ok"}}': 1,
        f'{PREPARE}_count{{result="already_exists"}}': 1,
        f'{PREPARE}_count{{result="error"}}': 1,
    }


class _Source:
    """A MountSource stand-in: mount(2) succeeds or fails without touching the system."""

    def __init__(self, backend: str, fail: bool) -> None:
        self.backend = backend
        self.fail = fail

    def mount(self, target: Path) -> None:
        if self.fail:
            raise MountError(errno.ENODEV, f"mount erofs on {target}: No such device")


def test_remote_layer_mounts_are_timed_by_backend_and_result(tmp_path: Path, scrape) -> None:
    remote = RemoteSnapshots(ApulldClient(str(tmp_path / "apulld.sock")))
    layer = RemoteLayer("b-1", "registry.example", "app", "sha256:" + "ab" * 32, 10, "", 0, 0)
    before = scrape()
    try:
        remote._mount(_Source("file", fail=False), tmp_path, layer)  # type: ignore[arg-type]
        with pytest.raises(FailedPreconditionError, match="cannot mount it"):
            remote._mount(_Source("fscache", fail=True), tmp_path, layer)  # type: ignore[arg-type]
    finally:
        remote.close()
    assert moved(before, scrape()) == {
        f'{MOUNT}_count{{backend="file",result="ok"}}': 1,
        f'{MOUNT}_count{{backend="fscache",result="error"}}': 1,
    }
