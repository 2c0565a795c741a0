"""How fast a file reads through apulld's FUSE file (cold: from the registry; warm: from the
chunk cache after a restart) next to a plain HTTP download of the same blob from the same
registry. Prints the figures (pytest -s); asserts only that the bytes are right."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from serving_support import Apulld, Mounts, convert_layer

from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob
from apull_node.daemon.backend import NodePaths, probe_file
from apull_node.image.format import DEFAULT_CHUNK_SIZE

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not probe_file(NodePaths())[0], reason="no file-backed EROFS here"),
]
REPO = "test/speed"
SIZE = 32 << 20


def read_timed(path: Path) -> tuple[float, str]:
    started = time.monotonic()
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return time.monotonic() - started, digest.hexdigest()


def test_cold_and_warm_reads_next_to_a_plain_download(registry, tmp_path) -> None:
    payload = random.Random(3).randbytes(SIZE)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("payload")
        info.size = SIZE
        tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}  # fmt: skip
    layer_blob = Blob(OCI_LAYER_GZIP, gzip.compress(raw, compresslevel=1, mtime=0))
    registry.push_image(REPO, "latest", Blob(OCI_CONFIG, json.dumps(config).encode()),
                        [layer_blob])  # fmt: skip
    layer = convert_layer(registry, REPO, raw, chunk_size=DEFAULT_CHUNK_SIZE)
    want = hashlib.sha256(payload).hexdigest()

    url = f"http://{registry.address}/v2/{REPO}/blobs/{layer.digest}"
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as resp:
        while resp.read(1 << 20):
            pass
    plain = time.monotonic() - started

    apulld, mounts = Apulld(tmp_path), Mounts(tmp_path)
    try:
        apulld.start(fdstore=False)
        root = mounts.erofs(apulld.put(layer, registry.address), "cold")
        cold, got = read_timed(root / "payload")
        assert got == want
        mounts.umount(root)
        assert apulld.stop() == 0
        apulld.start(fdstore=False)
        root = mounts.erofs(str(apulld.mountpoint / layer.blob_id), "warm")
        warm, got = read_timed(root / "payload")
        assert got == want
        assert apulld.stats().get("bytes_fetched", 0) == 0
        again, got = read_timed(root / "payload")
        assert got == want
    finally:
        mounts.close()
        apulld.close()
    mib = SIZE / (1 << 20)
    print(
        f"\n{mib:.0f} MiB file, {layer.size} byte blob, 1 MiB chunks: "
        f"plain HTTP download {layer.size / (1 << 20) / plain:.0f} MiB/s; through apulld: "
        f"cold {mib / cold:.0f} MiB/s, warm (chunk cache) {mib / warm:.0f} MiB/s, "
        f"page cache {mib / again:.0f} MiB/s"
    )
