"""A tiny real image the lab builds and pushes itself: Debian's static busybox in one layer.

Built byte-for-byte reproducibly (fixed mtimes, owners and gzip header), so pushing it
twice is a no-op.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient

REPO = "lab/busybox"
TAG = "latest"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "false", "sha256sum", "head", "wc", "dd")


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        data = BUSYBOX.read_bytes()
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


def build() -> tuple[Blob, Blob]:
    """Return (config, layer) blobs of the test image."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    tar = _layer_tar()
    layer = Blob(OCI_LAYER_GZIP, gzip.compress(tar, compresslevel=6, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    return config_blob, layer


def push(client: RegistryClient) -> str:
    """Push the test image; return its manifest digest."""
    config, layer = build()
    return client.push_image(REPO, TAG, config, [layer])
