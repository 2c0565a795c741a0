"""What a Prepare's labels say about an apull layer: its blob, where to fetch it, its id.

containerd's unpacker passes a layer's `containerd.io/snapshot/*` annotations as snapshot
labels (the apull.* ones the converter writes, FORMAT.md), and CRI adds
`containerd.io/snapshot/cri.image-ref` when disable_snapshot_annotations = false. The image
reference tells where the blob lives:

  registry.lab:5000/lab/big:apull          -> registry registry.lab:5000, repo lab/big
  registry.lab:5000/lab/big@sha256:...     -> the same (tag and digest do not matter)
  busybox, docker.io/library/busybox:1     -> registry registry-1.docker.io, repo library/busybox

Docker Hub: CRI normalises names to docker.io/library/...; apulld connects to the registry
it is given as host[:port], so the snapshotter gives it the host of Hub's registry API,
registry-1.docker.io (the same mapping docker and containerd apply).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apull_node.image import format as fmt
from apull_node.image.reference import ImageRefError, parse_reference
from apull_node.snapshotter.errors import FailedPreconditionError, InvalidArgumentError

#: Set by CRI (containerd's image pull with snapshot annotations): the image being pulled.
CRI_IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
#: Set by CRI too: the layer's digest and those of the layers above it, comma-separated.
CRI_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
#: Set by CRI too: the digest of the image manifest the layer belongs to.
CRI_MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
#: Ours, on every remote snapshot: the blob_id apulld knows the layer blob by.
BLOB_ID_LABEL = "containerd.io/snapshot/apull-remote.blob-id"

_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")


def is_apull_layer(labels: Mapping[str, str]) -> bool:
    return fmt.LAYER_FORMAT_VERSION in labels


def blob_id_of(digest: str) -> str:
    """apulld's name for a blob: `sha256-<hex>` (no colon: it goes into mount options)."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ValueError(f"{digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
    return digest.replace(":", "-", 1)


@dataclass(frozen=True)
class RemoteLayer:
    """One apull layer blob as apulld's blob_config wants it."""

    blob_id: str
    registry: str
    repo: str
    digest: str
    size: int
    chunk_table: str
    chunk_table_size: int
    chunk_size: int

    def blob_config(self) -> dict[str, Any]:
        """The PUT blob_config body; fsid = blob_id (each blob its own fscache volume)."""
        return {
            "blob_id": self.blob_id,
            "fsid": self.blob_id,
            "registry": self.registry,
            "repo": self.repo,
            "digest": self.digest,
            "size": self.size,
            "chunk_table": self.chunk_table,
            "chunk_table_size": self.chunk_table_size,
            "chunk_size": self.chunk_size,
        }

    def describe(self) -> str:
        return f"layer {self.digest} of {self.registry}/{self.repo}"


def _text(labels: Mapping[str, str], key: str, what: str) -> str:
    value = labels.get(key, "")
    if not value:
        raise InvalidArgumentError(f"apull layer: label {key} is missing ({what})")
    return value


def _number(labels: Mapping[str, str], key: str, what: str) -> int:
    value = _text(labels, key, what)
    if not value.isdigit() or int(value) <= 0:
        raise InvalidArgumentError(f"apull layer: label {key}={value!r} is not a positive number")
    return int(value)


def _digest(labels: Mapping[str, str], key: str, what: str) -> str:
    value = _text(labels, key, what)
    if not _DIGEST.fullmatch(value):
        raise InvalidArgumentError(f"apull layer: label {key}={value!r} is not a digest")
    return value


def remote_layer(labels: Mapping[str, str], apulld_address: str) -> RemoteLayer:
    """The layer the labels describe; InvalidArgument/FailedPrecondition say what is wrong."""
    version = labels.get(fmt.LAYER_FORMAT_VERSION, "")
    if version != fmt.FORMAT_VERSION:
        raise InvalidArgumentError(
            f"apull layer: format version {version!r} (label {fmt.LAYER_FORMAT_VERSION}); "
            f"this snapshotter reads version {fmt.FORMAT_VERSION}"
        )
    digest = _digest(labels, fmt.LAYER_BLOB_DIGEST, "the layer blob's digest")
    size = _number(labels, fmt.LAYER_BLOB_SIZE, "the layer blob's size")
    table = _digest(labels, fmt.LAYER_CHUNK_TABLE, "the chunk table's digest")
    table_size = _number(labels, fmt.LAYER_CHUNK_TABLE_SIZE, "the chunk table's size")
    chunk_size = _number(labels, fmt.LAYER_CHUNK_SIZE, "the chunk size")
    try:
        fmt.check_chunk_size(chunk_size)
    except ValueError as err:
        raise InvalidArgumentError(f"apull layer: label {fmt.LAYER_CHUNK_SIZE}: {err}") from None
    image = labels.get(CRI_IMAGE_REF_LABEL, "")
    if not image:
        raise FailedPreconditionError(
            f"apull layer {digest} (an EROFS blob, not a tar) can only be mounted lazily, and "
            f"the Prepare has no {CRI_IMAGE_REF_LABEL} label to tell apulld (at "
            f"{apulld_address}) where to fetch it from. Pull the image through CRI (crictl "
            "pull, or kubelet), with disable_snapshot_annotations = false in containerd's CRI "
            "config; `ctr images pull` cannot unpack apull images"
        )
    try:
        ref = parse_reference(image)
    except ImageRefError as err:
        raise InvalidArgumentError(
            f"apull layer {digest}: label {CRI_IMAGE_REF_LABEL}: {err}"
        ) from None
    return RemoteLayer(
        blob_id=blob_id_of(digest),
        registry=ref.endpoint,
        repo=ref.repository,
        digest=digest,
        size=size,
        chunk_table=table,
        chunk_table_size=table_size,
        chunk_size=chunk_size,
    )
