"""The benchmark's large image: over 1 GiB of files, of which the entrypoint reads a sliver.

Shaped like a CUDA devel image: a busybox base (the lab's test image layer) and several
"library" layers of large shared-object-like files, then a small app layer whose
entrypoint reads a version file and the first 64 KiB of one library, then prints
`READY_LINE`. The content is generated from fixed seeds (half random bytes, half text per
64 KiB block, so gzip halves it, as it does real binaries); layers are gzip-compressed
tars with fixed mtimes, so the image's digests are the same on every machine and pushing
it twice uploads nothing.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from apull.bench.image_parts import (
    add_dir,
    add_file,
    diff_id,
    generated_content,
    oci_config,
    tar_layer,
)
from apull.lab import test_image
from apull.registry.client import Blob, RegistryClient

#: Bump when the content changes: the tag names it, so an old image is never mistaken.
GENERATION = 1
REPO = "lab/bench-big"
PLAIN_TAG = f"plain-v{GENERATION}"
APULL_TAG = f"apull-v{GENERATION}"
READY_LINE = "apull-bench-ready"

MIB = 1 << 20

#: (layer name, [(path, size)]) for the library layers: 4 x 288 MiB = 1152 MiB of files.
LIBRARY_LAYERS: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = (
    *(
        (f"libs{n}", tuple((f"opt/cuda/lib64/libbench{n}_{i}.so", 48 * MIB) for i in range(6)))
        for n in range(3)
    ),
    (
        "libs3",
        (
            ("opt/cuda/lib64/libbench3_big.so", 256 * MIB),
            ("opt/cuda/lib64/libbench3_0.so", 32 * MIB),
        ),
    ),
)
#: Bytes of files in the library layers (what "1 GiB image" counts).
FILES_BYTES = sum(size for _, files in LIBRARY_LAYERS for _, size in files)
#: The file the read-throughput runs read in full (the entrypoint never touches it).
READ_FILE = "opt/cuda/lib64/libbench3_big.so"
READ_FILE_SIZE = 256 * MIB
#: The entrypoint (the image's Cmd).
START_PATH = "/bench/start.sh"
#: What the entrypoint reads before it prints READY_LINE.
START_SCRIPT = f"""#!/bin/sh
cat /opt/cuda/version.json > /dev/null
head -c 65536 /opt/cuda/lib64/libbench0_0.so > /dev/null
echo {READY_LINE}
"""


@dataclass(frozen=True)
class BigImage:
    config: Blob
    layers: list[Blob]


def _library(files: tuple[tuple[str, int], ...]) -> Callable[[tarfile.TarFile], None]:
    def build(tar: tarfile.TarFile) -> None:
        for directory in ("opt", "opt/cuda", "opt/cuda/lib64"):
            add_dir(tar, directory)
        for path, size in files:
            add_file(tar, path, generated_content(path, size), 0o755)

    return build


def _app(tar: tarfile.TarFile) -> None:
    for directory in ("opt", "opt/cuda", "bench"):
        add_dir(tar, directory)
    version = json.dumps({"cuda": {"name": "apull bench", "version": "12.0.0"}}).encode()
    add_file(tar, "opt/cuda/version.json", version)
    add_file(tar, START_PATH.lstrip("/"), START_SCRIPT.encode(), 0o755)


def build(progress: Callable[[str], None] = lambda _: None) -> BigImage:
    """Generate the image's blobs (about 1.2 GiB of tar, gzip level 1: ~30 s)."""
    _, base = test_image.build()
    base_tar = gzip.decompress(base.data)
    diff_ids = [diff_id(base_tar)]
    layers = [base]
    for name, files in LIBRARY_LAYERS:
        raw, blob = tar_layer(_library(files))
        diff_ids.append(diff_id(raw))
        layers.append(blob)
        progress(f"layer {name}: {len(raw) / MIB:.0f} MiB tar, {len(blob.data) / MIB:.0f} MiB gzip")
    raw, blob = tar_layer(_app)
    diff_ids.append(diff_id(raw))
    layers.append(blob)
    return BigImage(oci_config(diff_ids, START_PATH), layers)


def ensure_pushed(client: RegistryClient, progress: Callable[[str], None]) -> str:
    """Push the plain image unless its tag is there; return the manifest digest."""
    existing = client.manifest_digest(REPO, PLAIN_TAG)
    if existing:
        progress(f"{client.address}/{REPO}:{PLAIN_TAG} is there ({existing[:19]})")
        return existing
    progress(f"building {REPO}:{PLAIN_TAG} (once; about a minute)")
    image = build(progress)
    digest = client.push_image(REPO, PLAIN_TAG, image.config, image.layers)
    progress(f"pushed {client.address}/{REPO}:{PLAIN_TAG} ({digest[:19]})")
    return digest
