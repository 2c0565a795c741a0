"""Convert an image: every layer to an EROFS blob with a chunk table, then a new manifest.

Per layer: download (digest checked), unpack as root (diff ID checked against the config),
mkfs.erofs, hash into a chunk table, upload both blobs unless the target has them. The
manifest keeps the source config, so containerd's diff IDs and chain IDs are the source
image's. The same source image always gives the same target digests (layer_to_erofs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apull.image import format as fmt
from apull.image.chunks import ChunkTable
from apull.image.layer_to_erofs import ErofsBuildError, build_erofs, mkfs_version
from apull.image.layer_unpack import LayerError, unpack_layer
from apull.image.oci import (
    OCI_CONFIG,
    OCI_MANIFEST,
    SOURCE_LAYER_TYPES,
    Descriptor,
    ImageManifest,
    ManifestError,
    canonical_json,
    config_diff_ids,
    parse_platform,
    sha256_digest,
)
from apull.image.reference import ImageRef
from apull.image.referrers import push_chunk_tables
from apull.image.registry_auth import AuthError, find_credentials
from apull.image.registry_read import fetch_blob_bytes, fetch_blob_to_file, resolve_image
from apull.image.registry_session import RegistryError, RegistrySession
from apull.image.registry_write import push_blob_bytes, push_blob_file, push_manifest

_KNOWN_ERRORS = (RegistryError, AuthError, ManifestError, LayerError, ErofsBuildError, OSError)


class ConvertError(RuntimeError):
    """The conversion failed; the message names the image, the layer and the step."""


@dataclass(frozen=True)
class ConvertOptions:
    source: ImageRef
    target: ImageRef
    source_insecure: bool = False
    target_insecure: bool = False
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE
    work_dir: Path | None = None
    platform: str = "linux/amd64"
    auth_file: Path | None = None


@dataclass(frozen=True)
class LayerResult:
    source: Descriptor
    layer: Descriptor
    table: Descriptor
    uploaded: bool
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertResult:
    source_manifest: str
    manifest_digest: str
    manifest: bytes
    chunk_tables_manifest: str
    layers: list[LayerResult]


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


@contextlib.contextmanager
def _step(where: str, what: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Turn the expected failures into a ConvertError that says where and what."""
    start = time.monotonic()
    try:
        yield
    except _KNOWN_ERRORS as exc:
        raise ConvertError(f"{where}: {what}: {exc}") from exc
    if timings is not None:
        timings[what] = time.monotonic() - start


def digest_and_table(path: Path, chunk_size: int) -> tuple[str, int, ChunkTable]:
    """sha256 digest, size and chunk table of a file, in one read."""
    whole = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as stream:
            while chunk := stream.read(chunk_size):
                whole.update(chunk)
                yield chunk

    table = ChunkTable.from_chunks(pieces(), chunk_size)
    return "sha256:" + whole.hexdigest(), table.data_size, table


