"""A tiny real image the lab builds and pushes itself: Debian's static busybox in one layer.

Built byte-for-byte reproducibly (fixed mtimes, owners and gzip header), so pushing it
twice is a no-op. For amd64 the busybox is this machine's (busybox-static); for arm64 the one
in the lab's arm64 root file system. With arm64 nodes in the lab the tag is an index of both,
so one image reference serves a mixed fleet, as a DaemonSet's does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from apull.lab.image import rootfs_path
from apull.registry.client import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    Blob,
    RegistryClient,
    image_manifest,
)

REPO = "lab/busybox"
TAG = "latest"
BUSYBOX = Path("/bin/busybox")


def busybox(arch: str) -> Path:
    """The static busybox of `arch` (Debian's name): this machine's, or the arm64 root's."""
    if arch == "amd64":
        return BUSYBOX
    return rootfs_path(arch=arch) / "bin/busybox"


APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "false", "sha256sum", "head", "wc", "dd")


def _layer_tar(binary: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        data = binary.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        motd = b"apull lab test image\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(motd)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(motd))
    return buf.getvalue()


def build(arch: str = "amd64") -> tuple[Blob, Blob]:
    """Return (config, layer) blobs of the test image for `arch` (Debian's name)."""
    binary = busybox(arch)
    if not binary.exists():
        fix = "apt-get install busybox-static" if arch == "amd64" else "build the arm64 lab image"
        raise FileNotFoundError(f"{binary} is missing: {fix}")
    tar = _layer_tar(binary)
    layer = Blob(OCI_LAYER_GZIP, gzip.compress(tar, compresslevel=6, mtime=0))
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    return config_blob, layer


def push(client: RegistryClient, arches: tuple[str, ...] = ("amd64",)) -> str:
    """Push the test image; return its digest: the manifest's for one architecture, an
    index's (one manifest per architecture, each pushed by digest) for more."""
    if len(arches) == 1:
        config, layer = build(arches[0])
        return client.push_image(REPO, TAG, config, [layer])
    images = []
    for arch in arches:
        config, layer = build(arch)
        client.push_image(REPO, f"{TAG}-{arch}", config, [layer])
        images.append((arch, image_manifest(config, [layer])))
    return client.push_index(REPO, TAG, images)
