"""A small converted image for the lazy-pull tests on the lab: busybox, a few small files and
two big random files, pushed to the lab registry and converted with apull-image-build."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass

from apull.image.convert import ConvertOptions, convert
from apull.lab import layout, test_image
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient
from apull_node.image.reference import parse_reference

REPO = "test/lazy"
BIG = "data/big"
OTHER = "data/other"


@dataclass(frozen=True)
class LazyImage:
    ref: str  # as the nodes name it (registry.lab:5000/...)
    files: dict[str, bytes]
    erofs_bytes: int  # sum of the converted layer blobs

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _data_tar() -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(20261124)
    files = {f"data/small{i}": rng.randbytes(rng.randrange(100, 20000)) for i in range(8)}
    files["data/hello"] = b"hello from a lazily pulled layer\n"
    files[BIG] = rng.randbytes(40 << 20)
    files[OTHER] = rng.randbytes(8 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


def push_and_convert() -> LazyImage:
    client = RegistryClient(layout.host_registry())
    _, base = test_image.build()
    data_tar, files = _data_tar()
    data = Blob(OCI_LAYER_GZIP, gzip.compress(data_tar, compresslevel=1, mtime=0))
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(base.data)).hexdigest(),
        "sha256:" + hashlib.sha256(data_tar).hexdigest(),
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    client.push_image(REPO, "latest", config_blob, [base, data])
    host = layout.host_registry()
    result = convert(
        ConvertOptions(
            source=parse_reference(f"{host}/{REPO}:latest"),
            target=parse_reference(f"{host}/{REPO}:apull"),
            source_insecure=True,
            target_insecure=True,
        )
    )
    return LazyImage(
        ref=f"{layout.guest_registry()}/{REPO}:apull",
        files=files,
        erofs_bytes=sum(layer.layer.size for layer in result.layers),
    )