class _Converter:
    def __init__(self, options: ConvertOptions, work: Path, log: Callable[[str], None]) -> None:
        self.options = options
        self.work = work
        self.log = log
        auth_file = options.auth_file
        src, dst = options.source, options.target
        self.src_where = f"source {src}"
        self.dst_where = f"target {dst}"
        with _step(self.src_where, "credentials"):
            src_credentials = find_credentials(src.registry, auth_file)
        with _step(self.dst_where, "credentials"):
            dst_credentials = find_credentials(dst.registry, auth_file)
        self.source = RegistrySession(
            src.endpoint,
            src.repository,
            insecure=options.source_insecure,
            credentials=src_credentials,
        )
        self.target = RegistrySession(
            dst.endpoint,
            dst.repository,
            insecure=options.target_insecure,
            credentials=dst_credentials,
            push=True,
        )

    def run(self) -> ConvertResult:
        options = self.options
        with _step(self.src_where, "read manifest"):
            manifest, _ = resolve_image(
                self.source, options.source.reference, parse_platform(options.platform)
            )
        if fmt.IMAGE_FORMAT_VERSION in manifest.annotations:
            raise ConvertError(f"{self.src_where}: already an apull image ({manifest.digest})")
        with _step(self.src_where, f"read config {manifest.config.digest}"):
            config = fetch_blob_bytes(self.source, manifest.config)
            diff_ids = config_diff_ids(config, f"config {manifest.config.digest}")
        if len(diff_ids) != len(manifest.layers):
            raise ConvertError(
                f"{self.src_where}: config lists {len(diff_ids)} diff IDs "
                f"for {len(manifest.layers)} layers"
            )
        for number, layer in enumerate(manifest.layers, 1):
            if layer.media_type not in SOURCE_LAYER_TYPES:
                raise ConvertError(
                    f"{self.src_where}: layer {number} ({layer.digest}): media type "
                    f"{layer.media_type!r} is not a layer tar we can convert"
                )
        total = sum(layer.size for layer in manifest.layers)
        self.log(
            f"{self.src_where}: manifest {manifest.digest}, "
            f"{len(manifest.layers)} layers, {human_size(total)}"
        )
        with _step(self.dst_where, f"upload config {manifest.config.digest}"):
            push_blob_bytes(self.target, config)
        results = [
            self._layer(number, len(diff_ids), layer, diff_id)
            for number, (layer, diff_id) in enumerate(
                zip(manifest.layers, diff_ids, strict=True), 1
            )
        ]
        raw = canonical_json(self._manifest(manifest, results))
        tag = options.target.tag or "latest"
        with _step(self.dst_where, "upload manifest"):
            digest, _ = push_manifest(self.target, tag, raw, OCI_MANIFEST)
        referrer = ""
        if results:
            subject = Descriptor(OCI_MANIFEST, digest, len(raw))
            with _step(self.dst_where, "upload chunk-table referrer"):
                referrer = push_chunk_tables(self.target, subject, [r.table for r in results])
        return ConvertResult(manifest.digest, digest, raw, referrer, results)

    def _manifest(self, source: ImageManifest, layers: list[LayerResult]) -> dict[str, object]:
        annotations = {k: v for k, v in source.annotations.items() if not k.startswith("io.apull.")}
        annotations[fmt.IMAGE_FORMAT_VERSION] = fmt.FORMAT_VERSION
        annotations[fmt.IMAGE_SOURCE_MANIFEST] = source.digest
        annotations[fmt.IMAGE_BUILDER] = mkfs_version()
        return {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            # Same bytes as the source config: Docker's config JSON is OCI's.
            "config": Descriptor(OCI_CONFIG, source.config.digest, source.config.size).to_json(),
            "layers": [result.layer.to_json() for result in layers],
            "annotations": annotations,
        }

    def _layer(self, number: int, count: int, source: Descriptor, diff_id: str) -> LayerResult:
        where = f"{self.src_where}: layer {number}/{count} ({source.digest})"
        timings: dict[str, float] = {}
        blob = self.work / f"layer-{number}.blob"
        tree = self.work / f"layer-{number}.tree"
        image = self.work / f"layer-{number}.erofs"
        chunk_size = self.options.chunk_size
        with _step(where, "download", timings):
            fetch_blob_to_file(self.source, source, blob)
        with _step(where, "unpack", timings):
            tree.mkdir()
            stats = unpack_layer(blob, tree)
            blob.unlink()
        if stats.diff_id != diff_id:
            raise ConvertError(
                f"{where}: the uncompressed tar is {stats.diff_id}, the config says {diff_id}"
            )
        with _step(where, "mkfs.erofs", timings):
            build_erofs(tree, image, diff_id=diff_id)
            shutil.rmtree(tree)
        with _step(where, "chunk table", timings):
            digest, size, table = digest_and_table(image, chunk_size)
        table_raw = table.to_bytes()
        table_desc = Descriptor(
            fmt.CHUNK_TABLE_MEDIA_TYPE,
            sha256_digest(table_raw),
            len(table_raw),
            annotations={fmt.LAYER_BLOB_DIGEST: digest},
        )
        where_up = f"{self.dst_where}: layer {number}/{count} ({digest})"
        with _step(where_up, "upload", timings):
            uploaded = push_blob_file(self.target, image, digest, size)
            push_blob_bytes(self.target, table_raw)
            image.unlink()
        annotations = {
            fmt.LAYER_FORMAT_VERSION: fmt.FORMAT_VERSION,
            fmt.LAYER_BLOB_DIGEST: digest,
            fmt.LAYER_BLOB_SIZE: str(size),
            fmt.LAYER_SOURCE_DIGEST: source.digest,
            fmt.LAYER_SOURCE_MEDIA_TYPE: source.media_type,
            fmt.LAYER_DIFF_ID: diff_id,
            fmt.LAYER_UNCOMPRESSED_SIZE: str(stats.tar_size),
            fmt.LAYER_CHUNK_TABLE: table_desc.digest,
            fmt.LAYER_CHUNK_TABLE_SIZE: str(table_desc.size),
            fmt.LAYER_CHUNK_SIZE: str(chunk_size),
            fmt.LAYER_BLOCK_SIZE: str(fmt.BLOCK_SIZE),
        }
        layer = Descriptor(fmt.LAYER_MEDIA_TYPE, digest, size, annotations=annotations)
        spent = ", ".join(f"{step} {seconds:.2f}s" for step, seconds in timings.items())
        self.log(
            f"layer {number}/{count} {short(source.digest)} {human_size(source.size)} -> "
            f"EROFS {short(digest)} {human_size(size)} ({len(table.digests)} chunks, "
            f"{stats.entries} entries, {stats.whiteouts} whiteouts) "
            f"{'uploaded' if uploaded else 'already in target'}; {spent}"
        )
        return LayerResult(source, layer, table_desc, uploaded, timings)


def convert(options: ConvertOptions, log: Callable[[str], None] = lambda _: None) -> ConvertResult:
    """Convert options.source into options.target; `log` gets one line per step."""
    if os.geteuid() != 0:
        raise ConvertError("converting needs root (owners, device nodes, trusted.* xattrs)")
    if options.target.digest:
        raise ConvertError(f"target {options.target}: give a tag, not a digest")
    src, dst = options.source, options.target
    if (src.endpoint, src.repository, src.tag) == (dst.endpoint, dst.repository, dst.tag):
        raise ConvertError(f"target {dst}: the same tag as the source; pick another tag")
    try:
        fmt.check_chunk_size(options.chunk_size)
        mkfs_version()
        parse_platform(options.platform)
    except (ValueError, ErofsBuildError) as exc:
        raise ConvertError(str(exc)) from exc
    try:
        work = Path(tempfile.mkdtemp(prefix="apull-convert-", dir=options.work_dir))
    except OSError as exc:
        raise ConvertError(f"work directory {options.work_dir}: {exc}") from exc
    try:
        return _Converter(options, work, log).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
