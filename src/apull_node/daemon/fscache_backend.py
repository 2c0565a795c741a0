"""The fscache backend: EROFS over cachefiles on-demand. The snapshotter mounts
``mount -t erofs none -o fsid=<blob_id>[,domain_id=<domain>] <dir>``; the kernel asks for
the blob (OPEN: volume key ``erofs,<domain_id or fsid>``, cookie key the blob id) and then
for the ranges it lacks (READ), which apulld fetches, verifies against the chunk table and
writes into the object's cache file (its anonymous fd).

What the kernel's cache file holds it never asks for again (across remounts and apulld
restarts too), so chunks are verified but not kept a second time in apulld's chunk cache
(``ChunkCache(keep=False)``) unless peers are served from it (``keep_limit_bytes``); whole
chunks are written, with the chunks fetched ahead of a sequential reader, so the cache file
fills in chunk-sized pieces.

The cache file is opened O_DIRECT: writes go from a page-aligned buffer (an anonymous mmap)
at 4096-aligned offsets with 4096-multiple lengths (a blob's tail is padded with zeros).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from apull_node.daemon import apulld_metrics as metrics
from apull_node.daemon import fdstore
from apull_node.daemon.blob_registry import BlobConfig, BlobRegistry
from apull_node.daemon.blob_source import RegistrySource, TableError, TableStore, location_of
from apull_node.daemon.cachefiles_device import OnDemandServer, ReadFailedError
from apull_node.daemon.cachefiles_protocol import OpenRequest, ReadRequest
from apull_node.daemon.chunk_cache import BlobSpec, ChunkCache, ChunkUnavailableError, Pieces
from apull_node.daemon.counters import Counters
from apull_node.daemon.http_api import ServingError
from apull_node.daemon.image_prewarm import NotHeldError
from apull_node.daemon.registry_fetch import FetchSettings, RangeFetcher
from apull_node.daemon.startup_reads import StartupReads

log = logging.getLogger("apulld.fscache")
BLOCK = 4096


@dataclass(frozen=True)
class FscacheBackendConfig:
    cache_dir: Path  # cachefiles' directory (bound by `dir`)
    state_dir: Path  # apulld's own files: chunk tables
    fetch: FetchSettings
    threads: int = 4
    #: Keep verified chunks in apulld's own chunk cache too, up to this many bytes (0: not;
    #: the kernel's cache files keep them): what peers are served from.
    keep_limit_bytes: int = 0


def block_span(start: int, length: int) -> tuple[int, int]:
    """The smallest block-aligned [offset, end) holding [start, start + length)."""
    low = start - start % BLOCK
    high = -(-(start + length) // BLOCK) * BLOCK
    return low, high


def write_blocks(fd: int, start: int, data: bytes | bytearray | memoryview) -> int:
    """pwrite `data` at `start` (block-aligned) through a page-aligned buffer, the tail
    padded with zeros to a whole block (O_DIRECT rules). Returns the bytes written."""
    if start % BLOCK:
        raise ValueError(f"offset {start} is not a multiple of {BLOCK}")
    if not data:
        return 0
    low, high = block_span(start, len(data))
    with mmap.mmap(-1, high - low) as buffer:  # page-aligned, zero-filled
        buffer[: len(data)] = data
        view = memoryview(buffer)
        done = 0
        try:
            while done < len(view):
                wrote = os.pwrite(fd, view[done:], low + done)
                if wrote <= 0 or wrote % BLOCK:
                    raise OSError(errno.EIO, f"short write of {wrote} bytes at {low + done}")
                done += wrote
        finally:
            view.release()
    return done


class FscacheBackend:
    """ObjectProvider (cachefiles_device) and Serving (http_api) of the fscache path."""

    def __init__(self, config: FscacheBackendConfig, blobs: BlobRegistry) -> None:
        self.config = config
        self.blobs = blobs
        self.counters = Counters()
        self.fetcher = RangeFetcher(config.fetch, self.counters)
        # keep=False: the kernel's cache file is the cache; the limit only bounds nothing.
        # With peers to serve, verified chunks are kept in apulld's own cache as well.
        keep = config.keep_limit_bytes > 0
        limit = config.keep_limit_bytes if keep else 1 << 62
        self.cache = ChunkCache(
            config.state_dir / "chunks", limit, self.counters, keep=keep, caller_stores=True
        )
        self.tables = TableStore(config.state_dir / "tables", self.fetcher)
        self.startup = StartupReads()
        self._lock = threading.Lock()
        self._objects: dict[int, BlobConfig] = {}
        self._written: dict[str, int] = {}  # blob id -> bytes written to its cache file
        self.server: OnDemandServer | None = None
        self.resumed = False
        self.stored = False

    # -- life cycle -----------------------------------------------------------------------

    def start(self, device_fd: int, resumed: bool, inherited: dict[str, int]) -> None:
        """Serve the bound device; `inherited` are the object fds from the fd store (taken
        back when resumed, else closed and dropped)."""
        keep = fdstore.notify_socket()
        if not keep:
            log.warning(
                "no service manager ($NOTIFY_SOCKET unset): the cachefiles fds are not "
                "stored; mounted images cannot read uncached data once apulld exits"
            )
        self.resumed = resumed
        server = OnDemandServer(
            device_fd, self, workers=max(1, self.config.threads), store_fds=keep
        )
        if resumed:
            dropped = server.adopt(inherited)
            log.info(
                "resuming /dev/cachefiles from the previous apulld: %d open objects taken back%s",
                server.open_objects,
                f", {len(dropped)} dropped ({', '.join(dropped)})" if dropped else "",
            )
            server.restore()
            self.stored = keep
        else:
            for name, fd in inherited.items():
                log.warning("closing inherited fd %s: its device is gone", name)
                with contextlib.suppress(OSError):
                    os.close(fd)
                if keep:
                    fdstore.remove(name)
            self.stored = keep and fdstore.store(device_fd, fdstore.DEVICE_FD_NAME)
            if self.stored:
                log.info("/dev/cachefiles handed to the service manager's fd store")
        self.server = server
        server.start()

    def stop(self) -> None:
        """Finish the READs in hand; the fds stay with the fd store (or die with us)."""
        if self.server is None:
            return
        failed = self.server.stop()
        left = self.open_blobs()
        if self.stored:
            log.info("leaving /dev/cachefiles and %d objects to the service manager's fd store",
                     len(left))  # fmt: skip
        elif left:
            log.error(
                "apulld stops and nobody keeps /dev/cachefiles: %d mounted blobs can no "
                "longer read uncached data and must be remounted: %s",
                len(left), ", ".join(sorted(set(left))),
            )  # fmt: skip
        if failed:
            log.error("%d READs did not finish in time and were failed (EIO)", failed)

    def open_blobs(self) -> list[str]:
        with self._lock:
            return [config.blob_id for config in self._objects.values()]

    # -- the kernel's objects (cachefiles_device.ObjectProvider) --------------------------

    def open(self, request: OpenRequest) -> int:
        self.counters.add("open_requests")
        config = self.blobs.find(request.volume, request.cookie)
        if config is None or not config.chunk_table:
            self.counters.add("open_refused")
            why = "no such blob" if config is None else "it has no chunk_table"
            log.warning("OPEN of %s in volume %s refused (ENOENT): %s",
                        request.cookie, request.volume, why)  # fmt: skip
            return -errno.ENOENT
        with self._lock:
            self._objects[request.object_id] = config
        log.info("object %d: blob %s (%d bytes) in volume %s",
                 request.object_id, config.blob_id, config.size, request.volume)  # fmt: skip
        return config.size

    def adopt(self, object_id: int, name: fdstore.ObjectFdName) -> bool:
        config = next((c for c in self.blobs.all() if name.matches(c.blob_id)), None)
        if config is None or not config.chunk_table:
            log.warning("object %d (%s) from the previous apulld: its blob is gone",
                        object_id, name.blob_id or name.blob_hash)  # fmt: skip
            return False
        with self._lock:
            self._objects[object_id] = config
        return True

    def read(self, request: ReadRequest, anon_fd: int) -> None:
        with self._lock:
            config = self._objects.get(request.object_id)
        if config is None:
            raise KeyError(f"object {request.object_id} is not open")
        self.counters.add("read_requests")
        self.startup.saw(config.digest, request.offset, request.length)
        try:
            table = self.tables.get(config)
            source = RegistrySource(self.fetcher, location_of(config))
            spec = BlobSpec(config.digest, config.size, table)
            start, data = self.cache.read_span(spec, source, request.offset, request.length)
            self.counters.add("bytes_written", write_blocks(anon_fd, start, data))
            metrics.SERVED_FSCACHE_BYTES.inc(len(data))
            with self._lock:
                held = self._written.get(config.blob_id, 0) + len(data)
                self._written[config.blob_id] = min(config.size, held)
        except (TableError, ChunkUnavailableError, OSError) as err:
            self.counters.add("read_errors")
            log.error("read of blob %s bytes %d-%d failed (EIO): %s", config.blob_id,
                      request.offset, request.offset + request.length - 1, err)  # fmt: skip
            raise ReadFailedError(str(err)) from err

    # -- prewarm (image_prewarm.ChunkHolder) ----------------------------------------------

    @contextlib.contextmanager
    def _object_fd(self, config: BlobConfig) -> Iterator[int]:
        """The anonymous fd of an open object of the layer, borrowed; NotHeldError when the
        layer is not mounted (no object: the kernel has no cache file open for it)."""
        with self._lock:
            ids = [oid for oid, c in self._objects.items() if c.digest == config.digest]
        server = self.server
        for object_id in ids if server is not None else []:
            with server.borrow(object_id) as fd:  # type: ignore[union-attr]
                if fd is not None:
                    yield fd
                    return
        raise NotHeldError(
            "not mounted on this node (no open fscache object): pull the image through the "
            "apull snapshotter first"
        )

    def held(self, config: BlobConfig, chunk_size: int) -> list[bool]:
        """Which chunks the kernel's cache file holds (its data extents, SEEK_DATA)."""
        with self._object_fd(config) as fd:
            extents = data_extents(fd, config.size)
        return held_chunks(extents, config.size, chunk_size)

    def fill(self, config: BlobConfig, spec: BlobSpec, source: RegistrySource,
             offset: int, size: int) -> int:  # fmt: skip
        """Fetch and verify the chunks (no read-ahead), then write them into the kernel's
        cache file, as a READ would (the fd is borrowed for the writes only)."""
        pieces: Pieces
        if self.cache.keep:
            # Chunks apulld's own cache holds (kept for peers) are written from there:
            # what is fetched is kept, so nothing is fetched twice.
            first, span = self.cache.read_span(spec, source, offset, size)
            pieces = {first: (first, span)} if span else {}
        else:
            pieces = self.cache.fill(spec, source, offset, size)
        written = 0
        with self._object_fd(config) as fd:
            for index in sorted(pieces):
                at, piece = pieces[index]
                self.counters.add("bytes_written", write_blocks(fd, at, piece))
                written += len(piece)
        with self._lock:
            held = self._written.get(config.blob_id, 0) + written
            self._written[config.blob_id] = min(config.size, held)
        return written

    def close(self, object_id: int) -> None:
        with self._lock:
            config = self._objects.pop(object_id, None)
        if config is not None:
            log.info("object %d (blob %s) closed", object_id, config.blob_id)

    # -- blob config hooks (http_api.Serving) ---------------------------------------------

    def check_put(self, config: BlobConfig) -> None:
        if not config.chunk_table:
            raise ServingError(
                HTTPStatus.BAD_REQUEST,
                "chunk_table: required by the fscache backend (the layer's "
                "containerd.io/snapshot/apull.chunk-table label)",
            )
        with self._lock:
            users = [c for c in self._objects.values() if c.blob_id == config.blob_id]
        if any(_content(old) != _content(config) for old in users):
            raise ServingError(
                HTTPStatus.CONFLICT,
                f"blob {config.blob_id} is mounted (open fscache object) and cannot be "
                "replaced by other content; unmount it first",
            )

    def added(self, config: BlobConfig) -> dict[str, Any]:
        """How to mount the blob: the fsid option is the cookie key (the blob id), the
        volume its domain, else the fsid itself; a blob whose fsid names another blob can
        only be reached as that image's extra device (nothing to say then)."""
        if config.domain_id:
            return {"mount_options": f"fsid={config.blob_id},domain_id={config.domain_id}"}
        if config.fsid == config.blob_id:
            return {"mount_options": f"fsid={config.blob_id}"}
        return {}

    def check_delete(self, blob_id: str) -> None:
        if blob_id in self.open_blobs():
            raise ServingError(
                HTTPStatus.CONFLICT,
                f"blob {blob_id} is in use (open fscache object, mounted) and cannot be "
                "removed; unmount it first",
            )

    def removed(self, blob_id: str) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        server = self.server
        with self._lock:
            objects = {oid: c.blob_id for oid, c in self._objects.items()}
            written = dict(self._written)
        return {
            "backend": "fscache",
            "cache_dir": str(self.config.cache_dir),
            "resumed": self.resumed,
            "fd_stored": self.stored,
            "workers": max(1, self.config.threads),
            "open_objects": len(objects),
            "objects": [{"object_id": k, "blob_id": v} for k, v in sorted(objects.items())],
            "reads_in_flight": server.reads_in_flight if server is not None else 0,
            "stats": self.counters.snapshot(),
            # Bytes of each blob this apulld wrote into the kernel's cache files (the files
            # of open objects are not linked in the cache directory: apull status reads this).
            "written_bytes": written,
        }


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of the data in the file below `size` (SEEK_DATA / SEEK_HOLE)."""
    extents: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after position
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        position = end
    return extents


def held_chunks(extents: list[tuple[int, int]], size: int, chunk: int) -> list[bool]:
    """Which chunks of a blob of `size` lie wholly inside the extents (sorted, not
    overlapping): one pass over both."""
    count = -(-size // chunk)
    held = [False] * count
    index = 0
    for low, high in extents:
        index = max(index, low // chunk)
        while index < count:
            start, end = index * chunk, min(size, (index + 1) * chunk)
            if start >= high:
                break
            held[index] = (low <= start and end <= high) or covered(extents, start, end)
            index += 1
    return held


def covered(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside the extents (sorted, not overlapping)."""
    for low, high in extents:
        if low <= start < high:
            if end <= high:
                return True
            start = high
        elif low > start:
            return False
    return False


def _content(config: BlobConfig) -> tuple[str, int, str]:
    return config.digest, config.size, config.chunk_table
