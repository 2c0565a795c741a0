"""Warming an image's layers before containerd mounts them (PUT /v1.0/apulld/prefetch).

containerd's CRI unpacker Prepares an image's layers one after the other, and each remote
snapshot's mount waits for its blob's chunk table and first chunk (the EROFS superblock and
root directory). At the first Prepare of an image the snapshotter names the image's
manifest (CRI's `containerd.io/snapshot/cri.manifest-digest` label); apulld fetches it,
checks its digest, and fetches for all apull layers, LAYER_WORKERS at a time, in the
background: the chunk tables and each layer's first chunk (fetched together: tables.soon),
or the whole layer when it is at most `whole_max_bytes` (base layers: the shell and libc
nearly every container start reads; whole_blob.py: one request, no chunk table fetched).
The later Prepares find what their mounts read here.

Nothing is registered (the snapshotter's Prepares still register each blob); this only
fills caches: the verified chunk table store and, with the file backend, the chunk cache.
The fscache backend keeps no chunks of its own (the kernel's cache files do, once a blob is
open), so it warms chunk tables only. Everything fetched is verified like any read's fetch.
Failures are logged and otherwise ignored: reads fetch whatever is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from apull_node.daemon.blob_registry import BlobConfig, BlobConfigError, parse_blob_config
from apull_node.daemon.blob_source import (
    RegistrySource,
    TableError,
    TableStore,
    digest_of,
    location_of,
)
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache
from apull_node.daemon.counters import Counters
from apull_node.daemon.registry_fetch import BlobLocation, FetchError, RangeFetcher
from apull_node.daemon.whole_blob import fetch_whole
from apull_node.image import format as fmt
from apull_node.image.oci import ManifestError, media_type_of, parse_image_manifest

log = logging.getLogger("apulld.warmup")
#: A manifest warmed this recently is not warmed again (each layer's Prepare may ask).
RECENT_SECONDS = 60.0
#: Layers warmed at once.
LAYER_WORKERS = 3


def _number(annotations: dict[str, str], key: str) -> int:
    value = annotations.get(key, "")
    if not value.isdigit():
        raise BlobConfigError(key, f"{value!r} is not a number")
    return int(value)


def apull_layers(raw: bytes, manifest: BlobLocation) -> list[BlobConfig]:
    """Blob configs of the manifest's apull layers (the format version this apulld serves),
    bottom first, as the snapshotter would register them."""
    what = f"manifest {manifest}"
    if digest_of(raw, manifest.digest.partition(":")[0]) != manifest.digest:
        raise ManifestError(f"{what}: the bytes do not match the digest")
    image = parse_image_manifest(raw, media_type_of(raw, "", what), what)
    found = []
    for index, layer in enumerate(image.layers):
        annotations = layer.annotations
        if annotations.get(fmt.LAYER_FORMAT_VERSION) != fmt.FORMAT_VERSION:
            continue
        digest = annotations.get(fmt.LAYER_BLOB_DIGEST, "")
        try:
            config = parse_blob_config({
                "blob_id": digest.replace(":", "-", 1),
                "fsid": digest.replace(":", "-", 1),
                "registry": manifest.registry,
                "repo": manifest.repo,
                "digest": digest,
                "size": _number(annotations, fmt.LAYER_BLOB_SIZE),
                "chunk_table": annotations.get(fmt.LAYER_CHUNK_TABLE, ""),
                "chunk_table_size": _number(annotations, fmt.LAYER_CHUNK_TABLE_SIZE),
                "chunk_size": _number(annotations, fmt.LAYER_CHUNK_SIZE),
            })  # fmt: skip
        except BlobConfigError as err:
            log.warning("manifest %s: layer %d not warmed: %s", manifest, index, err)
            continue
        if not config.chunk_table or not config.chunk_size:
            log.warning("manifest %s: layer %d has no chunk table: not warmed", manifest, index)
            continue
        found.append(config)
    return found


class ImageWarmup:
    """Background warm-ups, one per manifest at a time; see the module's docstring."""

    def __init__(
        self,
        fetcher: RangeFetcher,
        tables: TableStore,
        cache: ChunkCache | None,
        counters: Counters,
        whole_max_bytes: int,
    ) -> None:
        self.fetcher = fetcher
        self.tables = tables
        self.cache = cache if cache is not None and cache.keep else None
        self.counters = counters
        self.whole_max_bytes = whole_max_bytes
        self._lock = threading.Lock()
        self._recent: dict[str, float] = {}
        self._images = ThreadPoolExecutor(2, thread_name_prefix="warm-image")
        self._layers = ThreadPoolExecutor(LAYER_WORKERS, thread_name_prefix="warm-layer")

    def request(self, manifest: BlobLocation, data: bytes | None = None) -> bool:
        """Start warming the image; False when it was warmed (or started) moments ago.
        `data`: the manifest's bytes when the caller has them (checked like fetched ones;
        fetched when they do not match)."""
        now = time.monotonic()
        with self._lock:
            for digest in [d for d, at in self._recent.items() if at + RECENT_SECONDS < now]:
                del self._recent[digest]
            if manifest.digest in self._recent:
                return False
            self._recent[manifest.digest] = now
        try:
            self._images.submit(self._warm_image, manifest, data)
        except RuntimeError:  # shutting down
            return False
        return True

    def _warm_image(self, manifest: BlobLocation, data: bytes | None) -> None:
        started = time.monotonic()
        try:
            layers = self._layers_of(manifest, data)
        except (FetchError, ManifestError) as err:
            log.warning("not warming %s: %s", manifest, err)
            with self._lock:
                self._recent.pop(manifest.digest, None)
            return
        self.counters.add("warmed_images")
        # What every mount reads: tables and first chunks; small layers whole at once (one
        # request instead of two: their first chunk would be fetched again with the rest).
        futures = []
        for config in layers:
            try:
                futures.append(self._layers.submit(self._warm_layer, config))
            except RuntimeError:  # shutting down
                break
        fetched = sum(f.result() for f in futures)
        log.info(
            "warmed %s: %d apull layers (%d whole), %d bytes fetched ahead in %.0f ms",
            manifest, len(layers), sum(map(self._whole, layers)), fetched,
            (time.monotonic() - started) * 1000,
        )  # fmt: skip

    def _layers_of(self, manifest: BlobLocation, data: bytes | None) -> list[BlobConfig]:
        """The manifest's apull layers, from `data` when it is the manifest (one registry
        request less at the head of the pull), else from the registry."""
        if data is not None:
            try:
                return apull_layers(data, manifest)
            except ManifestError as err:
                log.warning("manifest %s as given: %s; fetching it", manifest, err)
        return apull_layers(self.fetcher.fetch_manifest(manifest), manifest)

    def _whole(self, config: BlobConfig) -> bool:
        """Whether the layer is warmed whole (else its first chunk)."""
        return config.size <= self.whole_max_bytes

    def _warm_layer(self, config: BlobConfig) -> int:
        """The chunk table and, with a chunk cache, the first chunk or the whole layer (the
        chunks fetched while the table is: tables.soon; a whole layer's table computed from
        it: whole_blob)."""
        try:
            if self.cache is None:
                self.tables.get(config)
                return 0
            source = RegistrySource(self.fetcher, location_of(config))
            fetched = None
            if self._whole(config):
                fetched = fetch_whole(self.cache, self.tables, config, source)
            if fetched is None:
                spec = BlobSpec(config.digest, config.size, self.tables.soon(config))
                size = config.size if self._whole(config) else spec.table.chunk_size
                fetched = self.cache.warm(spec, source, 0, size)
        except TableError as err:
            log.warning("warming blob %s: %s", config.blob_id, err)
            return 0
        self.counters.add("warmed_bytes", fetched)
        return fetched

    def close(self) -> None:
        self._images.shutdown(wait=False, cancel_futures=True)
        self._layers.shutdown(wait=False, cancel_futures=True)
