"""What the benchmark's generated images are made of: reproducible content, tar layers
(gzip with fixed mtimes, so digests are the same on every machine), an OCI config; and the
conversion of a pushed image, done once."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable

from apull.image.convert import ConvertOptions, convert, target_state
from apull.registry.client import OCI_CONFIG, OCI_LAYER_GZIP, Blob, RegistryClient
from apull_node.image.format import DEFAULT_CHUNK_SIZE
from apull_node.image.reference import parse_reference

#: Generated content comes in blocks: half random bytes, half text (gzip halves it, as it
#: does real binaries).
BLOCK = 64 * 1024


def generated_content(seed: str, size: int) -> bytes:
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    text = (f"{seed} " * (BLOCK // 2 // (len(seed) + 1) + 1)).encode()[: BLOCK // 2]
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(BLOCK // 2)
        out += text
    return bytes(out[:size])


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def tar_layer(build: Callable[[tarfile.TarFile], None]) -> tuple[bytes, Blob]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    raw = buf.getvalue()
    return raw, Blob(OCI_LAYER_GZIP, gzip.compress(raw, compresslevel=1, mtime=0))


def diff_id(raw_tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw_tar).hexdigest()


def oci_config(diff_ids: list[str], command: str) -> Blob:
    """An amd64 image config running `command`, PATH=/bin."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": [command]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())


def ensure_converted(
    client: RegistryClient,
    repo: str,
    plain_tag: str,
    apull_tag: str,
    say: Callable[[str], None],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """repo:apull_tag converted from repo:plain_tag, unless it is current already."""
    plain = f"{client.address}/{repo}:{plain_tag}"
    converted = f"{client.address}/{repo}:{apull_tag}"
    options = ConvertOptions(
        source=parse_reference(plain),
        target=parse_reference(converted),
        source_insecure=True,
        target_insecure=True,
        chunk_size=chunk_size,
    )
    state = target_state(options)
    if state.current:
        say(f"{converted} is current: {state.reason}")
        return
    say(f"converting {plain} -> {converted}: {state.reason}")
    convert(options, say)
