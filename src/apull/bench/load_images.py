"""The load benchmark's images: five small images, each with its own data, whose entrypoint
prints a first line and then the sha256 of every data file it reads in full.

Each image is the lab's busybox base, a data layer of `FILES` files of `FILE_SIZE` bytes
generated from the image's own seed, and an app layer with the entrypoint. The digests the
entrypoint must print are known here, so a container that read a wrong byte is caught. Layers
are reproducible (fixed content, mtimes and gzip header): pushing twice uploads nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from dataclasses import dataclass

from apull.bench.big_image import MIB
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

GENERATION = 1
REPO = "lab/bench-load"
IMAGES = 5
FILES = 4
FILE_SIZE = 4 * MIB
FIRST_LINE = "apull-load-first"
START_PATH = "/load/start.sh"
START_SCRIPT = f"""#!/bin/sh
echo {FIRST_LINE}
cd /data && sha256sum *
"""


def plain_tag(index: int) -> str:
    return f"img{index}-plain-v{GENERATION}"


def apull_tag(index: int) -> str:
    return f"img{index}-apull-v{GENERATION}"


def file_names(index: int) -> list[str]:
    return [f"img{index}-part{n}.bin" for n in range(FILES)]


def file_data(index: int, name: str) -> bytes:
    return generated_content(f"load-{GENERATION}-{name}", FILE_SIZE)


def expected_digests(index: int) -> dict[str, str]:
    """What the entrypoint of image `index` must print: file name -> sha256."""
    return {n: hashlib.sha256(file_data(index, n)).hexdigest() for n in file_names(index)}


@dataclass(frozen=True)
class LoadImage:
    config: Blob
    layers: list[Blob]


def build(index: int) -> LoadImage:
    _, base = test_image.build()
    diff_ids = [diff_id(gzip.decompress(base.data))]
    layers = [base]

    def data(tar: tarfile.TarFile) -> None:
        add_dir(tar, "data")
        for name in file_names(index):
            add_file(tar, f"data/{name}", file_data(index, name))

    def app(tar: tarfile.TarFile) -> None:
        add_dir(tar, "load")
        add_file(tar, START_PATH.lstrip("/"), START_SCRIPT.encode(), 0o755)

    for build_layer in (data, app):
        raw, blob = tar_layer(build_layer)
        diff_ids.append(diff_id(raw))
        layers.append(blob)
    return LoadImage(oci_config(diff_ids, START_PATH), layers)


def ensure_pushed(client: RegistryClient, index: int) -> str:
    """Push image `index` unless its tag is there; return the manifest digest."""
    existing = client.manifest_digest(REPO, plain_tag(index))
    if existing:
        return existing
    image = build(index)
    return client.push_image(REPO, plain_tag(index), image.config, image.layers)


def data_bytes() -> int:
    """Bytes of data files in one image (what its entrypoint reads in full)."""
    return FILES * FILE_SIZE
