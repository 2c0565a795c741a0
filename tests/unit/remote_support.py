"""Helpers for the remote snapshot tests: the snapshotter's real entry point in a subprocess
wired to a test apulld, and Prepare requests built the way containerd's unpacker builds them
for a converted image pulled through CRI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from serving_support import multi_tar

from apull.image.convert import ConvertOptions, convert
from apull.lab import test_image
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient
from apull_node.image import format as fmt
from apull_node.image.reference import parse_reference
from apull_node.service import mount_syscalls
from apull_node.snapshotter.api import snapshots_pb2 as pb
from apull_node.snapshotter.api import snapshots_pb2_grpc as pb_grpc

SRC = Path(__file__).resolve().parents[2] / "src"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TWO_LAYER_REPO = "test/run"


@dataclass(frozen=True)
class UnpackRequest:
    """One layer's Prepare as containerd's unpacker (with CRI annotations) sends it."""

    key: str
    parent: str
    labels: dict[str, str]
    chain_id: str
    blob_digest: str


def manifest(registry: str, repo: str, tag: str) -> tuple[str, dict]:
    request = urllib.request.Request(
        f"http://{registry}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        body = reply.read()
    return "sha256:" + hashlib.sha256(body).hexdigest(), json.loads(body)


def chain_id(parent_chain: str, diff_id: str) -> str:
    if not parent_chain:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()


_counter = iter(range(1, 1_000_000))


def unpack_requests(
    registry: str, image_ref: str, repo: str, tag: str = "apull", parent_chain: str = ""
) -> list[UnpackRequest]:
    """The Prepares for each layer of `registry/repo:tag` (stacked on `parent_chain`).

    Labels: the layer annotations under containerd.io/snapshot/ (FilterInheritedLabels), the
    target containerd.io/snapshot.ref = chain id, and CRI's four cri.* labels with the image
    reference `image_ref` as CRI passes it (normalised). Keys are namespaced by containerd's
    metadata store ("<ns>/<n>/extract-<unique> <chain id>"); the parent is the backend name
    of the parent's committed snapshot, which for a remote snapshot is its chain id.
    """
    digest, document = manifest(registry, repo, tag)
    layers = document["layers"]
    requests = []
    chain = parent_chain
    for layer in layers:
        notes = layer.get("annotations", {})
        parent, chain = chain, chain_id(chain, notes[fmt.LAYER_DIFF_ID])
        labels = {k: v for k, v in notes.items() if k.startswith("containerd.io/snapshot/")}
        labels.update({
            "containerd.io/snapshot.ref": chain,
            "containerd.io/snapshot/cri.image-ref": image_ref,
            "containerd.io/snapshot/cri.manifest-digest": digest,
            "containerd.io/snapshot/cri.layer-digest": layer["digest"],
            # This layer and the ones above it.
            "containerd.io/snapshot/cri.image-layers": ",".join(
                x["digest"] for x in layers[layers.index(layer) :]
            ),
        })  # fmt: skip
        unique = f"{time.time_ns()}-{next(_counter)}"
        key = f"k8s.io/{next(_counter)}/extract-{unique} {chain}"
        requests.append(UnpackRequest(key, parent, labels, chain, layer["digest"]))
    return requests


class Snapshotter:
    """apull-containerd-grpc (python -m apull_node.snapshotter.main) with a gRPC stub."""

    def __init__(self, base: Path, apulld_address: str) -> None:
        self.base = base
        self.root = base / "root"
        self.address = str(base / "snap.sock")
        self.apulld_address = apulld_address
        self.containerd_address = ""  # "": the default (/run/containerd/containerd.sock)
        self.log = base / "snapshotter.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.SnapshotsStub | None = None

    def start(self, timeout: float = 20) -> float:
        """Start and wait for READY=1; the seconds it took."""
        config = self.base / "config.toml"
        config.write_text(
            '[global]\nlog_level = "debug"\n'
            f"[snapshotter]\napulld_address = {json.dumps(self.apulld_address)}\n"
            + (f"containerd_address = {json.dumps(self.containerd_address)}\n"
               if self.containerd_address else "")
        )  # fmt: skip
        notify_path = self.base / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(timeout)
        started = time.monotonic()
        with notify, open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "apull_node.snapshotter.main", "--config", str(config),
                 "--address", self.address, "--root", str(self.root)],
                env=dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONPATH=str(SRC)),
                stdout=log, stderr=log,
            )  # fmt: skip
            message = notify.recv(4096)
            assert message.startswith(b"READY=1"), self.log.read_text()
        took = time.monotonic() - started
        self.channel = grpc.insecure_channel(f"unix:{self.address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        return took

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # RPCs.

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list:
        assert self.stub is not None
        request = pb.PrepareSnapshotRequest(snapshotter="apull", key=key, parent=parent)
        request.labels.update(labels or {})
        return list(self.stub.Prepare(request).mounts)

    def unpack(self, request: UnpackRequest) -> grpc.RpcError:
        """Prepare one layer as the unpacker does; the error it answers (it must fail)."""
        try:
            self.prepare(request.key, request.parent, request.labels)
        except grpc.RpcError as err:
            return err
        raise AssertionError(f"Prepare of {request.chain_id} returned mounts")

    def stat(self, key: str) -> pb.Info:
        assert self.stub is not None
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter="apull", key=key)).info

    def remove(self, key: str) -> None:
        assert self.stub is not None
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter="apull", key=key))

    def usage(self, key: str) -> pb.UsageResponse:
        assert self.stub is not None
        return self.stub.Usage(pb.UsageRequest(snapshotter="apull", key=key))

    def cleanup(self) -> None:
        assert self.stub is not None
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="apull"))

    def names(self, *filters: str) -> list[str]:
        assert self.stub is not None
        request = pb.ListSnapshotsRequest(snapshotter="apull", filters=list(filters))
        return [i.name for r in self.stub.List(request) for i in r.info]

    def committed(self) -> list[str]:
        assert self.stub is not None
        request = pb.ListSnapshotsRequest(snapshotter="apull")
        return [i.name for r in self.stub.List(request) for i in r.info if i.kind == pb.COMMITTED]

    def erofs_mounts(self) -> dict[str, str]:
        """EROFS mounted under our snapshots: mountpoint -> source."""
        prefix = os.path.realpath(self.root / "snapshots") + "/"
        return {
            e.mountpoint: e.source
            for e in mount_syscalls.read_mountinfo()
            if e.fstype == "erofs" and e.mountpoint.startswith(prefix)
        }


def overlay_options(mounts: list) -> dict[str, str]:
    (mount,) = mounts
    assert mount.type == "overlay", mount
    return dict(o.split("=", 1) for o in mount.options if "=" in o)


def push_two_layer_image(
    registry: RegistryClient, repo: str = TWO_LAYER_REPO
) -> tuple[list[dict], bytes]:
    """busybox, then the multi-file layer (etc/hostname, data/*), converted: its layers'
    descriptors and the text file's content."""
    busybox_tar = gzip.decompress(test_image.build()[1].data)
    tars = [busybox_tar, multi_tar()]
    layers = [Blob(OCI_LAYER_GZIP, gzip.compress(t, compresslevel=1, mtime=0)) for t in tars]
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
    }  # fmt: skip
    registry.push_image(repo, "latest", Blob(OCI_CONFIG, json.dumps(config).encode()), layers)
    result = convert(
        ConvertOptions(
            source=parse_reference(f"{registry.address}/{repo}:latest"),
            target=parse_reference(f"{registry.address}/{repo}:apull"),
            source_insecure=True,
            target_insecure=True,
            chunk_size=64 * 1024,
        )
    )
    return [{"digest": x.layer.digest, "size": x.layer.size} for x in result.layers], tars[1]
