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

from apull.image.layer_to_erofs import ErofsBuildError, build_erofs, mkfs_version
from apull.image.layer_unpack import LayerError, unpack_layer
from apull.image.referrers import push_chunk_tables
from apull.image.registry_read import (
    MAX_MANIFEST_SIZE,
    fetch_blob_bytes,
    fetch_blob_to_file,
    resolve_image,
)
from apull.image.registry_write import has_blob, push_blob_bytes, push_blob_file, push_manifest
from apull_node.image import format as fmt
from apull_node.image.chunks import ChunkTable
from apull_node.image.oci import (
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_MANIFEST,
    SOURCE_LAYER_TYPES,
    Descriptor,
    ImageManifest,
    ManifestError,
    canonical_json,
    config_diff_ids,
    media_type_of,
    parse_image_manifest,
    parse_platform,
    sha256_digest,
)
from apull_node.image.reference import ImageRef
from apull_node.image.registry_auth import AuthError, find_credentials
from apull_node.image.registry_session import RegistryError, RegistrySession, error_text

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


@dataclass(frozen=True)
class TargetState:
    """Whether the target already holds what converting the source would push now.

    current: the target's manifest says it was made, in this format, with this host's EROFS
    builder and the requested chunk size, from the source's manifest as it is now, and the
    target has each of its layer blobs and chunk tables. Converting is deterministic, so
    converting again would push the same bytes."""

    current: bool
    reason: str
    source_manifest: str
    target_manifest: str
    layers: int
    source_bytes: int
    target_bytes: int


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
    def __init__(
        self,
        options: ConvertOptions,
        work: Path,
        log: Callable[[str], None],
        push: bool = True,
    ) -> None:
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
            push=push,
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

    def target_state(self) -> TargetState:
        """Read the source and the target; convert nothing."""
        options = self.options
        with _step(self.src_where, "read manifest"):
            manifest, _ = resolve_image(
                self.source, options.source.reference, parse_platform(options.platform)
            )
        if fmt.IMAGE_FORMAT_VERSION in manifest.annotations:
            raise ConvertError(f"{self.src_where}: already an apull image ({manifest.digest})")
        source_bytes = sum(layer.size for layer in manifest.layers)

        def state(current: bool, reason: str, target: str = "", size: int = 0) -> TargetState:
            return TargetState(
                current,
                reason,
                manifest.digest,
                target,
                len(manifest.layers),
                source_bytes,
                size,
            )

        tag = options.target.tag or "latest"
        with _step(self.dst_where, "read manifest"):
            found = _optional_manifest(self.target, tag)
        if found is None:
            return state(False, "the target does not exist")
        raw, digest = found
        try:
            media_type = media_type_of(raw, "", f"target manifest {digest}")
            target = parse_image_manifest(raw, media_type, f"{self.dst_where}@{digest}")
        except ManifestError as exc:
            return state(False, f"the target is not an image manifest ({exc})", digest)
        notes = target.annotations
        target_bytes = sum(layer.size for layer in target.layers)
        built_from = notes.get(fmt.IMAGE_SOURCE_MANIFEST, "")
        version = notes.get(fmt.IMAGE_FORMAT_VERSION)
        builder = mkfs_version()
        chunk = str(options.chunk_size)
        if version is None:
            why = "the target is not an apull image"
        elif version != fmt.FORMAT_VERSION:
            why = f"the target has format {version}, this converter writes {fmt.FORMAT_VERSION}"
        elif built_from != manifest.digest:
            why = (
                f"the target was made from {short(built_from)}, "
                f"the source is now {short(manifest.digest)}"
            )
        elif notes.get(fmt.IMAGE_BUILDER) != builder:
            why = f"the target was built with {notes.get(fmt.IMAGE_BUILDER)!r}, here {builder!r}"
        elif len(target.layers) != len(manifest.layers):
            why = f"the target has {len(target.layers)} layers, the source {len(manifest.layers)}"
        elif any(layer.annotations.get(fmt.LAYER_CHUNK_SIZE) != chunk for layer in target.layers):
            why = f"the target's chunk size is not {chunk}"
        else:
            why = ""
        if why:
            return state(False, why, digest, target_bytes)
        with _step(self.dst_where, "check layer blobs"):
            for number, layer in enumerate(target.layers, 1):
                table = layer.annotations.get(fmt.LAYER_CHUNK_TABLE, "")
                for what, blob in (("blob", layer.digest), ("chunk table", table)):
                    if not blob or not has_blob(self.target, blob):
                        return state(
                            False,
                            f"the target's layer {number} {what} {short(blob)} is missing",
                            digest,
                            target_bytes,
                        )
        return state(
            True,
            f"made from source manifest {short(manifest.digest)} with {builder}, "
            f"chunk size {chunk}",
            digest,
            target_bytes,
        )

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


def _optional_manifest(session: RegistrySession, reference: str) -> tuple[bytes, str] | None:
    """(bytes, digest) of the manifest at `reference`, or None when the registry has none."""
    url = session.repo_url(f"manifests/{reference}")
    with session.request("GET", url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise RegistryError(f"GET {url}: {error_text(resp.status, resp.read(4096))}")
        raw = resp.read(MAX_MANIFEST_SIZE)
    return raw, sha256_digest(raw)


def _check_options(options: ConvertOptions) -> None:
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


def target_state(options: ConvertOptions) -> TargetState:
    """Is options.target already the conversion of options.source? Reads only; no root."""
    _check_options(options)
    return _Converter(options, Path("/nonexistent"), lambda _: None, push=False).target_state()


def convert(options: ConvertOptions, log: Callable[[str], None] = lambda _: None) -> ConvertResult:
    """Convert options.source into options.target; `log` gets one line per step."""
    if os.geteuid() != 0:
        raise ConvertError("converting needs root (owners, device nodes, trusted.* xattrs)")
    _check_options(options)
    try:
        work = Path(tempfile.mkdtemp(prefix="apull-convert-", dir=options.work_dir))
    except OSError as exc:
        raise ConvertError(f"work directory {options.work_dir}: {exc}") from exc
    try:
        return _Converter(options, work, log).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
