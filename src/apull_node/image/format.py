"""The apull image format in one place: media types, annotation keys, fixed sizes.

FORMAT.md (next to this file) explains each of them. Layer annotation keys start with
``containerd.io/snapshot/`` on purpose: containerd's unpacker hands exactly those layer
annotations to the snapshotter as snapshot labels (``snapshots.FilterInheritedLabels``);
any other key never reaches it.
"""

from __future__ import annotations

#: Version of the format described in FORMAT.md; bumped on incompatible changes.
FORMAT_VERSION = "2"

# Media types.
#: A layer blob: an uncompressed EROFS filesystem image (block size BLOCK_SIZE). containerd
#: treats a manifest entry as a layer (unpacks it, passing its annotations to the
#: snapshotter) only under the `application/vnd.oci.image.layer.` prefix; any other type is
#: fetched whole as a plain child blob and never reaches the snapshotter's remote path.
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.apull.erofs.v1"
#: A chunk digest table blob (binary layout in chunks.py and FORMAT.md).
CHUNK_TABLE_MEDIA_TYPE = "application/vnd.apull.chunk-table.v1"
#: artifactType of the referrer manifest that lists an image's chunk tables.
CHUNK_TABLES_ARTIFACT_TYPE = "application/vnd.apull.chunk-tables.v1"

# Manifest annotations (the image as a whole; read by tools, not by containerd).
#: Present on every converted manifest: the format version. Marks the image as apull's.
IMAGE_FORMAT_VERSION = "io.apull_node.image.format-version"
#: Digest of the source manifest (the platform manifest, not the index) it was made from.
IMAGE_SOURCE_MANIFEST = "io.apull.image.source-manifest"
#: The EROFS builder, e.g. "mkfs.erofs 1.5": digests are reproducible for one builder.
IMAGE_BUILDER = "io.apull.image.builder"

# Layer annotations (inherited by containerd as snapshot labels).
_LAYER = "containerd.io/snapshot/apull."
#: The format version; its presence marks the layer as an apull EROFS layer.
LAYER_FORMAT_VERSION = _LAYER + "format-version"
#: Digest of this layer's own blob (the snapshotter sees labels, not the descriptor).
LAYER_BLOB_DIGEST = _LAYER + "blob-digest"
#: Size of this layer's blob in bytes (the fscache object size).
LAYER_BLOB_SIZE = _LAYER + "blob-size"
#: Digest of the source layer blob (compressed, as in the source manifest).
LAYER_SOURCE_DIGEST = _LAYER + "source-digest"
#: Media type of the source layer blob.
LAYER_SOURCE_MEDIA_TYPE = _LAYER + "source-media-type"
#: The source layer's diff ID (sha256 of its uncompressed tar), as in the image config.
LAYER_DIFF_ID = _LAYER + "diff-id"
#: Size in bytes of the source layer's uncompressed tar.
LAYER_UNCOMPRESSED_SIZE = _LAYER + "uncompressed-size"
#: Digest of the layer's chunk digest table blob (same repository).
LAYER_CHUNK_TABLE = _LAYER + "chunk-table"
#: Size in bytes of the chunk digest table blob.
LAYER_CHUNK_TABLE_SIZE = _LAYER + "chunk-table-size"
#: Chunk size of the table, in bytes (decimal).
LAYER_CHUNK_SIZE = _LAYER + "chunk-size"
#: EROFS block size in bytes: the node's page size must equal it for fscache mounts.
LAYER_BLOCK_SIZE = _LAYER + "block-size"

# Sizes.
#: EROFS block size. erofs-utils 1.5 fixes it to the build host's page size (4096 on
#: x86_64); newer erofs-utils take -b. Converted layers always use 4096.
BLOCK_SIZE = 4096
#: A chunk is the unit apulld fetches and verifies: smaller chunks fetch less for a
#: container's first reads (make bench: 256 KiB served half the bytes of 1 MiB, and
#: mounted faster), larger ones mean fewer table entries (32 bytes per chunk).
DEFAULT_CHUNK_SIZE = 256 << 10
MIN_CHUNK_SIZE = BLOCK_SIZE
MAX_CHUNK_SIZE = 1 << 30


def check_chunk_size(size: int) -> int:
    """Return `size` if it is a power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]."""
    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise ValueError(
            f"chunk size {size}: must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )
    return size
