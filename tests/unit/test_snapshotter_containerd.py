"""The snapshotter under the real containerd 1.6 on this host: pull, unpack, run, remove.

One snapshotter process (the real entry point) and one private containerd serve the whole
module; both, every shim and every mount under their temporary directory go at the end.
Images come from a registry v2 server of the module's own (conftest: docker-registry with the
lab's busybox test image pushed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import grpc
import pytest

from apull.testing.host_containerd import HostContainerd, containerd_binary, unmount_all
from apull_node.snapshotter.api import snapshots_pb2 as pb
from apull_node.snapshotter.api import snapshots_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(
    containerd_binary() is None,
    reason="containerd is not installed (make deps installs it); these tests drive the real "
    "containerd through the snapshotter",
)

LAYERED = "apull.test/layered:latest"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class Stack:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "snapshotter"
        self.address = str(base / "apull.sock")
        self.log = base / "snapshotter.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.containerd = HostContainerd(base / "containerd", self.address)

    def start_snapshotter(self) -> None:
        (self.base / "config.toml").write_text('[global]\nlog_level = "debug"\n')
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.base / "notify.sock"))
        notify.settimeout(20)
        with notify, open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "apull_node.snapshotter.main", "--config",
                 str(self.base / "config.toml"), "--address", self.address,
                 "--root", str(self.root)],
                env=dict(os.environ, NOTIFY_SOCKET=str(self.base / "notify.sock")),
                stdout=log,
                stderr=log,
            )  # fmt: skip
            assert notify.recv(4096).startswith(b"READY=1"), self.log.read_text()

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            unmount_all(self.base)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, check=check)

    def snapshots(self) -> dict[str, tuple[str, str]]:
        """`ctr snapshots ls` through our snapshotter: key -> (parent, kind)."""
        out = self.ctr("snapshots", "--snapshotter", "apull", "ls").stdout.splitlines()
        assert out[0].split() == ["KEY", "PARENT", "KIND"]
        rows = {}
        for line in out[1:]:
            fields = line.split()
            key, kind = fields[0], fields[-1]
            rows[key] = (fields[1] if len(fields) == 3 else "", kind)
        return rows

    def run(self, image: str, name: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.ctr(
            "run", "--rm", "--snapshotter", "apull",
            "--runc-root", str(self.base / "runc"), "--fifo-dir", str(self.base / "fifo"),
            image, name, *command,
        )  # fmt: skip

    def our_names(self) -> dict[str, int]:
        """Our own metadata, straight over gRPC: name -> kind."""
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            return {i.name: i.kind for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info}


@pytest.fixture(scope="module")
def stack():
    base = Path(tempfile.mkdtemp(prefix="apull-ctd-", dir="/tmp"))
    stack = Stack(base)
    try:
        stack.start_snapshotter()
        stack.containerd.start()
        yield stack
    finally:
        stack.stop()
        leftover = [p for p in unmount_all(base)]
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"still mounted after teardown: {leftover}"


@pytest.fixture(scope="module")
def busybox(stack, busybox_ref):
    """Pull the lab's busybox through the snapshotter; its single layer's chain id."""
    stack.ctr("images", "pull", "--plain-http", "--snapshotter", "apull", busybox_ref)
    committed = [k for k, (_, kind) in stack.snapshots().items() if kind == "Committed"]
    assert len(committed) == 1, stack.snapshots()
    return committed[0]


def test_containerd_loads_the_proxy_plugin(stack):
    plugins = stack.ctr("plugins", "ls").stdout
    assert re.search(r"^io\.containerd\.snapshotter\.v1\s+apull\s+\S+\s+ok\s*$", plugins, re.M)


def test_pull_unpacks_through_our_prepare_and_commit(stack, busybox):
    assert busybox.startswith("sha256:")
    assert stack.snapshots()[busybox] == ("", "Committed")
    # containerd's names are namespaced: "<ns>/<n>/<chain id>".
    ours = {name: kind for name, kind in stack.our_names().items() if name.endswith(busybox)}
    assert list(ours.values()) == [pb.COMMITTED]
    log = stack.log.read_text()
    assert re.search(r"Prepare .*key: \"default/\d+/extract-", log)
    assert re.search(r"Commit .*name: \"default/\d+/" + busybox, log)
    (binary,) = stack.root.glob("snapshots/*/fs/bin/busybox")
    assert binary.read_bytes()[:4] == b"\x7fELF"


def test_ctr_run_prints_hi(stack, busybox, busybox_ref):
    assert stack.run(busybox_ref, "apull-hi", "echo", "hi").stdout == "hi\n"
    # --rm removed the container's active snapshot again.
    assert list(stack.snapshots()) == [busybox]


def test_a_prepared_snapshot_mounts_with_the_image_files(stack, busybox):
    stack.ctr("snapshots", "--snapshotter", "apull", "prepare", "apull-mount-test", busybox)
    try:
        assert stack.snapshots()["apull-mount-test"] == (busybox, "Active")
        target = stack.base / "mnt"
        target.mkdir()
        out = stack.ctr(
            "snapshots", "--snapshotter", "apull", "mounts", str(target), "apull-mount-test"
        ).stdout
        assert out.startswith("mount -t overlay overlay "), out
        subprocess.run(out, shell=True, check=True)
        try:
            assert (target / "bin" / "busybox").read_bytes()[:4] == b"\x7fELF"
            (target / "written").write_text("hello")
            upper = re.search(r"upperdir=([^,\s]+)", out).group(1)
            assert Path(upper, "written").read_text() == "hello"
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        stack.ctr("snapshots", "--snapshotter", "apull", "rm", "apull-mount-test")
    assert "apull-mount-test" not in stack.snapshots()


# -- a two-layer image, built here and imported, to unpack onto an overlay


def _tar(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info, data = entry if isinstance(entry, tuple) else (entry, b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
           link: str = ""):  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
    return (info, data) if data else info


def _oci_archive(path: Path, layers: list[bytes]) -> list[str]:
    """An OCI image-layout tar of uncompressed layers, ref "latest"; returns the diff ids."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = blob(
        json.dumps({
            "architecture": ARCH, "os": "linux", "config": {"Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }).encode(),
        "application/vnd.oci.image.config.v1+json",
    )  # fmt: skip
    manifest = blob(
        json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [blob(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers],
        }).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )  # fmt: skip
    manifest["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode(),
    }
    files.update({f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()})
    path.write_bytes(_tar([_entry(name, data=data) for name, data in files.items()]))
    return diff_ids


@pytest.fixture(scope="module")
def layered(stack, busybox):
    """Import a two-layer image (busybox, then a file and a whiteout); its chain ids."""
    (binary,) = stack.root.glob("snapshots/*/fs/bin/busybox")
    lower = _tar([
        _entry("bin", tarfile.DIRTYPE, mode=0o755),
        _entry("bin/busybox", data=binary.read_bytes(), mode=0o755),
        _entry("etc", tarfile.DIRTYPE, mode=0o755),
        _entry("etc/a.txt", data=b"from the lower layer\n"),
        _entry("etc/gone.txt", data=b"deleted by the upper layer\n"),
    ])  # fmt: skip
    upper = _tar([
        _entry("etc", tarfile.DIRTYPE, mode=0o755),
        _entry("etc/b.txt", data=b"from the upper layer\n"),
        _entry("etc/.wh.gone.txt"),
    ])  # fmt: skip
    archive = stack.base / "layered.tar"
    diff_ids = _oci_archive(archive, [lower, upper])
    stack.ctr("images", "import", "--snapshotter", "apull", "--base-name", LAYERED.split(":")[0],
              str(archive))  # fmt: skip
    assert LAYERED in stack.ctr("images", "ls", "-q").stdout.split()
    chain = [diff_ids[0]]
    top = "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    return [*chain, top]


def test_a_layered_image_unpacks_onto_an_overlay_and_runs(stack, layered):
    bottom, top = layered
    snapshots = stack.snapshots()
    assert snapshots[bottom] == ("", "Committed")
    assert snapshots[top] == (bottom, "Committed")
    # containerd applied the upper layer into our upperdir: the whiteout is overlayfs's own.
    (whiteout,) = [
        p for p in stack.root.glob("snapshots/*/fs/etc/gone.txt") if stat.S_ISCHR(p.lstat().st_mode)
    ]
    assert os.major(whiteout.lstat().st_rdev) == os.minor(whiteout.lstat().st_rdev) == 0
    out = stack.run(
        LAYERED, "apull-layered", "/bin/busybox", "sh", "-c",
        "/bin/busybox cat /etc/a.txt /etc/b.txt; /bin/busybox ls /etc",
    ).stdout  # fmt: skip
    assert out.splitlines() == ["from the lower layer", "from the upper layer", "a.txt", "b.txt"]


def test_removing_an_image_removes_its_snapshots_and_directories(stack, busybox, layered):
    assert len(os.listdir(stack.root / "snapshots")) >= 3
    stack.ctr("images", "rm", "--sync", LAYERED)
    # containerd's garbage collector removed both layers (and the snapshots of removed
    # containers, which it collects lazily) through Remove.
    assert list(stack.snapshots()) == [busybox]
    (name,) = stack.our_names()
    assert name.endswith(busybox)
    (left,) = os.listdir(stack.root / "snapshots")
    assert (stack.root / "snapshots" / left / "fs" / "bin" / "busybox").is_file()
    assert re.search(r"Remove .*key: \"default/\d+/" + layered[1], stack.log.read_text())
